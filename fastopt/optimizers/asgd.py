"""ASGD, averaged SGD (Polyak & Juditsky, 1992), with ``torch.optim.ASGD``'s signature,
defaults, errors and state (``step``, ``eta``, ``mu``, ``ax``).

With :math:`g` the grad (negated if ``maximize``), :math:`\\eta_t` and :math:`\\mu_t` this
step's values of the per-param scalars:

.. math::
    g &\\leftarrow g + \\lambda_{wd}\\theta, \\qquad
        \\theta \\leftarrow \\theta(1 - \\lambda\\eta_t) - \\eta_t g \\\\
    a &\\leftarrow a + \\mu_t(\\theta - a) \\quad(\\texttt{ax}; \\; a \\leftarrow \\theta
        \\text{ when } \\mu_t = 1) \\\\
    \\eta_{t+1} &= \\frac{\\gamma}{(1 + \\lambda\\gamma t)^{\\alpha}}, \\qquad
        \\mu_{t+1} = \\frac{1}{\\max(1, t - t_0)}
"""

from __future__ import annotations

__all__ = ["ASGD"]

import torch
from torch import Tensor

from fastopt.declaration import WEIGHT_DECAY, Buffer, Declaration, Scalar
from fastopt.optimizer import FlatOptimizer
from fastopt.validation import check_with


def _scalars(s, group: dict, ops) -> None:
    """This step's ``eta`` and ``mu`` (as the update reads them), then the next ones."""
    lr, lambd = group["lr"], group["lambd"]
    s.step += 1
    eta = ops.double(s.eta)
    s.decay = 1 - lambd * eta
    s.neg_eta = -eta
    s.mu_now = ops.double(s.mu)
    step = ops.double(s.step)
    # torch.optim stores both through float32 tensors (torch.as_tensor of a Python float)
    s.eta = ops.float32(lr / ((1 + lambd * lr * step) ** group["alpha"]))
    s.mu = ops.float32(1 / ops.maximum(step - group["t0"], 1.0))


def asgd(param, grad, ax, b1, b2, b3, row, lr, weight_decay, h1, h2, h3, h4, h5, h6, h7,
         flags) -> None:
    """One flat slice, in place (the signature of ``kernels/asgd.py``'s)."""
    if flags & WEIGHT_DECAY:
        grad = grad.add(param, alpha=weight_decay)
    param.mul_(row.decay)
    param.add_(grad, alpha=row.neg_eta)
    if row.mu_now != 1:
        ax.add_(param.sub(ax).mul_(row.mu_now))
    else:
        ax.copy_(param)


def _hyper(opt, group: dict) -> tuple:
    weight_decay = group["weight_decay"]
    return (weight_decay,), WEIGHT_DECAY if weight_decay != 0 else 0


DECLARATION = Declaration(
    buffers=(Buffer("ax"),),
    scalars=(Scalar("step"), Scalar("eta", "lr"), Scalar("mu", 1.0)),
    derived=("decay", "neg_eta", "mu_now"),
    scalar_math=_scalars,
    math=asgd,
    kernel="asgd",
    hyper=_hyper,
    reference=torch.optim.ASGD,
    group_keys=("lr", "lambd", "alpha", "t0", "weight_decay"),
)


class ASGD(FlatOptimizer):
    """ASGD, a drop-in for ``torch.optim.ASGD`` (see the module docstring for the math).

    Args are torch.optim.ASGD's; ``foreach`` and ``capturable`` are accepted and change
    nothing; ``differentiable=True`` runs torch.optim's own algorithm. fastopt's keyword
    options: ``master_weights``, ``state_dtype``, ``stochastic_rounding``, ``rounding_seed``,
    ``max_grad_norm``, ``in_backward``, ``backend``, ``flatten_params``.
    """

    declaration = DECLARATION

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        **options,
    ) -> None:
        defaults = {"lr": lr, "lambd": lambd, "alpha": alpha, "t0": t0,
                    "weight_decay": weight_decay, "foreach": foreach, "maximize": maximize,
                    "differentiable": differentiable, "capturable": capturable}
        check_with(torch.optim.ASGD, defaults)
        super().__init__(params, defaults, **options)
