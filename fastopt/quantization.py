"""Blockwise 8-bit state (``state_dtype="int8"``), after Dettmers et al. 2021 (arXiv 2110.02861).

Each block of ``BLOCK`` consecutive elements of a param is stored as one byte per element (the
index of the nearest entry of a 256-value code table) and one fp32 scale, the block's largest
magnitude. Decoding is ``table[code] * scale``.

The tables are dynamic (non-linear): after the sign, the position of the first 1 bit picks a
decade, the remaining bits a linear step within it, so small values keep their relative
precision instead of rounding to zero. Built here from that description:

- signed (``exp_avg``): for decade ``k = 0..6``, ``2**(6-k)`` values evenly spaced over
  ``(0.1, 1] * 10**-k`` (the top one of each decade included), their negatives, and zero
  (twice, to fill 256 entries);
- unsigned (``exp_avg_sq``): decades ``k = 0..7`` with ``2**(7-k)`` values each, and zero.

``exp_avg_sq`` is stored as its square root: the update only uses ``sqrt(v)``, and the square
root halves the dynamic range a block must span, so an element far below its block's largest
does not round to zero (which would divide its ``exp_avg`` by ``eps`` alone).

Tensors under ``MIN_SIZE`` elements keep fp32 state, as bitsandbytes does: their state costs
little and they are often the sensitive ones (norms, biases).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK = 256
MIN_SIZE = 4096
CODES = torch.uint8


def _decades(levels: int, top_bits: int) -> list:
    values = []
    for k in range(levels):
        count = 2 ** (top_bits - k)
        scale = 10.0**-k
        values += [scale * (0.1 + 0.9 * (j + 1) / count) for j in range(count)]
    return values


@functools.lru_cache(maxsize=None)
def code_table(signed: bool) -> tuple:
    """The 256 code values, ascending."""
    if signed:
        positive = _decades(7, 6)  # 127 values
        values = positive + [-v for v in positive] + [0.0, 0.0]
    else:
        values = _decades(8, 7) + [0.0]  # 255 values and zero
    assert len(values) == 256
    return tuple(sorted(values))


@functools.lru_cache(maxsize=16)
def tables(signed: bool, device: torch.device) -> tuple:
    """(code values [256], midpoints between neighbours [255]) as fp32 tensors on ``device``."""
    values = torch.tensor(code_table(signed), dtype=torch.float32, device=device)
    return values, (values[1:] + values[:-1]) / 2


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def quantize(values: Tensor, signed: bool) -> tuple:
    """``values`` (one param, any shape) -> (codes of the same shape, fp32 scales [blocks])."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, num_blocks(n) * BLOCK - n)).view(-1, BLOCK)
    scales = padded.abs().amax(dim=1)
    normalized = padded / torch.where(scales > 0, scales, 1.0)[:, None]
    _, midpoints = tables(signed, values.device)
    codes = torch.bucketize(normalized, midpoints, out_int32=True).to(CODES)
    return codes.view(-1)[:n].view(values.shape), scales


def dequantize(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """codes (one param) and their block scales -> fp32 values of the codes' shape."""
    code_values, _ = tables(signed, codes.device)
    flat = code_values[codes.reshape(-1).int()]
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, num_blocks(n) * BLOCK - n)).view(-1, BLOCK)
    return (padded * scales[:, None]).view(-1)[:n].view(codes.shape)
