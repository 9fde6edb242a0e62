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


CASES = {
    "1x16M": lambda: [(16 * 1024 * 1024,)],
    "1000x16K": lambda: [(16 * 1024,)] * 1000,
    "gpt2-small": gpt2_small,
}


def numel(shapes: list) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total
