"""Adam's widened CPU step as loops compiled by inductor (``torch.compile``'s C++ code).

The eager widened step (``fastopt.precision.run_fp32``) makes fp32 copies of a slice of the
param, its moments and its grad, runs torch's fused Adam on them and stores the results back
rounded: a dozen passes over memory per element. Compiled, the same math is one vectorized
loop that reads each stored element once and writes it once, with no temporaries.

For each element, with ``p`` the fp32 value the step starts from (the param widened, the fp32
master, or the param and its remainder rebuilt: ``fastopt.precision.rebuild_master``):

.. math::
    g &\\leftarrow \\pm g \\qquad p \\leftarrow p(1 - \\gamma\\lambda) \\text{ (AdamW) or }
        g \\leftarrow g + \\lambda p \\text{ (Adam)} \\\\
    m &\\leftarrow \\mathrm{lerp}(m, g, 1 - \\beta_1), \\qquad
        v \\leftarrow \\beta_2 v + (1 - \\beta_2) g^2 \\\\
    p &\\leftarrow p - \\frac{\\gamma}{1 - \\beta_1^t}\\,
        \\frac{m}{\\sqrt{v} / \\sqrt{1 - \\beta_2^t} + \\epsilon}

in fp32, as torch's fused op computes it; the param is stored rounded to nearest, or
stochastically with the hash of ``fastopt.precision`` (the same bits), or split into its
remainder; the moments are stored rounded to nearest in their dtype.

Blockwise quantized moments (``fastopt.quantization``) take one compiled call a slice of whole
blocks (``_quantized_adam``): decode the codes (a lookup in the code table times the block's
scale), step and store the param, then for each new moment each block's largest magnitude,
its new scale, and the codes of the block divided by it, by the encoder's table of cells
(``_requantize``). Where the param is stored twice (``SPLIT_KINDS``), the re-encoding is a
call of its own. The fp32 moments of one slice are the only temporaries; a param's last
partial block steps eagerly.

Inductor vectorizes no int16 store. Int16 remainders are therefore stepped on words of
several elements: beside fp32 moments two to a word (``_adam_pairs``: int32 words of the
param, grad and remainder, int64 ones of the moments), beside 8-bit moments four to a word
(``_quantized_quads``, after ``_new_scales`` has found the new moments' block scales: two
calls, the moments made in each, no temporaries but the scales). Elsewhere they go through
an int32 copy.

Used where it serves (``takes``): a CPU, a C++ compiler for inductor, a bucket of at least
``MIN_ELEMENTS`` (so that a run that steps a small model never waits for a compile: one
compile, a few seconds, serves every shape), and the options these loops have (no amsgrad, no
GradScaler tensors, no torch dispatch mode; every other case keeps the eager step).
``FASTOPT_COMPILE=0`` turns it off. A compile that fails turns it off for the process, with a
warning, and the eager step runs.
"""

from __future__ import annotations

import functools
import os
import shutil
import types
import warnings

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastopt import precision, quantization

