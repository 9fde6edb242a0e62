"""RAdam (Liu et al., 2019, arXiv 1908.03265), with ``torch.optim.RAdam``'s signature,
defaults, errors and state.

With :math:`g` the grad (negated if ``maximize``), at step :math:`t`:

.. math::
    g &\\leftarrow g + \\lambda\\theta
        \\quad\\text{(or, decoupled: } \\theta \\leftarrow \\theta(1-\\gamma\\lambda)\\text{)} \\\\
    m &\\leftarrow \\beta_1 m + (1-\\beta_1) g, \\qquad
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2 \\\\
    \\rho_\\infty &= \\frac{2}{1-\\beta_2} - 1, \\qquad
        \\rho_t = \\rho_\\infty - \\frac{2 t \\beta_2^t}{1-\\beta_2^t} \\\\
    \\theta &\\leftarrow \\theta - \\gamma\\,\\frac{m}{1-\\beta_1^t}\\,
        \\frac{\\sqrt{1-\\beta_2^t}}{\\sqrt v + \\epsilon}\\, r_t
        \\quad\\text{if } \\rho_t > 5, \\text{ else }
        \\theta - \\gamma\\,\\frac{m}{1-\\beta_1^t}, \\\\
    r_t &= \\sqrt{\\frac{(\\rho_t-4)(\\rho_t-2)\\rho_\\infty}{(\\rho_\\infty-4)(\\rho_\\infty-2)\\rho_t}}
"""

from __future__ import annotations

__all__ = ["RAdam"]

import torch
from torch import Tensor

from fastopt.declaration import (DECOUPLED, WEIGHT_DECAY, Buffer, Declaration, Scalar,
                                 decay_factor)
from fastopt.optimizer import FlatOptimizer
from fastopt.validation import check_with


def _scalars(s, group: dict, ops) -> None:
    """Advance ``step``; derive the bias corrections and the rectification (``rect`` is 0
    while the variance is not yet tractable, rho_t <= 5)."""
    beta1, beta2 = group["betas"]
    s.step += 1
    step = ops.double(s.step)
    s.bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / bias_correction2
    tractable = rho_t > 5.0  # (then rho_inf > rho_t > 5: the denominator is positive)
    denominator = ops.where(tractable, (rho_inf - 4) * (rho_inf - 2) * rho_t, 1.0)
    rect = (rho_t - 4) * (rho_t - 2) * rho_inf / denominator
    s.rect = ops.where(tractable, ops.maximum(rect, 0.0) ** 0.5, 0.0)
    s.bias_correction2_sqrt = bias_correction2 ** 0.5


def radam(param, grad, exp_avg, exp_avg_sq, b2, b3, row, lr, one_minus_beta1, beta2,
          one_minus_beta2, weight_decay, eps, decay, h6, h7, flags) -> None:
    """One flat slice, in place (the signature of ``kernels/radam.py``'s)."""
    if flags & WEIGHT_DECAY:
        if flags & DECOUPLED:
            param.mul_(decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, one_minus_beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=one_minus_beta2)
    update = exp_avg.div(row.bias_correction1).mul_(lr)
    if row.rect > 0:
        adaptive = exp_avg_sq.sqrt().add_(eps).reciprocal_().mul_(row.bias_correction2_sqrt)
        update.mul_(adaptive).mul_(row.rect)
    param.sub_(update)


def _hyper(opt, group: dict) -> tuple:
    beta1, beta2 = group["betas"]
    weight_decay = group["weight_decay"]
    flags = (WEIGHT_DECAY if weight_decay != 0 else 0) \
        | (DECOUPLED if group["decoupled_weight_decay"] else 0)
    return (1.0 - beta1, beta2, 1.0 - beta2, weight_decay, group["eps"],
            decay_factor(group["lr"], weight_decay)), flags


DECLARATION = Declaration(
    buffers=(Buffer("exp_avg"), Buffer("exp_avg_sq")),
    scalars=(Scalar("step"),),
    derived=("bias_correction1", "rect", "bias_correction2_sqrt"),
    scalar_math=_scalars,
    math=radam,
    kernel="radam",
    hyper=_hyper,
    reference=torch.optim.RAdam,
    group_keys=("lr", "betas", "eps", "weight_decay"),
)


class RAdam(FlatOptimizer):
    """RAdam, a drop-in for ``torch.optim.RAdam`` (see the module docstring for the math).

    Args are torch.optim.RAdam's; ``foreach`` and ``capturable`` are accepted and change
    nothing; ``differentiable=True`` runs torch.optim's own algorithm. fastopt's keyword
    options: ``master_weights``, ``state_dtype``, ``stochastic_rounding``, ``rounding_seed``,
    ``max_grad_norm``, ``in_backward``, ``backend``, ``flatten_params``.
    """

    declaration = DECLARATION

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        **options,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "maximize": maximize, "foreach": foreach, "capturable": capturable,
                    "decoupled_weight_decay": decoupled_weight_decay,
                    "differentiable": differentiable}
        check_with(torch.optim.RAdam, defaults)
        super().__init__(params, defaults, **options)
