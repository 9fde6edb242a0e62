"""Adamax (Kingma & Ba, 2014, section 7.1), with ``torch.optim.Adamax``'s signature, defaults,
errors and state.

With :math:`g` the grad (negated if ``maximize``), at step :math:`t`:

.. math::
    g &\\leftarrow g + \\lambda\\theta \\\\
    m &\\leftarrow \\beta_1 m + (1-\\beta_1) g, \\qquad
        u \\leftarrow \\max(\\beta_2 u,\\; |g| + \\epsilon) \\quad(\\texttt{exp\\_inf}) \\\\
    \\theta &\\leftarrow \\theta - \\frac{\\gamma}{1-\\beta_1^t}\\,\\frac{m}{u}
"""

from __future__ import annotations

__all__ = ["Adamax"]

import torch
from torch import Tensor

from fastopt.declaration import WEIGHT_DECAY, Buffer, Declaration, Scalar
from fastopt.optimizer import FlatOptimizer
from fastopt.validation import check_with


def _scalars(s, group: dict, ops) -> None:
    """Advance ``step``; derive the step size ``clr = lr / (1 - beta1^t)``."""
    beta1, _ = group["betas"]
    s.step += 1
    s.clr = group["lr"] / (1 - beta1 ** ops.double(s.step))


def adamax(param, grad, exp_avg, exp_inf, b2, b3, row, lr, one_minus_beta1, beta2,
           weight_decay, eps, h4, h5, h6, h7, flags) -> None:
    """One flat slice, in place (the signature of ``kernels/adamax.py``'s)."""
    if flags & WEIGHT_DECAY:
        grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, one_minus_beta1)
    torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
    param.addcdiv_(exp_avg, exp_inf, value=-row.clr)


def _hyper(opt, group: dict) -> tuple:
    beta1, beta2 = group["betas"]
    weight_decay = group["weight_decay"]
    return (1.0 - beta1, beta2, weight_decay, group["eps"]), \
        WEIGHT_DECAY if weight_decay != 0 else 0


DECLARATION = Declaration(
    buffers=(Buffer("exp_avg"), Buffer("exp_inf")),
    scalars=(Scalar("step"),),
    derived=("clr",),
    scalar_math=_scalars,
    math=adamax,
    kernel="adamax",
    hyper=_hyper,
    reference=torch.optim.Adamax,
    group_keys=("lr", "betas", "eps", "weight_decay"),
)


class Adamax(FlatOptimizer):
    """Adamax, a drop-in for ``torch.optim.Adamax`` (see the module docstring for the math).

    Args are torch.optim.Adamax's; ``foreach`` and ``capturable`` are accepted and change
    nothing; ``differentiable=True`` runs torch.optim's own algorithm. fastopt's keyword
    options: ``master_weights``, ``state_dtype``, ``stochastic_rounding``, ``rounding_seed``,
    ``max_grad_norm``, ``in_backward``, ``backend``, ``flatten_params``.
    """

    declaration = DECLARATION

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        **options,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "foreach": foreach, "maximize": maximize,
                    "differentiable": differentiable, "capturable": capturable}
        check_with(torch.optim.Adamax, defaults)
        super().__init__(params, defaults, **options)
