"""SGD with momentum, dampening, Nesterov momentum and weight decay, as ``torch.optim.SGD``.

The math is in ``torch_path.sgd_update`` and ``kernels/sgd.py``.
"""

from __future__ import annotations

__all__ = ["SGD"]

import torch
from torch import Tensor

from fastopt import dispatch, whole_vectors
from fastopt.declaration import Buffer, Declaration
from fastopt.elementwise import _on
from fastopt.optimizer import FlatOptimizer
from fastopt.state import MASTER
from fastopt.step import MIXED
from fastopt.validation import check_flags, check_sgd


def _update(opt, group, bucket, plan, grad_scale, found_inf) -> None:
    """SGD's step: torch's fused SGD over the flat buffers or ``kernels/sgd.py``, once for
    params whose momentum buffer starts this step (it becomes the grad) and once for the rest."""
    momentum = group["momentum"]
    update = dispatch.update_fn("sgd", bucket.backend)
    states = ("momentum_buffer",) if momentum else ()
    exact = grad_scale is None and found_inf is None and whole_vectors.applies(bucket, states)
    for first in (True, False):
        if momentum == 0:
            todo = None if first else plan
        else:
            todo = plan.with_key(not first)  # key: the param had a buffer before this step
        if todo is None:
            continue
        params, grads = todo.pieces("param"), todo.grads
        buffers = todo.pieces("momentum_buffer") if momentum else []
        if exact:  # every element in torch's vector loop, as torch.optim.SGD rounds it
            params, grads, cut = whole_vectors.split(bucket, todo, params, grads,
                                                     {name: buffers for name in states})
            buffers = cut.get("momentum_buffer", [])
        update(
            params,
            grads,
            buffers,
            lr=_on(group["lr"], bucket.device),
            momentum=float(momentum),
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            is_first_step=first,
            grad_scale=_on(grad_scale, bucket.device),
            found_inf=_on(found_inf, bucket.device),
            **opt.precision_options(group, bucket, todo),
        )
    late = bucket.state.added_late.get("momentum_buffer")
    if late and momentum != 0:  # their buffers have started
        late.difference_update(i for lo, hi, _ in plan.step_runs for i in range(lo, hi))


SGD_DECLARATION = Declaration(
    buffers=(Buffer("momentum_buffer", when=lambda g: g["momentum"] != 0),),
    update=_update,
    options=frozenset({"master_weights", "state_dtype", "max_grad_norm", "in_backward"}),
    sparse_error=None,  # densified
    # torch's SGD adds the decay to the grad (grad.add(param)), which a sparse grad refuses
    sparse_weight_decay_error="add(sparse, dense) is not supported. Use add(dense, sparse) "
                              "instead.",
    reference=torch.optim.SGD,
    group_keys=("lr", "momentum", "dampening", "weight_decay"),
    cost="sgd",
)


class SGD(FlatOptimizer):
    r"""Stochastic gradient descent (with momentum as in Sutskever et al., 2013), a drop-in for
    ``torch.optim.SGD``.

    For each param :math:`\theta` with grad :math:`g` (negated if ``maximize``):

    .. math::
        g &\leftarrow g + \lambda\theta \\
        b &\leftarrow g \text{ on a param's first step, else } \mu b + (1-\tau) g \\
        g &\leftarrow g + \mu b \text{ (nesterov) or } b \quad\text{(when } \mu \ne 0\text{)} \\
        \theta &\leftarrow \theta - \gamma g

    Args are those of ``torch.optim.SGD``; ``foreach`` and ``fused`` are accepted and change
    nothing (every step is one fused pass per flat buffer); ``differentiable=True`` leaves the
    params where they are and runs torch.optim's own differentiable algorithm. Sparse grads are
    densified (torch's for-loop applies them sparsely; the result is the same). Keyword-only
    ``backend``: see ``fastopt.dispatch``; ``flatten_params=False``: params stay where they
    are (see ``fastopt.flat``); ``in_backward=True``: the update runs inside ``backward()``
    (see ``fastopt.in_backward``).
    """

    declaration = SGD_DECLARATION

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        **options,
    ) -> None:
        check_sgd(lr, momentum, dampening, weight_decay, nesterov)
        check_flags(foreach, fused, differentiable)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults, **options)

    def run_key(self, bucket, i: int) -> bool:
        """Whether param i had its momentum buffer before this step (torch starts one as the
        grad itself): it has state, and that state is not only a master that the buffer
        joined this step (momentum switched on mid-run)."""
        late = bucket.state.added_late.get("momentum_buffer")
        return bucket.state.has_state[i] and not (late and i in late)

    def uniform_key(self, bucket):
        if not bucket.state.added_late.get("momentum_buffer"):
            return super().uniform_key(bucket)
        keys = [self.run_key(bucket, i) for i in range(len(bucket.params))]
        return keys[0] if keys.count(keys[0]) == len(keys) else MIXED

    def saved_state_names(self, group: dict, p: Tensor, entry=None) -> tuple:
        return [], ["momentum_buffer", MASTER]  # momentum_buffer may be None (torch)
