"""A RepLKNet-style stage, written from the published description (Ding et al., 2022, "Scaling Up Your
Kernels to 31x31"): each RepLK block is BN → 1×1 conv → depthwise 31×31 conv (plus the parallel
5×5 depthwise branch that re-parameterization merges) → ReLU → 1×1 conv, with a residual; each
ConvFFN block is BN → 1×1 conv (4×) → GELU → 1×1 conv, with a residual. Stage 1 of RepLKNet-31B:
128 channels at 56×56.

    graphopt compile examples/replknet.py --dump-dir dumps/replknet
    graphopt compile examples/replknet.py:tiny

graphopt folds the BatchNorms, rewrites each 31×31 depthwise conv into a matmul-DFT convolution
(graphopt::fft_conv2d) where its cost model says so, and keeps the 5×5 branch direct."""
import torch
import torch.nn as nn


def conv_bn(c_in: int, c_out: int, k: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))


class RepLKBlock(nn.Module):
    def __init__(self, c: int, kernel: int, small: int = 5):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.pw1 = nn.Sequential(conv_bn(c, c, 1), nn.ReLU())
        self.large, self.small = conv_bn(c, c, kernel, groups=c), conv_bn(c, c, small, groups=c)
        self.pw2 = conv_bn(c, c, 1)

    def forward(self, x):
        y = self.pw1(self.norm(x))
        return x + self.pw2(torch.relu(self.large(y) + self.small(y)))


class ConvFFN(nn.Module):
    def __init__(self, c: int, ratio: int = 4):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.pw1, self.pw2 = conv_bn(c, ratio * c, 1), conv_bn(ratio * c, c, 1)

    def forward(self, x):
        return x + self.pw2(nn.functional.gelu(self.pw1(self.norm(x))))


class RepLKStage(nn.Module):
    def __init__(self, c: int = 128, kernel: int = 31, blocks: int = 2):
        super().__init__()
        self.blocks = nn.Sequential(*(m for _ in range(blocks) for m in (RepLKBlock(c, kernel), ConvFFN(c))))

    def forward(self, x):
        return self.blocks(x)


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Trained-looking BatchNorm statistics (fresh ones are the identity and hide errors)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def build(channels: int = 128, size: int = 56, kernel: int = 31, blocks: int = 2, batch: int = 1):
    torch.manual_seed(0)
    model = _randomize_batchnorm(RepLKStage(channels, kernel, blocks)).eval()
    return model, (torch.randn(batch, channels, size, size),)


def tiny():
    return build(channels=16, size=24, kernel=13, blocks=1, batch=2)
