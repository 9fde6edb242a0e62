"""SAGA (Defazio, Bach & Lacoste-Julien, 2014, arXiv 1407.0202): variance-reduced SGD for finite
sums, with a table of the last gradient seen for every training sample.

The table is what sank the seed's attempt: it holds ``num_samples`` copies of the trainable
params. So SAGA asks ``fastopt.memory`` what it needs before allocating anything and refuses,
with ``MemoryError``, what the device cannot hold.
"""

from __future__ import annotations

__all__ = ["SAGA"]

import torch
from torch import Tensor

from fastopt import dispatch
from fastopt.declaration import Buffer, Declaration
from fastopt.elementwise import _on
from fastopt.flat import real_shape
from fastopt.optimizer import FlatOptimizer
from fastopt.validation import check_saga, check_sample_index


def _update(opt, group, bucket, plan, grad_scale, found_inf) -> None:
    """SAGA's step for sample ``opt._index``: one fused pass over params, grads, the table's
    row for the sample and the table's mean."""
    rows = group["num_samples"]
    row = bucket.state.tensors["gradient_table"].view(rows, bucket.numel)[opt._index]
    chunks = plan.chunks
    dispatch.update_fn("saga", bucket.backend)(
        bucket.pieces("param", chunks),
        [c.grad for c in chunks],
        [_piece(bucket, row, c) for c in chunks],
        bucket.pieces("gradient_mean", chunks),
        lr=_on(group["lr"], bucket.device),
        weight_decay=float(group["weight_decay"]),
        num_samples=rows,
    )


SAGA_DECLARATION = Declaration(
    buffers=(Buffer("gradient_table"), Buffer("gradient_mean")),
    update=_update,
    options=frozenset(),  # no lean state, clipping or in_backward: the table is the point
    grad_scaling=False,  # GradScaler unscales the grads itself (unscale_) first
    differentiable=False,
    group_keys=("lr", "num_samples", "weight_decay"),
    cost="saga",
    by_address=False,
)


