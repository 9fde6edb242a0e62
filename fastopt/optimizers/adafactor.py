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

The step: the per-param norms of a run of vectors (biases, norms' weights) are sums over
64-element blocks of the flat buffers (slots and their zero padding are 64-aligned) and the
vectors' whole update is a handful of flat ops; each matrix takes its row and column
statistics as torch.optim computes them. No value is read back to the host on the GPU (the
scalars stay tensors). GradScaler unscales the grads itself (``_step_supports_amp_scaling`` is
False, as torch's); ``max_grad_norm`` clips inside the step.
"""

from __future__ import annotations

__all__ = ["Adafactor"]

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastopt.declaration import Buffer, Declaration, Scalar
from fastopt.optimizer import FlatOptimizer
from fastopt.state import MASTER
from fastopt.validation import check_with

BLOCK = 64  # the flat layout's slot alignment (fastopt.flat.SLOT_ALIGN): block sums per param


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
    table = bucket.state.scalars
    host = _on_host(bucket)
    if found_inf is not None and host and bool(found_inf):
        return  # the CPU reads it: nothing changes
    saved = None
    if found_inf is not None:  # GPU: write, then put back where found_inf says (no sync)
        saved = [t.clone() for t in _written(bucket)]
    for lo, hi, _ in plan.step_runs:
        table[lo:hi, 0] += 1
    steps = bucket.state.host_scalars()[:, 0] if host else table[:, 0]
    masters = bucket.state.tensors.get(MASTER)
    settings = _Settings(group, bucket.dtype if masters is None else masters.dtype, grad_scale,
                         host)
    for chunk in plan.chunks:
        step = float(steps[chunk.lo]) if host else steps[chunk.lo]
        _update_entry(bucket, chunk, settings, step, masters)
        if masters is not None:  # each param: its master rounded to nearest
            for piece, master in zip(bucket.pieces("param", [chunk]),
                                     bucket.pieces(MASTER, [chunk])):
                piece.copy_(master)
    if saved is not None:
        skip = found_inf.to(bucket.device) != 0
        for old, new in zip(saved, _written(bucket)):
            new.copy_(torch.where(skip, old, new))
    opt.renumber(bucket, plan)


def _on_host(bucket) -> bool:
    """Are the bucket's scalars read as Python numbers (CPU), or kept as tensors (no sync)?"""
    return bucket.device.type == "cpu"


def _written(bucket) -> list:
    """What a step writes: params (flat, or each external one), the scalar table, the state."""
    params = [bucket.flat] if not bucket.external else \
        [bucket.pieces("param", [c])[0] for c in _param_chunks(bucket)]
    return [*params, bucket.state.scalars, *bucket.state.tensors.values()]


def _param_chunks(bucket) -> list:
    from fastopt.plan import Chunk

    return [Chunk(i, i + 1, s, e, None, None)
            for i, (s, e) in enumerate(zip(bucket.starts, bucket.ends))]


class _Settings:
    """A group's options as the step reads them (``acc``: the dtype of per-param norms)."""

    def __init__(self, group: dict, dtype: torch.dtype, grad_scale, host: bool) -> None:
        eps1, eps2 = group["eps"]
        lr = group["lr"]
        self.lr = float(lr) if host and isinstance(lr, Tensor) else lr  # torch's _to_scalar
        self.beta2_decay = group["beta2_decay"]
        self.eps1 = torch.finfo(dtype).eps if eps1 is None else eps1
        self.eps2 = eps2
        self.d = group["d"]
        self.weight_decay = group["weight_decay"]
        self.maximize = group["maximize"]
        self.grad_scale = grad_scale
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        # eps1**2 rounds to 0 in the params' dtype: the zero padding between params would
        # compute 0 * rsqrt(0) (nan), so it is masked out
        self.masks_padding = float(torch.tensor(self.eps1 * self.eps1, dtype=dtype)) == 0


def _update_entry(bucket, chunk, s: _Settings, step, masters: Tensor | None) -> None:
    """Params ``chunk.lo:chunk.hi`` (one step count ``step``: a float on the CPU, a 0-d tensor
    on the GPU), their grads ``chunk.grad`` (one flat piece, or one param's grad); with fp32
    ``masters`` (the flat master buffer), the math updates those, in fp32."""
    if isinstance(step, Tensor):
        one_minus_beta2 = (step.to(s.acc) ** s.beta2_decay).to(bucket.dtype)
        rho = torch.clamp(step.to(s.acc).rsqrt(), max=s.lr) if not isinstance(s.lr, Tensor) \
            else torch.minimum(s.lr.to(step.device, s.acc), step.to(s.acc).rsqrt())
    else:
        one_minus_beta2 = step ** s.beta2_decay
        rho = min(s.lr, 1 / step ** 0.5)
    plan = _entry_plan(bucket, chunk)
    grads = chunk.grad.reshape(-1)
    if masters is not None:
        grads = grads.to(masters.dtype)
    if s.grad_scale is not None:
        grads = grads / s.grad_scale.to(grads.device)
    vectors = [_param(bucket, chunk, unit, masters) for unit in plan.vectors]
    matrices = [_param(bucket, chunk, unit, masters) for unit in plan.matrices]
    # alpha per param, from the params before the weight decay
    alphas = [torch.clamp(_rms(p, unit, s.acc), min=s.eps2) * rho
              for p, unit in zip(vectors, plan.vectors)]
    matrix_alphas = []
    if matrices:
        norms = torch.stack(torch._foreach_norm(matrices)).to(s.acc)
        matrix_alphas = (torch.clamp(norms / plan.matrix_sizes(norms.device, s.acc).sqrt(),
                                     min=s.eps2) * rho).unbind()
    if s.weight_decay != 0 and (vectors or matrices):
        torch._foreach_mul_(vectors + matrices, 1 - s.lr * s.weight_decay)
    state = bucket.state
    for p, unit, alpha in zip(vectors, plan.vectors, alphas):
        variance = state.tensors["variance"][unit.state : unit.state + p.numel()]
        padding = plan.padding(bucket, unit) if s.masks_padding else None
        _vector_step(p, grads[unit.start : unit.end], variance, unit, alpha, one_minus_beta2,
                     s, padding)
    for p, unit, alpha in zip(matrices, plan.matrices, matrix_alphas):
        _matrix_step(p, grads[unit.start : unit.end].view(unit.shape),
                     state.local_view("row_var", unit.index),
                     state.local_view("col_var", unit.index), alpha, one_minus_beta2, s)


def _param(bucket, chunk, unit, masters: Tensor | None) -> Tensor:
    """A unit's params: a slice of the flat param (or master) buffer (a run of vectors, flat; a
    matrix, shaped), or an external param where it lies."""
    if bucket.external and masters is None:
        p = bucket.pieces("param", [chunk._replace(lo=unit.index, hi=unit.index + 1)])[0]
        return p.reshape(-1) if unit.shape is None else p
    flat = bucket.flat if masters is None else masters
    piece = flat[chunk.start + unit.start : chunk.start + unit.end]
    return piece if unit.shape is None else piece.view(unit.shape)


def _wide(x: Tensor, acc: torch.dtype) -> Tensor:
    return x if x.dtype == acc else x.to(acc)


def _rms(x: Tensor, unit, acc: torch.dtype) -> Tensor:
    """Per param of a run, :math:`\\|x\\|_2 / \\sqrt n`."""
    return (_block_sums(_wide(x, acc).square(), unit) / unit.numels).sqrt()


def _block_sums(x: Tensor, unit) -> Tensor:
    """Sums of a run's params' pieces of ``x`` (its slots: multiples of BLOCK elements but the
    last), through its sums over BLOCK-element blocks."""
    if unit.lengths.numel() == 1:
        return x.sum().reshape(1)
    n = x.numel()
    whole = n // BLOCK * BLOCK
    blocks = x[:whole].view(-1, BLOCK).sum(1)
    if whole < n:
        blocks = torch.cat([blocks, x[whole:].sum().reshape(1)])
    if unit.blocks is None:  # one block per param
        return blocks
    # unsafe: no check that the lengths add up (they do), which would read them on the host
    return torch.segment_reduce(blocks, "sum", lengths=unit.blocks, unsafe=True)


def _expand(values: Tensor, lengths: Tensor, n: int) -> Tensor:
    """Per param values, one per element of a run of ``lengths``."""
    if values.numel() == 1:
        return values
    return values.repeat_interleave(lengths, output_size=n)


def _vector_step(p: Tensor, g: Tensor, variance: Tensor, unit, alpha: Tensor,
                 one_minus_beta2, s: _Settings, padding: Tensor | None) -> None:
    """A run of params of rank one or zero, flat: second moment, update, its RMS clip
    (``padding``: where the run's zero padding is, to keep out of the update)."""
    with _widened(variance, p.dtype) as variance:
        variance.lerp_(g * g, one_minus_beta2)
        update = variance.clamp(min=s.eps1 * s.eps1).rsqrt_().mul_(g)
    if padding is not None:
        update.masked_fill_(padding, 0)
    rms = _rms(update, unit, s.acc)
    coef = _coef(alpha, rms, s)
    p.addcmul_(update, _expand(coef, unit.lengths, p.numel()).to(p.dtype))


@contextlib.contextmanager
def _widened(state: Tensor, dtype: torch.dtype):
    """``state`` in the math's ``dtype``: itself, or (``state_dtype`` narrower than the math) a
    widened copy, stored back rounded when the block ends."""
    if state.dtype == dtype:
        yield state
        return
    wide = state.to(dtype)
    yield wide
    state.copy_(wide)


def _coef(alpha: Tensor, rms: Tensor, s: _Settings) -> Tensor:
    """The update's coefficient, :math:`-\\alpha / \\max(1, \\operatorname{RMS}(U)/d)`, for
    :math:`U` computed from the grad as it is (``maximize`` flips its sign here)."""
    coef = alpha / torch.clamp(rms / s.d, min=1.0)
    return coef if s.maximize else -coef


def _matrix_step(p: Tensor, g: Tensor, row_var: Tensor, col_var: Tensor, alpha: Tensor,
                 one_minus_beta2, s: _Settings) -> None:
    """One param of rank two or more: factored second moment (torch.optim's ops), update,
    its RMS clip."""
    row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1))
    col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2))
    with _widened(row_var, p.dtype) as row_var, _widened(col_var, p.dtype) as col_var:
        row_var.lerp_(row_mean, one_minus_beta2)
        col_var.lerp_(col_mean, one_minus_beta2)
    estimate = row_var @ col_var
    estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=s.eps1))
    update = estimate.clamp_(min=s.eps1 * s.eps1).rsqrt_().mul_(g)
    rms = torch.linalg.vector_norm(update).to(s.acc) / math.sqrt(update.numel())
    coef = _coef(alpha, rms, s)
    p.addcmul_(update, coef.to(p.dtype))  # no temporary of the param's size


