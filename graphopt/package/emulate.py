"""Run a bundle where it is meant to run and compare its outputs with the ones saved at export
(`graphopt verify-artifact DIR`): natively when the bundle's arch is this machine's, else an arm64 bundle under
qemu-user in a Debian arm64 root.

The root is made once and cached (default: `graphopt/arm64-root-…` in the user's cache directory, keyed by the
onnxruntime and TVM versions it holds): `debootstrap --foreign` fetches Debian's arm64 python3 and its libraries
(unpacked with dpkg-deb; nothing arm64 runs to install them), then pip installs the aarch64 wheels of numpy,
onnxruntime and apache-tvm — the versions this machine has — into it from PyPI. The emulated CPU is pinned to a
core a real board has (Cortex-A72, a Raspberry Pi 4's): qemu's default emulates every feature and would hide an
illegal instruction. qemu-user 7.2 passes this machine's x86 /proc/cpuinfo through, on which onnxruntime's
cpuinfo finds no ARM core and crashes at import; the root carries a Cortex-A72's /proc/cpuinfo, which qemu's -L
prefix serves instead."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..numerics import sqnr_db
from ..targets import host_arch
from ..errors import InputError, UnsupportedError, VerificationError
from .bundle import checked_file, read_manifest

SUITE, PYTHON = "bookworm", "3.11"           # Debian 12's python3 is 3.11
MIRROR = os.environ.get("GRAPHOPT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CPU = "cortex-a72"
TOOLS = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap", "dpkg-deb": "dpkg"}
FP32_TOLERANCE = 1e-4       # max |board − here| relative to max |here|, for bundles no lossy pass changed
LOSSY_MARGIN_DB = 1.0       # lossy bundles: the board's SQNR to the model's outputs may be this much below ours


@dataclass
class Check:
    backend: str
    output: str
    ok: bool
    line: str


def verify_artifact(directory: str | Path, root: str | Path | None = None, cpu: str = CPU,
                    backends: tuple[str, ...] | None = None) -> list[Check]:
    """Run the bundle in `directory` with each runtime it holds (or `backends`) where it is meant to run, and
    compare with its saved outputs. Raises VerificationError listing every mismatch; returns the checks."""
    directory, manifest = read_manifest(directory)
    if manifest.get("format_version", 1) < 2:
        raise InputError(f"{directory}: exported before bundles held reference outputs; export it again")
    if manifest["exits"]:
        raise InputError(f"{directory}: a bundle with early exits runs with graphopt.load(), not run.py")
    held = (("ort",) if manifest["segments"] else ()) + (("tvm",) if manifest.get("library") else ())
    for b in backends or ():
        if b not in held:
            raise InputError(f"backend {b!r}: the bundle holds {', '.join(held)}")
    checked_file(directory, manifest["runner"])
    here = _arrays(checked_file(directory, manifest["reference"]["outputs"]))
    model = _arrays(checked_file(directory, manifest["reference"]["model_outputs"]))
    lossy = [p["name"] for p in manifest.get("passes", []) if p["phase"] == "lossy"]
    reference = manifest["reference"]["outputs"].get("ran_on", "the reference")
    python = _python(manifest["arch"], root, cpu)
    checks = []
    with tempfile.TemporaryDirectory(prefix="graphopt-verify-") as tmp:
        for backend in backends or held:
            out = Path(tmp) / f"{backend}.npz"
            run = subprocess.run(python.command + [str(directory / "run.py"), "--backend", backend, "--outputs",
                                                   str(out)], env=python.env, capture_output=True, text=True,
                                 timeout=1800)
            if run.returncode != 0:
                tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
                checks.append(Check(backend, "-", False, f"{backend} on {python.where}: run.py failed "
                                                           f"(exit {run.returncode}): {' | '.join(tail)}"))
                continue
            board = _arrays(out.read_bytes())
            for name in here:
                checks.append(_compare(backend, python.where, name, board.get(name), here[name], model[name], lossy,
                                       reference))
    bad = [c.line for c in checks if not c.ok]
    if bad:
        raise VerificationError(f"{directory}: the bundle's run differs from the reference:\n  " + "\n  ".join(bad))
    return checks


def _compare(backend, where, name, board, here, model, lossy, reference) -> Check:
    """The board's output against the reference: within FP32_TOLERANCE, or after a lossy pass as accurate
    against the float model's outputs as the reference is (within LOSSY_MARGIN_DB)."""
    head = f"{backend} on {where}, {name}"
    if board is None or board.shape != here.shape:
        got = "missing" if board is None else f"shape {list(board.shape)}"
        return Check(backend, name, False, f"{head}: {got}, expected {list(here.shape)}")
    if not np.issubdtype(here.dtype, np.floating):
        same = np.array_equal(board, here)
        return Check(backend, name, same, f"{head}: {'equal' if same else 'differs'} (integer output)")
    err = float(np.abs(board.astype(np.float64) - here).max() / max(float(np.abs(here).max()), 1e-30))
    vs_here = _sqnr(here, board)
    if not lossy:
        ok = err <= FP32_TOLERANCE
        return Check(backend, name, ok, f"{head}: max error {err:.2e} of the output scale (limit {FP32_TOLERANCE:g}),"
                                        f" SQNR {vs_here:.1f} dB to the reference ({reference})")
    ours, theirs = _sqnr(model, here), _sqnr(model, board)
    ok = theirs >= ours - LOSSY_MARGIN_DB
    return Check(backend, name, ok, f"{head}: SQNR to the float model {theirs:.1f} dB (the reference "
                                    f"{ours:.1f} dB; {', '.join(lossy)} ran), {vs_here:.1f} dB to the reference "
                                    f"({reference})")


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return sqnr_db(torch.from_numpy(ref), torch.from_numpy(out))


