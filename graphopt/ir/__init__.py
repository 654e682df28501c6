"""graphopt's IR: an executable ATen FX graph with shapes, a text form, a networkx view and DOT dumps."""
from .dot import WHOLE_LIMIT, graph_dot, region_dot, write_picture
from .graph import Graph, copy_graph, is_call, op_name, same_shape, shape_dtype, subgraph, tensor_meta
from .legality import fusion_blocker
from .text import graph_text
from .views import ConvArgs, FoldedPad, LinearArgs, SdpaArgs, conv_args, linear_args, sdpa_args, zero_pad_into

__all__ = ["WHOLE_LIMIT", "region_dot", "ConvArgs", "FoldedPad", "Graph", "LinearArgs", "SdpaArgs", "conv_args", "copy_graph", "fusion_blocker", "graph_dot",
           "graph_text", "is_call", "linear_args", "op_name", "same_shape", "sdpa_args", "shape_dtype", "subgraph", "tensor_meta",
           "write_picture", "zero_pad_into"]
