"""Targets: where the compiled model runs. A target names a device and an ISA; backends map it
to their own terms (ORT execution providers, TVM target dicts)."""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from functools import cache

from .errors import InputError


@dataclass(frozen=True)
class Target:
    name: str                 # "cpu" | "cuda" | "arm64"
    device: str               # torch device the compiled model takes its inputs on
    arch: str                 # "x86_64" | "aarch64"
    features: frozenset[str] = field(default_factory=frozenset)  # ISA extensions (avx512f, amx_tile, ...)

    def __str__(self) -> str:
        return self.name


@cache
def host_cpu_features() -> frozenset[str]:
    """ISA flags of this machine, read once from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())


def _known() -> dict[str, Target]:
    return {
        "cpu": Target("cpu", "cpu", host_arch(), host_cpu_features()),
        "cuda": Target("cuda", "cuda", host_arch()),
        "arm64": Target("arm64", "cpu", "aarch64"),
    }


TARGET_NAMES = ("cpu", "cuda", "arm64")


def get_target(target: str | Target) -> Target:
    """Resolve a target name; an unknown one is an InputError listing the known ones."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, str) or target not in TARGET_NAMES:
        raise InputError(f"unknown target {target!r}; choose one of: {', '.join(TARGET_NAMES)}")
    return _known()[target]
