"""Rounding fp32 values for storage: to nearest (``to_storage``) or, for bf16, stochastically
with noise from a counter-based hash (``round_bf16_stochastic``); and the param round trip every
kernel shares (``load_param`` / ``store_param``: fp32 masters or their remainders, outside
edits, rounding).

bf16 round-to-nearest-even is the GPU's own conversion (one instruction). Triton's CPU
interpreter truncates instead, so under it (``INTERPRETED``, a compile-time constant) the
rounding is spelled out on the bits; both give torch's ``.to(torch.bfloat16)``.

The same hash as ``fastopt.precision``, in 32-bit unsigned integers (products wrap mod 2**32):

    x = offset * 0x9E3779B1 + step * 0x85EBCA77 + seed * 0xC2B2AE3D
    x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    noise = x & 0xFFFF;  bf16 = top 16 bits of (fp32 bits + noise)

``seed_word`` is ``seed * 0xC2B2AE3D mod 2**32``, computed once on the host.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import launch

SEED_MIX = 0xC2B2AE3D
INTERPRETED = tl.constexpr(launch.INTERPRETED)


def seed_word(seed: int) -> int:
    return (seed * SEED_MIX) & 0xFFFFFFFF


@triton.jit
def round_bf16_stochastic(value, offsets, step, seed_word):
    """fp32 ``value`` (at flat ``offsets``, step ``step``) rounded to bf16 with hashed noise."""
    x = offsets.to(tl.uint32) * 0x9E3779B1
    x = x + step.to(tl.uint32) * 0x85EBCA77 + tl.cast(seed_word, tl.uint32)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    bits = (value.to(tl.uint32, bitcast=True) + (x & 0xFFFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low bits are zero


@triton.jit
def round_bf16_nearest(value):
    """fp32 ``value`` to bf16, round to nearest even (nan stays nan), on the bits."""
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    rounded = bits.to(tl.float32, bitcast=True)
    return tl.where(value != value, value, rounded).to(tl.bfloat16)


@triton.jit
def to_storage(value, dtype: tl.constexpr):
    """fp32 ``value`` in ``dtype`` (a pointer's element type), rounded to nearest."""
    if INTERPRETED and dtype == tl.bfloat16:
        return round_bf16_nearest(value)
    else:
        return value.to(dtype)


@triton.jit
def rebuild_master(param, remainder):
    """The fp32 master of bf16 ``param`` and its ``remainder`` (int16; int8: the top 8 of those
    bits): the param's bits on top, the remainder added as a signed offset (mod 2**32)."""
    high = param.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    # the remainder's bits zero-extended, then sign-extended by shifts (no byte conversions)
    if remainder.dtype == tl.int8:
        offset = (remainder.to(tl.uint8, bitcast=True).to(tl.int32) << 24) >> 16
    else:
        offset = (remainder.to(tl.uint16, bitcast=True).to(tl.int32) << 16) >> 16
    return (high + offset.to(tl.uint32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def split_master(value, remainder_ty: tl.constexpr):
    """fp32 ``value`` as (the bf16 param: ``value`` rounded to nearest, ties away from zero;
    its remainder in ``remainder_ty``: the signed rest of the bits, int8 rounded to its top 8)."""
    bits = value.to(tl.int32, bitcast=True)
    up = tl.where(value != value, 0, (bits >> 15) & 1)  # a nan keeps its top bits
    high = (bits >> 16) + up  # the bf16's bits as a signed 16-bit number (arithmetic shift)
    offset = bits - (high << 16)
    # offset is in [-2**15, 2**15) ([0, 2**16) for a nan): only the top can overflow
    if remainder_ty == tl.int8:
        offset = tl.minimum((offset + 128) >> 8, 127)
    else:
        offset = tl.minimum(offset, 32767)
    param = high.to(tl.int16).to(tl.bfloat16, bitcast=True)
    if remainder_ty == tl.int8:  # truncated to the low byte, then read as signed
        remainder = offset.to(tl.uint8).to(tl.int8, bitcast=True)
    else:
        remainder = offset.to(tl.uint16).to(tl.int16, bitcast=True)
    return param, remainder


@triton.jit
def load_param(param_ptrs, master_ptrs, mask, HAS_MASTER: tl.constexpr):
    """The fp32 value an update starts from: the param widened, or its fp32 master, except
    where the param is no longer the master rounded: something outside the optimizer changed
    it (a clamp, a loaded checkpoint, another optimizer), and the param's value wins there.
    A master kept as a remainder (int16 / int8 ``master_ptrs``) is rebuilt from the param."""
    stored = tl.load(param_ptrs, mask=mask)
    current = stored.to(tl.float32)
    if HAS_MASTER:
        master = tl.load(master_ptrs, mask=mask)
        if master_ptrs.dtype.element_ty == tl.float32:
            rounded = to_storage(master, param_ptrs.dtype.element_ty).to(tl.float32)
            current = tl.where(rounded == current, master, current)
        else:
            current = rebuild_master(stored, master)
    return current


@triton.jit
def store_param(param_ptrs, master_ptrs, mask, param, flat_offsets, step, seed_word,
                HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr):
    """Store an updated fp32 param: into the master (kept whole) and the param rounded to
    nearest, or split into the param and its remainder, or the param rounded stochastically
    (bf16, with hashed noise at ``flat_offsets`` and ``step``)."""
    if HAS_MASTER and master_ptrs.dtype.element_ty != tl.float32:
        rounded, remainder = split_master(param, master_ptrs.dtype.element_ty)
        tl.store(param_ptrs, rounded, mask=mask)
        tl.store(master_ptrs, remainder, mask=mask)
    else:
        if HAS_MASTER:
            tl.store(master_ptrs, param, mask=mask)
        if STOCHASTIC_ROUNDING:
            rounded = round_bf16_stochastic(param, flat_offsets, step, seed_word)
            tl.store(param_ptrs, rounded, mask=mask)
        else:
            tl.store(param_ptrs, to_storage(param, param_ptrs.dtype.element_ty), mask=mask)
