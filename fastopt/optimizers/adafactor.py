"""Adafactor (Shazeer & Stern, 2018), with ``torch.optim.Adafactor``'s signature, defaults,
errors and state: a factored second moment for params of rank two or more.

With :math:`G` the grad (negated if ``maximize``), at step :math:`t`,
:math:`\\hat\\beta_t = 1 - t^{\\tau}` (:math:`\\tau` = ``beta2_decay``),
:math:`\\rho_t = \\min(\\gamma, 1/\\sqrt t)`, :math:`\\epsilon_1` (``eps[0]``, default the
param dtype's machine epsilon), :math:`\\epsilon_2` (``eps[1]``), :math:`d` the clipping
threshold and :math:`\\operatorname{RMS}(x) = \\|x\\|_2/\\sqrt{n}` over a whole param:

.. math::
    \\alpha &= \\max(\\epsilon_2, \\operatorname{RMS}(\\theta))\\,\\rho_t, \\qquad
        \\theta \\leftarrow \\theta\\,(1 - \\gamma\\lambda) \\\\
    R &\\leftarrow \\hat\\beta_t R + (1-\\hat\\beta_t)\\,\\operatorname{mean}_{-1}(G^2), \\quad
        C \\leftarrow \\hat\\beta_t C + (1-\\hat\\beta_t)\\,\\operatorname{mean}_{-2}(G^2), \\quad
        \\hat V = \\frac{R\\,C}{\\max(\\operatorname{mean}_{-2} R,\\ \\epsilon_1)}
        \\quad(\\text{rank} \\ge 2) \\\\
    \\hat V &\\leftarrow \\hat\\beta_t \\hat V + (1-\\hat\\beta_t)\\,G^2 \\quad(\\text{rank} \\le 1) \\\\
    U &= G / \\sqrt{\\max(\\hat V, \\epsilon_1^2)}, \\qquad
        \\theta \\leftarrow \\theta - \\frac{\\alpha}{\\max(1, \\operatorname{RMS}(U)/d)}\\,U

State per param: ``step``, and ``row_var`` (shape ``[..., R, 1]``) and ``col_var``
(``[..., 1, C]``) for a param of rank two or more, ``variance`` (the param's shape) for one of
rank one or zero: packed buffers per bucket (``fastopt.buffers``), so a matrix keeps
:math:`R + C` numbers, not :math:`RC`.

The step: a run of vectors (biases, norms' weights) is updated with a handful of flat ops,
in cache-sized runs, its per-param norms from norms of 64-element blocks (slots and their zero
padding are 64-aligned); each matrix takes its row and column statistics and its norms as
torch.optim computes them. On the CPU, params of equal step counts share a run key after every
step, as they do when loaded from a ``state_dict``: which vectors share a run (and so how their
norms round) does not depend on the history, and a resumed run is the one never stopped. On
the CPU a matrix's scalars are Python floats, as torch.optim's; on the GPU no value is read
back to the host (the scalars stay tensors). GradScaler unscales the grads itself
(``_step_supports_amp_scaling`` is False, as torch's); ``max_grad_norm`` clips inside the step.
"""

from __future__ import annotations

__all__ = ["Adafactor"]

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastopt.clipping import kept_where_found_inf
from fastopt.declaration import Buffer, Declaration, Scalar
from fastopt.dispatch import requested_backend
from fastopt.elementwise import host_mirror
from fastopt.optimizer import FlatOptimizer
from fastopt.precision import REMAINDERS, has_master
from fastopt.state import MASTER
from fastopt.validation import check_with

BLOCK = 64  # the flat layout's slot alignment (fastopt.flat.SLOT_ALIGN): block sums per param
SPAN = 1 << 18  # the elements of a run of vectors the step goes over at once (in cache)


def _row_shape(shape: tuple) -> tuple | None:
    return (*shape[:-1], 1) if len(shape) > 1 else None


def _col_shape(shape: tuple) -> tuple | None:
    return (*shape[:-2], 1, shape[-1]) if len(shape) > 1 else None


def _vector_shape(shape: tuple) -> tuple | None:
    return shape if len(shape) <= 1 else None