class _Unit(NamedTuple):
    """Elements ``start:end`` of an entry (from its first param's slot): a run of vectors
    (``shape`` None; ``state``: its offset in the packed ``variance``; ``lengths``: the slots'
    lengths, the last one's up to its end; ``blocks``: how many BLOCKs each covers, None for one
    each; ``numels``: their sizes) or one matrix (``shape``)
    of param ``index``."""

    start: int
    end: int
    index: int
    shape: tuple | None = None
    state: int = 0
    lengths: Tensor | None = None
    blocks: Tensor | None = None
    numels: Tensor | None = None


class _EntryPlan:
    """An entry's params as units (see ``_Unit``): maximal runs of consecutive nonempty
    params of rank one or zero (each alone in an external bucket, whose params are apart),
    and the nonempty params of higher rank."""

    def __init__(self, bucket, lo: int, hi: int) -> None:
        base, starts, ends = bucket.starts[lo], bucket.starts, bucket.ends
        variance = bucket.state.packed.get("variance")
        self.vectors: list = []
        self.matrices: list = []
        run: list = []
        for i in range(lo, hi + 1):
            shape = bucket.param_shapes[i] if i < hi else None
            vector = i < hi and len(shape) <= 1 and ends[i] > starts[i]
            if run and (not vector or bucket.external):
                lengths = [starts[k + 1] - starts[k] for k in run[:-1]]
                lengths.append(ends[run[-1]] - starts[run[-1]])
                numels = [ends[k] - starts[k] for k in run]
                self.vectors.append(_Unit(
                    starts[run[0]] - base, ends[run[-1]] - base, run[0],
                    state=variance[run[0]][0],
                    lengths=torch.tensor(lengths, device=bucket.device),
                    blocks=None if all(n <= BLOCK for n in lengths) else torch.tensor(
                        [-(-n // BLOCK) for n in lengths], device=bucket.device),
                    numels=torch.tensor(numels, dtype=torch.float64, device=bucket.device)))
                run = []
            if vector:
                run.append(i)
            elif i < hi and ends[i] > starts[i]:
                self.matrices.append(_Unit(starts[i] - base, ends[i] - base, i, shape))
        self._sizes = None
        self._padding: dict = {}

    def padding(self, bucket, unit: _Unit) -> Tensor | None:
        """A run's padding between its params, as a mask (None if it has none)."""
        if unit.start not in self._padding:
            first, size = bucket.starts[unit.index], unit.end - unit.start
            mask = torch.ones(size, dtype=torch.bool, device=bucket.device)
            k = unit.index
            while k < len(bucket.starts) and bucket.ends[k] - first <= size:
                mask[bucket.starts[k] - first : bucket.ends[k] - first] = False
                k += 1
            self._padding[unit.start] = mask if bool(mask.any()) else None
        return self._padding[unit.start]

    def matrix_sizes(self, device, dtype) -> Tensor:
        if self._sizes is None:
            self._sizes = torch.tensor([m.end - m.start for m in self.matrices],
                                       dtype=torch.float64, device=device)
        return self._sizes.to(dtype)


def _entry_plan(bucket, chunk) -> _EntryPlan:
    """The entry plan of params ``chunk.lo:chunk.hi``, made once per bucket and range."""
    key = ("adafactor", chunk.lo, chunk.hi)
    plan = bucket.real_views.get(key)
    if plan is None:
        plan = bucket.real_views[key] = _EntryPlan(bucket, chunk.lo, chunk.hi)
    return plan


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
    by_address=False,
    whole_params=True,
)


class Adafactor(FlatOptimizer):
    """Adafactor, a drop-in for ``torch.optim.Adafactor`` (see the module docstring for the
    math).

    Args are torch.optim.Adafactor's; ``foreach`` is accepted and changes nothing (every step is
    a few flat passes per bucket, and no host sync on the GPU). fastopt's keyword options:
    ``master_weights`` (the math on fp32 copies of bf16/fp16 params, ``eps1`` defaulting to
    fp32's epsilon, as an fp32 run), ``state_dtype`` (state stored narrow, math in the params'
    or masters' dtype), ``max_grad_norm``, ``in_backward``, ``backend``,
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