class SAGA(FlatOptimizer):
    r"""SAGA for a loss that is an average over ``num_samples`` training samples,
    :math:`f(\theta) = \frac1n \sum_j f_j(\theta) + \frac\lambda2\|\theta\|^2`.

    Call ``step(index=i)`` after the backward of sample ``i``'s loss :math:`f_i` (a mini-batch
    of one, or any fixed partition of the data into ``num_samples`` parts). With :math:`g` the
    grad, :math:`T_i` the table's row for ``i`` and :math:`\bar T` the mean of all rows:

    .. math::
        \theta &\leftarrow \theta - \gamma\,(g - T_i + \bar T + \lambda\theta) \\
        \bar T &\leftarrow \bar T + (g - T_i)/n, \qquad T_i \leftarrow g

    The weight decay :math:`\lambda` (an L2 term) is applied exactly at every step and never
    stored: the table holds the data terms' gradients only.

    Table initialisation: zeros (so :math:`\bar T = 0`). Until every sample has been visited
    once, :math:`\bar T` sums the rows seen so far divided by :math:`n`, which damps the first
    epoch (as SAG's warm start does); from then on the update is the unbiased SAGA step of the
    paper. To start from the gradients at the initial point instead, run one epoch with
    ``lr=0`` first.

    State per param: ``gradient_table`` (``[num_samples, *param.shape]``) and ``gradient_mean``
    (the param's shape), both views of flat buffers (the table is ``num_samples`` rows of the
    flat layout, so each step reads and writes one contiguous row). ``state_dict`` holds them in
    torch.optim's per-param format.

    Memory: before laying anything out, the constructor estimates the table, the mean and the
    step's scratch with :func:`fastopt.memory.estimate`; if that exceeds the free memory of the
    params' device, it raises ``MemoryError`` giving both numbers, and nothing is allocated.

    Args:
        params: params or param groups, as for any ``torch.optim`` optimizer.
        lr (float or Tensor): the step size :math:`\gamma` (Defazio et al. suggest ``1/(3L)``
            for :math:`L`-smooth :math:`f_j`).
        num_samples (int): :math:`n`, the number of samples (rows of the table).
        weight_decay (float): :math:`\lambda`. Default: 0.
        backend (str, keyword-only): see ``fastopt.dispatch``.
        flatten_params (bool, keyword-only): False keeps the params where they are (the table
            and the mean are flat either way). Default: True.
    """

    declaration = SAGA_DECLARATION

    def __init__(self, params, lr: float | Tensor, num_samples: int, weight_decay: float = 0, *,
                 backend: str = "auto", flatten_params: bool = True) -> None:
        check_saga(lr, num_samples, weight_decay)
        if isinstance(params, Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            "Tensors or dicts, but got " + torch.typename(params))
        # Materialise generators (model.parameters(), also inside groups) once: the memory
        # check and the optimizer must see the same params.
        params = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g
                  for g in params]
        _refuse_what_cannot_fit(params, lr=lr, num_samples=num_samples, weight_decay=weight_decay)
        defaults = {"lr": lr, "num_samples": num_samples, "weight_decay": weight_decay}
        self._index = None
        super().__init__(params, defaults, backend=backend, flatten_params=flatten_params)

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim's, with SAGA's checks: the group's ``num_samples``, ``lr`` and
        ``weight_decay``, and its table must fit (``MemoryError`` before anything changes)."""
        group = dict(param_group)
        group["params"] = ([group["params"]] if isinstance(group["params"], Tensor)
                           else list(group["params"]))
        options = {k: group.get(k, self.defaults[k]) for k in ("lr", "num_samples",
                                                              "weight_decay")}
        check_saga(options["lr"], options["num_samples"], options["weight_decay"])
        if self.param_groups:  # the constructor checked its own groups already
            _refuse_what_cannot_fit([group], **options)
        super().add_param_group(group)

    def buffer_rows(self, group: dict, name: str):
        """The gradient table's rows: one per sample (also ``fastopt.memory``'s count)."""
        if name != "gradient_table":
            return None
        samples = group.get("num_samples")
        if samples is None:
            raise TypeError("SAGA's memory depends on num_samples: pass num_samples=")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"Invalid num_samples: {samples!r} (a positive int)")
        return samples

    @torch.no_grad()
    def step(self, closure=None, *, index=None):
        """Perform a SAGA step for training sample ``index`` (see the class docstring).

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss (of sample ``index``).
            index (int): the sample whose gradient the params' ``.grad`` hold.
        """
        for group in self.param_groups:
            index = check_sample_index(index, group["num_samples"])
        self._index = index
        try:
            return super().step(closure)
        finally:
            self._index = None


def _piece(bucket, row: Tensor, chunk) -> Tensor:
    """A chunk's part of one table row, shaped as ``bucket.pieces`` shapes the others."""
    piece = row[chunk.start : chunk.end]
    if chunk.hi - chunk.lo == 1 and chunk.end == bucket.ends[chunk.lo]:
        return piece.view(real_shape(bucket.params[chunk.lo]))
    return piece


def _refuse_what_cannot_fit(params: list, **options) -> None:
    from fastopt import memory  # not at import time: ``python -m fastopt.memory`` runs it

    report = memory.estimate(params, "saga", **options)
    samples = sorted({g.get("num_samples", options["num_samples"]) for g in params
                      if isinstance(g, dict)} or {options["num_samples"]})
    for device in report.devices.values():
        if not device.fits:
            raise MemoryError(
                f"SAGA needs {device.new_bytes:,} bytes ({memory.human(device.new_bytes)}) on "
                f"{device.device} for its gradient table ({', '.join(f'{n:,}' for n in samples)}"
                f" samples x {device.num_elements:,} elements), its mean and a step's scratch, "
                "but only "
                f"{device.free_bytes:,} bytes ({memory.human(device.free_bytes)}) are free. "
                "Nothing was allocated. Use fewer samples (e.g. mini-batches as samples), fewer "
                "trainable params, or an optimizer without a per-sample table."
            )
