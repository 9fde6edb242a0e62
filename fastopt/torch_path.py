"""The pure-torch updates: one fused pass over each flat buffer.

Each function takes lists of 1-D tensors (normally one per flat buffer: the whole bucket at once)
and updates them in place with torch's own fused multi-tensor ops (``torch._fused_adam_``,
``torch._fused_adamw_``, ``torch._fused_sgd_``), which read every element once and write it
once, on CPU and CUDA alike. Because fastopt hands them one flat buffer instead of one tensor per
param, a model with many small params costs one call, not one per tensor.

The Triton launchers in ``fastopt.kernels`` have exactly these signatures. ``steps`` holds one
0-d float32 tensor per entry of ``params``, already incremented for this step; ``grad_scale`` and
``found_inf`` are GradScaler's device tensors (grads are divided by ``grad_scale``; when
``found_inf`` is nonzero nothing is written).

Mixed precision (``masters``: fp32 master copies; state stored in another dtype;
``rounding_seed``: stochastic rounding of bf16 params at flat ``offsets``) runs the same fused
ops on widened copies of slices (``fastopt.precision.run_fp32``), or as one loop compiled by
inductor on large CPU buckets (``fastopt.compiled``); quantized state has its own
update (``adam_int8_update``), and SAGA's is ``saga_update``.
"""

from __future__ import annotations

import numpy
import torch
from torch import Tensor

from fastopt import compiled, precision
from fastopt.quantization import (FORMATS, SLICE, decode_moments, encode_moments,
                                  normalize_blocks)


def count_adam_steps(table, runs: list | None, *, lr, beta1: float, beta2: float) -> None:
    """Add one to the step count (column 0 of ``table``, rows ``(step, step_size,
    bias_correction2_sqrt)``; the torch path derives the rest itself) of every param in
    ``runs`` (``[lo, hi, ...]`` each; None: every param). A CPU table comes as the numpy array
    over its memory (``Buffers.host_scalars``) and is counted in a few numpy ops however many
    runs there are: a torch op per run costs microseconds, and params without grads in some
    steps split a bucket into hundreds."""
    if isinstance(table, Tensor):
        for rows in [table] if runs is None else [table[r[0] : r[1]] for r in runs]:
            rows[:, 0].add_(1)
        return
    counts = table[:, 0]
    if runs is None:
        counts += 1
        return
    lo = numpy.fromiter((r[0] for r in runs), dtype=numpy.int64, count=len(runs))
    lengths = numpy.fromiter((r[1] for r in runs), dtype=numpy.int64, count=len(runs)) - lo
    # every row of every run: each run's first row, repeated, plus the position within it
    within = numpy.arange(int(lengths.sum())) - numpy.repeat(numpy.cumsum(lengths) - lengths,
                                                              lengths)
    counts[numpy.repeat(lo, lengths) + within] += 1


