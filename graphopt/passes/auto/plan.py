"""A joint plan: what every lossy family does to one graph, as data. It names the layers, groups and blocks by
their IR names (stable for the same model and pipeline), is written and read as JSON (never pickled), and
given back to compile() as `optimize=` it rebuilds the same model without searching."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...artifacts import write_bytes_atomically
from ...errors import InputError

FORMAT = "graphopt-plan/1"
MAP_FORMS = ("linear map", "low-rank map")     # a block's branch replaced by a full-rank or a low-rank fitted map


@dataclass
class Plan:
    quantize: dict[str, str] = field(default_factory=dict)   # layer node → "int8" | "int8-dynamic" | "int4"
    prune: dict[str, int] = field(default_factory=dict)      # dependency group key → units removed
    drop: dict[str, str] = field(default_factory=dict)       # residual add node → the skip input it returns instead
    # residual add node → "linear map" | "low-rank map": the block's branch replaced by a map fitted (least
    # squares, passes/skip/maps.py) on the fitting calibration batches when the plan is applied
    replace: dict[str, str] = field(default_factory=dict)
    metric: str = "cosine"
    budget: float | None = None
    measured: dict = field(default_factory=dict)   # loss (held-out), ms, dense_ms, where it was timed
    layers: list[dict] = field(default_factory=list)     # per layer, for people: what each family did to it
    search: dict = field(default_factory=dict)     # every plan evaluated, the families' own best, why it stopped

    @property
    def empty(self) -> bool:
        return not (self.quantize or self.prune or self.drop or self.replace)

    def summary(self) -> str:
        parts = [f"{len(self.quantize)} layers quantized" + (f" ({_counts(self.quantize)})" if self.quantize else ""),
                 f"{len(self.prune)} groups pruned", f"{len(self.drop)} blocks dropped"]
        if self.replace:
            parts.append(f"{len(self.replace)} blocks replaced by maps")
        return ", ".join(parts)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1, default=float)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically."""
        return write_bytes_atomically(path, "plan", self.to_json().encode())

    @classmethod
    def load(cls, source: str | Path) -> "Plan":
        """A plan from its JSON file (or text); an InputError naming what is wrong with it."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            try:
                text = Path(source).read_text()
            except OSError as e:
                raise InputError(f"cannot read the plan {str(source)!r}: {e.strerror or e}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"the plan is not JSON ({e}); give a file written by cm.plan.save(path)") from e
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise InputError(f"the plan is not a {FORMAT} file; give a file written by cm.plan.save(path)")
        known = set(cls.__dataclass_fields__)
        if set(data) - known:
            raise InputError(f"the plan has unknown fields {sorted(set(data) - known)}")
        plan = cls(**data)
        if not (isinstance(plan.quantize, dict) and isinstance(plan.prune, dict) and isinstance(plan.drop, dict)
                and isinstance(plan.replace, dict) and all(v in MAP_FORMS for v in plan.replace.values())
                and all(isinstance(v, int) and v > 0 for v in plan.prune.values())
                and all(v in ("int8", "int8-dynamic", "int4") for v in plan.quantize.values())):
            raise InputError("the plan's quantize/prune/drop/replace entries are malformed; give a file written by "
                             "cm.plan.save(path)")
        return plan


def _counts(quantize: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for v in quantize.values():
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
