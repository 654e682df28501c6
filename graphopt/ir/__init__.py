"""graphopt's IR: an executable ATen FX graph with shapes, a text form, a networkx view and DOT dumps."""
from .dot import graph_dot, write_picture
from .legality import fusion_blocker
from .graph import Graph, is_call, op_name, same_shape, shape_dtype, tensor_meta
from .text import graph_text

__all__ = ["Graph", "fusion_blocker", "graph_dot", "graph_text", "is_call", "op_name", "same_shape", "shape_dtype", "tensor_meta", "write_picture"]
