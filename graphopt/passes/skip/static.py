"""DropBlocks (the pass of the LayerSkip option): drop the residual blocks that cost least quality per millisecond saved, within a budget.

Per block, on the calibration batches: the output error with the block removed (its add returns the
skip input), and ShortGPT's Block Influence, 1 − cos(block input, block output), a proxy needing one
run for all blocks; the notes give their rank correlation. Latency saved is measured by the cost model:
the graph without every block of one kind (same ops and shapes) is lowered and timed against the full
graph, and the time saved is shared among those blocks. A greedy takes blocks by error per ms saved
while the summed errors fit; the set is then run as a whole (effects are not additive) and the worst
block backed off until it fits, and the blocks left out are retried one by one."""
from __future__ import annotations

import torch

from ...errors import UnsupportedError
from ...ir import Graph, copy_graph
from ..base import Pass, PassContext, PassResult, register
from ..calibration import observe, run_batches
from ...numerics import rank_correlation
from ... import quality
from .blocks import LOOKED_FOR, Block, find_blocks


@register
class DropBlocks(Pass):
    name = "layer_skip"
    phase = "lossy"
    summary = "drop residual blocks (attention/FFN sub-blocks, conv blocks) within a quality budget"
    lossy = True
    needs_calibration = True

    def __init__(self, budget: float = 0.01, metric: quality.Metric = "cosine"):
        quality.check("DropBlocks", budget, metric)
        self.budget, self.metric = float(budget), metric

    def __repr__(self) -> str:
        return f"DropBlocks(budget={self.budget:g}, metric={quality.name(self.metric)!r})"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        blocks = find_blocks(graph)
        if not blocks:
            raise UnsupportedError(f"layer_skip: the graph has no skippable block; looked for {LOOKED_FOR}")
        batches = ctx.calibration
        refs = run_batches(graph, batches)
        per_batch = len(refs) // len(batches)
        errors = [quality.loss(run_batches(graph, batches, {b.add: b.bypass}), refs, self.metric, per_batch)
                  for b in ctx.progress.each(blocks, "blocks checked")]
        influence = block_influence(graph, batches, blocks)
        saved, timing = latency_saved(graph, ctx, blocks)

        ratio = {b.index: errors[b.index] / saved[b.index] for b in blocks if saved[b.index] > 0}
        chosen, total = [], 0.0
        for i in sorted(ratio, key=ratio.get):
            if total + errors[i] <= self.budget:
                chosen.append(i)
                total += errors[i]
        measured = self._verify(graph, batches, refs, blocks, chosen)
        while chosen and measured > self.budget:            # back off the worst until the whole set fits
            chosen.remove(max(chosen, key=ratio.get))
            measured = self._verify(graph, batches, refs, blocks, chosen)
        ctx.progress.step(f"{len(chosen)} blocks fit the budget; retrying the others")
        for i in sorted(set(ratio) - set(chosen), key=ratio.get):   # then retry the others, one run each
            if measured + errors[i] <= self.budget:
                trial = self._verify(graph, batches, refs, blocks, chosen + [i])
                if trial <= self.budget:
                    chosen, measured = chosen + [i], trial

        result.notes.append(f"{len(blocks)} residual blocks; metric {quality.name(self.metric)}, budget {self.budget:g}; "
                            "latency measured by the cost model on the example inputs: "
                            + "; ".join(f"{k} {v:.3f} ms" for k, v in timing.items()))
        result.table("Residual blocks: error with the block removed alone, ShortGPT block influence, ms saved",
                     ["block", "kind", "error alone", "block influence", "ms saved", "dropped"],
                     [[f"{b.index} {b.path}", b.kind, errors[b.index], influence[b.index], saved[b.index],
                       "yes" if b.index in chosen else "no"] for b in blocks],
                     bars=("error alone", "block influence", "ms saved"))
        result.notes.append("block | module | kind | error removed alone | block influence | ms saved | dropped")
        for b in blocks:
            result.notes.append(f"  {b.index:3d} | {b.path} | {b.kind} | {errors[b.index]:.5f} | "
                                f"{influence[b.index]:.5f} | {saved[b.index]:.3f} | {'yes' if b.index in chosen else 'no'}")
        if len(blocks) > 2:
            result.notes.append(f"rank correlation (Spearman) of block influence with the measured error: "
                                f"{rank_correlation(errors, influence):.3f} over {len(blocks)} blocks")
        if not chosen:
            result.skipped(f"no block fits the budget {self.budget:g} (smallest error alone "
                           f"{min(errors):.4g}); the graph is unchanged")
            return result
        full_ms = (timing["full"] + timing["full, again"]) / 2
        saving = sum(saved[i] for i in chosen)
        result.notes.append(f"dropped set verified as a whole on the calibration data: {quality.name(self.metric)} loss "
                            f"{measured:.5f} ≤ {self.budget:g}; estimated {saving:.3f} ms saved of {full_ms:.3f}")
        for i in sorted(chosen, reverse=True):               # last first: a later block's skip may be this add
            b = blocks[i]
            b.add.replace_all_uses_with(b.skip)
        for i in sorted(chosen):
            result.did(f"dropped {blocks[i]} (error alone {errors[i]:.5f})")
        result.stats.update(blocks=len(blocks), dropped=len(chosen))
        return result

    def _verify(self, graph, batches, refs, blocks, chosen) -> float:
        if not chosen:
            return 0.0
        return quality.loss(run_batches(graph, batches, {blocks[i].add: blocks[i].bypass for i in chosen}),
                            refs, self.metric, len(refs) // len(batches))


def block_influence(graph: Graph, batches, blocks: list[Block]) -> list[float]:
    """ShortGPT's Block Influence: mean over samples of 1 − cos(block input, block output)."""
    by_add = {b.add: b for b in blocks}
    sums = [0.0] * len(blocks)
    counts = [0] * len(blocks)

    def on_node(node, args, out):
        b = by_add.get(node)
        if b is not None:
            x = b.bypass(*args)
            cos = torch.nn.functional.cosine_similarity(x.reshape(len(x), -1).double(),
                                                        out.reshape(len(out), -1).double(), dim=1)
            sums[b.index] += (1 - cos).sum().item()
            counts[b.index] += len(cos)
    observe(graph, batches, on_node=on_node)
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def latency_saved(graph: Graph, ctx: PassContext, blocks: list[Block]) -> tuple[list[float], dict]:
    """ms saved per block, measured by ctx.cost: the full graph vs the graph without every block of a kind
    (the saving shared among them: one block alone saves too little to time reliably)."""
    args, kwargs = ctx.example_args, ctx.example_kwargs
    timing = {"full": ctx.cost.graph_ms(graph, args, kwargs)}
    saved = [0.0] * len(blocks)
    for kind in sorted({b.kind for b in blocks}):
        members = [b for b in blocks if b.kind == kind]
        trial = copy_graph(graph)
        nodes = {n.name: n for n in trial.fx.nodes}
        for b in reversed(members):
            nodes[b.add.name].replace_all_uses_with(nodes[b.skip.name])
        trial.eliminate_dead_code()
        trial.tidy()
        timing[f"without kind {kind} (×{len(members)})"] = ctx.cost.graph_ms(trial, args, kwargs)
    timing["full, again"] = ctx.cost.graph_ms(graph, args, kwargs)   # timed on both sides of the trials: load drifts
    full = (timing["full"] + timing["full, again"]) / 2
    for kind in sorted({b.kind for b in blocks}):
        members = [b for b in blocks if b.kind == kind]
        for b in members:
            saved[b.index] = max(full - timing[f"without kind {kind} (×{len(members)})"], 0.0) / len(members)
    return saved, timing

