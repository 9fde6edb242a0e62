"""Named parameter-shape sets used by the benchmarks (and anything else that needs a real model's
layout without building the model)."""

from __future__ import annotations


def gpt2_small() -> list:
    """GPT-2 small (124M): 148 tensors, token/position embeddings, 12 blocks, final layer norm."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [
            (d,), (d,),  # ln_1
            (d, 3 * d), (3 * d,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def resnet18() -> list:
    """ResNet-18 (He et al. 2015) for ImageNet: 62 tensors, 11,689,512 elements (convs without
    bias, batch norms as weight and bias, the 1000-way fc)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    channels = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(width, channels, 3, 3), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,)]
            if block == 0 and (stride != 1 or channels != width):
                shapes += [(width, channels, 1, 1), (width,), (width,)]  # downsample
            channels = width
    return shapes + [(1000, 512), (1000,)]


def resnet18_head() -> list:
    """The seed's trainable head on a frozen ResNet-18 trunk (cats vs dogs): three convolutions,
    512->256 (4x4), 256->1 (5x5), 1->1 (1x1), with biases: 2,103,811 elements."""
    return [(256, 512, 4, 4), (256,), (1, 256, 5, 5), (1,), (1, 1, 1, 1), (1,)]


def demo_cnn() -> list:
    """The demo's DigitsCNN (``examples/demo.py``): two 3x3 convolutions and two linear layers,
    8 tensors, 38,282 elements."""
    return [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (64, 512), (64,), (10, 64), (10,)]


CASES = {
    "1x16M": lambda: [(16 * 1024 * 1024,)],
    "1000x16K": lambda: [(16 * 1024,)] * 1000,
    "gpt2-small": gpt2_small,
    # The default loop's cases (many small tensors, a few large, an odd size).
    "demo-cnn": demo_cnn,
    "1000x64": lambda: [(64,)] * 1000,
    "400x4K": lambda: [(4 * 1024,)] * 400,
    "1000x4K": lambda: [(4 * 1024,)] * 1000,
    "1x4M-odd": lambda: [(4 * 1024 * 1024 + 3,)],
}

# Models by name for ``python -m fastopt.memory``.
MODELS = {
    "gpt2-small": gpt2_small,
    "resnet18": resnet18,
    "resnet18-head": resnet18_head,
    "1x16M": CASES["1x16M"],
    "1000x16K": CASES["1000x16K"],
}


def numel(shapes: list) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total