def adam_update(
    params: list,
    grads: list,
    exp_avgs: list,
    exp_avg_sqs: list,
    max_exp_avg_sqs: list,
    steps: list,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    masters: list | None = None,
    rounding_seed: int | None = None,
    offsets: list | None = None,
    compile: bool = False,
) -> None:
    r"""Adam (Kingma & Ba, 2014) or, with ``decoupled``, AdamW (Loshchilov & Hutter, 2017).

    With :math:`g` the grad (negated if ``maximize``), :math:`t` the step:

    .. math::
        g &\leftarrow g + \lambda\theta \quad\text{(Adam)} \qquad
        \theta \leftarrow \theta(1 - \gamma\lambda) \quad\text{(AdamW)} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \hat v &\leftarrow \max(\hat v, v) \text{ if amsgrad else } v \\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,
                 \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    ``compile`` (this path's own keyword; its caller asks ``fastopt.compiled.takes``): a
    widened step runs as one loop compiled by inductor instead of eager slices.
    """
    if not params:
        return
    op = torch._fused_adamw_ if decoupled else torch._fused_adam_
    states = [exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
    if precision.needs_fp32(params, states, masters, rounding_seed):
        # fp32 masters, narrower state or stochastic rounding: fp32 math on widened copies,
        # in one compiled loop where it serves, else in eager slices
        if compile and grad_scale is None and found_inf is None and \
                compiled.adam_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr,
                                     beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                                     eps=eps, maximize=maximize, decoupled=decoupled,
                                     masters=masters, seed=rounding_seed, offsets=offsets):
            return
        precision.run_fp32(op, params, grads, states, steps, masters=masters, seed=rounding_seed,
                           offsets=offsets, lr=lr, beta1=beta1, beta2=beta2,
                           weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
                           maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
        return
    op(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=amsgrad,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def sgd_update(
    params: list,
    grads: list,
    momentum_buffers: list,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    masters: list | None = None,
) -> None:
    r"""SGD with momentum (Sutskever et al., 2013, as torch.optim.SGD).

    .. math::
        g &\leftarrow \pm g + \lambda\theta \\
        b &\leftarrow g \text{ on the first step, else } \mu b + (1-\tau) g \\
        g &\leftarrow g + \mu b \text{ if nesterov else } b \quad(\text{when } \mu \ne 0) \\
        \theta &\leftarrow \theta - \gamma g

    ``momentum_buffers`` is empty when ``momentum == 0``.
    """
    if not params:
        return
    if precision.needs_fp32(params, [momentum_buffers], masters, None):
        precision.run_fp32(torch._fused_sgd_, params, grads, [momentum_buffers], None,
                           masters=masters, weight_decay=weight_decay, momentum=momentum, lr=lr,
                           dampening=dampening, nesterov=nesterov, maximize=maximize,
                           is_first_step=is_first_step, grad_scale=grad_scale,
                           found_inf=found_inf)
        return
    device = params[0].device.type
    if device == "meta" or (params[0].dtype in (torch.float16, torch.bfloat16)
                            and device == "cpu"):
        # torch's CPU _fused_sgd_ skips elements of fp16/bf16 tensors (seen in torch 2.13: after
        # one step of lr=0.01 on 100 ones, most elements are unchanged), and it has no meta
        # kernel; use torch.optim.SGD's own op sequence, which rounds exactly as the reference
        # does.
        _sgd_ops(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                 weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                 is_first_step=is_first_step, grad_scale=grad_scale, found_inf=found_inf)
        return
    torch._fused_sgd_(
        params,
        grads,
        momentum_buffers,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=is_first_step,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def _sgd_ops(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
             maximize, is_first_step, grad_scale, found_inf) -> None:
    """SGD as torch.optim.SGD's for-loop computes it, one flat buffer at a time."""
    if found_inf is not None and found_inf.device.type == "cpu" and bool(found_inf):
        # CPU only: reading it costs no device sync
        return
    for j, (param, grad) in enumerate(zip(params, grads)):
        if grad_scale is not None:
            grad = grad / grad_scale
        if maximize:
            grad = -grad
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[j]
            if is_first_step:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def saga_update(params: list, grads: list, rows: list, means: list, *, lr: float | Tensor,
                weight_decay: float, num_samples: int) -> None:
    r"""SAGA (Defazio, Bach & Lacoste-Julien, 2014) for sample :math:`i`, with :math:`T_i` the
    gradient table's row for it and :math:`\bar T` the mean of the rows:

    .. math::
        \delta &= g - T_i \\
        \theta &\leftarrow \theta - \gamma\,(\delta + \bar T + \lambda\theta) \\
        \bar T &\leftarrow \bar T + \delta / n, \qquad T_i \leftarrow g

    A few multi-tensor passes with two temporaries (the Triton kernel does it in one).
    """
    if not params:
        return
    deltas = torch._foreach_sub(grads, rows)
    updates = torch._foreach_add(deltas, means)
    if weight_decay != 0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    if isinstance(lr, Tensor):
        torch._foreach_mul_(updates, lr)
        torch._foreach_sub_(params, updates)
    else:
        torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_add_(means, deltas, alpha=1.0 / num_samples)
    torch._foreach_copy_(rows, grads)


def adam_int8_update(params, grads, exp_avgs, exp_avg_scales, exp_avg_sqs, exp_avg_sq_scales,
                     steps, *, block_tables, bases, spans, lr, beta1, beta2, weight_decay, eps,
                     maximize, decoupled, grad_scale=None, found_inf=None, masters=None,
                     rounding_seed=None, offsets=None, code_bits=8, compile=False) -> None:
    """Adam / AdamW with blockwise quantized moments (``fastopt.quantization``, ``code_bits``
    8 or 4): for each param of each chunk (``spans``: each param's offset in the chunk and its
    size), in slices of ``quantization.SLICE`` elements (whole blocks), decode the moments to
    fp32, run torch's fused step, encode them again. ``exp_avgs``/``exp_avg_sqs`` hold each
    chunk's codes (4-bit: two to a byte, from the chunk's start), ``exp_avg_sqs`` those of
    sqrt(v). A step with ``found_inf`` set writes nothing (without reading it on the host).
    ``block_tables`` (the kernels' map of blocks; None here) is not needed: the params are
    walked one by one. ``compile`` (its caller asks ``fastopt.compiled.takes``): whole blocks
    step through compiled loops instead (``compiled.quantized_adam_slice``), a param's last
    partial block eagerly."""
    fmt = FORMATS["int8" if code_bits == 8 else "int4"]
    op = torch._fused_adamw_ if decoupled else torch._fused_adam_
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                 maximize=maximize)
    compile = compile and grad_scale is None and found_inf is None
    for j, param in enumerate(params):
        flat = {"param": param.reshape(-1), "grad": grads[j].reshape(-1),
                "m": exp_avgs[j].reshape(-1), "v": exp_avg_sqs[j].reshape(-1),
                "master": masters[j].reshape(-1) if masters is not None else None}
        scales = {"m": exp_avg_scales[j], "v": exp_avg_sq_scales[j]}
        block = 0
        for element, size in _block_runs(spans[j], fmt.block):
            def where(lo: int, n: int) -> tuple:  # elements, blocks, flat offset of a piece
                first = block + lo // fmt.block
                return (slice(element + lo, element + lo + n),
                        slice(first, first + fmt.num_blocks(n)),
                        offsets[j] + element + lo if offsets else 0)

            whole = size - size % fmt.block if compile else 0
            for lo, n in _pieces(whole, compiled.QUANTIZED_SLICE) + [(whole, size - whole)]:
                if lo < whole and compile:
                    compile = compiled.quantized_adam_slice(
                        fmt, flat, scales, *where(lo, n), steps[j], rounding_seed,
                        decoupled=decoupled, **hyper)
                    if compile:
                        continue
                for first, count in _pieces(lo + n, SLICE, lo):  # eagerly, a slice at a time
                    span, blocks, start = where(first, count)
                    _adam_int8_slice(op, fmt, flat, scales, span, blocks, steps[j],
                                     masters is not None, rounding_seed, start,
                                     dict(amsgrad=False, grad_scale=grad_scale,
                                          found_inf=found_inf, **hyper))
            block += fmt.num_blocks(size)


def _pieces(end: int, piece: int, begin: int = 0) -> list:
    """``(offset, length)`` of ``piece``-long pieces from ``begin`` to ``end``."""
    return [(lo, min(piece, end - lo)) for lo in range(begin, end, piece)]


def _block_runs(spans: list, block: int) -> list:
    """Params (``(offset, size)`` in a chunk) merged into runs that are one grid of blocks: a
    param joins the run before it when it starts where that ends and every param of the run
    is a whole number of blocks (so a slice covers many small params at once)."""
    runs = []
    for element, size in spans:
        if runs and runs[-1][0] + runs[-1][1] == element and runs[-1][1] % block == 0:
            runs[-1][1] += size
        else:
            runs.append([element, size])
    return runs


def _adam_int8_slice(op, fmt, flat, scales, span, blocks, step, has_master, rounding_seed,
                     start, options) -> None:
    """One slice of whole blocks of one param: decode, step, encode, both moments at once
    (``quantization.decode_moments`` / ``encode_moments``: one op serves both, and a small
    slice's step is mostly the ops' fixed costs). ``span`` starts at an even element (a
    param's start, or a whole number of blocks past it)."""
    source = flat["master"][span] if has_master else flat["param"][span]
    n = source.numel()
    codes = slice(span.start // fmt.per_byte, span.start // fmt.per_byte + fmt.code_bytes(n))
    math = precision.math_dtype(source.dtype)
    old_scales = torch.stack([scales["m"][blocks], scales["v"][blocks]])
    moments = decode_moments(flat["m"][codes], flat["v"][codes], old_scales, fmt, n)
    m, v = moments[0, :n], moments[1, :n]
    v.mul_(v)  # exp_avg_sq is stored as its square root
    if math != torch.float32:
        m, v = m.to(math), v.to(math)
    p32 = precision.load_master(source, flat["param"][span]) if has_master else source.to(math)
    op([p32], [flat["grad"][span].to(math)], [m], [v], [], [step], **options)
    if has_master:
        precision.store_master(source, flat["param"][span], p32)
    else:
        rounding = {} if rounding_seed is None else dict(seed=rounding_seed, step=step,
                                                         start=start)
        precision.store(source, p32, **rounding)
    del p32  # not held while the moments are encoded
    v.sqrt_()
    if math != torch.float32:
        moments[0, :n].copy_(m)
        moments[1, :n].copy_(v)
    del m, v
    new_scales = normalize_blocks(moments.view(2, -1, fmt.block))
    new_codes = encode_moments(moments, fmt)[:, : codes.stop - codes.start]
    if fmt.per_byte == 2 and n % 2:  # an odd last element leaves a zero nibble
        new_codes[:, -1] &= 15
    found_inf = options["found_inf"]
    if found_inf is not None:  # keep the old encoding bit for bit
        skip = found_inf.to(new_codes.device) != 0
        new_codes = torch.where(skip, torch.stack([flat["m"][codes], flat["v"][codes]]),
                                new_codes)
        new_scales = torch.where(skip, old_scales, new_scales)
    for row, name in enumerate(("m", "v")):
        flat[name][codes].copy_(new_codes[row])
        scales[name][blocks].copy_(new_scales[row])


# Elements per call of an optimizer's torch math: the temporaries of one chunk stay in a core's
# cache between the ops that read them (see benchmarks/route_costs.py).
CHUNK = 1 << 16


def elementwise_update(math, params: list, grads: list, buffers: list, rows: list, *, lr,
                       hyper: tuple, flags: int, maximize: bool, grad_scale=None,
                       found_inf=None, masters=None, rounding_seed=None, offsets=None,
                       step_column: int = 0) -> None:
    """Any declared elementwise optimizer (``fastopt.declaration``) on the torch path: for each
    entry, ``math(param, grad, b0, b1, b2, b3, row, lr, h0..h7, flags)`` (the optimizer's torch
    twin of its kernel, the same signature) on chunks of ``CHUNK`` elements, in place (an entry
    no larger than a chunk as it is).

    ``buffers``: per declared buffer, the list of entries (None when absent); ``rows``: per
    entry, the scalar values of its params (``fastopt.declaration.Columns`` of floats, or
    None). With fp32 masters, buffers stored in another dtype, or stochastic rounding, each
    slice is widened to fp32 (fp64 for fp64 params) first and stored back rounded
    (``fastopt.precision``). ``found_inf`` nonzero: nothing is written (read on the host; on
    a GPU that is the one sync GradScaler itself makes for torch.optim's non-fused optimizers).
    """
    if not params or (found_inf is not None and bool(found_inf)):
        return
    lr = float(lr) if isinstance(lr, Tensor) else lr
    hyper = tuple(hyper) + (0.0,) * (8 - len(hyper))
    scale = grad_scale.to(params[0].device) if grad_scale is not None else None

    def prepared(grad):  # a chunk of a grad as the math takes it: unscaled, negated
        if scale is None and not maximize:
            return grad
        if scale is not None:  # a 0-d half grad over a 0-d fp32 scale would come out fp32:
            grad = grad / scale if grad.dim() else (grad / scale).to(grad.dtype)  # kept a half
        return -grad if maximize else grad

    buffers = list(buffers) + [None] * (4 - len(buffers))
    dtype = params[0].dtype  # one bucket's entries: one dtype per buffer
    narrow = any(b is not None and b[0].dtype != dtype for b in buffers)
    widened = masters is not None or narrow or (rounding_seed is not None
                                                 and dtype == torch.bfloat16)
    for i, param in enumerate(params):
        slots = [b[i] if b is not None else None for b in buffers]
        if not widened:
            if param.numel() <= CHUNK:
                math(param, prepared(grads[i]), *slots, rows[i], lr, *hyper, flags)
                continue
            p, g = param.reshape(-1), grads[i].reshape(-1)
            s = [x.reshape(-1) if x is not None else None for x in slots]
            for lo in range(0, p.numel(), CHUNK):
                part = slice(lo, lo + CHUNK)
                math(p[part], prepared(g[part]), *[x[part] if x is not None else None for x in s],
                     rows[i], lr, *hyper, flags)
            continue
        master = masters[i] if masters is not None else None
        seed = rounding_seed if master is None and param.dtype == torch.bfloat16 else None
        start = offsets[i] if offsets is not None else 0
        _widened(math, param, grads[i], slots, master, rows[i], lr, hyper, flags, seed, start,
                 prepared)


def _widened(math, param, grad, slots, master, row, lr, hyper, flags, seed, start,
             prepared) -> None:
    """One entry of ``elementwise_update`` computed in fp32 slices of ``CHUNK`` elements and
    stored back rounded."""
    source = master if master is not None else param
    math_dtype = precision.math_dtype(source.dtype)
    flat = {"param": param.reshape(-1), "grad": grad.reshape(-1), "source": source.reshape(-1)}
    states = [s.reshape(-1) if s is not None else None for s in slots]
    step = None
    if seed is not None:
        step = torch.tensor(getattr(row, "step", 0.0))
    for lo in range(0, flat["param"].numel(), CHUNK):  # the math's temporaries stay in cache
        part = slice(lo, lo + CHUNK)
        if master is not None:
            p32 = precision.load_master(flat["source"][part], flat["param"][part])
        else:
            p32 = flat["param"][part].to(math_dtype)
        s32 = [s[part].to(math_dtype) if s is not None else None for s in states]
        math(p32, prepared(flat["grad"][part].to(math_dtype)), *s32, row, lr, *hyper, flags)
        if master is not None:
            precision.store_master(flat["source"][part], flat["param"][part], p32)
        else:
            rounding = {} if seed is None else dict(seed=seed, step=step, start=start + lo)
            precision.store(flat["param"][part], p32, **rounding)
        for s, values in zip(states, s32):
            if s is not None:
                precision.store(s[part], values)
