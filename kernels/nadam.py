"""NAdam's per-element math (Dozat, 2016), run by ``kernels/elementwise.py``: the twin of
``fastopt.optimizers.nadam.nadam`` (same arguments; see its module for the math). The row
holds (step, mu_product, bias_correction2, grad_coef, avg_coef)."""

import triton
import triton.language as tl

from .ops import DECOUPLED, WEIGHT_DECAY, decay_factor, fma, lerp


@triton.jit
def nadam(param, grad, exp_avg, exp_avg_sq, b2, b3, row_ptr, lr, one_minus_beta1, beta2,
          one_minus_beta2, weight_decay, eps, decay, h6, h7, FLAGS: tl.constexpr):
    if (FLAGS & WEIGHT_DECAY.value) != 0:
        if (FLAGS & DECOUPLED.value) != 0:
            param = param * decay_factor(lr, weight_decay, decay, FLAGS)
        else:
            grad = fma(param, weight_decay, grad)
    exp_avg = lerp(exp_avg, grad, one_minus_beta1)
    exp_avg_sq = fma(one_minus_beta2 * grad, grad, exp_avg_sq * beta2)  # addcmul_
    denom = tl.sqrt_rn(tl.div_rn(exp_avg_sq, tl.load(row_ptr + 2))) + eps
    param = param + tl.div_rn(tl.load(row_ptr + 3) * grad, denom)
    param = param + tl.div_rn(tl.load(row_ptr + 4) * exp_avg, denom)
    return param, exp_avg, exp_avg_sq, b2, b3
