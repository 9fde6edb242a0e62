"""Lion's per element math (Chen et al., 2023), run by ``kernels/elementwise.py``.

The twin of ``fastopt.optimizers.lion.lion`` (same arguments; see its module for the math):
the weight decay factor, then ``sign(beta1 m + (1 - beta1) g)`` and the moment, each rounded
as lion-pytorch's torch ops round them (``add(x, alpha=a)`` is a fused multiply-add).
"""

import triton
import triton.language as tl

from .ops import decay_factor, fma, sign


@triton.jit
def lion(param, grad, exp_avg, b1, b2, b3, row_ptr, lr, beta1, one_minus_beta1, beta2,
         one_minus_beta2, weight_decay, decay, h6, h7, FLAGS: tl.constexpr):
    if weight_decay != 0.0:
        param = param * decay_factor(lr, weight_decay, decay, FLAGS)
    param = fma(sign(fma(grad, one_minus_beta1, exp_avg * beta1)), -lr, param)
    exp_avg = fma(grad, one_minus_beta2, exp_avg * beta2)
    return param, exp_avg, b1, b2, b3