def _update(opt, group: dict, bucket, plan, grad_scale, found_inf) -> None:
    """Adafactor's step for ``plan``'s entries of ``bucket``: the steps advanced, then each
    entry (params sharing a step count) updated, vectors in flat runs, matrices one by one.
    ``grad_scale`` is the grad divisor ``max_grad_norm`` folds in (GradScaler's is refused)."""
    host = _on_host(bucket)
    if found_inf is not None and host and bool(found_inf):
        return  # the CPU reads it: nothing changes
    if found_inf is not None and not host:  # written, then put back where found_inf says
        kept_where_found_inf(bucket, found_inf, lambda: _update_all(opt, group, bucket, plan,
                                                                    grad_scale, host, found_inf))
    else:
        _update_all(opt, group, bucket, plan, grad_scale, host, found_inf)
    if host and not plan.whole:
        _keys_by_step(opt, bucket)
    else:
        opt.renumber(bucket, plan)


def _keys_by_step(opt, bucket) -> None:
    """After a step, instead of ``renumber``: params of equal step counts share a run key, as
    ``fastopt.state`` gives them when a ``state_dict`` is loaded: the runs of vectors stepped together, whose norms come from
    blocks (``_rms``), are then the same in a resumed run as in the one never stopped."""
    steps = bucket.state.host_scalars()[:, 0].tolist()
    keys: dict = {}
    for i, stated in enumerate(bucket.state.has_state):
        if stated:
            bucket.state.ids[i] = keys.setdefault(steps[i], next(opt._ids))


def _update_all(opt, group: dict, bucket, plan, grad_scale, host: bool, found_inf) -> None:
    """The steps advanced, then every entry of ``plan`` updated (``_update``). The kernels'
    step scalars come from the host mirror of the step counts where the host knows them
    (``fastopt.elementwise.host_mirror``: one copy to the device), else from the counts on the
    device (a few tiny ops per entry, no sync)."""
    table = bucket.state.scalars
    kernel = bucket.backend == "triton" and not bucket.external
    mirror = host_mirror(opt.declaration, group, bucket, found_inf) if kernel else None
    if mirror is not None:
        for lo, hi, _ in plan.step_runs:
            mirror[lo:hi, 0] += 1
        bucket.state.upload_mirror(mirror)
    else:  # the CPU's counts through the table's numpy view (a torch op costs microseconds)
        counts = bucket.state.host_scalars() if host else table
        for lo, hi, _ in plan.step_runs:
            counts[lo:hi, 0] += 1
        if kernel and host:  # numpy writes leave the version counter: the mirror is stale
            bucket.state.forget_mirror()
    steps = bucket.state.host_scalars()[:, 0] if host else table[:, 0]
    masters = bucket.state.tensors.get(MASTER)
    settings = _Settings(group, bucket.dtype if masters is None else masters.dtype, grad_scale,
                         host, _first_dtype(group))
    for chunk in plan.chunks:
        if kernel:  # the step count read on the device, also under the interpreter
            scalars = _device_scalars(table[chunk.lo, 0], settings) if mirror is None \
                else _host_scalars(float(mirror[chunk.lo, 0]), settings, bucket.device)
            _kernel_entry(bucket, chunk, settings, scalars, masters)
            continue
        step = float(steps[chunk.lo]) if host else steps[chunk.lo]
        _update_entry(bucket, chunk, settings, step, masters)
        if masters is not None:  # each param: its master rounded to nearest
            for piece, master in zip(bucket.pieces("param", [chunk]),
                                     bucket.pieces(MASTER, [chunk])):
                piece.copy_(master)


def _kernel_entry(bucket, chunk, s: _Settings, scalars: Tensor,
                  masters: Tensor | None) -> None:
    """Params ``chunk.lo:chunk.hi`` in four to six launches (``fastopt.kernels.adafactor``),
    their grads in the flat grad buffer or read where they lie (a ``GradTable``), ``scalars``
    their step's (``_device_scalars``, ``_host_scalars``) on the device."""
    from fastopt.kernels import adafactor as kernel
    from fastopt.kernels.table import GradTable

    key = ("adafactor-tiles", chunk.lo, chunk.hi)
    tiles = bucket.real_views.get(key)
    if tiles is None:
        packed = bucket.state.packed

        def offset(name: str, i: int):
            slot = packed.get(name, [None] * (i + 1))[i]
            return None if slot is None else slot[0]

        tiles = bucket.real_views[key] = kernel.make_tiles(
            [(i, bucket.starts[i] - chunk.start, bucket.ends[i] - bucket.starts[i],
              tuple(bucket.param_shapes[i]), offset("row_var", i), offset("col_var", i),
              offset("variance", i))
             for i in range(chunk.lo, chunk.hi) if bucket.ends[i] > bucket.starts[i]],
            bucket.device)
    state = bucket.state.tensors
    flat = bucket.flat[chunk.start :]
    table = chunk.grad.addresses if isinstance(chunk.grad, GradTable) else None  # by address
    kernel.adafactor_update(
        flat, flat if table is not None else chunk.grad.reshape(-1),
        state.get("row_var", flat), state.get("col_var", flat),
        state.get("variance", flat), tiles, scalars, eps1=s.eps1, eps2=s.eps2,
        d=s.d, maximize=s.maximize, decay=s.weight_decay != 0, grad_scale=s.grad_scale,
        grad_table=table, master=None if masters is None else masters[chunk.start :])


