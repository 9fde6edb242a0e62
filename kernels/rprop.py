"""Rprop's per-element math (Riedmiller & Braun, 1993), run by ``kernels/elementwise.py``: the
twin of ``fastopt.optimizers.rprop.rprop`` (same arguments; see its module for the math)."""

import triton
import triton.language as tl

from .ops import sign


@triton.jit
def rprop(param, grad, prev, step_size, b2, b3, row_ptr, lr, etaminus, etaplus, step_size_min,
          step_size_max, h4, h5, h6, h7, FLAGS: tl.constexpr):
    direction = sign(grad * prev)
    factor = tl.where(direction > 0.0, etaplus, tl.where(direction < 0.0, etaminus, 1.0))
    step_size = tl.minimum(tl.maximum(step_size * factor, step_size_min,
                                      propagate_nan=tl.PropagateNan.ALL),
                           step_size_max, propagate_nan=tl.PropagateNan.ALL)  # torch.clamp
    grad = tl.where(direction < 0.0, 0.0, grad)  # factor == etaminus (etaminus < 1 < etaplus)
    param = param - sign(grad) * step_size
    return param, grad, step_size, b2, b3
