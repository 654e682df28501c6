"""PlanExits (the pass of the EarlyExit option): exits after residual blocks, each with a light head and a confidence threshold, planned so the
quality lost on held-out calibration data stays within a budget; the graph is split into segments there.

Exit points are the cuts between blocks (a block's output that dominates the model's output in the
residual stream). At each, a head is fitted by ridge regression from the pooled hidden state to the
model's own outputs (the logits; the model has no head there). The calibration batches are cross-fitted
in two folds, so every sample's confidence (max softmax of the head's output) and loss (against the full
model) come from a head that never saw it; on these held-out scores per-exit thresholds are chosen
greedily, by measured cost saved per unit of loss, while the loss fits the budget. Segment costs are
measured by the cost model. Exits under 2% of the samples would take are left out (each is a segment
boundary, a backend call) and the thresholds set again; their segments merge. The plan
(segments as IR graphs, thresholds) is kept on the pass object for compile(), which builds the
segments with the backend and runs them with a host dispatcher (graphopt.runtime)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InputError, UnsupportedError
from ...ir import Graph, tensor_meta
from ..base import Pass, PassContext, PassResult, register
from ..calibration import observe, run_batches
from ... import quality
from .blocks import LOOKED_FOR, find_blocks, exit_points
from .segments import Head, Segment, pool, pool_dims, split

NEVER = float("inf")


@dataclass
class ExitPlan:
    segments: list[Segment]
    thresholds: list[float]        # exit k is taken when the head's max softmax probability ≥ thresholds[k]
    after: list[int]               # exit k follows block after[k] (blocks.find_blocks order)
    heads: list[Head]              # exit k's head (also built into segment k's graph)
    labels: list[str]              # where each exit is, for people
    example: list[tuple]           # example inputs of each segment (a calibration batch): built with a dynamic batch
    metric: str
    budget: float
    held_out_loss: float           # the planned loss on the held-out calibration batches
    fractions: list[float]         # of held-out samples leaving at each exit, then at the end
    relative_cost: float           # expected cost per sample relative to running every segment


class _Collect:
    def __init__(self):
        self.values = []

    def update(self, v):
        self.values.append(v.detach())


@register
class PlanExits(Pass):
    name = "early_exit"
    phase = "lossy"
    summary = "exits after residual blocks with fitted heads and confidence thresholds within a quality budget"
    lossy = True
    needs_calibration = True

    def __init__(self, budget: float = 0.01, metric: str = "cosine"):
        quality.check("PlanExits", budget, metric, callables=False)
        self.budget, self.metric = float(budget), metric

    def __repr__(self) -> str:
        return f"PlanExits(budget={self.budget:g}, metric={self.metric!r})"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        blocks = find_blocks(graph)
        check_exitable(graph, blocks)
        points = exit_points(graph, blocks)
        if not points:
            raise UnsupportedError("early_exit: no block output dominates the model's output (every cut between "
                                   "blocks has other values crossing it), so the graph cannot be split into segments")
        batches = ctx.calibration
        if len(batches) < 2:
            raise InputError("early_exit needs at least 2 calibration batches: heads are fitted on the first part, "
                             "thresholds are set on the held-out rest")
        folds = [list(range(len(batches)))[f::2] for f in range(2)]   # cross-fitting: two folds of batches
        cuts = [c for _, c in points]
        seen = observe(graph, batches, cuts, observer=_Collect)
        outs = run_batches(graph, batches)
        y = [o.double() for o in outs]
        y_all = torch.cat([y[i] for fold in folds for i in fold])

        heads, conf, err = [], [], []
        for cut in ctx.progress.each(cuts, "exit heads fitted"):
            values = seen[cut.name].values
            dims = pool_dims(values[0].dim())
            x = [pool(v, dims).double() for v in values]
            head, pred = fit_head(x, y, folds, dims, self.metric)
            heads.append(head)
            conf.append(torch.softmax(pred, -1).amax(-1))
            err.append(quality.per_sample(pred, y_all, self.metric))
        err.append(torch.zeros_like(err[0]))

        big = max(range(len(batches)), key=lambda i: len(batches[i][0][0]) if batches[i][0] else 0)
        segments = split(graph, cuts, heads)
        example = segment_inputs(graph, batches[big], cuts, segments)
        costs = [ctx.cost.graph_ms(s.graph, args) for s, args in zip(segments, example)]
        thresholds = calibrate(torch.stack(conf), torch.stack(err), torch.tensor(costs, dtype=torch.float64),
                               self.budget)
        loss, reach, exits = evaluate(torch.stack(conf), torch.stack(err), thresholds)
        fractions = [(exits == k).double().mean().item() for k in range(len(cuts) + 1)]
        relative = float((reach * torch.tensor(costs, dtype=torch.float64)).sum() / sum(costs))

        result.notes.append(f"{len(blocks)} residual blocks, {len(cuts)} exit points; {len(y_all)} calibration "
                            f"samples, each scored by a head fitted without it (2 folds); metric {self.metric}, "
                            f"budget {self.budget:g}")
        result.notes.append("exit | after | segment ms (measured) | threshold | held-out share leaving | loss if taken")
        for k, (b, cut) in enumerate(points):
            t = "never" if thresholds[k] == NEVER else f"{thresholds[k]:.4f}"
            result.notes.append(f"  {k} | block {b} [{blocks[b].path}] ({cut.name}) | {costs[k]:.3f} | {t} | "
                                f"{fractions[k]:.3f} | {err[k].mean().item():.4f}")
        result.notes.append(f"  end | last segment | {costs[-1]:.3f} | - | {fractions[-1]:.3f} | 0")
        result.table("Exits: share of held-out samples leaving at each (the exit histogram), segment cost, loss if taken",
                     ["exit", "share leaving", "segment ms", "threshold", "loss if taken"],
                     [[f"{k} after block {b} [{blocks[b].path}]", fractions[k], costs[k],
                       "never" if thresholds[k] == NEVER else thresholds[k], err[k].mean().item()]
                      for k, (b, _) in enumerate(points)] + [["end", fractions[-1], costs[-1], "-", 0.0]],
                     bars=("share leaving", "segment ms"))
        result.notes.append(f"held-out {self.metric} loss {loss:.5f} ≤ {self.budget:g}; expected cost "
                            f"{relative:.3f} of running every segment (×{1 / relative:.2f})")

        keep = [k for k, t in enumerate(thresholds) if t != NEVER]
        if not keep:
            result.skipped(f"no exit fits the budget {self.budget:g}: every sample runs to the end (one segment)")
        if len(keep) < len(cuts):
            result.notes.append(f"exits taken by under 2% of the held-out samples are dropped ({len(cuts) - len(keep)}), "
                                "merging their segments")
            cuts2 = [cuts[k] for k in keep]
            segments = split(graph, cuts2, [heads[k] for k in keep])
            example = segment_inputs(graph, batches[big], cuts2, segments)
        result.plan = ExitPlan(segments, [thresholds[k] for k in keep], [points[k][0] for k in keep],
                             [heads[k] for k in keep],
                             [f"block {points[k][0]} [{blocks[points[k][0]].path}]" for k in keep], example,
                             self.metric, self.budget, loss, [fractions[k] for k in keep] + [fractions[-1]], relative)
        result.stats.update(blocks=len(blocks), exit_points=len(cuts), exits=len(keep))
        return result


def check_exitable(graph: Graph, blocks) -> None:
    """UnsupportedError unless the graph has blocks and one (batch, classes) float output (the confidence rule
    is a max softmax probability)."""
    if not blocks:
        raise UnsupportedError(f"early_exit: the graph has no block to exit after; looked for {LOOKED_FOR}")
    outs = graph.outputs
    val = tensor_meta(outs[0]) if len(outs) == 1 else None
    if val is None or val.dim() != 2 or not val.is_floating_point():
        got = ", ".join(str(tuple(tensor_meta(o).shape)) if tensor_meta(o) is not None else "?" for o in outs)
        raise UnsupportedError(f"early_exit needs a classifier: one float (batch, classes) output whose max softmax "
                               f"probability is the confidence; this model returns {got}")


def fit_head(x: list, y: list, folds: list[list[int]], dims, metric, scales=(1e-4, 1e-3, 1e-2, 1e-1)):
    """Ridge regression from pooled hidden states `x` to the model's outputs `y` (per batch). Cross-fitted: each
    fold's predictions come from a head fitted on the other folds, so the thresholds are set on held-out
    scores; the penalty is the one with the lowest cross-fitted loss (then squared error). Returns the head
    fitted on all batches and the cross-fitted predictions (fold after fold)."""
    def solve(rows, scale):
        xs, ys = torch.cat([x[i] for i in rows]), torch.cat([y[i] for i in rows])
        mx, my = xs.mean(0), ys.mean(0)
        xc = xs - mx
        gram = xc.T @ xc
        w = torch.linalg.solve(gram + scale * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(len(gram),
                               dtype=gram.dtype), xc.T @ (ys - my))      # (features, outputs)
        return w, my - mx @ w

    y_held = torch.cat([y[i] for fold in folds for i in fold])
    best = None
    for scale in scales:
        preds = []
        for f, fold in enumerate(folds):
            w, b = solve([i for g, other in enumerate(folds) if g != f for i in other], scale)
            preds += [x[i] @ w + b for i in fold]
        pred = torch.cat(preds)
        key = (quality.per_sample(pred, y_held, metric).mean().item(), (pred - y_held).square().mean().item())
        if best is None or key < best[0]:
            best = (key, scale, pred)
    _, scale, pred = best
    w, b = solve(range(len(x)), scale)
    return Head(dims, w.T.float().contiguous(), b.float()), pred


def evaluate(conf: torch.Tensor, err: torch.Tensor, thresholds: list[float]):
    """(held-out loss, share of samples reaching each segment, exit taken by each sample) for thresholds."""
    n_exits, n = conf.shape
    exits = torch.full((n,), n_exits, dtype=torch.long)
    for k in reversed(range(n_exits)):
        exits = torch.where(conf[k] >= thresholds[k], torch.full_like(exits, k), exits)
    loss = err.gather(0, exits[None])[0].mean().item()
    reach = torch.stack([(exits >= k).double().mean() for k in range(n_exits + 1)])
    return loss, reach, exits


def calibrate(conf: torch.Tensor, err: torch.Tensor, costs: torch.Tensor, budget: float, min_share: float = 0.02,
              steps: int = 64) -> list[float]:
    """Thresholds by `greedy_thresholds`, then again without the exits fewer than `min_share` of the samples
    take (each exit is a segment boundary: a backend call and a copy of the samples going on), until every
    exit kept carries its weight."""
    allowed = set(range(conf.shape[0]))
    while True:
        thresholds = greedy_thresholds(conf, err, costs, budget, allowed, steps)
        _, _, exits = evaluate(conf, err, thresholds)
        rare = {k for k in allowed if (exits == k).double().mean().item() < min_share}
        if not rare:
            return thresholds
        allowed -= rare


def greedy_thresholds(conf, err, costs, budget, allowed, steps) -> list[float]:
    """Per-exit thresholds: start with no exit taken, then repeatedly lower the one threshold that saves the most
    measured cost per unit of loss while the loss fits. A step lowers a threshold until about 1/`steps` of the
    samples still reaching that exit leave there."""
    n_exits, n = conf.shape
    thresholds = [NEVER] * n_exits

    def measure(th):
        loss, reach, exits = evaluate(conf, err, th)
        return loss, float((reach * costs).sum()), exits

    loss, cost, exits = measure(thresholds)
    while True:
        best = None
        for k in sorted(allowed):
            waiting = conf[k][(exits > k) & (conf[k] < thresholds[k])].sort(descending=True).values
            if not len(waiting):
                continue
            trial = list(thresholds)
            trial[k] = waiting[min(len(waiting), max(1, n // steps)) - 1].item()
            t_loss, t_cost, t_exits = measure(trial)
            if t_loss > budget or t_cost >= cost:
                continue
            score = (cost - t_cost) / max(t_loss - loss, 1e-12)
            if best is None or score > best[0]:
                best = (score, trial, t_loss, t_cost, t_exits)
        if best is None:
            return thresholds
        _, thresholds, loss, cost, exits = best


def segment_inputs(graph: Graph, batch, cuts, segments: list[Segment]) -> list[tuple]:
    """Each segment's inputs on one calibration batch: the cut value before it and the model inputs it reads."""
    args, kwargs = batch
    seen = observe(graph, [batch], cuts, observer=_Collect)
    flat = graph.flat_inputs(args, kwargs)
    example = []
    for k, seg in enumerate(segments):
        hidden = [seen[cuts[k - 1].name].values[0]] if seg.has_hidden else []
        example.append(tuple(hidden + [flat[i] for i in seg.inputs]))
    return example
