"""torch's elementwise ops as the optimizers' kernels need them, rounded as torch rounds them.

torch.optim's reference algorithms are sequences of tensor ops; each rounds once per op, and
some are fused multiply-adds on the CPU: ``add(x, alpha=a)`` is ``fma(x, a, self)``,
``addcmul(t1, t2, value=v)`` is ``fma(v * t1, t2, self)``, ``lerp`` is one fma on either side
(``lerp`` below); ``addcdiv(t1, t2, value=v)`` is ``self + (v * t1) / t2``, each rounded. The
per-element kernel functions spell these out with ``tl.fma`` (the skeleton compiles them with
fp fusion off, so nothing else is fused) and so round as the reference does.
"""

import triton
import triton.language as tl

from .rounding import INTERPRETED

# The variant bits of a math function's FLAGS, as fastopt.declaration numbers them (test one
# with ``(FLAGS & BIT.value) != 0``: the interpreter's FLAGS is a plain int).
WEIGHT_DECAY = tl.constexpr(1)
DECOUPLED = tl.constexpr(2)
MOMENTUM = tl.constexpr(4)
CENTERED = tl.constexpr(8)
NESTEROV = tl.constexpr(16)
# Set in a math function's FLAGS by kernels/elementwise.py when the learning rate is a device
# tensor (then ``lr`` is read in the kernel and the host could not fold it into other scalars).
LR_ON_DEVICE = tl.constexpr(1 << 16)


@triton.jit
def fma(a, b, c):
    """``a * b + c`` rounded once: the GPU's fused multiply-add. Triton's interpreter before 3.9
    rounds ``tl.fma`` twice; under it the product is taken exactly in fp64 (two fp32 factors
    need 48 bits) and the sum rounded from there."""
    if INTERPRETED:
        product = tl.cast(a, tl.float64) * tl.cast(b, tl.float64)
        return (product + tl.cast(c, tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def lerp(start, end, weight):
    """``start.lerp_(end, weight)`` (torch's two-sided form, each side one fused multiply-add):
    ``start + weight * (end - start)`` for weight < 0.5, else ``end + (weight - 1) *
    (end - start)``. Selected without a branch (Triton 3.6 cannot lower a return in each
    branch of a runtime ``if``, and a merged branch costs registers)."""
    small = weight < 0.5
    return fma(end - start, tl.where(small, weight, weight - 1.0), tl.where(small, start, end))


@triton.jit
def sign(x):
    """``torch.sign``: -1, 0 or 1 (0 for nan)."""
    return tl.where(x > 0.0, 1.0, 0.0) - tl.where(x < 0.0, 1.0, 0.0)


@triton.jit
def decay_factor(lr, weight_decay, decay, FLAGS: tl.constexpr):
    """``1 - lr * weight_decay``: from the host (rounded from double, as torch's Python float
    is), or computed here when the learning rate is a device tensor."""
    if (FLAGS & LR_ON_DEVICE.value) != 0:
        return 1.0 - lr * weight_decay
    else:
        return decay
