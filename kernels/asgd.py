"""ASGD's per-element math (Polyak & Juditsky, 1992), run by ``kernels/elementwise.py``: the
twin of ``fastopt.optimizers.asgd.asgd`` (same arguments; see its module for the math). The
row holds (step, eta, mu, decay, neg_eta, mu_now): this step's values are the last three."""

import triton
import triton.language as tl

from .ops import WEIGHT_DECAY, fma


@triton.jit
def asgd(param, grad, ax, b1, b2, b3, row_ptr, lr, weight_decay, h1, h2, h3, h4, h5, h6, h7,
         FLAGS: tl.constexpr):
    if (FLAGS & WEIGHT_DECAY.value) != 0:
        grad = fma(param, weight_decay, grad)
    param = param * tl.load(row_ptr + 3)
    param = fma(grad, tl.load(row_ptr + 4), param)
    mu = tl.load(row_ptr + 5)
    if mu != 1.0:
        ax = ax + (param - ax) * mu
    else:
        ax = param
    return param, ax, b1, b2, b3
