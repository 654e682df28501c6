"""Post-training pruning: structured (groups shrunk), block-sparse and N:M linears, with reconstruction.

Importance and reconstruction come from one pass over the calibration batches collecting, for the input of
every layer that may lose inputs, its per-channel mean and variance and (for linears and 1×1 convs) its
Gram matrix. A channel's importance is FLAP's fluctuation, Var(x_c)·‖W[:, c]‖², summed over the layers
reading it: what removing it costs once its mean is compensated. Reconstruction then either adds the
removed channels' mean contribution to the reader's bias ("bias"), or refits the reader's kept weights and
bias by least squares on the calibration activations, regularised towards the original ("refit"; SparseGPT
and FLAP's step without retraining). Pruning a group only changes what its readers compute, so each
candidate is measured exactly by recomputing those readers (`run_batches(replace=...)`) and the whole plan
is verified the same way before the graph is shrunk."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ...cost.clock import Decided
from ...ir import Graph, conv_args, copy_graph, tensor_meta
from ...ops.sparse import pack_bsr
from ..base import Pass, PassContext, PassResult, register
from ..calibration import observe, run_batches
from ...numerics import cosine_error
from ..quant.layers import layer_name
from .detect import layers as weighted_layers
from .groups import CONV, LINEAR, Group, find_groups
from .options import Sparsity, misfit
from .shrink import macs, node_macs, parameters, refresh_meta, remove_inert, shrink

STEPS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)     # fractions of a group's units a budget plan may remove
BLOCK_RATIOS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5)             # uniform block ratios a budget plan tries, sparsest first
GRAM_LIMIT = 4096                                          # refit readers with at most this many input channels
SPARSE_MARGIN = 0.9                                        # the sparse kernel must take < 90% of dense's time


def split(batches: list) -> tuple[list, list]:
    """(batches statistics and reconstruction are fitted on, batches the error is measured on): from 4
    batches on, the last quarter is held back, so the budget is checked on data the refit has not seen."""
    if len(batches) < 4:
        return batches, batches
    cut = len(batches) - len(batches) // 4
    return batches[:cut], batches[cut:]


def held(batches: list) -> str:
    return "the calibration batches" if len(batches) < 4 else f"{len(batches) // 4} held-back calibration batch(es)"


# --- calibration statistics of layer inputs ----------------------------------------------------------
class InputStats:
    """Per-channel sums of a layer's input over calibration rows (pixels or tokens), and its Gram matrix."""

    def __init__(self, node: fx.Node, gram: bool):
        self.conv = node.target is CONV
        a = conv_args(node) if self.conv else None
        w = node.args[1].meta["val"]
        self.pointwise = not self.conv or (tuple(w.shape[2:]) == (1, 1) and not any(a.padding) and a.groups == 1)
        self.stride = tuple(a.stride) if self.conv else None
        self.want_gram = gram and self.pointwise and w.shape[1] <= GRAM_LIMIT
        self.n, self.sum, self.sumsq, self.gram = 0, 0.0, 0.0, None

    def update(self, x: torch.Tensor) -> None:
        if self.conv:
            if self.pointwise:
                x = x[:, :, ::self.stride[0], ::self.stride[1]]
            x = x.movedim(1, -1)
        rows = x.reshape(-1, x.shape[-1]).double()
        self.n += rows.shape[0]
        self.sum = self.sum + rows.sum(0)
        self.sumsq = self.sumsq + rows.square().sum(0)
        if self.want_gram:
            self.gram = (0.0 if self.gram is None else self.gram) + rows.T @ rows

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sumsq / max(self.n, 1) - self.mean.square()).clamp(min=0)


def collect(graph: Graph, batches, readers, gram: bool) -> dict[fx.Node, InputStats]:
    stats = {n: InputStats(n, gram) for n in readers}

    def on_node(n, args, out):
        if n in stats:
            stats[n].update(args[0])
    observe(graph, batches, [], on_node)
    return stats


