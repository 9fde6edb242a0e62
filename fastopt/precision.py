"""Mixed precision on the torch path: fp32 math for params and state stored narrower.

Three options change what is stored, never the math (always fp32):

- ``master_weights=True``: bf16/fp16 params get an fp32 copy (state ``master_param``); the
  update runs on it and the param receives it rounded to nearest. Where the param no longer
  equals its master rounded (changed outside the optimizer), the param's value is taken.
- ``state_dtype=torch.bfloat16`` (or float16): the moments are stored in that dtype, widened to
  fp32 for the update and rounded to nearest on the way back.
- ``master_weights="remainder"`` (bf16 params): the master is the param and the 16 bits it
  lacks (state ``master_remainder``, int16): together exactly an fp32 master, in 2 bytes per
  param instead of 4 (Apex's and Transformer Engine's "param remainders").
  ``master_weights="remainder8"`` keeps the top 8 of those bits (int8, 1 byte per param): a
  24-bit master. Each step rebuilds the master, updates it in fp32 and splits it again: the
  param is the master rounded to nearest (ties away from zero: the one rounding whose remainder
  always fits 16 signed bits), the remainder the signed difference, see ``rebuild_master`` and
  ``split_master``. ``state_dict`` saves the fp32 master as ``master_param``, as
  ``master_weights=True`` does.
- ``stochastic_rounding=True`` (bf16 params without master weights): the param is rounded up
  or down at random, with probability given by its distance to each neighbour, so small updates
  survive on average. The randomness is a counter-based hash of (seed, step, element offset in
  the flat buffer) — no RNG state: a resumed run rounds exactly as an uninterrupted one, and the
  global RNG is neither used nor needed.

``run_fp32`` does an update on fp32 copies (fp64 for fp64 params) of slices of the buffers with
torch's fused op, then stores the results back. The Triton kernels do the same in registers (kernels/adam.py);
the hash is the same, so both backends round identically when their fp32 results agree.

The hash, on uint32 words (every product taken mod 2**32):

    x = offset * 0x9E3779B1 + step * 0x85EBCA77 + seed * 0xC2B2AE3D
    x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    noise = x & 0xFFFF

and the bf16 result is the top 16 bits of (fp32 bits + noise): rounded away from zero with
probability (dropped bits) / 2**16.
"""

from __future__ import annotations

import torch
from torch import Tensor

SLICE = 1 << 18  # elements widened to fp32 at a time (bounds the temporaries: 1 MiB each)
MASK32 = 0xFFFFFFFF
OFFSET_MIX, STEP_MIX, SEED_MIX = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
HASH_MUL1, HASH_MUL2 = 0x7FEB352D, 0x846CA68B
HALF_DTYPES = (torch.float16, torch.bfloat16)


def signed32(word: int) -> int:
    """The int32 with the bits of uint32 ``word``."""
    word &= MASK32
    return word - (1 << 32) if word >> 31 else word


def rounding_noise(seed: int, step: Tensor, start: int, n: int, device) -> Tensor:
    """16 random bits per element ``start .. start + n`` of a flat buffer, for step ``step``,
    as int32 in [0, 2**16). The uint32 hash on int32 words: a product or sum wraps mod 2**32
    in two's complement as the uint32 one does, and a right shift masked to the bits a
    logical shift keeps is one. One int32 temporary per element besides the result."""
    x = torch.arange(n, dtype=torch.int32, device=device)
    x += signed32(start)
    x *= signed32(OFFSET_MIX)
    word = step.to(torch.int64) & MASK32
    word = (word - ((word >> 31) << 32)).to(torch.int32)  # the count's low 32 bits, as int32
    word *= signed32(STEP_MIX)
    x += word + signed32(seed * SEED_MIX)
    return mix_hash(x)


def mix_hash(x: Tensor) -> Tensor:
    """The hash's rounds on int32 words ``x`` (offset, step and seed mixed in), in place: its
    low 16 bits, the noise. One int32 temporary."""
    for shift, multiplier in ((16, HASH_MUL1), (15, HASH_MUL2), (16, None)):
        shifted = x >> shift
        shifted &= MASK32 >> shift
        x ^= shifted
        del shifted
        if multiplier is not None:
            x *= signed32(multiplier)
    x &= 0xFFFF
    return x