MIN_ELEMENTS = 1 << 20  # a bucket's elements below which the eager step runs
# Elements of int16 remainders a compiled call steps, their int32 copy (inductor vectorizes no
# int16 store) the call's one temporary: 4 MiB. On one 4M-element tensor 256K-element calls
# took 5.1-5.3 ms a step, 1M-element ones 4.2 (a call's fixed cost, about 35 us, and its threads).
REMAINDER_SLICE = 1 << 20
_FAILED: list = []  # the first compile error, once one has happened


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Can inductor compile C++ here (a compiler on the PATH, not turned off)?"""
    if os.environ.get("FASTOPT_COMPILE", "1") == "0":
        return False
    try:
        from torch._inductor import config
    except ImportError:  # pragma: no cover - every supported torch has inductor
        return False
    compiler = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    return shutil.which(compiler or "g++") is not None


_DTYPES = (torch.float32, *precision.HALF_DTYPES)  # the params' dtypes a compiled loop takes


def takes(options: dict, dtype: torch.dtype, elements: int, device,
          quantized: bool = False) -> bool:
    """Does a bucket of ``elements`` (its flat buffers' size) params of ``dtype`` on ``device``
    with a group's ``options`` (``quantized``: the bucket keeps quantized state; a group's
    params too small for it do not) step through the compiled loop? Widened Adam state on a
    CPU (``precision.widens``: fp32 params with narrower or quantized state, or half-precision
    params) without amsgrad, at least ``MIN_ELEMENTS``, and a compiler. (A step with
    GradScaler's tensors, or under a torch dispatch mode, takes the eager step. So do fp16
    params with fp32 masters and fp32 state: whether a param is still its master rounded is
    int16 code there, which inductor leaves scalar, and the eager step is faster; with
    quantized state the compiled loops are still the faster.)"""
    if _FAILED or dtype not in _DTYPES or not precision.widens(options, dtype) \
            or options.get("amsgrad") or elements < MIN_ELEMENTS:
        return False
    state_dtype = options.get("state_dtype")
    narrow = isinstance(state_dtype, torch.dtype) and state_dtype != torch.float32
    if dtype == torch.float16 and options.get("master_weights") is True and not quantized \
            and not narrow:  # fp32 state (a quantized group's small params keep it too)
        return False
    return torch.device(device).type == "cpu" and available()


def scratch_bytes(options: dict, largest: int) -> int:
    """The temporaries of a compiled step whose largest entry has ``largest`` elements: none
    (a few last elements' 4 bytes each), but int16 remainders' int32 copy beside narrow
    moments, ``REMAINDER_SLICE`` elements at a time; quantized state: its fp32 moments (and
    that copy), ``QUANTIZED_SLICE`` elements at a time, or beside int16 remainders and 8-bit
    moments only the slice's new scales (a param's last partial block steps eagerly: a few
    KiB)."""
    remainder16 = precision.REMAINDERS.get(options.get("master_weights")) == torch.int16
    state_dtype = options.get("state_dtype")
    if state_dtype in quantization.FORMATS:
        fmt = quantization.FORMATS[state_dtype]
        if remainder16 and fmt.bits == 8:  # _quantized_quads
            return 8 * (min(QUANTIZED_SLICE, largest) // fmt.block)
        return (12 if remainder16 else 8) * min(QUANTIZED_SLICE, largest)
    narrow = isinstance(state_dtype, torch.dtype) and state_dtype != torch.float32
    return 4 * min(REMAINDER_SLICE, largest) if remainder16 and narrow else 0


def _hash_noise(n: int, words: Tensor) -> Tensor:
    """``precision.rounding_noise`` as the compiled loop computes it: ``words`` holds the
    first element's flat offset and the step's and seed's share of the hash (int32)."""
    x = (torch.arange(n, dtype=torch.int32) + words[0]) * precision.signed32(
        precision.OFFSET_MIX) + words[1]
    return precision.mix_hash(x)


def _load(kind: str, param: Tensor, master) -> Tensor:
    """The fp32 value an entry's step starts from (``kind``: see ``_adam``): the param widened,
    its fp32 master (the param's value where something outside changed it:
    ``precision.follow_param``), or the param and its remainder rebuilt."""
    if kind == "master":  # compared as bits: inductor may keep a cast's value unrounded
        if param.dtype == torch.bfloat16:  # in int32, which inductor vectorizes (not int16);
            # a nan master counts as changed: the param's nan is taken
            changed = (_bf16_bits(master) != param.float().view(torch.int32) >> 16) | (
                master != master)
        else:
            changed = master.to(param.dtype).view(torch.int16) != param.view(torch.int16)
        return torch.where(changed, param.float(), master)
    if kind == "remainder8":  # the param's bits on top, the remainder's below them
        return (param.float().view(torch.int32) + (master.to(torch.int32) << 8)
                ).view(torch.float32)
    if kind == "remainder16":
        return (param.float().view(torch.int32) + (master.float().view(torch.int32) >> 16)
                ).view(torch.float32)
    return param.float()


