"""The one way graphopt opens an ONNX Runtime session: the compiled model's, the cost model's probes, the
benchmarks' ORT peers and the bundle's ORT-format writer all come through `ort_session`.

By default the intra-op workers spin between a run's ops, where it pays, and stop when the run returns
(ORT's `session.force_spinning_stop`). ORT's own default leaves them busy-waiting after each call, holding
the cores: PyTorch code a user runs right after `cm(x)` ran many times slower for ~0.1 s (eager torch.fft
0.5 → 8 ms), and graphopt's own host programs (early-exit segments, ORT segments around TVM kernels) slowed
each other. Never spinning instead costs the model itself: MobileNetV2 ×1.149, ResNet-50 ×1.054, BERT-base
×1.020 of ORT's default, where stopping after the run measured ×0.987, ×1.006, ×0.999
(benchmarks/bench_sessions.py).
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from .codegen.external import WeightedModel


SPINNING = ("during runs", "never", "always")   # "always": ORT's default, workers spin on after a run


def ort_session(model: bytes | str | Path | WeightedModel, providers=("CPUExecutionProvider",), *,
                optimize: bool = True,
                disabled: tuple[str, ...] | list[str] = (), spinning: str = "during runs",
                save_optimized: Path | str | None = None, save_format: str | None = None,
                profile_prefix: str | None = None, threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on `providers`. `optimize=False` runs the graph as written; `disabled` names ORT
    optimizers to leave out; `save_optimized` writes ORT's optimized model there (format "ORT", or ONNX with its
    weights of 1 KB or more in a .data file beside it); `profile_prefix` turns ORT's profiler on (its JSON file
    starts so); `threads` sets the intra-op workers (ORT's default: one per core). A compiled model comes as a
    WeightedModel (its bytes, and its external initializers' arrays, which ORT copies in at session creation:
    codegen/external.py), a file as its path (a model past 2 GB with its data file beside it)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if spinning not in SPINNING:
        raise ValueError(f"spinning={spinning!r}: one of {SPINNING}")
    if spinning == "never":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    elif spinning == "during runs":   # workers spin between a run's ops, and stop when the run returns
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
    if save_optimized is not None:
        options.optimized_model_filepath = str(save_optimized)
        if save_format != "ORT":     # an ONNX file holds 2 GB at most: its weights of 1 KB or more go beside it
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             Path(save_optimized).name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if save_format is not None:
        options.add_session_config_entry("session.save_model_format", save_format)
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    if isinstance(model, WeightedModel):
        names = list(model.weights)
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(model.weights[n]) for n in names])
        model = model.proto
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=list(providers), disabled_optimizers=list(disabled))


def spins(session: ort.InferenceSession) -> bool:
    """Whether a session's intra-op workers go on busy-waiting after a run returns (ORT's default)."""
    entry = session.get_session_options().get_session_config_entry

    def config(key: str) -> str | None:
        try:
            return entry(key)
        except Exception:   # not set: ORT's default
            return None
    return config("session.intra_op.allow_spinning") != "0" and config("session.force_spinning_stop") != "1"
