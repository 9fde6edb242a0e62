"""SGD with momentum, dampening, Nesterov and weight decay in one fused pass (as torch.optim.SGD).

Per element, in fp32:

    g   = grad / grad_scale           (when a GradScaler scale is given)
    g   = -g                          (MAXIMIZE)
    g   = g + wd * p                  (HAS_WEIGHT_DECAY)
    buf = g                           (HAS_MOMENTUM, FIRST_STEP: torch initialises it to the grad)
    buf = momentum * buf + (1 - dampening) * g      (HAS_MOMENTUM, later steps)
    g   = g + momentum * buf (NESTEROV)   or   g = buf
    p   = p - lr * g

With an fp32 master copy (HAS_MASTER) the update runs on it and the param receives it rounded
to nearest; the momentum buffer may be stored in any float dtype. A tensor ``lr``,
``grad_scale`` and ``found_inf`` are read on the device; when ``found_inf`` is
nonzero nothing is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .ops import fma
from .rounding import load_param, store_param, to_storage
from .table import flat_block, grad_arguments, table_block


@triton.jit
def _sgd_kernel(
    param_ptr,  # params, updated in place
    param_table_ptr,  # PARAM_TABLE: int64 address of each param (left where its owner keeps it)
    grad_ptr,  # grads: the flat grad buffer (see kernels/table.py)
    grad_table_ptr,  # GRAD_TABLE: int64 address of each param's grad
    block_param_ptr,  # GRAD_TABLE: int32 param of each program
    block_offset_ptr,  # GRAD_TABLE: int64 first element of each program within its param
    slot_start_ptr,  # GRAD_TABLE: int64 slot of each param in the flat buffers
    slot_size_ptr,  # GRAD_TABLE: int64 elements of each param
    momentum_buffer_ptr,  # momentum buffer, updated in place (HAS_MOMENTUM only)
    lr_ptr,  # fp32 learning rate on the device (LR_ON_DEVICE only)
    grad_scale_ptr,  # fp32 GradScaler scale (HAS_GRAD_SCALE only)
    found_inf_ptr,  # fp32 nonzero when a grad was inf/nan (HAS_FOUND_INF only)
    master_ptr,  # fp32 master copy of the params, updated in place (HAS_MASTER only)
    lr,  # learning rate (when not LR_ON_DEVICE)
    momentum,
    one_minus_dampening,
    weight_decay,
    n_elements,  # elements in this flat buffer
    HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    GRAD_TABLE: tl.constexpr,  # grads read where they lie, through grad_table_ptr
    PARAM_TABLE: tl.constexpr,  # params too, through param_table_ptr (GRAD_TABLE only)
    BLOCK_SIZE: tl.constexpr,
):
    if GRAD_TABLE:
        offsets, local, size, param_ptrs, grad_ptrs, first = table_block(
            param_ptr, param_table_ptr, grad_ptr, grad_table_ptr, block_param_ptr,
            block_offset_ptr, slot_start_ptr, slot_size_ptr, found_inf_ptr, HAS_FOUND_INF,
            PARAM_TABLE, BLOCK_SIZE)
        if first + BLOCK_SIZE <= size:  # a whole block: unmasked, 16-byte vector accesses
            _sgd_elements(param_ptrs, momentum_buffer_ptr, master_ptr, lr_ptr, grad_scale_ptr,
                          offsets, None, grad_ptrs, lr, momentum, one_minus_dampening,
                          weight_decay, HAS_MOMENTUM, FIRST_STEP, NESTEROV, HAS_WEIGHT_DECAY,
                          MAXIMIZE, LR_ON_DEVICE, HAS_GRAD_SCALE, HAS_MASTER)
        else:  # a param's last block, masked at its end
            _sgd_elements(param_ptrs, momentum_buffer_ptr, master_ptr, lr_ptr, grad_scale_ptr,
                          offsets, local < size, grad_ptrs, lr, momentum, one_minus_dampening,
                          weight_decay, HAS_MOMENTUM, FIRST_STEP, NESTEROV, HAS_WEIGHT_DECAY,
                          MAXIMIZE, LR_ON_DEVICE, HAS_GRAD_SCALE, HAS_MASTER)
    else:
        offsets, mask = flat_block(found_inf_ptr, n_elements, HAS_FOUND_INF, BLOCK_SIZE)
        _sgd_elements(param_ptr + offsets, momentum_buffer_ptr, master_ptr, lr_ptr,
                      grad_scale_ptr, offsets, mask, grad_ptr + offsets, lr, momentum,
                      one_minus_dampening, weight_decay, HAS_MOMENTUM, FIRST_STEP, NESTEROV,
                      HAS_WEIGHT_DECAY, MAXIMIZE, LR_ON_DEVICE, HAS_GRAD_SCALE, HAS_MASTER)


@triton.jit
def _sgd_elements(param_ptrs, momentum_buffer_ptr, master_ptr, lr_ptr, grad_scale_ptr, offsets,
                  mask, grad_ptrs, lr, momentum, one_minus_dampening, weight_decay,
                  HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
                  HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
                  LR_ON_DEVICE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  HAS_MASTER: tl.constexpr):
    """The update of the elements at ``offsets`` of the flat buffers (``mask``: None for a
    whole block), whose params are at ``param_ptrs`` and grads at ``grad_ptrs``."""
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    param = load_param(param_ptrs, master_ptr + offsets, mask, HAS_MASTER)
    grad = tl.load(grad_ptrs, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        grad = tl.div_rn(grad, tl.load(grad_scale_ptr).to(tl.float32))
    if MAXIMIZE:
        grad = -grad
    # Multiply-adds are fused (one rounding) where torch.optim's own ops fuse them
    # (add_(x, alpha=a) is an fma on CPU and GPU), so the results round as the reference's do.
    if HAS_WEIGHT_DECAY:
        grad = fma(param, weight_decay, grad)
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buf = grad
        else:
            buf = tl.load(momentum_buffer_ptr + offsets, mask=mask).to(tl.float32)
            buf = fma(grad, one_minus_dampening, buf * momentum)
        tl.store(momentum_buffer_ptr + offsets,
                 to_storage(buf, momentum_buffer_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            grad = fma(buf, momentum, grad)
        else:
            grad = buf
    param = fma(grad, -lr, param)
    store_param(param_ptrs, master_ptr + offsets, mask, param, offsets, 0.0, 0, HAS_MASTER,
                False)


def sgd_update(
    params: list,
    grads: list,
    momentum_buffers: list,
    *,
    lr,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale=None,
    found_inf=None,
    masters=None,
) -> None:
    """Launch one kernel per flat buffer; the signature of ``fastopt.torch_path.sgd_update``.
    An entry of ``grads`` may be a ``GradTable`` (kernels/table.py)."""
    lr_on_device = isinstance(lr, torch.Tensor)
    block = launch.block_size()
    has_momentum = momentum != 0
    for i, param in enumerate(params):
        grad_args, grid, table, by_address = grad_arguments(grads, i, param)
        n = param.numel()
        if grid[0] == 0:
            continue
        _sgd_kernel[grid](
            param,
            *grad_args,
            momentum_buffers[i] if has_momentum else param,
            lr if lr_on_device else param,
            grad_scale if grad_scale is not None else param,
            found_inf if found_inf is not None else param,
            masters[i] if masters is not None else param,
            0.0 if lr_on_device else launch.fp32(lr),
            launch.fp32(momentum),
            launch.fp32(1.0 - float(dampening)),  # rounded from fp64, as torch's alpha is
            launch.fp32(weight_decay),
            n,
            HAS_MOMENTUM=has_momentum,
            FIRST_STEP=is_first_step,
            NESTEROV=nesterov,
            HAS_WEIGHT_DECAY=weight_decay != 0,
            MAXIMIZE=maximize,
            LR_ON_DEVICE=lr_on_device,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            HAS_MASTER=masters is not None,
            GRAD_TABLE=table,
            PARAM_TABLE=by_address,
            BLOCK_SIZE=block,
            num_warps=launch.NUM_WARPS,
        )