def _bf16_bits(x: Tensor) -> Tensor:
    """The bits of fp32 ``x`` rounded to bf16 (to nearest, ties to even, as torch converts a
    number; a nan's are not), as a signed int32: the bits' top 16, sign-extended."""
    bits = x.view(torch.int32)
    return (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16


def _split(p: Tensor) -> tuple:
    """fp32 ``p`` as int32 words: its bf16 value rounded to nearest (``precision.split_master``;
    low 16 bits zero) and what is left, ``p``'s bits less those (unclamped)."""
    bits = p.view(torch.int32)
    high = (((bits >> 15) + (p == p).to(torch.int32)) >> 1) << 16
    return high, bits - high


def _store(kind: str, p: Tensor, param: Tensor, master, offsets, words: Tensor) -> None:
    """Store the updated fp32 ``p``: the param rounded to nearest (and the fp32 master),
    stochastically (the hash's noise, ``words``), or split into the param and its remainder
    (``precision.split_master`` in int32 words; int16 ones go out as int32 ``offsets``)."""
    if kind == "master":
        master.copy_(p)
        param.copy_(p)
    elif kind in ("remainder8", "remainder16"):
        high, low = _split(p)
        param.copy_(high.view(torch.float32))  # exact: its low 16 bits are zero
        if kind == "remainder8":
            master.copy_(((low + 128) >> 8).clamp(-128, 127).to(torch.int8))
        else:
            offsets.copy_(low.clamp(-32768, 32767))
    elif kind == "stochastic":
        noise = _hash_noise(p.numel(), words).view(p.shape)
        bits = (p.view(torch.int32) + noise) & -65536
        param.copy_(bits.view(torch.float32))  # exact: its low 16 bits are zero
    else:
        param.copy_(p)


def _adam_math(p: Tensor, g: Tensor, m: Tensor, v: Tensor, scalars: Tensor, decoupled: bool,
               maximize: bool, lerp_op: bool = False, round_decay: bool = True) -> tuple:
    """Adam's fp32 update of param ``p`` and moments ``m``, ``v`` by grad ``g`` (the module's
    formula) -> the new (p, m, v). ``scalars``: see ``_scalars``.

    GCC fuses products into sums where its heuristics allow, and they differ between copies
    of the same code (the elements of a word, a loop's tail, inductor 2.11's code and
    2.13's). So AdamW's decayed param, which torch's op rounds, is rounded explicitly
    (``_unfused``; GCC had fused it into the update in the second element of a pair, and in
    the quantized loop: a fifth of the masters an ulp off the eager step's after one step).
    ``round_decay=False``: not (``_adam``, whose loop of single elements GCC leaves unfused,
    as the tests check bit for bit against a loop of pairs; the select costs its bf16 loop
    4 %). And ``lerp`` is written out: GCC then fuses each branch into one FMA, as torch's
    kernel computes it, in every copy (inductor 2.11's own ``lerp`` it fused in the second
    element of a pair, not in the first nor in a loop of single elements: 30 % of the first
    moments an ulp off torch's). ``lerp_op``: torch's ``lerp`` instead (``_quantized_adam``:
    5 % faster there)."""
    decay, weight1, beta2, weight2, step_size, correction2_sqrt, eps = (
        scalars[k].float() for k in range(7))
    if maximize:
        g = -g
    if decoupled:  # rounded before the update is taken off, as torch's op rounds it
        p = _unfused(p * decay, decay) if round_decay else p * decay
    else:
        g = g + p * decay
    if lerp_op:
        m = m.lerp(g, weight1)
    else:  # each branch fused into one FMA, as torch's kernel computes it
        diff = g - m
        m = torch.where(weight1.abs() < 0.5, m + weight1 * diff, g - diff * (1 - weight1))
    v = weight2 * g * g + v * beta2  # this order: GCC fuses the products as in torch's op
    return p - step_size * m / (v.sqrt() / correction2_sqrt + eps), m, v


def _unfused(x: Tensor, scalar: Tensor) -> Tensor:
    """``x`` itself, through a select on ``scalar`` being nan (``x`` is a nan then too), so
    that the compiler cannot fuse the product ``x`` into the sum that takes it, where torch's
    op rounds it (a round trip through integer bits instead cost a vector's store and load
    in bf16 state's loop: 3.8 -> 7 ms on one 4M-element step)."""
    return torch.where(scalar != scalar, scalar, x)


def _adam(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master,
          offsets, scalars: Tensor, words: Tensor, decoupled: bool, maximize: bool,
          kind: str) -> None:
    """One entry's step, in place (the loop inductor compiles). ``kind``: how the param is
    stored (``"nearest"``, ``"stochastic"``, fp32 ``"master"``, ``"remainder8"``, or
    ``"remainder16"``, whose int16 remainder comes in as bf16 bits and goes out as int32
    ``offsets``: inductor vectorizes no int16 code)."""
    p, m, v = _adam_math(_load(kind, param, master), grad.float(), exp_avg.float(),
                         exp_avg_sq.float(), scalars, decoupled, maximize, round_decay=False)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    _store(kind, p, param, master, offsets, words)


def _adam_pairs(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                remainder: Tensor, scalars: Tensor, decoupled: bool, maximize: bool) -> None:
    """``_adam``'s ``"remainder16"`` step on words of two elements, the first in the low half:
    int32 words of the bf16 param, its bf16 grad and its int16 remainder, int64 words of the
    fp32 moments. Every store is a whole int32 or int64 word, which inductor vectorizes (an
    int16 store it does not): no int32 copy of the remainders, no temporaries."""
    words = [0, 0, 0, 0]  # the param's, the remainder's, exp_avg's, exp_avg_sq's
    for j in (0, 1):
        top = 16 * j
        p = ((((param >> top) & 0xFFFF) << 16) + ((remainder << (16 - top)) >> 16)
             ).view(torch.float32)  # the param's bits on top, the sign-extended remainder's
        p, m, v = _adam_math(p, (((grad >> top) & 0xFFFF) << 16).view(torch.float32),
                             _fp32_half(exp_avg, j), _fp32_half(exp_avg_sq, j), scalars,
                             decoupled, maximize)
        high, low = _split(p)
        low = low.clamp(-32768, 32767)
        halves = ((high >> 16) & 0xFFFF, low & 0xFFFF) if j == 0 else (high, low << 16)
        words[0] = words[0] | halves[0]
        words[1] = words[1] | halves[1]
        for k, x in ((2, m), (3, v)):
            word = x.view(torch.int32).to(torch.int64)
            words[k] = words[k] | (word & 0xFFFFFFFF if j == 0 else word << 32)
    for tensor, word in zip((param, remainder, exp_avg, exp_avg_sq), words):
        tensor.copy_(word)


# Elements of an entry's head that ``_adam_pairs`` steps: a multiple of 32, so that its loop
# has no vectorized tail (16 int32 words a vector), whose code GCC compiles on its own (fusing
# other products); the elements after it take ``_adam``'s loop, whose tail then starts where
# a master's does: the same code for each element as a ``master_weights=True`` run's.
PAIRED = 32
# ``_adam_pairs``' tensors: param, grad, exp_avg, exp_avg_sq, remainder; ``_quantized_quads``':
# param, grad, remainder, exp_avg's codes, exp_avg_sq's codes
PAIR_DTYPES = (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32, torch.int16)
QUAD_DTYPES = (torch.bfloat16, torch.bfloat16, torch.int16, torch.uint8, torch.uint8)


def _fp32_half(words: Tensor, j: int) -> Tensor:
    """The fp32 value in half ``j`` (0: the low) of int64 ``words``."""
    return (words >> (32 * j)).to(torch.int32).view(torch.float32)


def _as_words(parts: list, dtypes: tuple, elements: int):
    """``parts`` as words of ``elements`` elements each (int32 or int64 by the dtype's size),
    or None where their dtypes are not ``dtypes`` or an offset does not start a word."""
    if any(t.dtype != d for t, d in zip(parts, dtypes)):
        return None
    try:
        return [t.view({4: torch.int32, 8: torch.int64}[t.element_size() * elements])
                for t in parts]
    except RuntimeError:  # an offset that is not a whole word's
        return None


def _decode(codes: Tensor, scales: Tensor, values: Tensor) -> Tensor:
    """fp32 moments of whole blocks: ``codes`` [blocks, bytes of a block] index the code
    ``values`` (256, or 16 for 4-bit codes, the low nibble of a byte first), times each
    block's scale."""
    index = codes.to(torch.int32)
    if values.numel() == 16:  # each byte read twice, its nibbles in element order
        index = index.repeat_interleave(2, dim=1)
        index = (index >> (torch.arange(index.shape[1], dtype=torch.int32) & 1) * 4) & 15
    return values[index] * scales[:, None]


def _quantized_adam(param: Tensor, grad: Tensor, m_codes: Tensor, m_scales: Tensor,
                    v_codes: Tensor, v_scales: Tensor, master, offsets, m_values: Tensor,
                    v_values: Tensor, scalars: Tensor, words: Tensor, m_out, r_out,
                    m_cells: Tensor, v_cells: Tensor, decoupled: bool, maximize: bool,
                    kind: str, bits: int) -> None:
    """Quantized state's step on whole blocks (every tensor [blocks, block]; codes [blocks,
    bytes]): the moments decoded (``exp_avg_sq`` from its stored square root), the update,
    the param stored as ``_adam`` stores it; the new ``exp_avg`` and ``sqrt(exp_avg_sq)``
    encoded again (``_requantize``) in the same call, or, given ``m_out`` and ``r_out``, into
    them for a ``_requantize`` call of their own (``SPLIT_KINDS``)."""
    root = _decode(v_codes, v_scales, v_values)
    p, m, v = _adam_math(_load(kind, param, master), grad.float(),
                         _decode(m_codes, m_scales, m_values), root * root, scalars, decoupled,
                         maximize, lerp_op=True)
    _store(kind, p, param, master, offsets, words)
    if m_out is None:
        _requantize(m, v.sqrt(), m_scales, v_scales, m_codes, v_codes, m_cells, v_cells, bits)
    else:
        m_out.copy_(m)
        r_out.copy_(v.sqrt())


def _requantize(m: Tensor, r: Tensor, m_scales: Tensor, v_scales: Tensor, m_codes: Tensor,
                v_codes: Tensor, m_cells: Tensor, v_cells: Tensor, bits: int) -> None:
    """New moments' blocks (``m``; ``r``, the root of ``exp_avg_sq``) -> each block's scale,
    its largest magnitude, and the codes of the block divided by it (by 1 where all are
    zero: ``quantization.block_scales``), found by the encoder's table of cells
    (``_codes``); 4-bit ones two to a byte, the even element's low (each byte made from its
    two elements at once: no code is held in between). The eager step's ``normalize_blocks``
    and ``encode_moments`` compute the same."""
    for x, scales, codes, cells in ((m, m_scales, m_codes, m_cells),
                                    (r, v_scales, v_codes, v_cells)):
        scale, divisor = quantization.block_scales(x)
        scales.copy_(scale)
        x = x / divisor
        if bits == 4:
            codes.copy_(_codes(x[:, 0::2], cells) | (_codes(x[:, 1::2], cells) << 4))
        else:
            codes.copy_(_codes(x, cells))


def _codes(x: Tensor, cells: Tensor) -> Tensor:
    """int32 codes of normalized values, as ``quantization.encode`` finds them: one lookup in
    ``quantization.cell_table`` and one addition."""
    word = x.view(torch.int32)
    return (cells[(word >> 16) + (1 << 15)] + quantization.folded(word)) >> 16


def _new_scales(param: Tensor, grad: Tensor, m_codes: Tensor, m_scales: Tensor,
                v_codes: Tensor, v_scales: Tensor, remainder: Tensor, m_values: Tensor,
                v_values: Tensor, scalars: Tensor, out: Tensor, decoupled: bool,
                maximize: bool) -> None:
    """The scales ``_quantized_adam`` would give a slice's new moments (``out`` [2, blocks]:
    ``exp_avg``'s, then ``sqrt(exp_avg_sq)``'s), for ``_quantized_quads`` to encode them
    with, the moments made again there: nothing of the slice is written here, so the
    moments are kept nowhere in between. The tensors are ``_quantized_quads``' words (a
    reduction over bf16 tensors took twice as long: inductor vectorizes it 32 elements wide,
    and the lookups with it)."""
    largest = [None, None]
    for j in range(4):
        _, m, v = _adam_math(*_quad_lane(j, param, grad, remainder, m_codes, m_scales, v_codes,
                                         v_scales, m_values, v_values), scalars, decoupled,
                             maximize)
        for k, x in enumerate((m.abs(), v.sqrt())):
            largest[k] = x if j == 0 else torch.maximum(largest[k], x)
    for k in range(2):
        out[k].copy_(largest[k].amax(dim=-1))


def _quad_lane(j: int, param: Tensor, grad: Tensor, remainder: Tensor, m_codes: Tensor,
               m_scales: Tensor, v_codes: Tensor, v_scales: Tensor, m_values: Tensor,
               v_values: Tensor) -> tuple:
    """Element ``j`` of each word of ``_quantized_quads``' tensors, in fp32: the param rebuilt
    from its bf16 bits and its sign-extended remainder, the grad, ``exp_avg`` and
    ``exp_avg_sq`` decoded (the latter from its stored square root)."""
    half, byte = 16 * j, 8 * j
    p = ((((param >> half) & 0xFFFF).to(torch.int32) << 16)
         + ((((remainder >> half) & 0xFFFF).to(torch.int32) << 16) >> 16))
    g = (((grad >> half) & 0xFFFF).to(torch.int32) << 16).view(torch.float32)
    root = v_values[(v_codes >> byte) & 0xFF] * v_scales[:, None]
    return (p.view(torch.float32), g, m_values[(m_codes >> byte) & 0xFF] * m_scales[:, None],
            root * root)


def _quantized_quads(param: Tensor, grad: Tensor, m_codes: Tensor, m_scales: Tensor,
                     v_codes: Tensor, v_scales: Tensor, remainder: Tensor, m_values: Tensor,
                     v_values: Tensor, scalars: Tensor, scales: Tensor, m_cells: Tensor,
                     v_cells: Tensor, decoupled: bool, maximize: bool) -> None:
    """``_quantized_adam``'s step of bf16 params with int16 remainders and 8-bit moments, on
    words of four elements, the first in the low bits (every tensor [blocks, block / 4]):
    int64 words of the param, its bf16 grad and its remainder, int32 words of each moment's
    codes (``_quad_lane``); the new moments encoded with ``scales`` (``_new_scales``), which
    then replace the old ones. Every store is a whole word, which inductor vectorizes (an
    int16 store it does not): no int32 copy of the remainders, no fp32 moments kept between
    two calls."""
    divisors = [torch.where(s > 0, s, 1.0)[:, None] for s in (scales[0], scales[1])]
    words = [0, 0, 0, 0]  # the param's, the remainder's, exp_avg's codes, exp_avg_sq's
    for j in range(4):
        p, m, v = _adam_math(*_quad_lane(j, param, grad, remainder, m_codes, m_scales,
                                         v_codes, v_scales, m_values, v_values), scalars,
                             decoupled, maximize)
        high, low = _split(p)
        half, byte = 16 * j, 8 * j
        words[0] = words[0] | (((high >> 16) & 0xFFFF).to(torch.int64) << half)
        words[1] = words[1] | ((low.clamp(-32768, 32767) & 0xFFFF).to(torch.int64) << half)
        words[2] = words[2] | (_codes(m / divisors[0], m_cells) << byte)
        words[3] = words[3] | (_codes(v.sqrt() / divisors[1], v_cells) << byte)
    for tensor, word in zip((param, remainder, m_codes, v_codes), words):
        tensor.copy_(word)
    m_scales.copy_(scales[0])  # after every read of the old ones (inductor orders them)
    v_scales.copy_(scales[1])


_COMPILED: dict = {}
# torch's own CPU kernels are built with GCC's default contraction of a product and a sum into
# one FMA; inductor turns it off unless asked: asked, the loop rounds as torch's fused op does.
# Lookups index tables their codes cannot pass (uint8 codes, 16-bit cells): no bounds checks.
# A long expression is not stored to memory midway (torch before 2.13 stores one of more than
# 30 ops, or read by more than 8 reductions: the encoder's codes, a slice's worth of int32).
_INDUCTOR = {"cpp.enable_floating_point_contract_flag": "fast", "assert_indirect_indexing": False,
             "realize_opcount_threshold": 1 << 30, "realize_acc_reads_threshold": 1 << 30}
# A loop of words: one loop that stores nothing midway. Inductor stores a value read by two
# ops that reads more than 4 tensors (each new moment of ``_quantized_quads``: 8 bytes a slice
# element); in one loop the two ops' code shares it anyway.
_ONE_LOOP = {**_INDUCTOR, "realize_reads_threshold": 1 << 30}
_WORDS = (_adam_pairs, _new_scales, _quantized_quads)  # the loops of words


def _run(body, static: tuple, *tensors) -> None:
    """Run ``body(*tensors, *static)`` compiled (``static``: its options, how the param is
    stored). Sizes are symbolic: one compile serves every shape. Each key (the body, its
    static arguments, the tensors' dtypes) has a code object of its own, so that dynamo's
    cache (kept per code object, at most ``recompile_limit`` entries) holds one entry per
    key."""
    key = (body.__name__, *static, tuple(getattr(t, "dtype", None) for t in tensors))
    if key not in _COMPILED:
        def loop(*args):
            body(*args, *static)
        own = types.FunctionType(loop.__code__.replace(), loop.__globals__, loop.__name__,
                                 loop.__defaults__, loop.__closure__)
        _COMPILED[key] = torch.compile(own, dynamic=True, fullgraph=True, options=_ONE_LOOP
                                       if body in _WORDS else _INDUCTOR)
    _COMPILED[key](*tensors)


def _fail(error: Exception) -> None:
    """A compile failed: the eager step from now on, said once."""
    _FAILED.append(error)
    warnings.warn(f"fastopt: compiling the CPU step failed ({error!r}); "
                  "the eager step runs instead", RuntimeWarning, stacklevel=4)


def _kind(param: Tensor, master, seed) -> str:
    """How an entry's param is stored (see ``_adam``)."""
    if master is None:
        return "stochastic" if seed is not None and param.dtype == torch.bfloat16 else "nearest"
    if master.dtype == torch.int8:
        return "remainder8"
    return "remainder16" if master.dtype == torch.int16 else "master"


@functools.lru_cache(maxsize=64)
def _scalars(lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
             step: float, decoupled: bool) -> Tensor:
    """``_adam_math``'s scalars, as torch's fused op computes them in float64 (each rounded to
    float32 where the loop reads it): the weight decay factor (AdamW: 1 - lr wd; Adam: wd),
    1 - beta1, beta2, 1 - beta2, lr / bias correction 1, the square root of bias correction
    2, eps. Made once for each set of values (every slice of a step shares them; the loops
    only read them)."""
    return torch.tensor([1 - lr * weight_decay if decoupled else weight_decay, 1 - beta1,
                         beta2, 1 - beta2, lr / (1 - beta1 ** step),
                         (1 - beta2 ** step) ** 0.5, eps], dtype=torch.float64, device="cpu")


# a step without stochastic rounding (only read)
_NO_WORDS = torch.zeros(2, dtype=torch.int32, device="cpu")


def _words(kind: str, seed, step: float, start: int) -> Tensor:
    """The hash's words for stochastic rounding (``_hash_noise``) from flat offset ``start``."""
    if kind != "stochastic":
        return _NO_WORDS
    return torch.tensor([precision.signed32(start), precision.signed32(
        int(step) * precision.STEP_MIX + seed * precision.SEED_MIX)], dtype=torch.int32,
        device="cpu")


def adam_update(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list, *,
                lr, beta1: float, beta2: float, weight_decay: float, eps: float,
                maximize: bool, decoupled: bool, masters=None, seed=None, offsets=None) -> bool:
    """The widened Adam step of ``precision.run_fp32``'s entries through the compiled loop
    (``takes`` said it may); False (nothing written) where the compile failed. Int16
    remainders beside fp32 moments step as words of two elements (``_adam_pairs``, all but
    the last ``n % PAIRED``); beside narrower ones (or at an odd offset, and those last
    elements) they go through an int32 copy, ``REMAINDER_SLICE`` elements at a time."""
    if _get_current_dispatch_mode() is not None:
        return False  # dynamo traces under no user dispatch mode: the eager step
    lr = float(lr)
    written = False  # once an entry is written, a failure is not one to fall back from
    for j, param in enumerate(params):
        step = float(steps[j])
        master = masters[j] if masters is not None else None
        kind = _kind(param, master, seed)
        scalars = _scalars(lr, beta1, beta2, weight_decay, eps, step, decoupled)
        flat = [param.view(-1), grads[j].reshape(-1), exp_avgs[j].view(-1),
                exp_avg_sqs[j].view(-1), master.view(-1) if master is not None else None]
        n = flat[0].numel()
        if n == 0:
            continue
        piece = REMAINDER_SLICE if kind == "remainder16" else n
        start = 0
        try:
            head = n - n % PAIRED if kind == "remainder16" else 0
            pairs = _as_words([t[:head] for t in flat], PAIR_DTYPES, 2) if head else None
            if pairs is not None:  # whole vectors of words; the last elements below
                _run(_adam_pairs, (decoupled, maximize), *pairs, scalars)
                written, start = True, head
            for lo in range(start, n, piece):
                parts = [t[lo : lo + piece] if t is not None else None for t in flat]
                offsets_out = None
                if kind == "remainder16":
                    offsets_out = torch.empty(parts[0].numel(), dtype=torch.int32,
                                              device=parts[0].device)
                    parts[4] = parts[4].view(torch.bfloat16)
                words = _words(kind, seed, step, offsets[j] + lo if offsets else 0)
                _run(_adam, (decoupled, maximize, kind), *parts, offsets_out, scalars, words)
                written = True
                if offsets_out is not None:
                    flat[4][lo : lo + piece].copy_(offsets_out)
        except Exception as error:  # no working compiler after all: the eager step, always
            if written:
                raise
            _fail(error)
            return False
    return True


QUANTIZED_SLICE = 1 << 18  # elements of quantized state a call steps (whole blocks)
# How params are stored whose quantized step takes two calls, the new moments kept in between:
# in one, inductor would also keep the param's fp32 value (stored twice: the master and the
# param, or the param and its remainder), a third temporary.
SPLIT_KINDS = ("master", "remainder8", "remainder16")


def quantized_adam_slice(fmt, flat: dict, scales: dict, span: slice, blocks: slice,
                         start: int, step, seed, *, lr, beta1: float, beta2: float,
                         weight_decay: float, eps: float, maximize: bool,
                         decoupled: bool) -> bool:
    """One slice of whole blocks of quantized state (``torch_path.adam_int8_update``'s
    ``flat`` tensors and ``scales``, elements ``span``, blocks ``blocks``; ``start``: the
    span's flat offset, for stochastic rounding) stepped by one compiled call (two for
    ``SPLIT_KINDS``): decode, update and store the param (``_quantized_adam``), block scales
    and codes (``_requantize``). Their fp32 moments are the only temporaries
    (``scratch_bytes``). Int16 remainders with 8-bit codes take words of four elements
    instead: the new scales (``_new_scales``), then everything else (``_quantized_quads``),
    the new scales the only temporaries. False, with nothing written, where a compile has
    failed (this slice's first call, or before; either of the two calls of words) or a torch
    dispatch mode is active (dynamo traces under none); a second ``_requantize`` call that
    fails to compile, after the param is written, makes this slice's codes eagerly from the
    same moments."""
    if _FAILED or _get_current_dispatch_mode() is not None:
        return False
    n = span.stop - span.start
    shape = (n // fmt.block, fmt.block)
    codes = slice(span.start // fmt.per_byte, (span.start + n) // fmt.per_byte)
    master = flat["master"][span].view(shape) if flat["master"] is not None else None
    param = flat["param"][span].view(shape)
    kind = _kind(param, master, seed)
    m_codes, v_codes = (flat[name][codes].view(shape[0], -1) for name in ("m", "v"))
    tables, cells = quantization.code_and_cell_tables(fmt, param.device)
    step = float(step)
    scalars = _scalars(float(lr), beta1, beta2, weight_decay, eps, step, decoupled)
    quads = _as_words([param, flat["grad"][span].view(shape), master, m_codes, v_codes],
                      QUAD_DTYPES, 4) if kind == "remainder16" and fmt.bits == 8 else None
    if quads is not None:  # two calls, no temporaries but the new scales
        new = torch.empty(2, shape[0], device=param.device)
        try:
            for body, extra in ((_new_scales, ()), (_quantized_quads, cells)):
                _run(body, (decoupled, maximize), quads[0], quads[1], quads[3],
                     scales["m"][blocks], quads[4], scales["v"][blocks], quads[2], *tables,
                     scalars, new, *extra)
        except Exception as error:  # nothing written: the eager step takes this slice
            _fail(error)
            return False
        return True
    offsets_out = torch.empty(shape, dtype=torch.int32, device=param.device) \
        if kind == "remainder16" else None
    outs = [torch.empty(shape, device=param.device) for _ in range(2)] if kind in SPLIT_KINDS \
        else [None, None]
    try:
        _run(_quantized_adam, (decoupled, maximize, kind, fmt.bits), param,
             flat["grad"][span].view(shape), m_codes, scales["m"][blocks], v_codes,
             scales["v"][blocks], master.view(torch.bfloat16) if offsets_out is not None
             else master, offsets_out, *tables, scalars, _words(kind, seed, step, start),
             *outs, *cells)
    except Exception as error:  # nothing written: the eager step takes this slice
        _fail(error)
        return False
    if offsets_out is not None:
        master.copy_(offsets_out)
    if outs[0] is not None:
        moments = (*outs, scales["m"][blocks], scales["v"][blocks], m_codes, v_codes, *cells)
        try:
            _run(_requantize, (fmt.bits,), *moments)
        except Exception as error:  # the param is written: this slice's codes eagerly
            _fail(error)
            _requantize(*moments, fmt.bits)
    return True
