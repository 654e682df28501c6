"""gpt2 built from its transformers config (random init). For the CLI:

    graphopt compile examples/gpt2.py --dump-dir dumps/gpt2 --onnx gpt2.onnx        # published base size
    graphopt compile examples/gpt2.py:tiny --dump-dir dumps/gpt2-tiny              # a small one, in seconds
"""
from graphopt import zoo


def build():
    return zoo.build("gpt2", size="base", batch=1, seq=128)


def tiny():
    return zoo.build("gpt2", size="tiny", batch=2, seq=32)
