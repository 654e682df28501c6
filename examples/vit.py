"""vit built from its transformers config (random init). For the CLI:

    graphopt compile examples/vit.py --dump-dir dumps/vit --onnx vit.onnx        # published base size
    graphopt compile examples/vit.py:tiny --dump-dir dumps/vit-tiny              # a small one, in seconds
"""
from graphopt import zoo


def build():
    return zoo.build("vit", size="base", batch=1, seq=128)


def tiny():
    return zoo.build("vit", size="tiny", batch=2, seq=32)
