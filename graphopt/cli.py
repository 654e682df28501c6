"""`graphopt compile MODEL`, `graphopt passes`, `graphopt report DIR` and `graphopt verify-artifact DIR`.

MODEL is `path/to/file.py` (calls its `build()`), `path/to/file.py:factory`, or `package.module:factory`.
The factory takes no arguments and returns `(model, example_inputs)`."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import GraphoptError, InputError


def load_factory(spec: str):
    """Resolve a MODEL spec to its factory function."""
    where, _, name = spec.partition(":")
    name = name or "build"
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise InputError(f"model file {where!r} not found")
        mod_spec = importlib.util.spec_from_file_location(f"graphopt_model_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise InputError(f"model file {where!r} failed to load: {_one_line(e)}") from e
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise InputError(f"cannot import model module {where!r}: {_one_line(e)}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise InputError(f"{where} has no function {name}() returning (model, example_inputs)")
    return factory


def call_factory(spec: str):
    """What the factory named by `spec` returns; its own exception becomes an InputError naming it."""
    factory = load_factory(spec)
    try:
        return factory()
    except GraphoptError:
        raise
    except Exception as e:
        raise InputError(f"{spec}: {factory.__name__}() raised {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"


def _compile(ns: argparse.Namespace) -> int:
    from . import compile
    from .artifacts import checked_path
    if ns.onnx:                   # where the artifacts go is checked before any work
        checked_path(ns.onnx, "--onnx")
    if ns.export and Path(ns.export).exists() and not Path(ns.export).is_dir():
        raise InputError(f"--export {ns.export!r} exists and is not a directory")
    built = call_factory(ns.model)
    if not (isinstance(built, tuple) and len(built) == 2):
        raise InputError(f"{ns.model} must return (model, example_inputs), got {type(built).__name__}")
    model, example = built
    passes = ns.passes.split(",") if ns.passes else "default"
    calibration = call_factory(ns.calibration) if ns.calibration else None
    cm = compile(model, example, target=ns.target, backend=ns.backend, passes=passes, dump_dir=ns.dump_dir,
                 verify=ns.verify, tolerance=ns.tolerance, dynamic_shapes="batch" if ns.dynamic_batch else None,
                 quantize=ns.quantize, calibration=calibration, accuracy_budget=ns.accuracy_budget,
                 precision=ns.precision, progress=ns.progress)
    for rec in cm.report:
        drift = f"drift {rec.drift.rel:.2e}" if rec.drift else ""
        print(f"{rec.index:>2} {rec.name:<16} {rec.rewrites:>4} rewrites  {rec.nodes_before:>5} → {rec.nodes_after:<5} ops"
              f"  {rec.time_s * 1e3:7.0f} ms  {drift}")
    if ns.onnx:
        print(f"wrote {cm.export_onnx(ns.onnx)}")
    if ns.export:
        print(f"wrote {cm.export(ns.export)}")
    if ns.dump_dir:
        print(f"dumps: {Path(ns.dump_dir) / 'report.html'}")
    return 0


def _passes(ns: argparse.Namespace) -> int:
    from .passes import DEFAULT_PIPELINES, available, default_pipeline, family
    from .targets import get_target
    by_family: dict[str, list] = {}
    for name, cls in available().items():
        by_family.setdefault(family(cls), []).append(cls)
    for fam, classes in by_family.items():
        print(f"{fam}:")
        for cls in classes:
            print(f"  {cls.name:<16} {cls.phase:<13} {cls.summary}")
    print()
    for target in DEFAULT_PIPELINES:
        print(f"default pipeline for {target}: {' → '.join(default_pipeline(get_target(target)))}")
    return 0


def _report(ns: argparse.Namespace) -> int:
    from .report import render
    folder = Path(ns.directory)
    if not folder.is_dir():
        raise InputError(f"{ns.directory!r} is not a folder; give a dump_dir a compile wrote")
    path = render(folder)
    print(f"wrote {path}")
    if ns.open:
        import webbrowser
        webbrowser.open(path.resolve().as_uri())
    return 0


def _verify_artifact(ns: argparse.Namespace) -> int:
    from .errors import VerificationError
    from .package import verify_artifact
    try:
        checks = verify_artifact(ns.directory, root=ns.root, cpu=ns.cpu,
                                 backends=tuple(ns.backends.split(",")) if ns.backends else None)
    except VerificationError as e:
        print(f"graphopt: verify-artifact: {e}", file=sys.stderr)
        return 1
    for c in checks:
        print(f"ok  {c.line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphopt", description="compiler-style graph optimizer for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model; write dumps and an ONNX artifact")
    c.add_argument("model", help="file.py (calls build()), file.py:factory or package.module:factory")
    c.add_argument("--target", default="cpu")
    c.add_argument("--backend", help="ort | tvm | auto (default: the target's: auto on cpu and arm64, ort on cuda)")
    c.add_argument("--passes", help="comma-separated pass names (default: the target's pipeline)")
    c.add_argument("--dump-dir", help="write per-pass dumps and report.html here")
    c.add_argument("--onnx", help="write the optimized model as ONNX to this path")
    c.add_argument("--export", help="write the bundle a user ships (ONNX, .ort, TVM library, run.py, manifest) here")
    c.add_argument("--verify", action="store_true", help="fail at the first pass whose drift exceeds --tolerance")
    c.add_argument("--tolerance", type=float, default=1e-4)
    c.add_argument("--dynamic-batch", action="store_true", help="accept any batch size (dim 0 of every input)")
    c.add_argument("--quantize", help="int8 | int8-dynamic | int4-weight | auto")
    c.add_argument("--calibration", help="file.py:function (or package.module:function) returning a list of batches")
    c.add_argument("--accuracy-budget", type=float, help="with --quantize auto: allowed mean (1 - cosine) output error")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress line on stderr (default: when stderr is a terminal)")
    c.add_argument("--precision", default="fp32", help="fp32 | fp16 (with --backend tvm: half-precision convs and "
                                                       "matmuls, fp32 accumulation)")
    c.set_defaults(func=_compile)
    p = sub.add_parser("passes", help="list the passes and the default pipelines")
    p.set_defaults(func=_passes)
    r = sub.add_parser("report", help="render a dump folder's report.html again from its report.json")
    r.add_argument("directory")
    r.add_argument("--open", action="store_true", help="open it in the default browser")
    r.set_defaults(func=_report)
    v = sub.add_parser("verify-artifact", help="run an exported bundle where it runs (arm64: under qemu) and compare "
                                               "its outputs with the ones saved at export")
    v.add_argument("directory")
    v.add_argument("--root", help="the Debian arm64 root to emulate in (made there if missing; default: in the "
                                  "user's cache directory)")
    v.add_argument("--cpu", default="cortex-a72", help="the emulated CPU (qemu -cpu); default cortex-a72")
    v.add_argument("--backends", help="comma-separated: ort,tvm (default: every runtime the bundle holds)")
    v.set_defaults(func=_verify_artifact)
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except GraphoptError as e:
        print(f"graphopt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
