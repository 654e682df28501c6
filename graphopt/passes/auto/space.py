"""The joint planner's search space: every lossy family's moves on one graph, how a plan is applied, and what a
plan costs in milliseconds.

A knob is one place a family can act, with its levels: a layer's precision (float, int8 static, int8 dynamic,
int4 weights), a dependency group's units removed (a ladder of ratios, reconstructed by least squares), a
residual block kept, replaced by a fitted linear or low-rank map (LLM-Streamline; passes/skip/maps.py), or
dropped. A plan sets every knob. Applying it always runs the families in one order — prune (on the graph the
groups were found on), replace and drop blocks (rewire their adds; maps fitted on the fitting batches, on the
pruned graph), quantize the layers left — so a plan rebuilds the same graph wherever it is applied.

Milliseconds come from the cost model (the backend that will run the model, on the target), timed side by side
once per compile: the dense graph, each uniform precision, every group pruned by half, the graph without each
kind of block, and with each kind of block replaced by each form of map. From these a plan's latency is estimated
per layer — its multiply-adds after pruning at the dense
rate, less what its precision saves per multiply-add — so the search can rank thousands of plans; the finalists
are then built and timed for real."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


from ...errors import InputError
from ...ir import Graph, copy_graph
from ..base import PassContext
from ..quant.layers import CONV, LINEAR, QuantOptions, layer_name, layers as quant_layers, weight_max
from ..quant.quantize import Quantize
from ..skip.blocks import Block, find_blocks
from ..skip.maps import BlockMap, fit_maps
from ..sparsity.groups import Group, find_groups
from ..sparsity.prune import GroupPruning, keyed
from ..sparsity.shrink import node_macs
from .plan import MAP_FORMS, Plan

LINEAR_LEVELS = ("float", "int8", "int8-dynamic", "int4")
CONV_LEVELS = ("float", "int8")
FAMILIES = ("quant", "prune", "skip")
QUANT_BATCHES = 4     # fitting batches static int8 observes activation ranges on (every plan the same ones)


@dataclass(frozen=True)
class Knob:
    family: str          # "quant" | "prune" | "skip"
    key: str             # layer node | group key | residual add node
    levels: tuple        # level 0 is "do nothing"
    label: str           # for people: the module path
    units: int = 0       # a group's units


Genome = tuple[int, ...]   # one level index per knob


class Space:
    def __init__(self, graph: Graph, ctx: PassContext, fit: list, families=FAMILIES):
        self.graph, self.ctx, self.fit = graph, ctx, fit
        knobs: list[Knob] = []
        groups: list[Group] = []
        if "prune" in families:
            groups = [g for g in keyed(find_groups(graph)) if g.prunable and g.units > 1]
        self.pruning = GroupPruning(graph, groups, fit, "refit") if groups else None
        self.block_ms: dict[str, float] = {}
        for g in groups:
            knobs.append(Knob("prune", g.key, (0, *_steps(self.pruning.steps(g), g.units)), g.name, g.units))
        self.blocks: list[Block] = find_blocks(graph) if "skip" in families else []
        self.maps = fitted_maps(graph, fit, self.blocks) if self.blocks else {}   # add → form → BlockMap
        for b in self.blocks:   # kept, replaced by a map (the dearer form first), dropped
            forms = tuple(sorted(self.maps.get(b.add.name, {}), key=lambda f: -self.maps[b.add.name][f].macs_per_position))
            knobs.append(Knob("skip", b.add.name, (False, *forms, True), f"block {b.index} {b.path}"))
        for n in quant_layers(graph) if "quant" in families else ():
            knobs.append(Knob("quant", n.name, LINEAR_LEVELS if n.target is LINEAR else CONV_LEVELS, layer_name(n)))
        self.knobs = knobs
        self.qopts = dataclasses.replace(QuantOptions(), weight_max=weight_max(QuantOptions(), ctx)[0])
        self._block_of = {b.add.name: b for b in self.blocks}
        self.timing: dict[str, float] = {}

    # --- plans -------------------------------------------------------------------------------------
    def plan(self, genome: Genome) -> Plan:
        p = Plan()
        for knob, level in zip(self.knobs, genome):
            value = knob.levels[level]
            if level == 0:
                continue
            if knob.family == "quant":
                p.quantize[knob.key] = value
            elif knob.family == "prune":
                p.prune[knob.key] = value
            elif value is True:
                p.drop[knob.key] = self._block_of[knob.key].skip.name
            else:
                p.replace[knob.key] = value
        return p

    def dense(self) -> Genome:
        return (0,) * len(self.knobs)

    def uniform(self, family: str, level) -> Genome:
        """Every knob of `family` at `level` where it has it (a precision; for groups a fraction of units)."""
        out = []
        for k in self.knobs:
            if k.family != family:
                out.append(0)
            elif family == "prune":
                out.append(min(range(len(k.levels)), key=lambda i: abs(k.levels[i] - level * k.units)))
            else:
                out.append(k.levels.index(level) if level in k.levels else 0)
        return tuple(out)

    def built(self, genome_or_plan) -> Graph:
        """A copy of the graph with the plan applied (the graph itself is never changed)."""
        plan = genome_or_plan if isinstance(genome_or_plan, Plan) else self.plan(genome_or_plan)
        trial = copy_graph(self.graph)
        apply(trial, plan, self.ctx, self.fit, self.pruning, self.qopts, self.maps_for(plan))
        return trial

    def maps_for(self, plan: Plan) -> dict | None:
        """The maps fitted on the dense graph, for a plan that prunes nothing (pruning changes their inputs: apply
        refits them then)."""
        return None if plan.prune else self.maps

    # --- milliseconds ------------------------------------------------------------------------------
    def measure_rates(self) -> None:
        """Time, side by side on the cost model, what the estimate is built from (see the module docstring)."""
        ctx, graphs = self.ctx, {"dense": self.graph}
        families = {k.family for k in self.knobs}
        if "quant" in families:
            for level in LINEAR_LEVELS[1:]:
                if any(k.family == "quant" and level in k.levels for k in self.knobs):
                    graphs[level] = self.built(self.uniform("quant", level))
        if "prune" in families:
            graphs["prune half"] = self.built(self.uniform("prune", 0.5))
        kinds = {}
        for b in self.blocks:   # one block alone saves too little to time: every block of a kind goes at once
            kinds.setdefault(b.kind, []).append(b)
        mapped = {}
        for kind, members in kinds.items():
            graphs[f"without blocks of kind {kind} (×{len(members)})"] = self.built(
                Plan(drop={b.add.name: b.skip.name for b in members}))
            for form in MAP_FORMS:
                if all(form in self.maps.get(b.add.name, {}) for b in members):
                    mapped[kind, form] = f"blocks of kind {kind} replaced by {form}s (×{len(members)})"
                    graphs[mapped[kind, form]] = self.built(Plan(replace={b.add.name: form for b in members}))
        for g in graphs.values():
            g.tidy()
        times = ctx.cost.graphs_ms(graphs, ctx.example_args, ctx.example_kwargs)
        self.block_ms = {b.add.name: max(times["dense"] - times[f"without blocks of kind {kind} (×{len(members)})"],
                                         0.0) / len(members) for kind, members in kinds.items() for b in members}
        self.map_ms = {(b.add.name, form): max(times["dense"] - times[label], 0.0) / len(kinds[kind])
                       for (kind, form), label in mapped.items() for b in kinds[kind]}
        self.timing = times
        self.dense_ms = times["dense"]
        self.macs = {n.name: float(node_macs(n)) for n in self.graph.ops() if n.target in (CONV, LINEAR)}
        self.rate = {}     # ms saved per multiply-add, per precision
        for level in LINEAR_LEVELS[1:]:
            if level in times:
                moved = sum(self.macs[k.key] for k in self.knobs if k.family == "quant" and level in k.levels)
                self.rate[level] = max(self.dense_ms - times[level], 0.0) / max(moved, 1)
        self.dense_rate = 0.0  # ms per multiply-add of the dense layers, from pruning half of every group
        if "prune half" in times:
            removed = sum(self.macs.values()) - sum(float(node_macs(n)) for n in graphs["prune half"].ops()
                                                    if n.target in (CONV, LINEAR))
            self.dense_rate = max(self.dense_ms - times["prune half"], 0.0) / max(removed, 1)
        self._index_layers()

    def _index_layers(self) -> None:
        """Per conv/linear: the groups its inputs and outputs belong to, and the block it sits in."""
        self.out_group, self.in_group, self.in_block = {}, {}, {}
        if self.pruning is not None:
            for key, g in self.pruning.groups.items():
                for n in g.producers + g.depthwise:
                    self.out_group[n.name] = key
                for n in g.consumers + g.depthwise:
                    self.in_group.setdefault(n.name, key)
        for b in self.blocks:
            for n in b.region:
                if n.name in self.macs:
                    self.in_block.setdefault(n.name, b.add.name)

    def estimate_ms(self, genome: Genome) -> float:
        """A plan's milliseconds estimated from the measured rates (module docstring)."""
        plan = self.plan(genome)
        ms = self.dense_ms - sum(self.block_ms[a] for a in plan.drop) - sum(self.map_ms[a, form]
                                                                             for a, form in plan.replace.items())
        units = {k.key: k.units for k in self.knobs if k.family == "prune"}
        kept = {key: 1 - removed / units[key] for key, removed in plan.prune.items()}
        for name, macs in self.macs.items():
            block = self.in_block.get(name)
            if block in plan.drop or block in plan.replace:
                continue
            keep = kept.get(self.out_group.get(name), 1.0) * kept.get(self.in_group.get(name), 1.0)
            ms -= (1 - keep) * macs * self.dense_rate + keep * macs * self.rate.get(plan.quantize.get(name), 0.0)
        return ms

    def saving(self, knob_index: int, level: int) -> float:
        """ms one move saves alone, estimated."""
        g = list(self.dense())
        g[knob_index] = level
        return self.dense_ms - self.estimate_ms(tuple(g))

    def measure(self, genomes: dict[str, Genome]) -> dict[str, float]:
        """Build each plan and time them side by side with the dense graph (ms per call, by label)."""
        graphs = {"dense": self.graph} | {label: self.built(g) for label, g in genomes.items()}
        for g in graphs.values():
            g.tidy()
        return self.ctx.cost.graphs_ms(graphs, self.ctx.example_args, self.ctx.example_kwargs)


