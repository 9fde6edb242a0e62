"""Adam's widened CPU step as one loop compiled by inductor (``torch.compile``'s C++ code).

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

Used where it serves (``takes``): a CPU, a C++ compiler for inductor, a bucket of at least
``MIN_ELEMENTS`` (so that a run that steps a small model never waits for a compile: one
compile, a few seconds, serves every shape), and the options this loop has (no amsgrad, no
GradScaler tensors, no quantized state, no torch dispatch mode; every other case keeps the
eager step). ``FASTOPT_COMPILE=0`` turns it off. A compile that fails turns it off for the process,
with a warning, and the eager step runs.
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

from fastopt import precision

MIN_ELEMENTS = 1 << 20  # a bucket's elements below which the eager step runs
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


def takes(options: dict, dtype: torch.dtype, elements: int, device) -> bool:
    """Does a bucket of ``elements`` (its flat buffers' size) params of ``dtype`` on ``device``
    with a group's ``options`` step through the compiled loop? Widened Adam state on a CPU
    (``precision.widens``: fp32 params with narrower state, or half-precision params) without
    amsgrad or quantized state, at least ``MIN_ELEMENTS``, and a compiler. (A step with
    GradScaler's tensors, or under a torch dispatch mode, takes the eager step.)"""
    if _FAILED or torch.device(device).type != "cpu" \
            or dtype not in (torch.float32, *precision.HALF_DTYPES):
        return False
    if not precision.widens(options, dtype) or options.get("amsgrad") \
            or isinstance(options.get("state_dtype"), str):
        return False
    return elements >= MIN_ELEMENTS and available()


def scratch_bytes(options: dict, largest: int) -> int:
    """The temporaries of a compiled step whose largest entry has ``largest`` elements: none,
    but int16 remainders' int32 copy, ``precision.SLICE`` elements at a time."""
    if precision.REMAINDERS.get(options.get("master_weights")) == torch.int16:
        return 4 * min(precision.SLICE, largest)
    return 0


def _hash_noise(n: int, words: Tensor) -> Tensor:
    """``precision.rounding_noise`` as the compiled loop computes it: ``words`` holds the
    first element's flat offset and the step's and seed's share of the hash (int32)."""
    x = (torch.arange(n, dtype=torch.int32) + words[0]) * precision.signed32(
        precision.OFFSET_MIX) + words[1]
    return precision.mix_hash(x)


def _adam(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master,
          offsets, scalars: Tensor, words: Tensor, decoupled: bool, maximize: bool,
          kind: str) -> None:
    """One entry's step, in place (the loop inductor compiles). ``kind``: how the param is
    stored (``"nearest"``, ``"stochastic"``, fp32 ``"master"``, ``"remainder8"``, or
    ``"remainder16"``, whose int16 remainder comes in as bf16 bits and goes out as int32
    ``offsets``: inductor vectorizes no int16 code). ``scalars``: torch's fused op's
    float64 values, each rounded to float32 as it rounds them: the weight decay factor
    (AdamW: 1 - lr wd; Adam: wd), 1 - beta1, beta2, 1 - beta2, lr / bias correction 1, the
    square root of bias correction 2, eps."""
    decay, weight1, beta2, weight2, step_size, correction2_sqrt, eps = (
        scalars[k].float() for k in range(7))
    if kind == "master":
        p = master
    elif kind == "remainder8":  # the param's bits on top, the remainder's below them
        p = (param.float().view(torch.int32) + (master.to(torch.int32) << 8)).view(torch.float32)
    elif kind == "remainder16":
        p = (param.float().view(torch.int32) + (master.float().view(torch.int32) >> 16)
             ).view(torch.float32)
    else:
        p = param.float()
    g = grad.float()
    if maximize:
        g = -g
    if decoupled:
        p = p * decay
    else:
        g = g + p * decay
    m = exp_avg.float().lerp(g, weight1)
    v = exp_avg_sq.float() * beta2 + weight2 * g * g
    p = p - step_size * m / (v.sqrt() / correction2_sqrt + eps)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if kind == "master":
        master.copy_(p)
        param.copy_(p)
    elif kind in ("remainder8", "remainder16"):  # precision.split_master, in int32 words
        bits = p.view(torch.int32)
        high = (((bits >> 15) + p.isnan().logical_not().to(torch.int32)) >> 1) << 16
        param.copy_(high.view(torch.float32))  # exact: its low 16 bits are zero
        if kind == "remainder8":
            master.copy_((((bits - high) + 128) >> 8).clamp(-128, 127).to(torch.int8))
        else:
            offsets.copy_((bits - high).clamp(-32768, 32767))
    elif kind == "stochastic":
        bits = (p.view(torch.int32) + _hash_noise(p.numel(), words)) & -65536
        param.copy_(bits.view(torch.float32))  # exact: its low 16 bits are zero
    else:
        param.copy_(p)


_COMPILED: dict = {}
# torch's own CPU kernels are built with GCC's default contraction of a product and a sum into
# one FMA; inductor turns it off unless asked: asked, the loop rounds as torch's fused op does
_INDUCTOR = {"cpp.enable_floating_point_contract_flag": "fast"}


def _compiled(kind: str, decoupled: bool, maximize: bool, dtypes: tuple):
    """The compiled loop for these options and tensor dtypes. Sizes are symbolic: one compile
    serves every shape. Each key has a code object of its own, so that dynamo's cache (kept
    per code object, at most ``recompile_limit`` entries) holds one entry per key."""
    key = (kind, decoupled, maximize, dtypes)
    if key not in _COMPILED:
        def step(param, grad, exp_avg, exp_avg_sq, master, offsets, scalars, words):
            _adam(param, grad, exp_avg, exp_avg_sq, master, offsets, scalars, words, decoupled,
                  maximize, kind)
        own = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__,
                                 step.__defaults__, step.__closure__)
        _COMPILED[key] = torch.compile(own, dynamic=True, fullgraph=True, options=_INDUCTOR)
    return _COMPILED[key]


def _kind(param: Tensor, master, seed) -> str:
    """How an entry's param is stored (see ``_adam``)."""
    if master is None:
        return "stochastic" if seed is not None and param.dtype == torch.bfloat16 else "nearest"
    if master.dtype == torch.int8:
        return "remainder8"
    return "remainder16" if master.dtype == torch.int16 else "master"


def adam_update(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list, *,
                lr, beta1: float, beta2: float, weight_decay: float, eps: float,
                maximize: bool, decoupled: bool, masters=None, seed=None, offsets=None) -> bool:
    """The widened Adam step of ``precision.run_fp32``'s entries through the compiled loop
    (``takes`` said it may); False (nothing written) where the compile failed. Int16
    remainders go through an int32 copy, ``precision.SLICE`` elements at a time."""
    if _get_current_dispatch_mode() is not None:
        return False  # dynamo traces under no user dispatch mode: the eager step
    lr = float(lr)
    written = False  # once an entry is written, a failure is not one to fall back from
    for j, param in enumerate(params):
        step = float(steps[j])
        master = masters[j] if masters is not None else None
        kind = _kind(param, master, seed)
        scalars = torch.tensor([1 - lr * weight_decay if decoupled else weight_decay,
                                1 - beta1, beta2, 1 - beta2, lr / (1 - beta1 ** step),
                                (1 - beta2 ** step) ** 0.5, eps], dtype=torch.float64)
        words = torch.zeros(2, dtype=torch.int32)
        if kind == "stochastic":
            words[1] = precision.signed32(int(step) * precision.STEP_MIX
                                          + seed * precision.SEED_MIX)
        flat = [param.view(-1), grads[j].reshape(-1), exp_avgs[j].view(-1),
                exp_avg_sqs[j].view(-1), master.view(-1) if master is not None else None]
        n = flat[0].numel()
        if n == 0:
            continue
        piece = precision.SLICE if kind == "remainder16" else n
        try:
            for lo in range(0, n, piece):
                parts = [t[lo : lo + piece] if t is not None else None for t in flat]
                offsets_out = None
                if kind == "remainder16":
                    offsets_out = torch.empty(parts[0].numel(), dtype=torch.int32)
                    parts[4] = parts[4].view(torch.bfloat16)
                if kind == "stochastic":
                    words[0] = precision.signed32(offsets[j] + lo)
                dtypes = tuple(t.dtype if t is not None else None for t in parts)
                _compiled(kind, decoupled, maximize, dtypes)(*parts, offsets_out, scalars,
                                                             words)
                written = True
                if offsets_out is not None:
                    flat[4][lo : lo + piece].copy_(offsets_out)
        except Exception as error:  # no working compiler after all: the eager step, always
            if written:
                raise
            _FAILED.append(error)
            warnings.warn(f"fastopt: compiling the CPU step failed ({error!r}); "
                          "the eager step runs instead", RuntimeWarning, stacklevel=3)
            return False
    return True
