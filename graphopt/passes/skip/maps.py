"""Replacement maps for skipped blocks (LLM-Streamline): instead of removing a residual block's branch f(x),
replace it with a cheap map g(x) fitted by least squares on the calibration activations, so y = x + g(x).

The map acts where the block's features live — per token on the last dimension (transformers, plus a term from the
mean over the sequence: attention mixes tokens, a per-token map alone cannot), per position on the channel
dimension (NCHW convolutions: a 1×1 conv) — and is full rank (d × d) or low rank (d → r → d, a
reduced-rank regression: the full fit projected on the top-r principal directions of its own fitted outputs,
which keeps the most output variance a rank-r map can). Fitted in float64 on centred data with a small ridge,
so a block whose branch is near-linear in x costs almost nothing to skip."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ...ir import Graph
from ..calibration import observe
from .blocks import Block

aten = torch.ops.aten
CONV_OPS = {"aten.conv1d", "aten.conv2d", "aten.convolution", "graphopt.conv_act", "graphopt.fft_conv2d"}
RIDGE = 1e-3          # relative to the mean input variance: keeps the fit stable on few calibration tokens


@dataclass
class BlockMap:
    """g(x) = x·A + b along `dim` of x, A either `weight` (d_in × d_out) or `down` · `up` (rank r)."""
    dim: int                          # the feature dimension of x: -1 (tokens) or 1 (channels, NCHW)
    bias: torch.Tensor                # (d_out,)
    weight: torch.Tensor | None = None
    down: torch.Tensor | None = None  # (d_in × r)
    up: torch.Tensor | None = None    # (r × d_out)
    seq: torch.Tensor | None = None   # (d_in × d_out): + mean over dim 1 (the tokens) of x, times seq

    @property
    def form(self) -> str:
        return "linear map" if self.weight is not None else f"rank-{self.down.shape[1]} map"

    @property
    def kind(self) -> str:
        """The form without its rank ("linear map" | "low-rank map"): what a joint plan names."""
        return "linear map" if self.weight is not None else "low-rank map"

    @property
    def macs_per_position(self) -> int:
        if self.weight is not None:
            return self.weight.numel()
        return self.down.numel() + self.up.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) in torch, for measuring a candidate on the calibration batches."""
        h = x.movedim(self.dim, -1).to(self.bias.dtype)
        out = h @ self.weight if self.weight is not None else (h @ self.down) @ self.up
        if self.seq is not None:
            out = out + h.mean(1, keepdim=True) @ self.seq
        return (out + self.bias).movedim(-1, self.dim).to(x.dtype)

    def emit(self, graph: Graph, x: fx.Node, before: fx.Node, name: str) -> fx.Node:
        """Insert nodes computing g(x) before `before`: aten.linear on the last dimension, or a 1×1 conv on
        channels (the ops every backend already lowers)."""
        mats = [self.weight] if self.weight is not None else [self.down, self.up]
        spatial = len(x.meta["val"].shape) - 2
        h = x
        for i, m in enumerate(mats):
            w = m.t().contiguous().float()                         # (out, in), as linear and conv take it
            if self.dim != -1:
                w = w.reshape(*w.shape, *[1] * spatial)
            w = graph.add_constant(w, f"{name}_map{i}", before=before)
            b = graph.add_constant(self.bias.float(), f"{name}_map_bias", before=before) \
                if i == len(mats) - 1 else None
            op = aten.linear.default if self.dim == -1 else aten.conv2d.default if spatial == 2 else aten.conv1d.default
            h = graph.call(op, (h, w, b), before=before)
        if self.seq is not None:
            mean = graph.call(aten.mean.dim, (x, [1], True), before=before)
            w = graph.add_constant(self.seq.t().contiguous().float(), f"{name}_map_seq", before=before)
            h = graph.call(aten.add.Tensor, (h, graph.call(aten.linear.default, (mean, w), before=before)),
                           before=before)
        return h


def feature_dim(block: Block) -> int | None:
    """Where the block's features are: channels (dim 1) for a conv block on NCHW/NCL tensors, else the last
    dimension; None where neither fits (a scalar stream)."""
    val = block.skip.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    convs = any(str(n.target).removesuffix(".default").replace("::", ".").startswith(tuple(CONV_OPS))
                for n in block.region if n.op == "call_function")
    return 1 if convs and val.dim() in (3, 4) else -1


def fit_maps(graph: Graph, batches, blocks: list[Block], ranks: dict[int, tuple[int, ...]] | None = None
             ) -> dict[int, list[BlockMap]]:
    """Per block (by index): the full-rank map and a low-rank one per rank in `ranks[index]` (default: d/8,
    in multiples of 8), fitted on `batches` from the block's input to its branch's output, in one pass."""
    dims = {b.index: feature_dim(b) for b in blocks}
    usable = [b for b in blocks if dims[b.index] is not None and _same_features(b)]
    by_add = {b.add: b for b in usable}
    tokens = {b.index: dims[b.index] == -1 and b.skip.meta["val"].dim() == 3 for b in usable}
    stats: dict[int, list] = {}

    def on_node(node, args, out):
        b = by_add.get(node)
        if b is None:
            return
        x = b.bypass(*args)
        y = out - x                                            # the branch: y = x + f(x)
        if tokens[b.index]:                                    # features: [x, mean of x over the tokens]
            x = torch.cat([x, x.mean(1, keepdim=True).expand_as(x)], -1)
        x = x.movedim(dims[b.index], -1).reshape(-1, x.shape[dims[b.index]]).double()
        y = y.movedim(dims[b.index], -1).reshape(-1, y.shape[dims[b.index]]).double()
        s = stats.setdefault(b.index, [0, 0, 0, 0, 0])
        s[0] += len(x)
        s[1] = s[1] + x.sum(0)
        s[2] = s[2] + y.sum(0)
        s[3] = s[3] + x.T @ x
        s[4] = s[4] + x.T @ y
    observe(graph, batches, on_node=on_node)

    maps = {}
    for b in usable:
        if b.index not in stats:
            continue
        n, sx, sy, xx, xy = stats[b.index]
        mx, my = sx / n, sy / n
        cxx = xx / n - torch.outer(mx, mx)                     # centred covariances
        cxy = xy / n - torch.outer(mx, my)
        ridge = RIDGE * cxx.diagonal().mean().clamp_min(1e-12)
        sol = torch.linalg.solve(cxx + ridge * torch.eye(len(mx), dtype=cxx.dtype), cxy)
        d = len(my)
        a, seq = (sol[:d], sol[d:]) if tokens[b.index] else (sol, None)
        bias = my - mx @ sol
        found = [BlockMap(dims[b.index], bias, weight=a, seq=seq)]
        # reduced rank: the fitted outputs' covariance Aᵀ Cxx A, its top-r eigenvectors V; A_r = A V Vᵀ
        _, vecs = torch.linalg.eigh(a.T @ cxx[:d, :d] @ a)
        for r in (ranks or {}).get(b.index, (max(8, d // 8 // 8 * 8),)):
            if 2 * r >= d:
                continue
            v = vecs[:, -r:]
            down, up = a @ v, v.T
            low = torch.cat([down @ up, seq]) if seq is not None else down @ up
            found.append(BlockMap(dims[b.index], my - mx @ low, down=down, up=up, seq=seq))
        maps[b.index] = found
    return maps


def _same_features(b: Block) -> bool:
    """The map adds g(x) to x: the branch output must have x's shape."""
    x, y = b.skip.meta.get("val"), b.branch.meta.get("val")
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and tuple(x.shape) == tuple(y.shape)
