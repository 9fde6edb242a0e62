"""Adagrad (Duchi et al., 2011), with ``torch.optim.Adagrad``'s signature, defaults, errors
and state (made for every param at construction, as torch makes it).

With :math:`g` the grad (negated if ``maximize``), at step :math:`t`:

.. math::
    g &\\leftarrow g + \\lambda\\theta, \\qquad
        \\tilde\\gamma = \\frac{\\gamma}{1 + (t-1)\\eta} \\quad(\\eta = \\texttt{lr\\_decay}) \\\\
    s &\\leftarrow s + g^2 \\quad(\\texttt{sum}, \\text{ starting at }
        \\texttt{initial\\_accumulator\\_value}) \\\\
    \\theta &\\leftarrow \\theta - \\tilde\\gamma\\, \\frac{g}{\\sqrt s + \\epsilon}

Sparse grads are densified (the update of an element without a grad is zero, as torch's sparse
path leaves it); with a weight decay they are refused, as torch refuses them.
"""

from __future__ import annotations

__all__ = ["Adagrad"]

import torch
from torch import Tensor

from fastopt.declaration import WEIGHT_DECAY, Buffer, Declaration, Scalar
from fastopt.optimizer import FlatOptimizer
from fastopt.validation import check_with


def _scalars(s, group: dict, ops) -> None:
    """Advance ``step``; derive the decayed step size ``clr``."""
    s.step += 1
    s.clr = group["lr"] / (1 + (ops.double(s.step) - 1) * group["lr_decay"])


def adagrad(param, grad, sum_, b1, b2, b3, row, lr, weight_decay, eps, lr_decay, h3, h4, h5,
            h6, h7, flags) -> None:
    """One flat slice, in place (the signature of ``kernels/adagrad.py``'s): torch.optim's
    for-loop ops (fp32 and fp64 CPU buckets take ``fused`` below instead)."""
    if flags & WEIGHT_DECAY:
        grad = grad.add(param, alpha=weight_decay)
    sum_.addcmul_(grad, grad, value=1)
    std = sum_.sqrt().add_(eps)
    param.addcdiv_(grad, std, value=-row.clr)


def fused(params, grads, buffers, steps, lr, hyper, maximize, grad_scale) -> None:
    """A whole plan through torch's own fused CPU Adagrad (one pass per entry, each entry's
    step count read from the scalar table, already advanced; torch's fused-vs-for-loop tests
    hold it to the for-loop, as ours do)."""
    weight_decay, eps, lr_decay = hyper
    torch._fused_adagrad_(params, grads, buffers[0], steps, lr=lr, lr_decay=lr_decay,
                          weight_decay=weight_decay, eps=eps, maximize=maximize,
                          grad_scale=grad_scale)


def _hyper(opt, group: dict) -> tuple:
    weight_decay = group["weight_decay"]
    return (weight_decay, group["eps"], group["lr_decay"]), \
        WEIGHT_DECAY if weight_decay != 0 else 0


DECLARATION = Declaration(
    buffers=(Buffer("sum"),),  # starts at initial_accumulator_value (Adagrad.buffer_init)
    scalars=(Scalar("step"),),
    derived=("clr",),
    scalar_math=_scalars,
    math=adagrad,
    fused=fused,
    kernel="adagrad",
    hyper=_hyper,
    sparse_error=None,  # densified
    sparse_weight_decay_error="weight_decay option is not compatible with sparse gradients",
    eager_state=True,
    reference=torch.optim.Adagrad,
    group_keys=("lr", "lr_decay", "eps", "weight_decay"),
)


class Adagrad(FlatOptimizer):
    """Adagrad, a drop-in for ``torch.optim.Adagrad`` (see the module docstring for the math).

    Args are torch.optim.Adagrad's; ``foreach`` and ``fused`` are accepted and change nothing
    (every step is one fused pass per flat buffer); ``differentiable=True`` runs torch.optim's
    own algorithm. fastopt's keyword options: ``master_weights``, ``state_dtype``,
    ``stochastic_rounding``, ``rounding_seed``, ``max_grad_norm``, ``in_backward``,
    ``backend``, ``flatten_params``.
    """

    declaration = DECLARATION

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        **options,
    ) -> None:
        defaults = {"lr": lr, "lr_decay": lr_decay, "eps": eps, "weight_decay": weight_decay,
                    "initial_accumulator_value": initial_accumulator_value,
                    "foreach": foreach, "maximize": maximize,
                    "differentiable": differentiable, "fused": fused}
        check_with(torch.optim.Adagrad, defaults)
        super().__init__(params, defaults, **options)

    def buffer_init(self, group: dict, name: str) -> float:
        """``sum`` starts at the constructor's ``initial_accumulator_value`` for every group,
        as torch.optim.Adagrad starts it (a group's own value is not read)."""
        return float(self.defaults["initial_accumulator_value"])
