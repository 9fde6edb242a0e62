"""Training with lean precision: does the loss stay where fp32 puts it?

Two small jobs, each trained with the same seed and batches under every variant:

- the demo's CNN on scikit-learn's digits (cross-entropy, batch 32);
- a tiny transformer (2 encoder layers, d=64, 4 heads) that learns to reverse sequences of 12
  tokens from a vocabulary of 16 (the answer needs attention across the whole sequence).

Variants: fp32 params and state (the reference); bf16 params with torch.optim's behaviour
(bf16 state, rounding to nearest); bf16 params with fp32 ``master_weights``, with their
remainders (``master_weights="remainder"``: the same fp32 master in 2 bytes a param;
``"remainder8"``: a 24-bit one in 1 byte; and the remainder beside 8-bit state); bf16 params
with ``stochastic_rounding``; fp32 params with ``state_dtype=torch.bfloat16``; fp32 params with
``state_dtype="int8"`` or ``"int4"`` (and 4-bit state beside remainders or stochastic
rounding). ``python -m examples.precision`` prints the final losses.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fastopt
from examples.demo import DigitsCNN, load_digits_split

VARIANTS = {
    "fp32": (torch.float32, {}),
    "bf16 params": (torch.bfloat16, {}),
    "bf16 + master_weights": (torch.bfloat16, {"master_weights": True}),
    "bf16 + remainder": (torch.bfloat16, {"master_weights": "remainder"}),
    "bf16 + remainder8": (torch.bfloat16, {"master_weights": "remainder8"}),
    "bf16 + remainder + int8 state": (torch.bfloat16, {"master_weights": "remainder",
                                                       "state_dtype": "int8"}),
    "bf16 + remainder8 + bf16 state": (torch.bfloat16, {"master_weights": "remainder8",
                                                        "state_dtype": torch.bfloat16}),
    "bf16 + int8 state + stochastic_rounding": (torch.bfloat16, {
        "state_dtype": "int8", "stochastic_rounding": True}),
    "bf16 + stochastic_rounding": (torch.bfloat16, {"stochastic_rounding": True}),
    "fp32 + bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "fp32 + int8 state": (torch.float32, {"state_dtype": "int8"}),
    "fp32 + int4 state": (torch.float32, {"state_dtype": "int4"}),
    "bf16 + int4 state + stochastic_rounding": (torch.bfloat16, {
        "state_dtype": "int4", "stochastic_rounding": True}),
    "bf16 + remainder8 + int4 state": (torch.bfloat16, {"master_weights": "remainder8",
                                                        "state_dtype": "int4"}),
    "bf16 + remainder + int4 state": (torch.bfloat16, {"master_weights": "remainder",
                                                       "state_dtype": "int4"}),
}


class Reverser(nn.Module):
    """Token + position embeddings, 2 transformer encoder layers, a linear read-out."""

    def __init__(self, vocab: int = 16, length: int = 12, width: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(width, vocab)

    def forward(self, x):
        h = self.tokens(x) + self.positions.to(self.tokens.weight.dtype)
        return self.out(self.encoder(h))


def reversal_batches(steps: int, batch: int = 64, vocab: int = 16, length: int = 12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, vocab, (batch, length), generator=gen)
        yield x, x.flip(1)


def train_reverser(dtype, options: dict, steps: int = 200, lr: float = 1e-3,
                   seed: int = 0) -> list:
    """Losses of the reversal task (AdamW, constant lr), one per step."""
    torch.manual_seed(seed)
    model = Reverser().to(dtype)
    opt = fastopt.AdamW(model.parameters(), lr=lr, weight_decay=0.01, **options)
    losses = []
    for x, y in reversal_batches(steps, seed=seed):
        opt.zero_grad()
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 16), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_digits(dtype, options: dict, epochs: int = 4, lr: float = 3e-3, seed: int = 0) -> list:
    """Per-epoch mean training loss of the demo CNN on digits (AdamW)."""
    (x_train, y_train), _ = load_digits_split(seed)
    torch.manual_seed(seed)
    model = DigitsCNN().to(dtype)
    opt = fastopt.AdamW(model.parameters(), lr=lr, **options)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx].to(dtype)).float(), y_train[idx])
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        history.append(total / count)
    return history


def tail_mean(values: list, n: int = 20) -> float:
    return sum(values[-n:]) / len(values[-n:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.precision", description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="reversal-task steps")
    parser.add_argument("--epochs", type=int, default=4, help="digits epochs")
    args = parser.parse_args(argv)
    print(f"digits: AdamW lr 3e-3, mean training loss of epoch {args.epochs}; reversal: AdamW "
          f"lr 1e-3, mean loss over all {args.steps} steps and over the last 20")
    print(f"{'variant':<40} {'digits':>8} {'reversal (all)':>15} {'reversal (last 20)':>19}")
    for name, (dtype, options) in VARIANTS.items():
        digits = train_digits(dtype, options, epochs=args.epochs)[-1]
        reversal = train_reverser(dtype, options, steps=args.steps)
        print(f"{name:<40} {digits:8.4f} {sum(reversal) / len(reversal):15.4f} "
              f"{tail_mean(reversal):19.4f}", flush=True)


if __name__ == "__main__":
    main()
