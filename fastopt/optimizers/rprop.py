"""Rprop (Riedmiller & Braun, 1993), with ``torch.optim.Rprop``'s signature, defaults, errors
and state (``step``, ``prev``, ``step_size``).

With :math:`g` the grad (negated if ``maximize``), :math:`p` the previous step's (zeroed where
its sign flipped), :math:`s` the per-element step size (starting at the learning rate):

.. math::
    c &= \\eta_+ \\text{ if } gp > 0, \\; \\eta_- \\text{ if } gp < 0, \\; 1 \\text{ otherwise} \\\\
    s &\\leftarrow \\mathrm{clamp}(s\\,c,\\; s_{\\min}, s_{\\max}), \\qquad
        g \\leftarrow 0 \\text{ where } c = \\eta_- \\\\
    \\theta &\\leftarrow \\theta - \\mathrm{sign}(g)\\, s, \\qquad p \\leftarrow g
"""

from __future__ import annotations

__all__ = ["Rprop"]

import torch
from torch import Tensor

from fastopt.declaration import Buffer, Declaration, Scalar
from fastopt.optimizer import FlatOptimizer
from fastopt.validation import check_with


def _scalars(s, group: dict, ops) -> None:
    s.step += 1  # kept for the state_dict, as torch.optim keeps it: the math does not use it


def rprop(param, grad, prev, step_size, b2, b3, row, lr, etaminus, etaplus, step_size_min,
          step_size_max, h4, h5, h6, h7, flags) -> None:
    """One flat slice, in place (the signature of ``kernels/rprop.py``'s)."""
    sign = grad.mul(prev).sign()
    factor = sign.masked_fill(sign > 0, etaplus).masked_fill_(sign < 0, etaminus)
    factor.masked_fill_(sign == 0, 1)
    step_size.mul_(factor).clamp_(step_size_min, step_size_max)
    grad = grad.masked_fill(factor == etaminus, 0)
    param.addcmul_(grad.sign(), step_size, value=-1)
    prev.copy_(grad)


def _hyper(opt, group: dict) -> tuple:
    etaminus, etaplus = group["etas"]
    step_size_min, step_size_max = group["step_sizes"]
    return (etaminus, etaplus, step_size_min, step_size_max), 0


DECLARATION = Declaration(
    buffers=(Buffer("prev"), Buffer("step_size", init="lr")),
    scalars=(Scalar("step"),),
    scalar_math=_scalars,
    math=rprop,
    kernel="rprop",
    hyper=_hyper,
    reference=torch.optim.Rprop,
    group_keys=("lr", "etas", "step_sizes"),
)


class Rprop(FlatOptimizer):
    """Rprop, a drop-in for ``torch.optim.Rprop`` (see the module docstring for the math).

    Args are torch.optim.Rprop's; ``foreach`` and ``capturable`` are accepted and change
    nothing; ``differentiable=True`` runs torch.optim's own algorithm. fastopt's keyword
    options: ``master_weights``, ``state_dtype``, ``stochastic_rounding``, ``rounding_seed``,
    ``max_grad_norm``, ``in_backward``, ``backend``, ``flatten_params``.
    """

    declaration = DECLARATION

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        etas: tuple = (0.5, 1.2),
        step_sizes: tuple = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        **options,
    ) -> None:
        defaults = {"lr": lr, "etas": etas, "step_sizes": step_sizes, "foreach": foreach,
                    "maximize": maximize, "differentiable": differentiable,
                    "capturable": capturable}
        check_with(torch.optim.Rprop, defaults)
        super().__init__(params, defaults, **options)
