"""bert built from its transformers config (random init). For the CLI:

    graphopt compile examples/bert.py --dump-dir dumps/bert --onnx bert.onnx        # published base size
    graphopt compile examples/bert.py:tiny --dump-dir dumps/bert-tiny              # a small one, in seconds
"""
from graphopt import zoo


def build():
    return zoo.build("bert", size="base", batch=1, seq=128)


def tiny():
    return zoo.build("bert", size="tiny", batch=2, seq=32)
