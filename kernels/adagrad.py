"""Adagrad's per-element math (Duchi et al., 2011), run by ``kernels/elementwise.py``: the
twin of ``fastopt.optimizers.adagrad.adagrad`` (same arguments; see its module for the math).
The row holds (step, clr): the step size decayed by ``lr_decay`` already."""

import triton
import triton.language as tl

from .ops import WEIGHT_DECAY, fma


@triton.jit
def adagrad(param, grad, sum_, b1, b2, b3, row_ptr, lr, weight_decay, eps, lr_decay, h3, h4,
            h5, h6, h7, FLAGS: tl.constexpr):
    if (FLAGS & WEIGHT_DECAY.value) != 0:
        grad = fma(param, weight_decay, grad)
    sum_ = fma(grad, grad, sum_)  # addcmul_
    std = tl.sqrt_rn(sum_) + eps
    param = param + tl.div_rn(-tl.load(row_ptr + 1) * grad, std)
    return param, sum_, b1, b2, b3
