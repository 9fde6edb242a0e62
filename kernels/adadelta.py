"""Adadelta's per-element math (Zeiler, 2012), run by ``kernels/elementwise.py``: the twin of
``fastopt.optimizers.adadelta.adadelta`` (same arguments; see its module for the math)."""

import triton
import triton.language as tl

from .ops import WEIGHT_DECAY, fma


@triton.jit
def adadelta(param, grad, square_avg, acc_delta, b2, b3, row_ptr, lr, rho, one_minus_rho, eps,
             weight_decay, h4, h5, h6, h7, FLAGS: tl.constexpr):
    if (FLAGS & WEIGHT_DECAY.value) != 0:
        grad = fma(param, weight_decay, grad)
    square_avg = fma(one_minus_rho * grad, grad, square_avg * rho)  # addcmul_
    std = tl.sqrt_rn(square_avg + eps)
    delta = tl.div_rn(tl.sqrt_rn(acc_delta + eps), std) * grad
    acc_delta = fma(one_minus_rho * delta, delta, acc_delta * rho)
    param = fma(delta, -lr, param)
    return param, square_avg, acc_delta, b2, b3
