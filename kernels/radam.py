"""RAdam's per-element math (Liu et al., 2019), run by ``kernels/elementwise.py``: the twin of
``fastopt.optimizers.radam.radam`` (same arguments; see its module for the math). The row
holds (step, bias_correction1, rect, bias_correction2_sqrt); ``rect`` is 0 before the
rectification starts."""

import triton
import triton.language as tl

from .ops import DECOUPLED, WEIGHT_DECAY, decay_factor, fma, lerp


@triton.jit
def radam(param, grad, exp_avg, exp_avg_sq, b2, b3, row_ptr, lr, one_minus_beta1, beta2,
          one_minus_beta2, weight_decay, eps, decay, h6, h7, FLAGS: tl.constexpr):
    if (FLAGS & WEIGHT_DECAY.value) != 0:
        if (FLAGS & DECOUPLED.value) != 0:
            param = param * decay_factor(lr, weight_decay, decay, FLAGS)
        else:
            grad = fma(param, weight_decay, grad)
    exp_avg = lerp(exp_avg, grad, one_minus_beta1)
    exp_avg_sq = fma(one_minus_beta2 * grad, grad, exp_avg_sq * beta2)  # addcmul_
    update = tl.div_rn(exp_avg, tl.load(row_ptr + 1)) * lr
    rect = tl.load(row_ptr + 2)
    if rect > 0.0:
        adaptive = tl.div_rn(1.0, tl.sqrt_rn(exp_avg_sq) + eps) * tl.load(row_ptr + 3)
        update = update * adaptive * rect
    return param - update, exp_avg, exp_avg_sq, b2, b3
