"""SGD with momentum, dampening, Nesterov momentum and weight decay, as ``torch.optim.SGD``.

The math is in ``torch_path.sgd_update`` and ``kernels/sgd.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastopt import dispatch
from fastopt.adam import _on
from fastopt.optimizer import FlatOptimizer, precision_defaults
from fastopt.validation import check_flags, check_precision, check_sgd


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

    update_name = "sgd"
    grad_table_ok = True
    sparse_grads_ok = True
    reference_class = torch.optim.SGD
    required_group_keys = ("lr", "momentum", "dampening", "weight_decay")
    precision_keys = ("master_weights", "state_dtype", "max_grad_norm")

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
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        flatten_params: bool = True,
        in_backward: bool = False,
    ) -> None:
        check_sgd(lr, momentum, dampening, weight_decay, nesterov)
        check_flags(foreach, fused, differentiable)
        check_precision(master_weights, state_dtype, False, 0, max_grad_norm)
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
            **precision_defaults(master_weights, state_dtype, max_grad_norm=max_grad_norm,
                                 rounding=False),
        }
        super().__init__(params, defaults, backend=backend, flatten_params=flatten_params,
                         in_backward=in_backward)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def state_names(self, group: dict, bucket) -> list:
        names = ["momentum_buffer"] if group["momentum"] != 0 else []
        return names + self.precision_names(group, bucket)

    def saved_state_names(self, group: dict) -> tuple:
        return [], ["momentum_buffer", "master_param"]  # momentum_buffer may be None (torch)

    def update(self, group, bucket, plan, grad_scale, found_inf) -> None:
        momentum = group["momentum"]
        update = dispatch.update_fn("sgd", bucket.backend)
        for first in (True, False):
            if momentum == 0:
                todo = None if first else plan
            else:
                todo = plan.with_key(not first)  # key: the param had a buffer before this step
            if todo is None:
                continue
            update(
                todo.pieces("param"),
                todo.grads,
                todo.pieces("momentum_buffer") if momentum else [],
                lr=_on(group["lr"], bucket.device),
                momentum=float(momentum),
                dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]),
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                is_first_step=first,
                grad_scale=_on(grad_scale, bucket.device),
                found_inf=_on(found_inf, bucket.device),
                **self.precision_options(group, bucket, todo),
            )
