"""Lion (Chen et al., 2023, arXiv 2302.06675), with lion-pytorch's signature and defaults.

Per element, with :math:`g` the grad (negated if ``maximize``), :math:`m` the ``exp_avg``:

.. math::
    \\theta &\\leftarrow \\theta\\,(1 - \\gamma\\lambda) \\\\
    \\theta &\\leftarrow \\theta - \\gamma\\,\\mathrm{sign}(\\beta_1 m + (1-\\beta_1) g) \\\\
    m &\\leftarrow \\beta_2 m + (1-\\beta_2) g

with ``decoupled_weight_decay=True`` :math:`\\lambda` is divided by the learning rate the
optimizer was built with (lion-pytorch's option). The torch twin below and ``kernels/lion.py``
round each step as lion-pytorch's ``update_fn`` does (its ``add(..., alpha=...)`` are fused
multiply-adds).
"""

from __future__ import annotations

__all__ = ["Lion"]

from torch import Tensor

from fastopt.declaration import ELEMENTWISE, Buffer, Declaration, decay_factor
from fastopt.optimizer import FlatOptimizer
from fastopt.validation import check_lr


def lion(param, grad, exp_avg, b1, b2, b3, row, lr, beta1, one_minus_beta1, beta2,
         one_minus_beta2, weight_decay, decay, h6, h7, flags) -> None:
    """The update of one flat slice, in place (the signature of ``kernels/lion.py``'s)."""
    if weight_decay != 0:
        param.mul_(decay)
    update = exp_avg.mul(beta1).add_(grad, alpha=one_minus_beta1).sign_()
    param.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=one_minus_beta2)


def _hyper(opt, group: dict) -> tuple:
    """Lion's kernel scalars: the betas and their complements (rounded from double, as
    lion-pytorch's ``1. - beta`` is), the weight decay and its factor ``1 - lr * wd``."""
    beta1, beta2 = group["betas"]
    weight_decay = group["weight_decay"]
    if group["decoupled_weight_decay"]:
        weight_decay = weight_decay / opt._init_lr
    return (beta1, 1.0 - beta1, beta2, 1.0 - beta2, weight_decay,
            decay_factor(group["lr"], weight_decay)), 0


LION = Declaration(
    buffers=(Buffer("exp_avg"),),
    math=lion,
    kernel="lion",
    hyper=_hyper,
    options=ELEMENTWISE - {"stochastic_rounding", "rounding_seed"},  # no step count to seed it
    differentiable=False,
    complex=False,  # sign() of a complex number has no meaning here (lion-pytorch fails too)
    group_keys=("lr", "betas", "weight_decay"),
)


class Lion(FlatOptimizer):
    r"""Lion, a drop-in for ``lion_pytorch.Lion`` (see the module docstring for the math).

    Args are lion-pytorch's: ``lr`` (default 1e-4), ``betas`` (0.9, 0.99), ``weight_decay``,
    ``use_triton`` (accepted; fastopt picks its kernels itself) and ``decoupled_weight_decay``;
    plus torch.optim's ``maximize``, and fastopt's keyword options (``master_weights``,
    ``state_dtype``, ``max_grad_norm``, ``in_backward``, ``backend``, ``flatten_params``).
    State: ``exp_avg`` per param, as lion-pytorch keeps it; no step count.

    What differs from lion-pytorch: ``decoupled_weight_decay`` is also a param group option
    (lion-pytorch reads only the constructor's), it divides by the constructor's ``lr`` as
    lion-pytorch does; the optimizer survives ``copy.deepcopy`` and pickling (lion-pytorch's
    loses its settings); bad arguments raise ``ValueError`` (lion-pytorch asserts), and
    ``lr=0`` is allowed (a scheduler's warmup starts there).
    """

    declaration = LION

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-4,
        betas: tuple = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        **options,
    ) -> None:
        check_lr(lr)
        for index, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if decoupled_weight_decay and not float(lr) > 0.0:
            raise ValueError("decoupled_weight_decay=True divides the weight decay by the "
                             f"initial learning rate, which must be positive: got lr={lr}")
        self._init_lr = float(lr)
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay,
                    "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize,
                    "foreach": foreach, "fused": fused}
        super().__init__(params, defaults, **options)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_init_lr": self._init_lr}