def _device_scalars(step: Tensor, s: _Settings) -> Tensor:
    """fp32 ``[1 - beta2_t, rho_t, 1 - lr * weight_decay, rho_t - fp32(rho_t)]`` from the 0-d
    ``step`` on the device, computed in double as torch.optim computes them from Python floats
    (no sync); the last is what rho_t's fp32 lacks of the double (the kernels' coefficient is
    computed in double, as torch.optim's)."""
    t = step.double()
    lr = s.lr.to(t.device, torch.float64) if isinstance(s.lr, Tensor) else s.lr
    rho = torch.minimum(lr, t.rsqrt()) if isinstance(lr, Tensor) else t.rsqrt().clamp_(max=lr)
    decay = 1 - lr * s.weight_decay
    if not isinstance(decay, Tensor):  # filled on the device (no copy from the host: a CUDA
        decay = torch.full_like(t, decay)  # graph can capture it)
    return torch.stack([t ** s.beta2_decay, rho, decay, rho - rho.float().double()]).float()


def _host_scalars(step: float, s: _Settings, device: torch.device) -> Tensor:
    """``_device_scalars`` from a step count the host knows, as torch.optim computes them
    from Python floats, copied to ``device`` without a sync (from pinned memory)."""
    from fastopt.kernels.launch import fp32

    rho = min(s.lr, 1 / step ** 0.5)
    values = torch.tensor([step ** s.beta2_decay, rho, 1 - s.lr * s.weight_decay,
                           rho - fp32(rho)], dtype=torch.float32)
    if device.type != "cuda":
        return values
    return values.pin_memory().to(device, non_blocking=True)


def _on_host(bucket) -> bool:
    """Are the bucket's scalars read as Python numbers (CPU), or kept as tensors (no sync)?"""
    return bucket.device.type == "cpu"


def _first_dtype(group: dict) -> torch.dtype | None:
    """The dtype of the math of the group's first param with a grad (fp32 for a half param
    with a fp32 master): torch's for-loop sets ``eps=(None, ...)``'s eps1 from it and keeps
    it for every param of the group."""
    if group["eps"][0] is not None:
        return None
    for p in group["params"]:
        if p.grad is not None:
            return torch.float32 if has_master(group, p.dtype) else p.dtype
    return None


class _Settings:
    """A group's options as the step reads them (``acc``: the dtype of per-param norms)."""

    def __init__(self, group: dict, dtype: torch.dtype, grad_scale, host: bool,
                 first_dtype: torch.dtype | None = None) -> None:
        eps1, eps2 = group["eps"]
        if eps1 is None:  # torch's for-loop takes the first stepped param's, for the group
            eps1 = torch.finfo(first_dtype or dtype).eps
        lr = group["lr"]
        self.lr = float(lr) if host and isinstance(lr, Tensor) else lr  # torch's _to_scalar
        self.beta2_decay = group["beta2_decay"]
        self.eps1 = eps1
        self.eps2 = eps2
        self.d = group["d"]
        self.weight_decay = group["weight_decay"]
        self.maximize = group["maximize"]
        self.grad_scale = grad_scale
        self.dtype = dtype  # of the math: the params', or the masters'
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        # eps1**2 rounds to 0 in the params' dtype: the zero padding between params would
        # compute 0 * rsqrt(0) (nan), so it is masked out
        self.masks_padding = _underflows(self.eps1 * self.eps1, dtype)


