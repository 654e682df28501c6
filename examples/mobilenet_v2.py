"""mobilenet_v2 built from its transformers config (random init). For the CLI:

    graphopt compile examples/mobilenet_v2.py --dump-dir dumps/mobilenet_v2 --onnx mobilenet_v2.onnx        # published base size
    graphopt compile examples/mobilenet_v2.py:tiny --dump-dir dumps/mobilenet_v2-tiny              # a small one, in seconds
"""
from graphopt import zoo


def build():
    return zoo.build("mobilenet_v2", size="base", batch=1, seq=128)


def tiny():
    return zoo.build("mobilenet_v2", size="tiny", batch=2, seq=32)
