"""Adam / AdamW with blockwise quantized moments, 8-bit (Dettmers et al. 2021) or 4-bit (Li et
al. 2023), in one pass.

Each program updates ``ROWS`` consecutive quantization blocks of up to ``QBLOCK`` elements (a
block table gives each block's flat range; blocks start at every param's start). Per block, in
fp32:

    m = signed_table[m_code] * m_scale;  u = unsigned_table[v_code] * v_scale;  v = u * u
    (the Adam update of kernels/adam.py on param, grad, m, v)
    m_scale = max |m|;  m_code = nearest(signed_table, m / m_scale)
    v_scale = max sqrt(v); v_code = nearest(unsigned_table, sqrt(v) / v_scale)

``nearest`` counts the midpoints between table entries that lie below the value: a table by the
value's top bits (8-bit: 15 of |x|'s, 4-bit: 12) gives the count below every float with those
bits, and one midpoint settles it. The code tables are loaded once per program and read with
``tl.gather`` (shared memory): no global load depends on an element's value. 4-bit codes are two to a byte (element ``2j`` in the low
nibble of byte ``j``): a program loads its bytes and interleaves their nibbles, and splits its
codes into pairs to store them; a param's odd last element leaves its byte's high nibble zero.

The update divides as torch does but for two quotients whose rounding the codes absorb: the
moments over their block's scale use Triton's fp32 division (within 2 ulp, no IEEE slow path),
and sqrt(v) / sqrt(1 - beta2^t) is a product with the step's reciprocal (within an ulp). A
value an ulp from a midpoint may then take the neighbouring code, as the kernel's parity
tests allow (0.1 % of the codes); the update's own quotient stays IEEE.

When a program's blocks are all whole and back to back in the flat buffers (no param's short
last block, no slot padding among them), its elements are one contiguous, 64-element-aligned
range: loads and stores are unmasked vector accesses (8 elements per thread: two 16-byte fp32
vectors, 8 bytes of 8-bit codes or 4 of 4-bit ones). Other programs (a param's last block, the buffer's end) place each
element by its block's row, masked.
Tables and layout: ``fastopt.quantization``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import launch
from .adam import adam_arguments, adam_flags, adam_moments, step_row
from .rounding import load_param, seed_word, store_param

ROWS = 8  # 8-bit blocks per program: 2048 elements, 8 per thread of 8 warps (see rows_per_program)
NUM_WARPS = 8
INTERPRETER_ROWS = 32  # Triton's CPU interpreter pays per program: fewer, bigger ones there
GUESSES = tl.constexpr(4096)  # guess_table entries: 2**-24 to 2**8 by their top 15 bits
GUESS_BASE = tl.constexpr((127 - 24) << 7)  # the top 15 bits of 2**-24: entry 0
CELLS16 = tl.constexpr(4096)  # cell_table16 entries: a float's top 12 bits


@triton.jit
def _nearest(x, midpoints, counts, SIGNED: tl.constexpr):
    """Index of the table entry nearest to x (|x| <= 1): how many of the 255 ``midpoints``
    are below x (ties go to the lower entry, as ``torch.bucketize`` does). ``counts``
    (``guess_table``) gives, by the top 15 bits of |x|'s fp32 (its exponent and 7 mantissa
    bits), how many of the positive midpoints lie below every float with those bits; at most
    one more lies among those floats, the next one, and one comparison settles it. The signed
    table's midpoints below zero mirror its positive ones (checked there), so a negative x
    counts the positive midpoints at or above |x|."""
    magnitude = tl.abs(x)
    bits = magnitude.to(tl.int32, bitcast=True)
    index = tl.minimum(tl.maximum((bits >> 16) - GUESS_BASE, 0), GUESSES - 1)
    below = tl.gather(counts, index, 0).to(tl.int32)
    if SIGNED:  # entries [-1 .. -1e-6] 0 0 [1e-6 .. 1]; midpoints 0-126 < 0, 127 = 0, 128-254
        threshold = tl.gather(midpoints, 128 + below, 0)
        up = 128 + below + (magnitude > threshold).to(tl.int32)
        down = 127 - below - (magnitude >= threshold).to(tl.int32)
        return tl.where(x > 0, up, down)
    else:  # 0 [1e-7 .. 1]: every midpoint positive
        return below + (magnitude > tl.gather(midpoints, below, 0)).to(tl.int32)


@triton.jit
def _per_element(row_values, ROWS_PER_PROGRAM: tl.constexpr, QBLOCK: tl.constexpr):
    """One value per block, repeated for each of the block's ``QBLOCK`` elements."""
    return tl.reshape(tl.broadcast_to(row_values[:, None], (ROWS_PER_PROGRAM, QBLOCK)),
                      (ROWS_PER_PROGRAM * QBLOCK,))


