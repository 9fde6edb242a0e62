"""Adamax's per-element math (Kingma & Ba, 2014), run by ``kernels/elementwise.py``: the twin
of ``fastopt.optimizers.adamax.adamax`` (same arguments; see its module for the math). The row
holds (step, clr)."""

import triton
import triton.language as tl

from .ops import WEIGHT_DECAY, fma, lerp


@triton.jit
def adamax(param, grad, exp_avg, exp_inf, b2, b3, row_ptr, lr, one_minus_beta1, beta2,
           weight_decay, eps, h4, h5, h6, h7, FLAGS: tl.constexpr):
    if (FLAGS & WEIGHT_DECAY.value) != 0:
        grad = fma(param, weight_decay, grad)
    exp_avg = lerp(exp_avg, grad, one_minus_beta1)
    # NaN propagates, as torch.maximum does
    exp_inf = tl.maximum(exp_inf * beta2, tl.abs(grad) + eps, propagate_nan=tl.PropagateNan.ALL)
    param = param + tl.div_rn(-tl.load(row_ptr + 1) * exp_avg, exp_inf)
    return param, exp_avg, exp_inf, b2, b3
