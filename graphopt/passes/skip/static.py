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
from .maps import fit_maps


@register
class DropBlocks(Pass):
    name = "layer_skip"
    phase = "lossy"
    summary = "drop residual blocks (attention/FFN sub-blocks, conv blocks) within a quality budget, or replace them by fitted maps"
    lossy = True
    needs_calibration = True

    def __init__(self, budget: float = 0.01, metric: quality.Metric = "cosine", replace: bool = True):
        quality.check("DropBlocks", budget, metric)
        self.budget, self.metric, self.replace = float(budget), metric, bool(replace)

    def __repr__(self) -> str:
        return f"DropBlocks(budget={self.budget:g}, metric={quality.name(self.metric)!r}, replace={self.replace})"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        blocks = find_blocks(graph)
        if not blocks:
            raise UnsupportedError(f"layer_skip: the graph has no skippable block; looked for {LOOKED_FOR}")
        batches = ctx.calibration
        refs = run_batches(graph, batches)

        def loss(on, reference, moves: dict) -> float:
            return quality.loss(run_batches(graph, on, {blocks[i].add: skipped(blocks[i], m) for i, m in moves.items()}),
                                reference, self.metric, len(reference) // len(on))

        maps, judged, judged_refs = {}, batches, refs
        if self.replace and len(batches) >= 2:       # maps fitted on half the batches, every move judged on the other
            fit, judged = batches[0::2], batches[1::2]
            judged_refs = run_batches(graph, judged)
            maps = fit_maps(graph, fit, blocks)
        errors = {(b.index, REMOVED): loss(judged, judged_refs, {b.index: REMOVED})
                  for b in ctx.progress.each(blocks, "blocks checked")}
        influence = block_influence(graph, batches, blocks)
        for b in ctx.progress.each([b for b in blocks if b.index in maps], "replacement maps measured"):
            errors |= {(b.index, m.form): loss(judged, judged_refs, {b.index: m}) for m in maps[b.index]}
        saved, timing = latency_saved(graph, ctx, blocks, maps)
        moves = {(b.index, REMOVED): REMOVED for b in blocks} | {(i, m.form): m for i, ms in maps.items() for m in ms}

        # quality per ms saved; errors below a hundredth of the budget count as that much, so between two
        # near-free moves for one block (a near-identity block removed, or mapped) the one saving more wins
        floor = self.budget / 100
        ratio = {key: max(errors[key], floor) / saved[key] for key in moves if saved.get(key, 0) > 0}
        chosen: dict[int, object] = {}
        total = 0.0
        for key in sorted(ratio, key=ratio.get):      # least quality per ms saved first, one move per block
            if key[0] not in chosen and total + errors[key] <= self.budget:
                chosen[key[0]] = moves[key]
                total += errors[key]
        measured = loss(judged, judged_refs, chosen) if chosen else 0.0
        while chosen and measured > self.budget:      # back off the worst until the whole set fits
            del chosen[max(chosen, key=lambda i: ratio[i, _form(chosen[i])])]
            measured = loss(judged, judged_refs, chosen) if chosen else 0.0
        ctx.progress.step(f"{len(chosen)} blocks fit the budget; retrying the others")
        for key in sorted(ratio, key=ratio.get):      # then retry the others, one run each
            if key[0] not in chosen and measured + errors[key] <= self.budget:
                trial = loss(judged, judged_refs, chosen | {key[0]: moves[key]})
                if trial <= self.budget:
                    chosen, measured = chosen | {key[0]: moves[key]}, trial

        result.notes.append(f"{len(blocks)} residual blocks; metric {quality.name(self.metric)}, budget {self.budget:g}; "
                            "latency measured by the cost model on the example inputs: "
                            + "; ".join(f"{k} {v:.3f} ms" for k, v in timing.items()))
        if self.replace and not maps:
            result.notes.append("replacement maps: none fitted (they need 2 calibration batches or more: fitted on "
                                "one half, judged on the other)")
        best_map = {b.index: min(maps.get(b.index, []), key=lambda m: errors[b.index, m.form], default=None)
                    for b in blocks}
        result.table("Residual blocks: error and ms saved when removed alone, and when replaced by its best "
                     "fitted map (judged on held-out calibration batches); ShortGPT block influence",
                     ["block", "kind", "error removed", "ms saved removed", "best map", "error mapped",
                      "ms saved mapped", "block influence", "chosen"],
                     [[f"{b.index} {b.path}", b.kind, errors[b.index, REMOVED], saved[b.index, REMOVED],
                       best_map[b.index].form if best_map[b.index] else "-",
                       errors[b.index, best_map[b.index].form] if best_map[b.index] else None,
                       saved.get((b.index, best_map[b.index].form)) if best_map[b.index] else None,
                       influence[b.index], _form(chosen[b.index]) if b.index in chosen else "kept"] for b in blocks],
                     bars=("error removed", "ms saved removed", "error mapped", "block influence"))
        result.notes.append("block | module | kind | error removed alone | block influence | ms saved | chosen")
        for b in blocks:
            result.notes.append(f"  {b.index:3d} | {b.path} | {b.kind} | {errors[b.index, REMOVED]:.5f} | "
                                f"{influence[b.index]:.5f} | {saved[b.index, REMOVED]:.3f} | "
                                f"{_form(chosen[b.index]) if b.index in chosen else 'kept'}")
        if len(blocks) > 2:
            result.notes.append(f"rank correlation (Spearman) of block influence with the measured error: "
                                f"{rank_correlation([errors[b.index, REMOVED] for b in blocks], influence):.3f} "
                                f"over {len(blocks)} blocks")
        if not chosen:
            smallest = min(errors.values())
            result.skipped(f"no block fits the budget {self.budget:g} removed or replaced (smallest error "
                           f"{smallest:.4g}); the graph is unchanged")
            return result
        full_ms = timing["full"]
        saving = sum(saved[i, _form(m)] for i, m in chosen.items())
        on = "the calibration data" if judged is batches else f"{len(judged)} calibration batches the maps were not fitted on"
        result.notes.append(f"chosen set verified as a whole on {on}: {quality.name(self.metric)} loss "
                            f"{measured:.5f} ≤ {self.budget:g}; estimated {saving:.3f} ms saved of {full_ms:.3f}")
        for i, m in sorted(chosen.items()):            # maps first: a removal below may rewire their input
            if m is not REMOVED:
                b = blocks[i]
                b.add.replace_input_with(b.branch, m.emit(graph, b.skip, b.add, f"block{i}"))
        for i in sorted(chosen, reverse=True):          # last first: a later block's skip may be this add
            if chosen[i] is REMOVED:
                blocks[i].add.replace_all_uses_with(blocks[i].skip)
        graph.eliminate_dead_code()
        for i, m in sorted(chosen.items()):
            if m is REMOVED:
                result.did(f"dropped {blocks[i]} (error alone {errors[i, REMOVED]:.5f})")
            else:
                result.did(f"replaced {blocks[i]} by a {m.form} ({m.macs_per_position} MACs per position; error alone "
                           f"{errors[i, m.form]:.5f} on held-out batches, {errors[i, REMOVED]:.5f} removed)")
        result.stats.update(blocks=len(blocks), dropped=sum(m is REMOVED for m in chosen.values()),
                            replaced=sum(m is not REMOVED for m in chosen.values()))
        return result


REMOVED = "removed"


def _form(move) -> str:
    return REMOVED if move is REMOVED else move.form


def skipped(block: Block, move):
    """What the block's add returns under `move` (for calibration.run_batches): its skip input, or x + g(x)."""
    if move is REMOVED:
        return block.bypass

    def mapped(*operands):
        x = block.bypass(*operands)
        return x + move(x)
    return mapped


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


def latency_saved(graph: Graph, ctx: PassContext, blocks: list[Block], maps: dict | None = None
                  ) -> tuple[dict, dict]:
    """ms saved per (block, move), measured by ctx.cost: the full graph vs the graph with every block of a kind
    removed (or replaced by its maps of one form), the saving shared among them: one block alone saves too
    little to time reliably."""
    args, kwargs = ctx.example_args, ctx.example_kwargs
    timing = {"full": ctx.cost.graph_ms(graph, args, kwargs)}
    trials = {}
    for kind in sorted({b.kind for b in blocks}):
        members = [b for b in blocks if b.kind == kind]
        forms = [REMOVED] + [m.form for m in (maps or {}).get(members[0].index, [])]
        for form in forms:
            if form != REMOVED and not all(b.index in maps and any(m.form == form for m in maps[b.index])
                                           for b in members):
                continue
            trial = copy_graph(graph)
            nodes = {n.name: n for n in trial.fx.nodes}
            for b in reversed(members):
                add, skip = nodes[b.add.name], nodes[b.skip.name]
                if form == REMOVED:
                    add.replace_all_uses_with(skip)
                else:
                    m = next(m for m in maps[b.index] if m.form == form)
                    add.replace_input_with(nodes[b.branch.name], m.emit(trial, skip, add, f"block{b.index}"))
            trial.eliminate_dead_code()
            trial.tidy()
            label = f"kind {kind} (×{len(members)}) " + ("removed" if form == REMOVED else f"as {form}s")
            timing[label] = ctx.cost.graph_ms(trial, args, kwargs)
            trials[kind, form] = (label, members)
    full, saved = timing["full"], {}
    for (kind, form), (label, members) in trials.items():
        for b in members:
            saved[b.index, form] = max(full - timing[label], 0.0) / len(members)
    for (index, form), ms in saved.items():   # a map is the block replaced by some work, removal by none: a map
        if form != REMOVED:                   # measured saving more (the trials timed apart, under load) is noise
            saved[index, form] = min(ms, saved.get((index, REMOVED), ms))
    return saved, timing
