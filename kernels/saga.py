"""SAGA (Defazio, Bach & Lacoste-Julien, 2014) in one fused pass over a flat buffer.

Per element, in fp32, with ``row`` the gradient table's row for this step's sample and ``mean``
the running mean of the table's rows:

    delta = grad - row
    p     = p - lr * (delta + mean + wd * p)
    mean  = mean + delta / n
    row   = grad

Each element is read once (param, grad, row, mean) and written once (param, mean, row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .ops import fma
from .rounding import to_storage


@triton.jit
def _saga_kernel(
    param_ptr,  # params, updated in place
    grad_ptr,  # this sample's grads
    row_ptr,  # the table's row for this sample, overwritten with the grads
    mean_ptr,  # the mean of the table's rows, updated in place
    lr_ptr,  # fp32 learning rate on the device (LR_ON_DEVICE only)
    lr,  # learning rate (when not LR_ON_DEVICE)
    weight_decay,
    inv_num_samples,  # 1 / n
    n_elements,
    HAS_WEIGHT_DECAY: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    row = tl.load(row_ptr + offsets, mask=mask).to(tl.float32)
    mean = tl.load(mean_ptr + offsets, mask=mask).to(tl.float32)
    delta = grad - row
    update = delta + mean
    if HAS_WEIGHT_DECAY:
        update = fma(param, weight_decay, update)  # add_(param, alpha=wd) fuses the same way
    param = fma(update, -lr, param)
    mean = fma(delta, inv_num_samples, mean)
    tl.store(param_ptr + offsets, to_storage(param, param_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + offsets, to_storage(mean, mean_ptr.dtype.element_ty), mask=mask)
    tl.store(row_ptr + offsets, to_storage(grad, row_ptr.dtype.element_ty), mask=mask)


def saga_update(params: list, grads: list, rows: list, means: list, *, lr, weight_decay: float,
                num_samples: int) -> None:
    """Launch one kernel per flat buffer; the signature of ``fastopt.torch_path.saga_update``."""
    lr_on_device = isinstance(lr, torch.Tensor)
    block = launch.block_size()
    for i, param in enumerate(params):
        n = param.numel()
        if n == 0:
            continue
        _saga_kernel[launch.grid(n, block)](
            param,
            grads[i],
            rows[i],
            means[i],
            lr if lr_on_device else param,
            0.0 if lr_on_device else launch.fp32(lr),
            launch.fp32(weight_decay),
            launch.fp32(1.0 / num_samples),
            n,
            HAS_WEIGHT_DECAY=weight_decay != 0,
            LR_ON_DEVICE=lr_on_device,
            BLOCK_SIZE=block,
            num_warps=launch.NUM_WARPS,
        )