def apply(graph: Graph, plan: Plan, ctx: PassContext, fit: list, pruning: GroupPruning | None = None,
          qopts: QuantOptions | None = None, maps: dict[str, dict[str, BlockMap]] | None = None) -> list[str]:
    """Apply `plan` to `graph` in place — prune, replace and drop blocks, quantize — and say what was done, one
    note per change. `pruning` is the groups' measured state (made from `fit` here when not given); the blocks'
    maps are fitted on `fit` here when `maps` (add → form → map, fitted on this graph) is not given; static int8
    observes its activation ranges on the first QUANT_BATCHES of `fit`."""
    notes = []
    if plan.prune:
        if pruning is None:
            groups = [g for g in keyed(find_groups(graph)) if g.key in plan.prune]
            missing = set(plan.prune) - {g.key for g in groups}
            if missing:
                raise _mismatch("dependency group", sorted(missing)[0])
            pruning = GroupPruning(graph, groups, fit, "refit")
        notes += pruning.apply(graph, plan.prune)
    if plan.replace:
        blocks = {b.add.name: b for b in find_blocks(graph)}
        missing = [add for add in plan.replace if add not in blocks]
        if missing:
            raise _mismatch("residual block at", missing[0])
        maps = maps if maps is not None else fitted_maps(graph, fit, [blocks[a] for a in plan.replace])
        for add, form in plan.replace.items():   # before any drop: a dropped block's skip may be this add
            fitted, b = maps.get(add, {}), blocks[add]
            # pruning the residual stream can leave no low-rank form (rank d/8 no longer under half of d): the
            # linear map then; a block no map fits stays. Either is said, and every plan's loss and time are
            # measured on what this builds
            m = fitted.get(form) or fitted.get("linear map")
            if m is None:
                notes.append(f"kept the residual block ending at %{add} ({layer_name(b.add)}): no map fits it on "
                             "the pruned graph")
                continue
            b.add.replace_input_with(b.branch, m.emit(graph, b.skip, b.add, f"{add}_replaced"))
            notes.append(f"replaced the residual block ending at %{add} ({layer_name(b.add)}) by a {m.form} "
                         f"({m.macs_per_position} MACs per position), fitted on {len(fit)} calibration batches"
                         + ("" if form in fitted else f" (the plan's {form} does not fit the pruned graph)"))
        graph.eliminate_dead_code()
    if plan.drop:
        nodes = {n.name: n for n in graph.fx.nodes}
        order = {n.name: i for i, n in enumerate(graph.fx.nodes)}
        for add in sorted(plan.drop, key=lambda a: -order.get(a, -1)):   # last first: a later skip may be this add
            if add not in nodes or plan.drop[add] not in nodes:
                raise _mismatch("residual block at", add)
            nodes[add].replace_all_uses_with(nodes[plan.drop[add]])
            notes.append(f"dropped the residual block ending at %{add} ({layer_name(nodes[add])})")
        graph.eliminate_dead_code()
    if plan.quantize:
        missing = [k for k in plan.quantize if k not in {n.name for n in graph.ops()}]
        if missing and not (plan.drop or plan.replace):
            raise _mismatch("layer", missing[0])
        qctx = PassContext(ctx.target, ctx.example_args, ctx.example_kwargs, fit[:QUANT_BATCHES], ctx.cost)
        options = qopts or dataclasses.replace(QuantOptions(), weight_max=weight_max(QuantOptions(), ctx)[0])
        notes += Quantize("int8", dataclasses.replace(options, kernel_choice=True), plan.quantize).run(graph, qctx).notes
    graph.eliminate_dead_code()
    return notes


def fitted_maps(graph: Graph, fit: list, blocks: list[Block]) -> dict[str, dict[str, BlockMap]]:
    """Per block (by its add's name): its maps fitted on `fit`, by form (a linear map; a low-rank one where
    rank d/8 is cheaper)."""
    found = fit_maps(graph, fit, blocks)
    return {b.add.name: {m.kind: m for m in found[b.index]} for b in blocks if b.index in found}


def _steps(steps: list[int], units: int) -> list[int]:
    """Pruning steps that keep a multiple of 8 units where there are 16 or more: CPU kernels block channels by 8
    (ORT's NCHWc convs on AVX2), and 42 of 48 channels measured slower than the estimate's MAC count said."""
    if units < 16:
        return steps
    aligned = sorted({units - 8 * max(1, round((units - r) / 8)) for r in steps} - {0})
    return [r for r in aligned if 0 < r < units]


def _mismatch(what: str, name: str) -> InputError:
    return InputError(f"the plan names {what} {name!r}, which this graph does not have: a plan rebuilds the model "
                      "it was searched on, with the same pipeline and target; search again with graphopt.Auto(...)")