@functools.lru_cache(maxsize=64)
def _underflows(value: float, dtype: torch.dtype) -> bool:
    return float(torch.tensor(value, dtype=dtype)) == 0


def _update_entry(bucket, chunk, s: _Settings, step, masters: Tensor | None) -> None:
    """Params ``chunk.lo:chunk.hi`` (one step count ``step``: a float on the CPU, a 0-d tensor
    on the GPU), their grads ``chunk.grad`` (one flat piece, or one param's grad); with fp32
    ``masters`` (the flat master buffer), the math updates those, in fp32."""
    if isinstance(step, Tensor):
        one_minus_beta2 = (step.to(s.acc) ** s.beta2_decay).to(s.dtype)
        rho = torch.clamp(step.to(s.acc).rsqrt(), max=s.lr) if not isinstance(s.lr, Tensor) \
            else torch.minimum(s.lr.to(step.device, s.acc), step.to(s.acc).rsqrt())
    else:
        one_minus_beta2 = step ** s.beta2_decay
        rho = min(s.lr, 1 / step ** 0.5)
    plan = _entry_plan(bucket, chunk)
    own = chunk.grad  # one param's grad of its shape, as the math takes it: no flat copy
    if not (chunk.hi - chunk.lo == 1 and masters is None and s.grad_scale is None
            and own.dim() and own.shape == bucket.param_shapes[chunk.lo]
            and own.is_contiguous()):
        own = None
        grads = chunk.grad.reshape(-1)
        if masters is not None:
            grads = grads.to(masters.dtype)
        if s.grad_scale is not None:
            grads = grads / s.grad_scale.to(grads.device)
    decay = 1 - s.lr * s.weight_decay if s.weight_decay != 0 else None
    state = bucket.state
    host = not isinstance(step, Tensor)
    for unit in plan.vectors:  # alpha from the params before the weight decay
        p = _param(bucket, chunk, unit, masters)
        alpha = _alpha(_rms(p, unit, s.acc, host), rho, s)
        if decay is not None:
            p.mul_(decay)
        variance = plan.variance(state, unit, p.numel())
        padding = plan.padding(bucket, unit) if s.masks_padding else None
        _vector_step(p, own if own is not None else grads[unit.start : unit.end], variance,
                     unit, alpha, one_minus_beta2, s, padding)
    for unit in plan.matrices:
        p = _param(bucket, chunk, unit, masters)
        alpha = _alpha(_rms(p, unit, s.acc, host), rho, s)
        if decay is not None:
            p.mul_(decay)
        g = own if own is not None else grads[unit.start : unit.end].view(unit.shape)
        _matrix_step(p, g, *plan.factors(state, unit), alpha, one_minus_beta2, s)


def _param(bucket, chunk, unit, masters: Tensor | None) -> Tensor:
    """A unit's params: a slice of the flat param (or master) buffer (a run of vectors, flat; a
    matrix, shaped), or an external param where it lies."""
    if bucket.external and masters is None:
        p = bucket.pieces("param", [chunk._replace(lo=unit.index, hi=unit.index + 1)])[0]
        return p.reshape(-1) if unit.shape is None else p
    if not unit.several and len(bucket.param_shapes[unit.index]) > 0:  # one param: its
        return bucket.param_pieces("param" if masters is None else MASTER)[unit.index]  # view
    flat = bucket.flat if masters is None else masters
    piece = flat[chunk.start + unit.start : chunk.start + unit.end]
    return piece if unit.shape is None else piece.view(unit.shape)


def _wide(x: Tensor, acc: torch.dtype) -> Tensor:
    return x if x.dtype == acc else x.to(acc)


def _rms(x: Tensor, unit, acc: torch.dtype, host: bool):
    """Per param of a run, :math:`\\|x\\|_2 / \\sqrt n`: norms of BLOCK-element blocks (a run
    of several params spans whole blocks, its padding included; one pass, no temporary), then
    per param. One param's (a matrix, a vector alone) is a Python float on the host (the CPU
    reads it as torch.optim does), a tensor on the GPU."""
    if not unit.several:  # one param
        norm = torch.linalg.vector_norm(x)
        if host:
            return norm.item() / math.sqrt(x.numel())
        return norm.to(acc) / math.sqrt(x.numel())
    x = _wide(x, acc)
    blocks = torch.linalg.vector_norm(x.view(-1, BLOCK), dim=1)
    if unit.blocks is None:  # one block per param
        return blocks / unit.numels.sqrt()
    # unsafe: no check that the lengths add up (they do), which would read them on the host
    squares = torch.segment_reduce(blocks.square(), "sum", lengths=unit.blocks, unsafe=True)
    return (squares / unit.numels).sqrt()


