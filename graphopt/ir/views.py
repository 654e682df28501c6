"""Named views of the ATen ops passes read most, and the idioms they share.

`conv_args(node).groups` instead of `node.args[8]`: the schema's defaults filled in, so a pass never
counts positions. `zero_pad_into(conv)` is the one place a zero pad in front of a convolution is
read as extra conv padding (TF-"same" and causal models pad every conv)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx

from .graph import is_call

aten = torch.ops.aten
CONV, LINEAR, PAD = aten.convolution.default, aten.linear.default, aten.constant_pad_nd.default
SDPA = aten.scaled_dot_product_attention.default


class ConvArgs(NamedTuple):
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    transposed: bool
    output_padding: list[int]
    groups: int

    def replace(self, **changes) -> tuple:
        """The node's args with some fields changed (assign to node.args)."""
        return tuple(self._replace(**changes))


class LinearArgs(NamedTuple):
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None


class SdpaArgs(NamedTuple):
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: fx.Node | None
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool


def _filled(node: fx.Node) -> list:
    """The node's arguments by position, with the schema's defaults for those not given."""
    schema = node.target._schema
    values = list(node.args)
    for arg in schema.arguments[len(values):]:
        values.append(node.kwargs[arg.name] if arg.name in node.kwargs else arg.default_value)
    return values[:len(schema.arguments)]


def conv_args(node: fx.Node) -> ConvArgs:
    return ConvArgs(*_filled(node))


def linear_args(node: fx.Node) -> LinearArgs:
    return LinearArgs(*_filled(node))


def sdpa_args(node: fx.Node) -> SdpaArgs:
    return SdpaArgs(*_filled(node))


class FoldedPad(NamedTuple):
    source: fx.Node                    # what the pad read: the conv reads it directly now
    pads: list[tuple[int, int]]        # per spatial dim (before, after): the conv's padding plus the pad's
    pad: fx.Node


def zero_pad_into(conv: fx.Node) -> FoldedPad | None:
    """When the conv's input is a zero pad of its spatial dims only (no cropping), that pad as conv padding."""
    a = conv_args(conv)
    pad, dims = a.x, len(a.padding)
    if not is_call(pad, PAD) or (pad.args[2] if len(pad.args) > 2 else 0) != 0:
        return None
    amounts = list(pad.args[1])
    if len(amounts) != 2 * dims or min(amounts) < 0:
        return None
    # constant_pad_nd lists the last dim first: [last_before, last_after, second_last_before, ...]
    pads = [(a.padding[d] + amounts[2 * (dims - 1 - d)], a.padding[d] + amounts[2 * (dims - 1 - d) + 1])
            for d in range(dims)]
    return FoldedPad(pad.args[0], pads, pad)