def reconstructed(graph: Graph, n: fx.Node, keep: torch.Tensor, st: InputStats, how: str,
                  rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reader `n`'s (weight, bias) reading only input channels `keep` (of output `rows`, default all)."""
    w = graph.constant(n.args[1]).double()
    b_node = n.args[2] if len(n.args) > 2 else None
    b = graph.constant(b_node).double() if b_node is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    cin = w.shape[1]
    drop = torch.ones(cin, dtype=torch.bool)
    drop[keep] = False
    if how == "refit" and st.gram is not None and st.n > 0:
        # least squares over calibration rows z = [x, 1]: min ‖Θ z − Θ' z_K‖² + λ‖Θ' − Θ_K‖²
        g = torch.zeros(cin + 1, cin + 1, dtype=torch.float64)
        g[:cin, :cin], g[:cin, cin], g[cin, :cin], g[cin, cin] = st.gram, st.sum, st.sum, st.n
        theta = torch.cat([w.reshape(w.shape[0], cin), (b if b is not None else torch.zeros(w.shape[0]))[:, None]
                           .double()], 1)
        kk = torch.cat([keep, torch.tensor([cin])])
        gkk = g[kk][:, kk]
        lam = 1e-2 * gkk.diagonal().mean()
        sol = torch.linalg.solve(gkk + lam * torch.eye(len(kk), dtype=torch.float64),
                                 (theta @ g[:, kk] + lam * theta[:, kk]).T).T
        new_w, new_b = sol[:, :-1].reshape(w.shape[0], len(keep), *w.shape[2:]), sol[:, -1]
        return new_w.float(), new_b.float()
    new_w = w[:, keep]
    if how == "none" or not drop.any():
        return new_w.float(), (b.float() if b is not None else None)
    contribution = w[:, drop].reshape(w.shape[0], int(drop.sum()), -1).sum(2) @ st.mean[drop]
    return new_w.float(), ((b if b is not None else 0) + contribution).float()


def _reader_fn(n: fx.Node, keep: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """What reader `n` computes once its input channels outside `keep` are gone (for run_batches)."""
    dim = 1 if n.target is CONV else -1
    return lambda x, _w, _b=None, *rest: n.target(x.index_select(dim, keep), w, b, *rest)


# --- structured pruning of dependency groups, shared by Sparsify and the joint planner -------------------
class GroupPruning:
    """What pruning the groups of one graph needs, measured once: the calibration statistics of every reader
    (on the `fit` batches) and each group's units ranked least important first (FLAP's fluctuation). A plan
    maps group keys to units removed; `replace` computes a plan's readers for run_batches, `apply` shrinks a
    graph — this one or a copy of it (groups found again there, matched by key)."""

    def __init__(self, graph: Graph, groups: list[Group], fit: list, reconstruct: str):
        self.groups, self.reconstruct = {g.key: g for g in groups}, reconstruct
        stats = collect(graph, fit, [c for g in groups for c in g.consumers], reconstruct == "refit")
        self.stats = {n.name: st for n, st in stats.items()}
        self.order = {g.key: self._ranking(graph, g) for g in groups}
        self._graph = graph
        self._refits: dict[tuple, tuple] = {}   # (reader, group, units removed, rows) → reconstructed weights

    def portable(self) -> dict:
        """What `apply` reads, as plain data (statistics and rankings by name, no nodes): for another process."""
        return {"stats": self.stats, "order": self.order, "reconstruct": self.reconstruct}

    @classmethod
    def restore(cls, graph: Graph, state: dict) -> "GroupPruning":
        """The pruning `portable()` wrote, on `graph` (the same graph, rebuilt elsewhere), measured nothing again."""
        self = cls.__new__(cls)
        self.stats, self.order, self.reconstruct = state["stats"], state["order"], state["reconstruct"]
        self.groups = {g.key: g for g in keyed(find_groups(graph)) if g.key in self.order}
        self._graph, self._refits = graph, {}
        return self

    def steps(self, g: Group) -> list[int]:
        """The numbers of units a budget plan may remove from `g` (STEPS of its units, at least one kept)."""
        return sorted({min(max(round(s * g.units), 1), g.units - 1) for s in STEPS})

    def kept(self, key: str, removed: int) -> list[int]:
        return sorted(self.order[key][removed:].tolist())

    def replace(self, plan: dict[str, int]) -> dict:
        """Reader node → what it computes under `plan` (for calibration.run_batches on this graph)."""
        out = {}
        for key, removed in plan.items():
            if removed:
                g = self.groups[key]
                keep = g.channels(self.kept(key, removed))
                out |= {c: _reader_fn(c, keep, *self._weights(self._graph, c, key, removed, keep))
                        for c in g.consumers}
        return out

    def apply(self, graph: Graph, plan: dict[str, int]) -> list[str]:
        """Shrink `graph` (this one, or a copy of it) to `plan`; one note per group pruned."""
        groups = self.groups if graph is self._graph else {g.key: g for g in keyed(find_groups(graph))}
        notes = []
        for key, removed in plan.items():
            if not removed:
                continue
            g = groups[key]
            keep_units = self.kept(key, removed)
            keep = g.channels(keep_units)
            weights = {c: self._weights(graph, c, key, removed, keep) for c in g.consumers}
            units = g.units
            shrink(graph, g, keep_units, weights)
            notes.append(f"pruned {removed} of {units} {g.kind} of {g.name} (reconstruction: {self.reconstruct})")
        if notes:
            refresh_meta(graph)
        return notes

    def _weights(self, graph: Graph, reader: fx.Node, key: str, removed: int, keep: torch.Tensor):
        """The reader's reconstructed (weight, bias), solved once per plan step: a search applies the same steps
        to many copies of the graph. Rows are solved independently, so the key is the step and the reader's rows
        (fewer where its own output group was pruned first, always the same ones for the same count)."""
        at = (reader.name, key, removed, graph.constant(reader.args[1]).shape[0])
        if at not in self._refits:
            self._refits[at] = reconstructed(graph, reader, keep, self.stats[reader.name], self.reconstruct)
        return self._refits[at]

    def _ranking(self, graph: Graph, g: Group) -> torch.Tensor:
        """The group's units, least important first (importance: fluctuation, FLAP)."""
        score = torch.zeros(g.size, dtype=torch.float64)
        for c in g.consumers:
            w = graph.constant(c.args[1]).double()
            col = w.reshape(w.shape[0], w.shape[1], -1).square().sum((0, 2))
            st = self.stats[c.name]
            spread = st.var if self.reconstruct != "none" else st.sumsq / max(st.n, 1)
            score += col * spread
        return score.reshape(g.units, g.unit).sum(1).argsort()


def keyed(groups: list[Group]) -> list[Group]:
    """The groups with a unique `key` each (their name, numbered where two share one)."""
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.name] = seen.get(g.name, 0) + 1
        g.key = g.name if seen[g.name] == 1 else f"{g.name} #{seen[g.name]}"
    return groups


def group_macs(g: Group) -> float:
    """Multiply-adds of every layer holding the group's channels (what removing all of them would save)."""
    return float(sum(node_macs(n) for n in g.producers + g.consumers + g.depthwise))


# --- the pass ----------------------------------------------------------------------------------------
@register
class Sparsify(Pass):
    name = "sparsify"
    phase = "lossy"
    summary = "prune post-training (structured groups, block-sparse or N:M linears) with reconstruction"
    lossy = True
    needs_calibration = True
    precedes = ("quant",)   # the float weights are pruned (and refit), then quantized

    def __init__(self, options: Sparsity | None = None):
        self.options = options or Sparsity("structured", budget=0.01)

    def __repr__(self) -> str:
        return f"Sparsify({self.options!r})"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        before = macs(graph), parameters(graph)
        remove_inert(graph, result)
        o = self.options
        if o.pattern == "structured":
            self._structured(graph, ctx, result)
        else:
            self._linears(graph, ctx, result)
        graph.eliminate_dead_code()      # the layers replaced must not count as after
        after = macs(graph), parameters(graph)
        result.stats.update(macs_before=before[0], macs_after=after[0], params_before=before[1],
                            params_after=after[1])
        result.notes.append(f"MACs {before[0]:,} → {after[0]:,} ({after[0] / max(before[0], 1):.0%}); parameters "
                            f"{before[1]:,} → {after[1]:,}")
        return result

    def _chosen(self, n: fx.Node) -> bool:
        return not self.options.layers or any(layer_name(n) == p or layer_name(n).startswith(p + ".")
                                              for p in self.options.layers)

    # --- structured: remove units of dependency groups -------------------------------------------
    def _structured(self, graph: Graph, ctx: PassContext, result: PassResult) -> None:
        o = self.options
        groups = []
        for g in keyed(find_groups(graph)):
            if not g.prunable:
                if g.producers and g.blocked:
                    result.skipped(f"{g.name}: {g.blocked[0]}")
            elif g.units > 1 and all(self._chosen(n) for n in g.producers):
                groups.append(g)
        if not groups:
            result.skipped("no prunable group (every channel set is normalized, concatenated or an output)")
            return
        fit, check = split(ctx.calibration)
        pruning = GroupPruning(graph, groups, fit, o.reconstruct)
        refs = run_batches(graph, check)

        def error(plan: dict[str, int], batches, references) -> float:
            return cosine_error(run_batches(graph, batches, pruning.replace(plan)), references)

        if o.ratio is not None:
            plan = {g.key: min(round(o.ratio * g.units), g.units - 1) for g in groups}
        else:
            sub = check[:2]
            sub_refs = run_batches(graph, sub)
            steps = {g.key: pruning.steps(g) for g in groups}
            err = {(g.key, r): error({g.key: r}, sub, sub_refs)
                   for g in ctx.progress.each(groups, "channel groups measured") for r in steps[g.key]}
            plan, spent = {g.key: 0 for g in groups}, 0.0
            while True:          # greedy: the next step of some group costing least error per MAC saved
                moves = []
                for g in groups:
                    nxt = [r for r in steps[g.key] if r > plan[g.key]]
                    if nxt:
                        r = nxt[0]
                        extra = err[g.key, r] - err.get((g.key, plan[g.key]), 0.0)
                        gain = group_macs(g) * (r - plan[g.key]) / g.units
                        if spent + extra <= o.budget:
                            moves.append((max(extra, 0.0) / max(gain, 1e-9), g, r, extra))
                if not moves:
                    break
                _, g, r, extra = min(moves, key=lambda m: m[0])
                plan[g.key], spent = r, spent + extra
            measured = error(plan, check, refs)
            while measured > o.budget:        # errors do not add exactly: back off the costliest step
                g = max((g for g in groups if plan[g.key]), key=lambda g: err[g.key, plan[g.key]])
                lower = [r for r in steps[g.key] if r < plan[g.key]]
                plan[g.key] = lower[-1] if lower else 0
                measured = error(plan, check, refs)
            result.notes.append(f"budget plan: estimated error {spent:.2e}, measured {measured:.2e} on "
                                f"{held(ctx.calibration)} (budget {o.budget:g})")
        if o.ratio is not None:
            result.notes.append(f"uniform plan: error {error(plan, check, refs):.2e} on {held(ctx.calibration)}")
        elif any(plan.values()) and not ctx.cost.unmeasurable:
            # a budget plan is the planner's choice: kept only if it measures faster than the graph unpruned
            trial = copy_graph(graph)
            pruning.apply(trial, plan)
            pruned_wins = Decided("pruned", "dense")
            ms = ctx.cost.graphs_ms({"dense": graph, "pruned": trial}, ctx.example_args, ctx.example_kwargs,
                                    stop=pruned_wins)
            if not pruned_wins.keeps_first(ms):
                result.skipped(f"the budget plan measures {ms['pruned']:.3f} ms against {ms['dense']:.3f} ms unpruned "
                               f"({ctx.cost.on}): nothing pruned")
                return
            result.notes.append(f"the budget plan measures {ms['pruned']:.3f} ms against {ms['dense']:.3f} ms unpruned "
                                f"({ctx.cost.on})")
        for note in pruning.apply(graph, plan):
            result.did(note)


    # --- block-sparse and N:M linears --------------------------------------------------------------
    def _linears(self, graph: Graph, ctx: PassContext, result: PassResult) -> None:
        o = self.options
        chosen = []
        for n in weighted_layers(graph):
            if n.target is not LINEAR or not self._chosen(n):
                continue
            w = n.args[1].meta["val"]
            why = misfit(o, w.shape[0], w.shape[1])
            (result.skipped(f"{layer_name(n)}: {why}") if why else chosen.append(n))
        if not chosen:
            result.skipped(f"no linear fits the {o.pattern} pattern")
            return
        fit, check = split(ctx.calibration)
        stats = collect(graph, fit, chosen, o.reconstruct == "refit" and not o.nm)
        refs = run_batches(graph, check)

        def pruned(ratio: float) -> dict:
            return {n: self._pruned_weights(graph, n, stats[n], ratio) for n in chosen}

        def linear(w, b):
            return lambda x, *_: torch.nn.functional.linear(x, w, b)

        def error(weights: dict) -> float:
            replace = {n: linear(*weights[n][:2]) for n in chosen}
            return cosine_error(run_batches(graph, check, replace), refs)

        if o.nm or o.ratio is not None:
            weights = pruned(o.ratio or 0.0)
            measured = error(weights)
            if o.budget is not None and measured > o.budget:
                result.skipped(f"{o.pattern} on every linear: error {measured:.2e} exceeds the budget {o.budget:g}; "
                               "nothing pruned")
                return
        else:
            for ratio in BLOCK_RATIOS:
                ctx.progress.step(f"block sparsity {ratio:.0%} measured")
                weights = pruned(ratio)
                measured = error(weights)
                if measured <= o.budget:
                    break
            else:
                result.skipped(f"block sparsity: even {BLOCK_RATIOS[-1]:.0%} exceeds the budget {o.budget:g} "
                               f"(error {measured:.2e}); nothing pruned")
                return
            result.notes.append(f"budget plan: {ratio:.0%} of blocks pruned in every linear")
        result.notes.append(f"{o.pattern}: output error {measured:.2e} on {held(ctx.calibration)}")
        for n in chosen:
            w, b, k = weights[n]
            self._lower(graph, ctx, n, w, b, k, result)

    def _pruned_weights(self, graph: Graph, n: fx.Node, st: InputStats, ratio: float):
        """(weight, bias, blocks kept per block row or None) of linear `n` pruned to the pattern."""
        o = self.options
        w = graph.constant(n.args[1]).double()
        b = graph.constant(n.args[2]).double() if len(n.args) > 2 and n.args[2] is not None else None
        norms = (st.sumsq / max(st.n, 1)).sqrt()
        if o.nm:
            N, M = o.nm
            score = (w.abs() * norms).reshape(w.shape[0], -1, M)
            mask = torch.zeros_like(score, dtype=torch.bool).scatter_(2, score.topk(N, dim=2).indices, True)
            mask = mask.reshape(w.shape)
            if o.reconstruct != "none":      # removed weights' mean contribution into the bias
                b = (b if b is not None else 0) + (w * ~mask) @ st.mean
            return (w * mask).float(), (b.float() if b is not None else None), None
        bh, bw = o.block
        rb, cb = w.shape[0] // bh, w.shape[1] // bw
        score = (w.square() * norms.square()).reshape(rb, bh, cb, bw).sum((1, 3))
        k = max(1, round((1 - ratio) * cb))
        cols = score.topk(k, dim=1).indices.sort(dim=1).values
        new_w, new_b = torch.zeros_like(w), b.clone() if b is not None else None
        for r in range(rb):
            rows = torch.arange(r * bh, (r + 1) * bh)
            keep = (cols[r][:, None] * bw + torch.arange(bw)).reshape(-1)
            rw, rbias = reconstructed(graph, n, keep, st, o.reconstruct, rows)
            new_w[r * bh:(r + 1) * bh, keep] = rw.double()
            if rbias is not None:
                new_b = torch.zeros(w.shape[0], dtype=torch.float64) if new_b is None else new_b
                new_b[r * bh:(r + 1) * bh] = rbias.double()
        return new_w.float(), (new_b.float() if new_b is not None else None), k

    def _lower(self, graph: Graph, ctx: PassContext, n: fx.Node, w, b, k, result: PassResult) -> None:
        """Pruned weights in; the block-sparse op where the cost model measures it faster than dense."""
        o = self.options
        x = tensor_meta(n.args[0])
        rows = math.prod(int(d) if str(d).isdigit() else 1 for d in x.shape[:-1])
        name = layer_name(n)
        w_node = graph.add_constant(w, n.args[1].target.removeprefix("_graphopt_") + "_sparse", before=n)
        b_node = graph.add_constant(b, name + "_bias_sparse", before=n) if b is not None else None
        n.args = (n.args[0], w_node, b_node)
        result.did(f"{name}: {o.pattern} pruned, density {float((w != 0).float().mean()):.1%}")
        if ctx.cost.unmeasurable:
            result.skipped(f"{name}: kept dense ({ctx.cost.unmeasurable})")
            return
        if o.nm:
            sparse_s, dense_s, why = ctx.cost.nm_linear_choice(rows, w.shape[1], w.shape[0], *o.nm)
            timing = f"sparse {sparse_s * 1e3:.3f} ms" if sparse_s is not None else f"no sparse kernel runs ({why})"
            result.notes.append(f"{name}: kept dense ({dense_s * 1e3:.3f} ms); {timing}; graphopt has no N:M "
                                "lowering faster than dense on this target")
            return
        sparse_s, dense_s = ctx.cost.sparse_linear_choice(rows, w.shape[1], w.shape[0], k, o.block)
        timing = f"block-sparse {sparse_s * 1e3:.3f} ms vs dense {dense_s * 1e3:.3f} ms ({dense_s / sparse_s:.2f}×)"
        if sparse_s >= SPARSE_MARGIN * dense_s:
            result.notes.append(f"{name}: kept dense — {timing}")
            return
        blocks, cols, _ = pack_bsr(w, o.block)
        nodes = [graph.add_constant(blocks, name + "_bsr_blocks", before=n),
                 graph.add_constant(cols, name + "_bsr_cols", before=n)]
        new = graph.call(torch.ops.graphopt.bsr_linear.default,
                         (n.args[0], *nodes, b_node, int(w.shape[1]), o.block[1]), before=n)
        new.meta["nn_module_stack"] = n.meta.get("nn_module_stack", {})
        n.replace_all_uses_with(new)
        result.notes.append(f"{name}: graphopt::bsr_linear — {timing}")