def _alpha(rms, rho, s: _Settings):
    """:math:`\\max(\\epsilon_2, \\operatorname{RMS}(\\theta))\\,\\rho_t` (floats, or tensors)."""
    if isinstance(rms, float):
        return max(s.eps2, rms) * rho
    return torch.clamp(rms, min=s.eps2) * rho


def _scaled_add(p: Tensor, update: Tensor, coef, unit) -> None:
    """``p += coef * update`` with each param's coefficient (per block of a run)."""
    if isinstance(coef, float):
        p.add_(update, alpha=coef)
        return
    coef = coef.to(update.dtype)
    if not unit.several:
        p.addcmul_(update, coef)
        return
    if unit.blocks is not None:
        coef = coef.repeat_interleave(unit.blocks, output_size=update.numel() // BLOCK)
    p.view(-1, BLOCK).addcmul_(update.view(-1, BLOCK), coef.unsqueeze(1))


def _vector_step(p: Tensor, g: Tensor, variance: Tensor, unit, alpha: Tensor,
                 one_minus_beta2, s: _Settings, padding: Tensor | None) -> None:
    """A run of params of rank one or zero, flat: second moment, update, its RMS clip
    (``padding``: where the run's zero padding is, to keep out of the update)."""
    wide = _wide(variance, p.dtype)  # state_dtype narrower than the math: a widened copy
    wide.lerp_(g * g, one_minus_beta2)
    update = wide.clamp(min=s.eps1 * s.eps1).rsqrt_().mul_(g)
    if wide is not variance:
        variance.copy_(wide)
    if padding is not None:
        update.masked_fill_(padding, 0)
    rms = _rms(update, unit, s.acc, isinstance(alpha, float))
    _scaled_add(p, update, _coef(alpha, rms, s), unit)


def _coef(alpha, rms, s: _Settings):
    """The update's coefficient, :math:`-\\alpha / \\max(1, \\operatorname{RMS}(U)/d)`, for
    :math:`U` computed from the grad as it is (``maximize`` flips its sign here); floats, or
    tensors."""
    if isinstance(rms, float):
        coef = alpha / max(1.0, rms / s.d)
    else:
        coef = alpha / torch.clamp(rms / s.d, min=1.0)
    return coef if s.maximize else -coef


def _matrix_step(p: Tensor, g: Tensor, row_var: Tensor, col_var: Tensor, alpha: Tensor,
                 one_minus_beta2, s: _Settings) -> None:
    """One param of rank two or more: factored second moment (torch.optim's ops), update,
    its RMS clip."""
    row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1))
    col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2))
    rows, cols = _wide(row_var, p.dtype), _wide(col_var, p.dtype)  # see _vector_step
    rows.lerp_(row_mean, one_minus_beta2)
    cols.lerp_(col_mean, one_minus_beta2)
    if rows is not row_var:
        row_var.copy_(rows)
        col_var.copy_(cols)
    row_var, col_var = rows, cols
    estimate = row_var @ col_var
    estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=s.eps1))
    update = estimate.clamp_(min=s.eps1 * s.eps1).rsqrt_().mul_(g)
    rms = _rms(update, _ONE, s.acc, isinstance(alpha, float))
    _scaled_add(p, update, _coef(alpha, rms, s), _ONE)  # no temporary of the param's size


class _Unit(NamedTuple):
    """Elements ``start:end`` of an entry (from its first param's slot): a run of vectors
    (``shape`` None; ``state``: its offset in the packed ``variance``; ``several`` params, the
    run then ending on a BLOCK boundary (into padding), with ``blocks``: how many BLOCKs each
    slot spans (None: one each); ``numels``: the params' sizes) or one matrix (``shape``) of
    param ``index``."""

    start: int
    end: int
    index: int
    shape: tuple | None = None
    state: int = 0
    several: bool = False
    blocks: Tensor | None = None
    numels: Tensor | None = None


_ONE = _Unit(0, 0, 0)  # one param (a matrix): its scalars need no per-param expansion


