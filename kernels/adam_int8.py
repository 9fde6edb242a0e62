"""Adam / AdamW with blockwise 8-bit moments, in one pass (Dettmers et al. 2021).

Each program updates ``ROWS`` quantization blocks of up to ``QBLOCK`` elements (a block table
gives each block's flat range, so blocks start at every param's start). Per block, in fp32:

    m = signed_table[m_code] * m_scale;  u = unsigned_table[v_code] * v_scale;  v = u * u
    (the Adam update of kernels/adam.py on param, grad, m, v)
    m_scale = max |m|;  m_code = nearest(signed_table, m / m_scale)
    v_scale = max sqrt(v); v_code = nearest(unsigned_table, sqrt(v) / v_scale)

``nearest`` is a binary search over the 255 midpoints between table entries (8 probes of a
1 KiB table that stays in cache). Tables and layout: ``fastopt.quantization``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .adam import adam_arguments, adam_flags, adam_moments, adam_step, step_row
from .rounding import load_param, seed_word, store_param

ROWS = 4  # quantization blocks per program
INTERPRETER_ROWS = 32  # Triton's CPU interpreter pays per program: fewer, bigger ones there


@triton.jit
def _nearest(x, midpoints_ptr):
    """Index of the table entry nearest to x: how many of the 255 midpoints are below x."""
    position = tl.zeros(x.shape, dtype=tl.int32)
    for bit in tl.static_range(8):
        candidate = position + (128 >> bit)
        midpoint = tl.load(midpoints_ptr + candidate - 1)
        position = tl.where(midpoint < x, candidate, position)
    return position


@triton.jit
def _adam_int8_kernel(
    param_ptr,  # params of this chunk (flat from the chunk's start), updated in place
    grad_ptr,  # their grads
    m_codes_ptr,  # uint8 codes of exp_avg
    m_scales_ptr,  # fp32 scale of each block of exp_avg
    v_codes_ptr,  # uint8 codes of sqrt(exp_avg_sq)
    v_scales_ptr,  # fp32 scale of each block of sqrt(exp_avg_sq)
    block_table_ptr,  # int64 [n_blocks, 2]: flat [start, end) of each block
    signed_values_ptr,  # fp32 [256] code table of exp_avg
    signed_midpoints_ptr,  # fp32 [255]
    unsigned_values_ptr,  # fp32 [256] code table of sqrt(exp_avg_sq)
    unsigned_midpoints_ptr,  # fp32 [255]
    step_ptr,
    lr_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    master_ptr,
    lr,
    decay_factor,
    beta1,
    beta2,
    weight_decay,
    eps,
    n_blocks,
    base,  # the chunk's flat start: block ranges are relative to it
    seed_word,
    HAS_WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    if HAS_FOUND_INF:  # an inf/nan grad this step: every block masked off, nothing written
        n_blocks = tl.where(tl.load(found_inf_ptr) == 0.0, n_blocks, 0)
    row_ok = rows < n_blocks
    start = tl.load(block_table_ptr + rows * 2, mask=row_ok, other=0) - base
    end = tl.load(block_table_ptr + rows * 2 + 1, mask=row_ok, other=0) - base
    offsets = start[:, None] + tl.arange(0, QBLOCK)[None, :]
    mask = row_ok[:, None] & (offsets < end[:, None])
    step, step_size, bias_correction2_sqrt = step_row(step_ptr)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)

    param = load_param(param_ptr + offsets, master_ptr + offsets, mask, HAS_MASTER)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m_code = tl.load(m_codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
    v_code = tl.load(v_codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
    m_scale = tl.load(m_scales_ptr + rows, mask=row_ok, other=0.0)
    v_scale = tl.load(v_scales_ptr + rows, mask=row_ok, other=0.0)
    exp_avg = tl.load(signed_values_ptr + m_code) * m_scale[:, None]
    root = tl.load(unsigned_values_ptr + v_code) * v_scale[:, None]
    exp_avg_sq = root * root

    param, exp_avg, exp_avg_sq = adam_moments(
        param, grad, exp_avg, exp_avg_sq, grad_scale_ptr, lr, decay_factor, beta1, beta2,
        weight_decay, HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED, LR_ON_DEVICE)
    param = adam_step(param, exp_avg, exp_avg_sq, step_size, bias_correction2_sqrt, eps)

    m_scale = tl.max(tl.where(mask, tl.abs(exp_avg), 0.0), axis=1)
    m_code = _nearest(exp_avg / tl.where(m_scale > 0, m_scale, 1.0)[:, None], signed_midpoints_ptr)
    root = tl.sqrt_rn(exp_avg_sq)
    v_scale = tl.max(tl.where(mask, root, 0.0), axis=1)
    v_code = _nearest(root / tl.where(v_scale > 0, v_scale, 1.0)[:, None], unsigned_midpoints_ptr)

    store_param(param_ptr + offsets, master_ptr + offsets, mask, param, base + offsets, step,
                seed_word, HAS_MASTER, STOCHASTIC_ROUNDING)
    tl.store(m_codes_ptr + offsets, m_code.to(tl.uint8), mask=mask)
    tl.store(v_codes_ptr + offsets, v_code.to(tl.uint8), mask=mask)
    tl.store(m_scales_ptr + rows, m_scale, mask=row_ok)
    tl.store(v_scales_ptr + rows, v_scale, mask=row_ok)


def adam_int8_update(params, grads, exp_avgs, exp_avg_scales, exp_avg_sqs, exp_avg_sq_scales,
                     steps, *, block_tables, bases, spans, lr, beta1, beta2, weight_decay, eps,
                     maximize, decoupled, grad_scale=None, found_inf=None, masters=None,
                     rounding_seed=None, offsets=None) -> None:
    """One launch per chunk; the signature of ``fastopt.torch_path.adam_int8_update``."""
    from fastopt.quantization import BLOCK, tables

    stochastic = rounding_seed is not None and masters is None
    rows = INTERPRETER_ROWS if os.environ.get("TRITON_INTERPRET") == "1" else ROWS
    for i, param in enumerate(params):
        n_blocks = block_tables[i].shape[0]
        if n_blocks == 0:
            continue
        signed_values, signed_midpoints = tables(True, param.device)
        unsigned_values, unsigned_midpoints = tables(False, param.device)
        _adam_int8_kernel[(triton.cdiv(n_blocks, rows),)](
            param, grads[i], exp_avgs[i], exp_avg_scales[i], exp_avg_sqs[i],
            exp_avg_sq_scales[i], block_tables[i], signed_values, signed_midpoints,
            unsigned_values, unsigned_midpoints,
            *adam_arguments(param, steps[i], masters[i] if masters is not None else None, lr,
                            beta1, beta2, weight_decay, eps, grad_scale, found_inf),
            n_blocks, bases[i], seed_word(rounding_seed) if stochastic else 0,
            **adam_flags(param, lr, weight_decay, decoupled, maximize, grad_scale, found_inf,
                         masters, stochastic),
            ROWS_PER_PROGRAM=rows,
            QBLOCK=BLOCK,
            num_warps=4,
        )