def _arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@dataclass
class Python:
    command: list[str]
    env: dict
    where: str


def _python(arch: str, root, cpu: str) -> Python:
    """How to start a Python that runs `arch` code: this one, or the arm64 root's under qemu."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    host = host_arch()
    if arch == host:
        return Python([sys.executable], env, f"this machine ({host})")
    if arch != "aarch64":
        raise UnsupportedError(f"a bundle for {arch} runs on {arch}: this machine is {host} and emulates aarch64 only")
    root = arm64_root(root)
    env.update(QEMU_CPU=cpu, PYTHONPATH=str(root / "opt/graphopt-site"), PYTHONNOUSERSITE="1")
    return Python([_tool("qemu-aarch64-static"), "-L", str(root), str(root / f"usr/bin/python{PYTHON}")], env,
                  f"emulated aarch64 ({cpu})")


def arm64_root(root: str | Path | None = None) -> Path:
    """A Debian arm64 root with python3, numpy, onnxruntime and TVM for running bundles under qemu: `root` if
    given (made there when missing), else one in the user's cache directory. Made once; reused after."""
    versions = _wheels()
    if root is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        tag = "-".join(v.split("==")[1] for v in versions if not v.startswith("numpy"))
        root = cache / "graphopt" / f"arm64-root-{SUITE}-{tag}"
    root = Path(root)
    ready = root / ".graphopt-root.json"
    if ready.is_file():
        made = json.loads(ready.read_text())
        if made.get("wheels") != versions:
            raise InputError(f"{root} holds {', '.join(made.get('wheels', []))}, this machine has "
                             f"{', '.join(versions)}; give another root (or remove that one)")
        return root
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root} exists and is not a graphopt arm64 root; give an empty or new folder")
    for tool in TOOLS:
        _tool(tool)
    if os.geteuid() != 0:
        raise UnsupportedError("making the arm64 root needs root privileges (debootstrap creates device nodes): "
                               "run once as root, or give --root a root made before")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3", SUITE, str(partial),
          MIRROR], "debootstrap")
    for deb in sorted((partial / "var/cache/apt/archives").glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(partial)], f"unpacking {deb.name}")
    _fake_cpuinfo(partial)
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(partial / "opt/graphopt-site"),
          "--platform", "manylinux_2_28_aarch64", "--only-binary=:all:", "--implementation", "cp",
          "--python-version", PYTHON, *versions], "pip install of the aarch64 wheels")
    (partial / ready.name).write_text(json.dumps({"suite": SUITE, "wheels": versions, "mirror": MIRROR}))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


def _wheels() -> list[str]:
    """The runtimes the root gets: this machine's versions (the .ort format and the TVM library follow them)."""
    import importlib.metadata as md
    names = ["onnxruntime"]
    try:
        md.version("apache-tvm")
        names += ["apache-tvm", "apache-tvm-ffi"]
    except md.PackageNotFoundError:
        pass
    return [f"{n}=={md.version(n)}" for n in names] + ["numpy"]


def _fake_cpuinfo(root: Path) -> None:
    cores = os.cpu_count() or 1
    core = ("processor\t: {}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
            "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/cpuinfo").write_text("\n".join(core.format(i) for i in range(cores)))
    cpus = root / "sys/devices/system/cpu"
    cpus.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpus / name).write_text(f"0-{cores - 1}\n")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UnsupportedError(f"running an arm64 bundle here needs {name} (Debian: apt-get install {TOOLS[name]})")
    return path


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise UnsupportedError(f"making the arm64 root: {what} failed (exit {done.returncode}): {tail}")
