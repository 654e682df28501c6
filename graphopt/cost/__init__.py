"""Every measured decision: one clock, the probe graphs, and the cost model of a target, which
passes receive through their context and backends consult for their own choices."""
from .fft import Conv2dShape, ConvShape, Decision
from .model import CostModel

__all__ = ["Conv2dShape", "ConvShape", "CostModel", "Decision"]