def round_stochastic(value: Tensor, noise: Tensor) -> Tensor:
    """fp32 ``value`` to bf16, rounding up or down with the given 16-bit noise (int32, which
    this overwrites): the top 16 bits of (value's bits + noise), a bf16's bits (the sum wraps
    as a uint32 one; the arithmetic shift leaves them as the signed 16-bit number ``int16``
    holds)."""
    noise += value.view(torch.int32)
    noise >>= 16
    return noise.to(torch.int16).view(torch.bfloat16)


def store(target: Tensor, value: Tensor, *, seed=None, step=None, start: int = 0) -> None:
    """Write fp32 ``value`` into ``target`` (its own dtype): nearest, or stochastically into
    bf16 when ``seed`` is given. ``start`` is ``target``'s offset in its flat buffer."""
    if value is target:
        return
    if seed is not None and target.dtype == torch.bfloat16:
        noise = rounding_noise(seed, step, start, value.numel(), value.device)
        target.copy_(round_stochastic(value, noise.view(value.shape)))
    else:
        target.copy_(value)


MASTER = "master_param"  # the fp32 master copy of a bf16/fp16 param (master_weights=True)
REMAINDER = "master_remainder"  # the bits a bf16 param lacks of its master (see the docstring)
REMAINDERS = {"remainder": torch.int16, "remainder8": torch.int8}
REMAINDER_SHIFT = {torch.int16: 0, torch.int8: 8}  # where the remainder's lowest bit sits


def rebuild_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master of a bf16 ``param`` and its ``remainder`` (int16, or int8 for a 24-bit
    master): the param's bits on top, plus the remainder as a signed offset of the fp32 bits.
    In int32 (the param's bits as a signed 16-bit number, shifted): no sum overflows for a
    remainder ``split_master`` made."""
    bits = param.view(torch.int16).to(torch.int32)
    bits <<= 16
    if REMAINDER_SHIFT[remainder.dtype]:
        offset = remainder.to(torch.int32)
        offset <<= REMAINDER_SHIFT[remainder.dtype]
        bits += offset
    else:
        bits += remainder
    return bits.view(torch.float32)


def split_master(value: Tensor, param: Tensor, remainder: Tensor) -> None:
    """Store fp32 ``value`` as a bf16 ``param`` (``value`` rounded to nearest, ties away from
    zero) and its ``remainder`` (the rest of its bits, int16; int8: rounded to nearest to the
    top 8 of them). ``rebuild_master`` gives ``value`` back (int16), or within 255 units of
    its last bit, under 2**-8 of the param's (int8). In int32, on the bits as signed numbers
    (the arithmetic shift keeps the sign bit where a bf16 has it)."""
    bits = value.view(torch.int32)
    high = bits >> 15  # the param's bits and the first one below them: (high + 1) >> 1
    high += value.isnan().logical_not_()  # rounds half away from zero (on the magnitude),
    high >>= 1  # except that a nan keeps its top bits (rounding could carry it out)
    param.view(torch.int16).copy_(high)
    high <<= 16
    offset = torch.sub(bits, high, out=high)  # the bits below the param's, signed
    shift = REMAINDER_SHIFT[remainder.dtype]
    if shift:
        offset += 1 << (shift - 1)
        offset >>= shift
    info = torch.iinfo(remainder.dtype)
    remainder.copy_(offset.clamp_(info.min, info.max))


def load_master(master: Tensor, param: Tensor) -> Tensor:
    """The fp32 value an update starts from, with ``master`` the param's fp32 master (see
    ``follow_param``) or its remainder (``rebuild_master``)."""
    if master.dtype in REMAINDER_SHIFT:
        return rebuild_master(param, master)
    return follow_param(master, param)


def store_master(master: Tensor, param: Tensor, value: Tensor) -> None:
    """Store the updated fp32 ``value`` into the master and the param (rounded to nearest), or
    split it into the param and its remainder."""
    if master.dtype in REMAINDER_SHIFT:
        split_master(value, param, master)
        return
    store(master, value)
    store(param, value)


def follow_param(master: Tensor, param: Tensor) -> Tensor:
    """The fp32 master, except where the param is no longer the master rounded to its dtype:
    something outside the optimizer changed it (a clamp, a loaded checkpoint, another
    optimizer sharing the param), and the param's value wins there."""
    changed = master.to(param.dtype) != param
    return torch.where(changed, param.float(), master)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update computes in: fp32, or fp64 for fp64 params (never narrower)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slices(tensor: Tensor, start: int):
    """(flat slice, its offset in the flat buffer) pieces of at most SLICE elements."""
    flat = tensor.reshape(-1)
    for lo in range(0, flat.numel(), SLICE):
        yield flat[lo : lo + SLICE], start + lo