class _EntryPlan:
    """An entry's params as units (see ``_Unit``): runs of consecutive nonempty params of rank
    one or zero, each up to SPAN elements (cache-sized: every op of the step goes over a run
    while it is in cache; alone in an external bucket, whose params are apart), and the
    nonempty params of higher rank."""

    def __init__(self, bucket, lo: int, hi: int) -> None:
        base, starts, ends = bucket.starts[lo], bucket.starts, bucket.ends
        self.vectors: list = []
        self.matrices: list = []
        run: list = []
        for i in range(lo, hi + 1):
            shape = bucket.param_shapes[i] if i < hi else None
            vector = i < hi and len(shape) <= 1 and ends[i] > starts[i]
            if run and (not vector or bucket.external or ends[i] - starts[run[0]] > SPAN):
                self.vectors.append(self._run(bucket, run, base))
                run = []
            if vector:
                run.append(i)
            elif i < hi and ends[i] > starts[i]:
                self.matrices.append(_Unit(starts[i] - base, ends[i] - base, i, shape))
        self._padding: dict = {}
        self._factors: dict = {}
        self._variances: dict = {}

    @staticmethod
    def _run(bucket, run: list, base: int) -> _Unit:
        starts, ends, device = bucket.starts, bucket.ends, bucket.device
        first, last = run[0], run[-1]
        offset = bucket.state.packed["variance"][first][0]
        if len(run) == 1:
            return _Unit(starts[first] - base, ends[first] - base, first, state=offset,
                         numels=torch.tensor([float(ends[first] - starts[first])],
                                             dtype=torch.float64, device=device))
        end = -(-ends[last] // BLOCK) * BLOCK  # into the padding: whole blocks
        lengths = [starts[k + 1] - starts[k] for k in run[:-1]] + [end - starts[last]]
        blocks = [n // BLOCK for n in lengths]
        return _Unit(starts[first] - base, end - base, first, state=offset, several=True,
                     blocks=None if max(blocks) == 1 else torch.tensor(blocks, device=device),
                     numels=torch.tensor([float(ends[k] - starts[k]) for k in run],
                                         dtype=torch.float64, device=device))

    def factors(self, state, unit: _Unit) -> tuple:
        """A matrix's ``row_var`` and ``col_var`` views (made once)."""
        views = self._factors.get(unit.index)
        if views is None or views[0]._base is not state.tensors["row_var"]:
            views = self._factors[unit.index] = (state.local_view("row_var", unit.index),
                                                 state.local_view("col_var", unit.index))
        return views

    def variance(self, state, unit: _Unit, size: int) -> Tensor:
        """A run's slice of the packed ``variance`` (``size`` elements; made once)."""
        buffer = state.tensors["variance"]
        view = self._variances.get(unit.start)
        if view is None or view._base is not buffer:
            view = self._variances[unit.start] = buffer[unit.state : unit.state + size]
        return view

    def padding(self, bucket, unit: _Unit) -> Tensor | None:
        """A run's padding between its params and after the last, as a mask (None if it has
        none; from the layout, not read back from the device)."""
        if unit.start not in self._padding:
            first, size = bucket.starts[unit.index], unit.end - unit.start
            mask, k, covered = None, unit.index, 0
            pieces = []
            while k < len(bucket.starts) and bucket.ends[k] - first <= size:
                pieces.append((bucket.starts[k] - first, bucket.ends[k] - first))
                covered += bucket.ends[k] - bucket.starts[k]
                k += 1
            if covered < size:
                mask = torch.ones(size, dtype=torch.bool, device=bucket.device)
                for lo, hi in pieces:
                    mask[lo:hi] = False
            self._padding[unit.start] = mask
        return self._padding[unit.start]


def _entry_plan(bucket, chunk) -> _EntryPlan:
    """The entry plan of params ``chunk.lo:chunk.hi``, made once per bucket and range."""
    key = ("adafactor", chunk.lo, chunk.hi)
    plan = bucket.real_views.get(key)
    if plan is None:
        plan = bucket.real_views[key] = _EntryPlan(bucket, chunk.lo, chunk.hi)
    return plan


def _scratch(options: dict, bucket: dict, dtype: torch.dtype, device_type: str) -> int | None:
    """Bytes a step on the Triton kernels allocates (``fastopt.memory``): the workspace of
    ``fastopt.kernels.adafactor`` (with ``in_backward``, the largest step group's), its
    tables and the step's scalars. None where the torch ops run (fastopt.memory's rules)."""
    if device_type != "cuda" or dtype == torch.float64 \
            or requested_backend(options.get("backend", "auto")) == "torch":
        return None
    try:
        from fastopt.kernels import adafactor as kernel
    except ImportError:  # no Triton: the torch ops
        return None
    shapes = [tuple(s) for s in bucket["shapes"] if math.prod(s)]
    bounds = [(0, len(shapes))]
    if options.get("in_backward"):
        from fastopt.in_backward import group_bounds

        bounds = group_bounds([math.prod(s) * dtype.itemsize for s in shapes])
    return max((_kernel_bytes(kernel, shapes[lo:hi]) for lo, hi in bounds), default=0)


def _kernel_bytes(kernel, shapes: list) -> int:
    """The workspace, tables and scalars of one entry of params of ``shapes`` (nonempty)."""
    tiles = sum(kernel.tile_count(math.prod(s), s) for s in shapes)
    chunks = [kernel.chunk_counts(math.prod(s), s) for s in shapes]
    row_chunks, col_chunks, long_matrices = (sum(c[k] for c in chunks) for k in range(3))
    matrices = [(math.prod(s[:-2]), s[-2], s[-1]) for s in shapes if len(s) >= 2]
    workspace = kernel.workspace_elements(tiles, len(shapes), sum(b * r for b, r, _ in matrices),
                                          sum(b * c for b, _, c in matrices),
                                          sum(b for b, _, _ in matrices), row_chunks)
    tables = len(shapes) * kernel.INFO.value * 8 + (tiles + row_chunks + col_chunks) * 4 * 4 \
        + long_matrices * 2 * 4
    return 4 * workspace + tables + SCALAR_TEMPORARIES * 512


SCALAR_TEMPORARIES = 10  # _device_scalars' small tensors (a 512-byte block each on a GPU)


DECLARATION = Declaration(
    buffers=(Buffer("row_var", shape=_row_shape), Buffer("col_var", shape=_col_shape),
             Buffer("variance", shape=_vector_shape)),
    scalars=(Scalar("step"),),
    update=_update,
    options=frozenset({"master_weights", "state_dtype", "max_grad_norm", "in_backward"}),
    complex=False,
    grad_scaling=False,  # GradScaler unscales the grads itself first, as for torch's
    reference=torch.optim.Adafactor,
    differentiable=False,  # torch.optim.Adafactor has no differentiable mode
    group_keys=("lr", "beta2_decay", "eps", "d", "weight_decay"),
    cost="adafactor",
    by_address=True,  # fresh grads read where they lie (params in the flat buffer only)
    whole_params=True,
    math_in_param_dtype=True,
    scratch=_scratch,
)


class Adafactor(FlatOptimizer):
    """Adafactor, a drop-in for ``torch.optim.Adafactor`` (see the module docstring for the
    math).

    Args are torch.optim.Adafactor's; ``foreach`` is accepted and changes nothing (every step is
    a few flat passes per bucket, and no host sync on the GPU). fastopt's keyword options:
    ``master_weights`` (the math on fp32 copies of bf16/fp16 params, ``eps1`` defaulting to
    fp32's epsilon, as an fp32 run), ``state_dtype`` (state stored narrow, math in the params'
    or masters' dtype; a state_dtype wider than half-precision params without masters is
    refused), ``max_grad_norm``, ``in_backward``, ``backend``,
    ``flatten_params``.
    """

    declaration = DECLARATION

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        **options,
    ) -> None:
        defaults = {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d,
                    "weight_decay": weight_decay, "foreach": foreach, "maximize": maximize}
        check_with(torch.optim.Adafactor, defaults)
        super().__init__(params, defaults, **options)

    def reads_by_address(self, group: dict, external: bool = False) -> bool:
        """Fresh grads are read where they lie; params left where their owner keeps them take
        the torch ops (the kernels update params in the flat buffer)."""
        return not external

    def prepare_bucket(self, group: dict, bucket) -> None:
        super().prepare_bucket(group, bucket)
        if group.get("master_weights") in REMAINDERS:
            raise ValueError(
                f"Adafactor reduces over whole fp32 masters; master_weights="
                f"{group['master_weights']!r} keeps remainders: use master_weights=True")