@triton.jit
def _block_max(values, ROWS_PER_PROGRAM: tl.constexpr, QBLOCK: tl.constexpr):
    """The largest of each block's ``QBLOCK`` values: (per block, per element)."""
    rows = tl.max(tl.reshape(values, (ROWS_PER_PROGRAM, QBLOCK)), axis=1)
    return rows, _per_element(rows, ROWS_PER_PROGRAM, QBLOCK)


@triton.jit
def _load(pointers, mask, other):
    """``tl.load``, masked (with ``other``) unless ``mask`` is None."""
    if mask is None:
        return tl.load(pointers)
    else:
        return tl.load(pointers, mask=mask, other=other)


@triton.jit
def _nearest16(x, midpoints, cells):
    """Index of the 16-entry table's entry nearest to x: how many of its 15 ``midpoints``
    (padded with +inf to 16) are below x (ties go to the lower entry, as ``torch.bucketize``
    does). ``cells`` (``cell_table16``) counts, by x's top 12 bits (sign, exponent and 3
    mantissa bits), the midpoints below every float with those bits; at most one more lies
    among those floats, the next one, and one comparison settles it."""
    cell = (x.to(tl.uint32, bitcast=True) >> 20).to(tl.int32)
    below = tl.gather(cells, cell, 0).to(tl.int32)
    return below + (x > tl.gather(midpoints, below, 0)).to(tl.int32)


@triton.jit
def _load_codes(codes_ptr, code_offsets, code_mask, CODE_BITS: tl.constexpr):
    """Each element's code (int32); 4-bit: each byte's two nibbles, low one first."""
    stored = _load(codes_ptr + code_offsets, code_mask, 0).to(tl.int32)
    if CODE_BITS == 8:
        return stored
    else:
        return tl.interleave(stored & 15, stored >> 4)