def run_fp32(fused, params, grads, states, steps, *, masters=None, seed=None, offsets=None,
             **kwargs) -> None:
    """Call ``fused(params32, grads32, *states32, steps, **kwargs)`` (a torch fused fp32 op, its
    tensor lists first) on fp32 copies of at most SLICE elements at a time, then store the
    results back: into ``masters`` and (rounded) into ``params`` when masters are given (or
    split into ``params`` and their remainders, see ``store_master``), else
    into ``params``; state lists back into their own dtypes.

    ``states`` is a list of tensor lists (each aligned with ``params``; an empty list stays
    empty). ``offsets`` gives each param's offset in its flat buffer (stochastic rounding)."""
    offsets = offsets if offsets is not None else [0] * len(params)
    for j, param in enumerate(params):
        source = masters[j] if masters is not None else param
        sources = list(slices(source, offsets[j]))
        param_pieces = list(slices(param, offsets[j]))
        grad_pieces = list(slices(grads[j], 0))
        state_pieces = [list(slices(state[j], 0)) if state else None for state in states]
        math = math_dtype(source.dtype)
        for k, (piece, start) in enumerate(sources):
            if masters is not None:
                p32 = load_master(piece, param_pieces[k][0])
            else:
                p32 = piece.to(math)
            s32 = [[s[k][0].to(math)] if s is not None else [] for s in state_pieces]
            step = [] if steps is None else [[steps[j]]]
            fused([p32], [grad_pieces[k][0].to(math)], *s32, *step, **kwargs)
            if masters is not None:
                store_master(piece, param_pieces[k][0], p32)
            else:
                rounding = {} if seed is None else dict(seed=seed, step=steps[j], start=start)
                store(piece, p32, **rounding)
            for s, values in zip(state_pieces, s32):
                if s is not None:
                    store(s[k][0], values[0])


def needs_fp32(params: list, states: list, masters, seed) -> bool:
    """Does this update store anything in a dtype other than its params' (so the fused op,
    which wants one dtype, must run on fp32 copies)?"""
    if not params:
        return False
    dtype = params[0].dtype
    if masters is not None or (seed is not None and dtype == torch.bfloat16):
        return True
    for state in states:  # a loop, not any(): this runs on every step
        if state and state[0].dtype != dtype:
            return True
    return False


def has_master(group: dict, dtype: torch.dtype) -> bool:
    """Does ``group`` keep fp32 masters (or their remainders) of its params of ``dtype``?"""
    return bool(group.get("master_weights")) and dtype in HALF_DTYPES


def master_name(group: dict) -> str:
    """The state holding ``group``'s masters: ``master_param`` (fp32) or ``master_remainder``."""
    return REMAINDER if group.get("master_weights") in REMAINDERS else MASTER


def widens(options: dict, dtype: torch.dtype) -> bool:
    """Do a group's ``options`` make the torch path work on widened copies of params of
    ``dtype`` (``run_fp32``; quantized state likewise)?"""
    state_dtype = options.get("state_dtype")
    return (state_dtype is not None and state_dtype != dtype) \
        or (bool(options.get("master_weights")) and dtype in HALF_DTYPES) \
        or (bool(options.get("stochastic_rounding")) and dtype == torch.bfloat16)
