"""The house rules, checked: passes never import a backend or a code generator (what they measure
they ask the cost model), every pass belongs to a family and declares a phase, and an added pass
goes to the end of its phase."""
import ast
from pathlib import Path

import graphopt
from graphopt.passes import PHASES, available, family, place, resolve
from graphopt.passes.quant.quantize import Quantize

PASSES = Path(graphopt.__file__).parent / "passes"
FORBIDDEN = ("graphopt.backends", "graphopt.codegen")


def _imports(text: str, package: str) -> list[str]:
    """Absolute module names a file of `package` imports (relative imports resolved)."""
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module) if p)
            out += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return out


def _package(path: Path) -> str:
    return ".".join(path.relative_to(PASSES.parent.parent).with_suffix("").parts[:-1])


def test_passes_import_no_backend_or_codegen():
    offenders = {f"{p.relative_to(PASSES)}: {m}" for p in PASSES.rglob("*.py")
                 for m in _imports(p.read_text(), _package(p)) if m.startswith(FORBIDDEN)}
    assert not offenders, offenders


def test_the_import_check_sees_relative_imports():
    names = _imports("from ...backends.ort import OrtBackend\nfrom ..base import Pass\n", "graphopt.passes.fusion")
    assert "graphopt.backends.ort" in names and "graphopt.passes.base" in names
    assert any(m.startswith(FORBIDDEN) for m in names)


def test_every_pass_has_a_family_and_phase():
    for name, cls in available().items():
        assert family(cls) in {"cleanup", "fusion", "quant", "fft", "sparsity", "skip", "auto"}, name
        assert cls.phase in PHASES, name


def test_an_added_pass_goes_to_the_end_of_its_phase():
    cpu = graphopt.get_target("cpu")
    pipeline = place(resolve("default", cpu), Quantize("int8-dynamic"))
    names = [p.name for p in pipeline]
    assert names.index("quantize") == names.index("shrink_inert") + 1 == names.index("fuse_epilogues") - 1
    assert [p.name for p in place(resolve(["dce"], cpu), Quantize())] == ["quantize", "dce"]