@triton.jit
def _store_codes(codes_ptr, code_offsets, code_mask, codes, mask, CODE_BITS: tl.constexpr,
                 ELEMENTS: tl.constexpr):
    """Store each element's code; 4-bit: pairs of them to a byte (a masked-off element's
    nibble zero)."""
    if CODE_BITS == 8:
        tl.store(codes_ptr + code_offsets, codes.to(tl.uint8), mask=code_mask)
    else:
        if mask is not None:
            codes = tl.where(mask, codes, 0)
        low, high = tl.split(tl.reshape(codes, (ELEMENTS // 2, 2)))
        tl.store(codes_ptr + code_offsets, (low | (high << 4)).to(tl.uint8), mask=code_mask)


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
    signed_midpoints_ptr,  # fp32 [256]: the 255 midpoints, then +inf
    unsigned_values_ptr,  # fp32 [256] code table of sqrt(exp_avg_sq)
    unsigned_midpoints_ptr,  # fp32 [256]
    signed_guesses_ptr,  # uint8 [4096] guess_table(True) (4-bit: [4096] cell_table16(True))
    unsigned_guesses_ptr,  # uint8 [4096] guess_table(False) (4-bit: cell_table16(False))
    step_ptr,  # fp32 row (t, step_size, bias_correction2_sqrt), see kernels/adam.py
    lr_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    master_ptr,
    lr,
    decay,  # these five: see adam.adam_arguments
    one_minus_beta1,
    beta2,
    one_minus_beta2,
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
    CODE_BITS: tl.constexpr,  # 8: a byte per element; 4: two elements to a byte
):
    first_row = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM
    if HAS_FOUND_INF:  # an inf/nan grad this step: every block masked off, nothing written
        n_blocks = tl.where(tl.load(found_inf_ptr) == 0.0, n_blocks, 0)
    element = tl.arange(0, ROWS_PER_PROGRAM * QBLOCK)
    rows = first_row + tl.arange(0, ROWS_PER_PROGRAM)
    row_ok = rows < n_blocks
    starts = tl.load(block_table_ptr + rows * 2, mask=row_ok, other=0)
    ends = tl.load(block_table_ptr + rows * 2 + 1, mask=row_ok, other=0)
    # Every block whole, and no gap between them (a param's short last block is followed by
    # slot padding, which must not be updated: only its own elements are).
    whole = tl.sum(((ends - starts == QBLOCK) & row_ok).to(tl.int32), axis=0)
    start = tl.min(tl.where(row_ok, starts, starts + (1 << 62)), axis=0) - base
    span = tl.max(ends, axis=0) - base - start
    if (whole == ROWS_PER_PROGRAM) and (span == ROWS_PER_PROGRAM * QBLOCK):
        offsets = tl.multiple_of(start, 64) + element
        if CODE_BITS == 8:
            code_offsets = offsets
        else:
            code_offsets = tl.multiple_of(start // 2, 32) + tl.arange(
                0, ROWS_PER_PROGRAM * QBLOCK // 2)
        _adam_int8_elements(
            param_ptr, grad_ptr, m_codes_ptr, m_scales_ptr, v_codes_ptr, v_scales_ptr,
            signed_values_ptr, signed_midpoints_ptr, unsigned_values_ptr,
            unsigned_midpoints_ptr, signed_guesses_ptr, unsigned_guesses_ptr, step_ptr, lr_ptr,
            grad_scale_ptr, master_ptr, offsets, None, code_offsets, None, first_row, n_blocks,
            lr, decay, one_minus_beta1, beta2, one_minus_beta2, eps, base,
            seed_word, HAS_WEIGHT_DECAY, DECOUPLED, MAXIMIZE, LR_ON_DEVICE, HAS_GRAD_SCALE,
            HAS_MASTER, STOCHASTIC_ROUNDING, ROWS_PER_PROGRAM, QBLOCK, CODE_BITS)
    else:  # each element placed by its block's row, masked at the block's end
        row = first_row + element // QBLOCK  # (the blocks need not be whole or back to back)
        in_rows = row < n_blocks
        row_start = tl.load(block_table_ptr + row * 2, mask=in_rows, other=0) - base
        row_end = tl.load(block_table_ptr + row * 2 + 1, mask=in_rows, other=0) - base
        offsets = row_start + element % QBLOCK
        mask = in_rows & (offsets < row_end)
        if CODE_BITS == 8:
            code_offsets = offsets
            code_mask = mask
        else:  # a pair of elements to a byte: blocks start at even offsets
            code_offsets = tl.split(tl.reshape(offsets, (ROWS_PER_PROGRAM * QBLOCK // 2, 2)))[0]
            code_offsets = code_offsets // 2
            code_mask = tl.split(tl.reshape(mask.to(tl.int32),
                                            (ROWS_PER_PROGRAM * QBLOCK // 2, 2)))[0] != 0
        _adam_int8_elements(
            param_ptr, grad_ptr, m_codes_ptr, m_scales_ptr, v_codes_ptr, v_scales_ptr,
            signed_values_ptr, signed_midpoints_ptr, unsigned_values_ptr,
            unsigned_midpoints_ptr, signed_guesses_ptr, unsigned_guesses_ptr, step_ptr, lr_ptr,
            grad_scale_ptr, master_ptr, offsets, mask, code_offsets, code_mask, first_row,
            n_blocks, lr, decay, one_minus_beta1, beta2, one_minus_beta2,
            eps, base, seed_word, HAS_WEIGHT_DECAY, DECOUPLED, MAXIMIZE,
            LR_ON_DEVICE, HAS_GRAD_SCALE, HAS_MASTER, STOCHASTIC_ROUNDING, ROWS_PER_PROGRAM,
            QBLOCK, CODE_BITS)


@triton.jit
def _adam_int8_elements(
        param_ptr, grad_ptr, m_codes_ptr, m_scales_ptr, v_codes_ptr, v_scales_ptr,
        signed_values_ptr, signed_midpoints_ptr, unsigned_values_ptr, unsigned_midpoints_ptr,
        signed_guesses_ptr, unsigned_guesses_ptr, step_ptr, lr_ptr, grad_scale_ptr, master_ptr,
        offsets, mask, code_offsets, code_mask, first_row, n_blocks, lr, decay,
        one_minus_beta1, beta2, one_minus_beta2, eps, base, seed_word,
        HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
        LR_ON_DEVICE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr,
        STOCHASTIC_ROUNDING: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
        QBLOCK: tl.constexpr, CODE_BITS: tl.constexpr):
    """Decode, update and encode the elements at ``offsets`` (``mask``: None when every one is
    there, and every block ``first_row + [0, ROWS_PER_PROGRAM)`` below ``n_blocks``), their
    codes at ``code_offsets`` (4-bit: one byte per pair of elements; ``code_mask``)."""
    step, step_size, bias_correction2_sqrt = step_row(step_ptr)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    entries = tl.arange(0, 1 << CODE_BITS)
    signed_values = tl.load(signed_values_ptr + entries)
    unsigned_values = tl.load(unsigned_values_ptr + entries)
    rows = first_row + tl.arange(0, ROWS_PER_PROGRAM)
    if mask is None:
        rows_ok = None
    else:
        rows_ok = rows < n_blocks

    param = load_param(param_ptr + offsets, master_ptr + offsets, mask, HAS_MASTER)
    grad = _load(grad_ptr + offsets, mask, 0.0).to(tl.float32)
    m_code = _load_codes(m_codes_ptr, code_offsets, code_mask, CODE_BITS)
    v_code = _load_codes(v_codes_ptr, code_offsets, code_mask, CODE_BITS)
    m_scale = _per_element(_load(m_scales_ptr + rows, rows_ok, 0.0), ROWS_PER_PROGRAM, QBLOCK)
    v_scale = _per_element(_load(v_scales_ptr + rows, rows_ok, 0.0), ROWS_PER_PROGRAM, QBLOCK)
    exp_avg = tl.gather(signed_values, m_code, 0) * m_scale
    decoded_root = tl.gather(unsigned_values, v_code, 0) * v_scale
    exp_avg_sq = decoded_root * decoded_root

    param, exp_avg, exp_avg_sq = adam_moments(
        param, grad, exp_avg, exp_avg_sq, grad_scale_ptr, lr, decay, one_minus_beta1,
        beta2, one_minus_beta2, HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY,
        DECOUPLED, LR_ON_DEVICE)
    # adam_step's update, sqrt(v) / sqrt(1 - beta2^t) taken as a product with the step's
    # reciprocal (an ulp from torch's quotient at most, as the moments' codes allow); the root
    # is the one encoded below
    root = tl.sqrt_rn(exp_avg_sq)
    denom = root * tl.div_rn(1.0, bias_correction2_sqrt) + eps
    param = param + tl.div_rn(-step_size * exp_avg, denom)
    store_param(param_ptr + offsets, master_ptr + offsets, mask, param, base + offsets, step,
                seed_word, HAS_MASTER, STOCHASTIC_ROUNDING)

    # One moment's encoding live at a time: exp_avg's codes first, but beside stochastic
    # rounding sqrt(exp_avg_sq)'s (in those orders every variant's masked path fits sm_90's
    # registers with Triton 3.9; the other orders spill a word)
    if not STOCHASTIC_ROUNDING:
        _encode(exp_avg, m_codes_ptr, m_scales_ptr, signed_midpoints_ptr, signed_guesses_ptr,
                code_offsets, code_mask, mask, rows, rows_ok, True, CODE_BITS,
                ROWS_PER_PROGRAM, QBLOCK)
    _encode(root, v_codes_ptr, v_scales_ptr, unsigned_midpoints_ptr,
            unsigned_guesses_ptr, code_offsets, code_mask, mask, rows, rows_ok, False,
            CODE_BITS, ROWS_PER_PROGRAM, QBLOCK)
    if STOCHASTIC_ROUNDING:
        _encode(exp_avg, m_codes_ptr, m_scales_ptr, signed_midpoints_ptr, signed_guesses_ptr,
                code_offsets, code_mask, mask, rows, rows_ok, True, CODE_BITS,
                ROWS_PER_PROGRAM, QBLOCK)


@triton.jit
def _encode(values, codes_ptr, scales_ptr, midpoints_ptr, guesses_ptr, code_offsets, code_mask,
            mask, rows, rows_ok, SIGNED: tl.constexpr, CODE_BITS: tl.constexpr,
            ROWS_PER_PROGRAM: tl.constexpr, QBLOCK: tl.constexpr):
    """Store one moment's block scales (largest magnitude of each block's elements at
    ``mask``) and each element's code of ``values`` over its block's scale."""
    magnitude = tl.abs(values)
    if mask is not None:
        magnitude = tl.where(mask, magnitude, 0.0)
    row_scale, scale = _block_max(magnitude, ROWS_PER_PROGRAM, QBLOCK)
    # Triton's fp32 division (div.full: within 2 ulp over the whole range, subnormal scales
    # included, without IEEE division's slow path; see the module docstring)
    normalized = values / tl.where(scale > 0, scale, 1.0)
    midpoints = tl.load(midpoints_ptr + tl.arange(0, 1 << CODE_BITS))
    if CODE_BITS == 8:
        code = _nearest(normalized, midpoints, tl.load(guesses_ptr + tl.arange(0, GUESSES)),
                        SIGNED)
    else:
        code = _nearest16(normalized, midpoints, tl.load(guesses_ptr + tl.arange(0, CELLS16)))
    _store_codes(codes_ptr, code_offsets, code_mask, code, mask, CODE_BITS,
                 ROWS_PER_PROGRAM * QBLOCK)
    tl.store(scales_ptr + rows, row_scale, mask=rows_ok)


def adam_int8_update(params, grads, exp_avgs, exp_avg_scales, exp_avg_sqs, exp_avg_sq_scales,
                     steps, *, block_tables, bases, spans, lr, beta1, beta2, weight_decay, eps,
                     maximize, decoupled, grad_scale=None, found_inf=None, masters=None,
                     rounding_seed=None, offsets=None, code_bits=8) -> None:
    """One launch per chunk; the signature of ``fastopt.torch_path.adam_int8_update``."""
    from fastopt.quantization import FORMATS

    fmt = FORMATS["int8" if code_bits == 8 else "int4"]
    stochastic = rounding_seed is not None and masters is None
    rows = rows_per_program(fmt, masters[0].dtype if masters else None, launch.INTERPRETED)
    for i, param in enumerate(params):
        n_blocks = block_tables[i].shape[0]
        if n_blocks == 0:
            continue
        signed_values, signed_midpoints, signed_guesses = kernel_tables(True, param.device, fmt)
        unsigned_values, unsigned_midpoints, unsigned_guesses = kernel_tables(
            False, param.device, fmt)
        _adam_int8_kernel[(triton.cdiv(n_blocks, rows),)](
            param, grads[i], exp_avgs[i], exp_avg_scales[i], exp_avg_sqs[i],
            exp_avg_sq_scales[i], block_tables[i], signed_values, signed_midpoints,
            unsigned_values, unsigned_midpoints, signed_guesses, unsigned_guesses,
            *adam_arguments(param, steps[i], masters[i] if masters is not None else None, lr,
                            beta1, beta2, weight_decay, eps, grad_scale, found_inf,
                            decoupled),
            n_blocks, bases[i], seed_word(rounding_seed) if stochastic else 0,
            **adam_flags(param, lr, weight_decay, decoupled, maximize, grad_scale, found_inf,
                         masters, stochastic),
            ROWS_PER_PROGRAM=rows,
            QBLOCK=fmt.block,
            CODE_BITS=fmt.bits,
            num_warps=NUM_WARPS,
        )


def rows_per_program(fmt, master, interpreter: bool = False) -> int:
    """Blocks per program: 2048 elements in either format; 1024 for 4-bit beside a remainder
    master (int16/int8 ``master``): at 2048 that kernel takes about 150 registers a thread on
    sm_90 (one program an SM), at 1024 80-96 (three)."""
    rows = INTERPRETER_ROWS if interpreter else ROWS
    if fmt.bits == 4 and master in ("i16", "i8", torch.int16, torch.int8):
        return rows
    return rows * 256 // fmt.block


@functools.lru_cache(maxsize=16)
def kernel_tables(signed: bool, device, fmt=None) -> tuple:
    """(code values, midpoints padded with +inf to as many entries, ``guess_table`` (8-bit)
    or ``cell_table16`` (4-bit)) on ``device``."""
    from fastopt.quantization import INT8, tables

    fmt = fmt or INT8
    values, midpoints = tables(signed, device, fmt)
    padded = torch.cat([midpoints, midpoints.new_full((1,), float("inf"))])
    guesses = (guess_table if fmt.bits == 8 else cell_table16)(signed).to(device)
    return values, padded, guesses


@functools.lru_cache(maxsize=2)
def guess_table(signed: bool) -> torch.Tensor:
    """uint8 [GUESSES]: entry ``i`` counts the table's positive midpoints below every float
    whose top 15 bits are ``GUESS_BASE + i`` (entry 0: also those under 2**-24). Among those
    floats lies at most one more midpoint (checked here), so ``_nearest`` settles a code with
    one comparison; the signed table's midpoints below zero mirror its positive ones, and the
    one between its two zeros is zero (checked too)."""
    from fastopt.quantization import tables

    _, midpoints = tables(signed, torch.device("cpu"))
    positive = midpoints[128:] if signed else midpoints
    assert bool((positive > 0).all())
    if signed:
        assert torch.equal(midpoints[:127], -positive.flip(0)) and float(midpoints[127]) == 0.0
    top_bits = torch.arange(GUESSES.value, dtype=torch.int32) + GUESS_BASE.value
    lowest = (top_bits << 16).view(torch.float32)
    highest = ((top_bits << 16) | 0xFFFF).view(torch.float32)
    below = torch.bucketize(lowest, positive)
    below[0] = 0
    assert int((torch.bucketize(highest, positive) - below).max()) <= 1
    return below.to(torch.uint8)


@functools.lru_cache(maxsize=2)
def cell_table16(signed: bool) -> torch.Tensor:
    """uint8 [CELLS16]: entry ``i`` counts the 4-bit table's midpoints below every float whose
    top 12 bits are ``i`` (sign, exponent, 3 mantissa bits). Among those floats lies at most
    one more midpoint (checked here, for every finite range), so ``_nearest16`` settles a code
    with one comparison."""
    from fastopt.quantization import INT4, cell_codes

    return cell_codes(signed, INT4, top_bits=12)[0].to(torch.uint8)
