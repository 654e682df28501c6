"""resnet built from its transformers config (random init). For the CLI:

    graphopt compile examples/resnet.py --dump-dir dumps/resnet --onnx resnet.onnx        # published base size
    graphopt compile examples/resnet.py:tiny --dump-dir dumps/resnet-tiny              # a small one, in seconds
"""
from graphopt import zoo


def build():
    return zoo.build("resnet", size="base", batch=1, seq=128)


def tiny():
    return zoo.build("resnet", size="tiny", batch=2, seq=32)
