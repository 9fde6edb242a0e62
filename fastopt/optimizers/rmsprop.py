"""RMSprop (Hinton's lecture 6e; centered: Graves, 2013), with ``torch.optim.RMSprop``'s
signature, defaults, errors and state.

With :math:`g` the grad (negated if ``maximize``):

.. math::
    g &\\leftarrow g + \\lambda\\theta, \\qquad
        v \\leftarrow \\alpha v + (1-\\alpha) g^2 \\quad(\\texttt{square\\_avg}) \\\\
    \\bar g &\\leftarrow \\alpha \\bar g + (1-\\alpha) g \\quad(\\texttt{grad\\_avg},
        \\text{centered}), \\qquad d = \\sqrt{v - \\bar g^2} + \\epsilon
        \\quad(\\sqrt v + \\epsilon \\text{ if not centered}) \\\\
    b &\\leftarrow \\mu b + g / d, \\quad \\theta \\leftarrow \\theta - \\gamma b
        \\quad(\\mu > 0), \\qquad \\text{else } \\theta \\leftarrow \\theta - \\gamma\\, g / d
"""

from __future__ import annotations

__all__ = ["RMSprop"]

import torch
from torch import Tensor

from fastopt.declaration import CENTERED, MOMENTUM, WEIGHT_DECAY, Buffer, Declaration, Scalar
from fastopt.optimizer import FlatOptimizer
from fastopt.validation import check_with


def _scalars(s, group: dict, ops) -> None:
    s.step += 1  # kept for the state_dict, as torch.optim keeps it: the math does not use it


def rmsprop(param, grad, square_avg, momentum_buffer, grad_avg, b3, row, lr, alpha,
            one_minus_alpha, eps, weight_decay, momentum, h5, h6, h7, flags) -> None:
    """One flat slice, in place (the signature of ``kernels/rmsprop.py``'s)."""
    if flags & WEIGHT_DECAY:
        grad = grad.add(param, alpha=weight_decay)
    square_avg.mul_(alpha).addcmul_(grad, grad, value=one_minus_alpha)
    if flags & CENTERED:
        grad_avg.lerp_(grad, one_minus_alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg.add_(eps)
    if flags & MOMENTUM:
        momentum_buffer.mul_(momentum).addcdiv_(grad, avg)
        param.add_(momentum_buffer, alpha=-lr)
    else:
        param.addcdiv_(grad, avg, value=-lr)


def _hyper(opt, group: dict) -> tuple:
    alpha, weight_decay, momentum = group["alpha"], group["weight_decay"], group["momentum"]
    flags = (WEIGHT_DECAY if weight_decay != 0 else 0) | (MOMENTUM if momentum > 0 else 0) \
        | (CENTERED if group["centered"] else 0)
    return (alpha, 1.0 - alpha, group["eps"], weight_decay, momentum), flags


DECLARATION = Declaration(
    buffers=(Buffer("square_avg"),
             Buffer("momentum_buffer", when=lambda group: group["momentum"] > 0),
             Buffer("grad_avg", when=lambda group: group["centered"])),
    scalars=(Scalar("step"),),
    scalar_math=_scalars,
    math=rmsprop,
    kernel="rmsprop",
    hyper=_hyper,
    reference=torch.optim.RMSprop,
    group_keys=("lr", "alpha", "eps", "weight_decay", "momentum", "centered"),
)


class RMSprop(FlatOptimizer):
    """RMSprop, a drop-in for ``torch.optim.RMSprop`` (see the module docstring for the math).

    Args are torch.optim.RMSprop's; ``foreach`` and ``capturable`` are accepted and change
    nothing; ``differentiable=True`` runs torch.optim's own algorithm. fastopt's keyword
    options: ``master_weights``, ``state_dtype``, ``stochastic_rounding``, ``rounding_seed``,
    ``max_grad_norm``, ``in_backward``, ``backend``, ``flatten_params``.
    """

    declaration = DECLARATION

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        **options,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps,
                    "centered": centered, "weight_decay": weight_decay,
                    "capturable": capturable, "foreach": foreach, "maximize": maximize,
                    "differentiable": differentiable}
        check_with(torch.optim.RMSprop, defaults)
        super().__init__(params, defaults, **options)
