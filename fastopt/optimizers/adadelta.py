"""Adadelta (Zeiler, 2012, arXiv 1212.5701), with ``torch.optim.Adadelta``'s signature,
defaults, errors and state.

With :math:`g` the grad (negated if ``maximize``):

.. math::
    g &\\leftarrow g + \\lambda\\theta, \\qquad
        v \\leftarrow \\rho v + (1-\\rho) g^2 \\quad(\\texttt{square\\_avg}) \\\\
    \\Delta &= \\frac{\\sqrt{u + \\epsilon}}{\\sqrt{v + \\epsilon}}\\, g, \\qquad
        u \\leftarrow \\rho u + (1-\\rho) \\Delta^2 \\quad(\\texttt{acc\\_delta}), \\qquad
        \\theta \\leftarrow \\theta - \\gamma \\Delta
"""

from __future__ import annotations

__all__ = ["Adadelta"]

import torch
from torch import Tensor

from fastopt.declaration import WEIGHT_DECAY, Buffer, Declaration, Scalar
from fastopt.optimizer import FlatOptimizer
from fastopt.validation import check_with


def _scalars(s, group: dict, ops) -> None:
    s.step += 1  # kept for the state_dict, as torch.optim keeps it: the math does not use it


def adadelta(param, grad, square_avg, acc_delta, b2, b3, row, lr, rho, one_minus_rho, eps,
             weight_decay, h4, h5, h6, h7, flags) -> None:
    """One flat slice, in place (the signature of ``kernels/adadelta.py``'s)."""
    if flags & WEIGHT_DECAY:
        grad = grad.add(param, alpha=weight_decay)
    square_avg.mul_(rho).addcmul_(grad, grad, value=one_minus_rho)
    std = square_avg.add(eps).sqrt_()
    delta = acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
    acc_delta.mul_(rho).addcmul_(delta, delta, value=one_minus_rho)
    param.add_(delta, alpha=-lr)


def _hyper(opt, group: dict) -> tuple:
    rho, weight_decay = group["rho"], group["weight_decay"]
    return (rho, 1.0 - rho, group["eps"], weight_decay), WEIGHT_DECAY if weight_decay != 0 else 0


DECLARATION = Declaration(
    buffers=(Buffer("square_avg"), Buffer("acc_delta")),
    scalars=(Scalar("step"),),
    scalar_math=_scalars,
    math=adadelta,
    kernel="adadelta",
    hyper=_hyper,
    reference=torch.optim.Adadelta,
    group_keys=("lr", "rho", "eps", "weight_decay"),
)


class Adadelta(FlatOptimizer):
    """Adadelta, a drop-in for ``torch.optim.Adadelta`` (see the module docstring).

    Args are torch.optim.Adadelta's; ``foreach`` and ``capturable`` are accepted and change
    nothing; ``differentiable=True`` runs torch.optim's own algorithm. fastopt's keyword
    options: ``master_weights``, ``state_dtype``, ``stochastic_rounding``, ``rounding_seed``,
    ``max_grad_norm``, ``in_backward``, ``backend``, ``flatten_params``.
    """

    declaration = DECLARATION

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        **options,
    ) -> None:
        defaults = {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay,
                    "maximize": maximize, "capturable": capturable, "foreach": foreach,
                    "differentiable": differentiable}
        check_with(torch.optim.Adadelta, defaults)
        super().__init__(params, defaults, **options)
