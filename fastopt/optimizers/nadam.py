"""NAdam (Dozat, 2016), with ``torch.optim.NAdam``'s signature, defaults, errors and state.

With :math:`g` the grad (negated if ``maximize``), at step :math:`t`, momentum decay
:math:`\\psi`:

.. math::
    g &\\leftarrow g + \\lambda\\theta
        \\quad\\text{(or, decoupled: } \\theta \\leftarrow \\theta(1-\\gamma\\lambda)\\text{)} \\\\
    \\mu_t &= \\beta_1\\,(1 - \\tfrac12\\, 0.96^{t\\psi}), \\qquad
        \\textstyle\\prod_t = \\prod_{t-1}\\,\\mu_t \\quad(\\texttt{mu\\_product}) \\\\
    m &\\leftarrow \\beta_1 m + (1-\\beta_1) g, \\qquad
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2, \\qquad
        d = \\sqrt{v / (1-\\beta_2^t)} + \\epsilon \\\\
    \\theta &\\leftarrow \\theta - \\gamma\\,\\frac{1-\\mu_t}{1-\\prod_t}\\,\\frac{g}{d}
        - \\gamma\\,\\frac{\\mu_{t+1}}{1-\\prod_t\\mu_{t+1}}\\,\\frac{m}{d}

The per-param scalars (``step``, ``mu_product``) and the coefficients derived from them are
``_scalars`` (torch ops on the scalar table, both backends); the per-element math is ``nadam``
here and in ``kernels/nadam.py``.
"""

from __future__ import annotations

__all__ = ["NAdam"]

import torch
from torch import Tensor

from fastopt.declaration import (DECOUPLED, WEIGHT_DECAY, Buffer, Declaration, Scalar,
                                 decay_factor)
from fastopt.optimizer import FlatOptimizer
from fastopt.validation import check_with


def _scalars(s, group: dict, ops) -> None:
    """Advance ``step`` and ``mu_product``; derive the bias correction and the coefficients
    of the two ``addcdiv`` (as torch.optim computes them, in double from float32 state)."""
    beta1, beta2 = group["betas"]
    psi = group["momentum_decay"]
    s.step += 1
    step = ops.double(s.step)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
    # a float32 tensor times a Python float: float32 math
    s.mu_product = ops.float32(s.mu_product * ops.float32(mu))
    product = ops.double(s.mu_product)
    lr = group["lr"]
    s.bias_correction2 = 1 - beta2 ** step
    s.grad_coef = -lr * (1.0 - mu) / (1.0 - product)
    s.avg_coef = -lr * mu_next / (1.0 - product * mu_next)


def nadam(param, grad, exp_avg, exp_avg_sq, b2, b3, row, lr, one_minus_beta1, beta2,
          one_minus_beta2, weight_decay, eps, decay, h6, h7, flags) -> None:
    """One flat slice, in place (the signature of ``kernels/nadam.py``'s)."""
    if flags & WEIGHT_DECAY:
        if flags & DECOUPLED:
            param.mul_(decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, one_minus_beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=one_minus_beta2)
    denom = exp_avg_sq.div(row.bias_correction2).sqrt_().add_(eps)
    param.addcdiv_(grad, denom, value=row.grad_coef)
    param.addcdiv_(exp_avg, denom, value=row.avg_coef)


def _hyper(opt, group: dict) -> tuple:
    beta1, beta2 = group["betas"]
    weight_decay = group["weight_decay"]
    flags = (WEIGHT_DECAY if weight_decay != 0 else 0) \
        | (DECOUPLED if group["decoupled_weight_decay"] else 0)
    return (1.0 - beta1, beta2, 1.0 - beta2, weight_decay, group["eps"],
            decay_factor(group["lr"], weight_decay)), flags


DECLARATION = Declaration(
    buffers=(Buffer("exp_avg"), Buffer("exp_avg_sq")),
    scalars=(Scalar("step"), Scalar("mu_product", 1.0)),
    derived=("bias_correction2", "grad_coef", "avg_coef"),
    scalar_math=_scalars,
    math=nadam,
    kernel="nadam",
    hyper=_hyper,
    reference=torch.optim.NAdam,
    group_keys=("lr", "betas", "eps", "weight_decay", "momentum_decay"),
)


class NAdam(FlatOptimizer):
    """NAdam, a drop-in for ``torch.optim.NAdam`` (see the module docstring for the math).

    Args are torch.optim.NAdam's; ``foreach`` and ``capturable`` are accepted and change
    nothing (every step is one fused pass per flat buffer, and no host sync on the GPU);
    ``differentiable=True`` runs torch.optim's own algorithm. fastopt's keyword options:
    ``master_weights``, ``state_dtype``, ``stochastic_rounding``, ``rounding_seed``,
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
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        **options,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "momentum_decay": momentum_decay,
                    "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize,
                    "foreach": foreach, "capturable": capturable,
                    "differentiable": differentiable}
        check_with(torch.optim.NAdam, defaults)
        super().__init__(params, defaults, **options)
