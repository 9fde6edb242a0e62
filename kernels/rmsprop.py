"""RMSprop's per-element math, run by ``kernels/elementwise.py``: the twin of
``fastopt.optimizers.rmsprop.rmsprop`` (same arguments; see its module for the math).
``momentum_buffer`` and ``grad_avg`` exist with MOMENTUM and CENTERED."""

import triton
import triton.language as tl

from .ops import CENTERED, MOMENTUM, WEIGHT_DECAY, fma, lerp


@triton.jit
def rmsprop(param, grad, square_avg, momentum_buffer, grad_avg, b3, row_ptr, lr, alpha,
            one_minus_alpha, eps, weight_decay, momentum, h5, h6, h7, FLAGS: tl.constexpr):
    if (FLAGS & WEIGHT_DECAY.value) != 0:
        grad = fma(param, weight_decay, grad)
    square_avg = fma(one_minus_alpha * grad, grad, square_avg * alpha)  # addcmul_
    if (FLAGS & CENTERED.value) != 0:
        grad_avg = lerp(grad_avg, grad, one_minus_alpha)
        avg = tl.sqrt_rn(fma(-grad_avg, grad_avg, square_avg)) + eps
    else:
        avg = tl.sqrt_rn(square_avg) + eps
    if (FLAGS & MOMENTUM.value) != 0:
        momentum_buffer = momentum_buffer * momentum + tl.div_rn(grad, avg)
        param = fma(momentum_buffer, -lr, param)
    else:
        param = param + tl.div_rn(-lr * grad, avg)
    return param, square_avg, momentum_buffer, grad_avg, b3
