"""One fused pass for any elementwise optimizer: the skeleton every declared kernel runs in.

An optimizer's kernel module holds only its per-element math, a ``@triton.jit`` function

    math(param, grad, b0, b1, b2, b3, row_ptr, lr, h0, ..., h7, FLAGS)
        -> (param, b0, b1, b2, b3)

on fp32 blocks: the param (or its fp32 master), the grad (unscaled and negated for ``maximize``
already), up to four state buffers in the order its declaration lists them, a pointer to this
launch's row of the scalar table (kept scalars, then the values the scalar math derived this
step), the learning rate, eight hyperparameters and the optimizer's own constexpr ``FLAGS``
(``fastopt.declaration``; ``kernels/ops.py``'s ``LR_ON_DEVICE`` bit is set in it when the
learning rate is a device tensor). This skeleton does the rest, as ``kernels/adam.py`` does for Adam:
which elements a program covers (the flat buffers, or fresh grads through an address table:
``kernels/table.py``), loading each stream once in fp32, GradScaler's ``grad_scale`` and
``found_inf`` (nothing is stored when it is nonzero), fp32 masters, storing each buffer in its
own dtype (rounded to nearest) and the param rounded to nearest or stochastically.

``BUFFERS`` says which of ``b0..b3`` exist (bit k for ``b_k``): absent ones are never loaded
or stored. Kernels know pointers, sizes and scalars only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .ops import LR_ON_DEVICE as LR_ON_DEVICE_FLAG
from .rounding import load_param, seed_word, store_param, to_storage
from .table import flat_block, grad_arguments, table_block

HYPER_SLOTS = 8  # h0..h7
BUFFER_SLOTS = 4  # b0..b3


@triton.jit
def _elementwise_kernel(
    param_ptr,  # params, updated in place (fp32, fp16 or bf16)
    param_table_ptr,  # PARAM_TABLE: int64 address of each param (left where its owner keeps it)
    grad_ptr,  # grads (the params' dtype): the flat grad buffer (see kernels/table.py)
    grad_table_ptr,  # GRAD_TABLE: int64 address of each param's grad
    block_param_ptr,  # GRAD_TABLE: int32 param of each program
    block_offset_ptr,  # GRAD_TABLE: int64 first element of each program within its param
    slot_start_ptr,  # GRAD_TABLE: int64 slot of each param in the flat buffers
    slot_size_ptr,  # GRAD_TABLE: int64 elements of each param
    b0_ptr,  # state buffers, updated in place (BUFFERS says which exist)
    b1_ptr,
    b2_ptr,
    b3_ptr,
    row_ptr,  # fp32 row of the scalar table: kept scalars, then this step's derived values
    lr_ptr,  # fp32 learning rate on the device (LR_ON_DEVICE only)
    grad_scale_ptr,  # fp32 GradScaler scale (HAS_GRAD_SCALE only)
    found_inf_ptr,  # fp32 nonzero when a grad was inf/nan (HAS_FOUND_INF only)
    master_ptr,  # fp32 master copy of the params, updated in place (HAS_MASTER only)
    lr,  # learning rate (when not LR_ON_DEVICE)
    h0,  # the optimizer's hyperparameters (its declaration's ``hyper``)
    h1,
    h2,
    h3,
    h4,
    h5,
    h6,
    h7,
    n_elements,  # elements in this flat buffer
    base_offset,  # offset of this buffer's first element in its flat layout (STOCHASTIC_ROUNDING)
    seed_word,  # the rounding seed, mixed (STOCHASTIC_ROUNDING)
    MATH: tl.constexpr,  # the optimizer's per-element function
    FLAGS: tl.constexpr,  # its variant bits (and kernels/ops.py's LR_ON_DEVICE)
    BUFFERS: tl.constexpr,  # bit k: buffer b_k exists
    STEP_COLUMN: tl.constexpr,  # the row's step count (STOCHASTIC_ROUNDING hashes it)
    MAXIMIZE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
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
            _elements(param_ptrs, grad_ptrs, b0_ptr, b1_ptr, b2_ptr, b3_ptr, row_ptr, lr_ptr,
                      grad_scale_ptr, master_ptr, offsets, None, lr, h0, h1, h2, h3, h4, h5, h6, h7,
                      base_offset, seed_word, MATH, FLAGS, BUFFERS, STEP_COLUMN, MAXIMIZE,
                      LR_ON_DEVICE, HAS_GRAD_SCALE, HAS_MASTER, STOCHASTIC_ROUNDING)
        else:  # a param's last block, masked at its end
            _elements(param_ptrs, grad_ptrs, b0_ptr, b1_ptr, b2_ptr, b3_ptr, row_ptr, lr_ptr,
                      grad_scale_ptr, master_ptr, offsets, local < size, lr, h0, h1, h2, h3,
                      h4, h5, h6, h7, base_offset, seed_word, MATH, FLAGS, BUFFERS, STEP_COLUMN,
                      MAXIMIZE, LR_ON_DEVICE, HAS_GRAD_SCALE, HAS_MASTER, STOCHASTIC_ROUNDING)
    else:
        offsets, mask = flat_block(found_inf_ptr, n_elements, HAS_FOUND_INF, BLOCK_SIZE)
        _elements(param_ptr + offsets, grad_ptr + offsets, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
                  row_ptr, lr_ptr, grad_scale_ptr, master_ptr, offsets, mask, lr, h0, h1, h2,
                  h3, h4, h5, h6, h7, base_offset, seed_word, MATH, FLAGS, BUFFERS, STEP_COLUMN,
                  MAXIMIZE, LR_ON_DEVICE, HAS_GRAD_SCALE, HAS_MASTER, STOCHASTIC_ROUNDING)


@triton.jit
def _load(ptr, offsets, mask, default, PRESENT: tl.constexpr):
    """A buffer's values in fp32 (``default`` stands in for an absent one)."""
    if PRESENT:
        return tl.load(ptr + offsets, mask=mask).to(tl.float32)
    else:
        return default


@triton.jit
def _store(ptr, offsets, mask, value, PRESENT: tl.constexpr):
    if PRESENT:
        tl.store(ptr + offsets, to_storage(value, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _elements(param_ptrs, grad_ptrs, b0_ptr, b1_ptr, b2_ptr, b3_ptr, row_ptr, lr_ptr,
              grad_scale_ptr, master_ptr, offsets, mask, lr, h0, h1, h2, h3, h4, h5, h6, h7,
              base_offset, seed_word, MATH: tl.constexpr, FLAGS: tl.constexpr,
              BUFFERS: tl.constexpr, STEP_COLUMN: tl.constexpr, MAXIMIZE: tl.constexpr,
              LR_ON_DEVICE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
              HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr):
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
    b0 = _load(b0_ptr, offsets, mask, param, (BUFFERS & 1) != 0)
    b1 = _load(b1_ptr, offsets, mask, param, (BUFFERS & 2) != 0)
    b2 = _load(b2_ptr, offsets, mask, param, (BUFFERS & 4) != 0)
    b3 = _load(b3_ptr, offsets, mask, param, (BUFFERS & 8) != 0)
    param, b0, b1, b2, b3 = MATH(param, grad, b0, b1, b2, b3, row_ptr, lr, h0, h1, h2, h3,
                                 h4, h5, h6, h7, FLAGS)
    _store(b0_ptr, offsets, mask, b0, (BUFFERS & 1) != 0)
    _store(b1_ptr, offsets, mask, b1, (BUFFERS & 2) != 0)
    _store(b2_ptr, offsets, mask, b2, (BUFFERS & 4) != 0)
    _store(b3_ptr, offsets, mask, b3, (BUFFERS & 8) != 0)
    if STOCHASTIC_ROUNDING:
        step = tl.load(row_ptr + STEP_COLUMN)
    else:
        step = 0.0
    store_param(param_ptrs, master_ptr + offsets, mask, param, base_offset + offsets, step,
                seed_word, HAS_MASTER, STOCHASTIC_ROUNDING)


def elementwise_update(math, params: list, grads: list, buffers: list, rows: list, *, lr,
                       hyper: tuple, flags: int, maximize: bool, grad_scale=None,
                       found_inf=None, masters=None, rounding_seed=None, offsets=None,
                       step_column: int = 0) -> None:
    """Launch ``_elementwise_kernel`` with ``math`` once per entry of ``params``; the signature
    of ``fastopt.torch_path.elementwise_update`` (``buffers``: per declared buffer, a list of
    entries or None when absent; ``rows``: per entry, its row of the scalar table, or None).
    An entry of ``grads`` may be a ``GradTable`` (kernels/table.py)."""
    stochastic = rounding_seed is not None and masters is None
    lr_on_device = isinstance(lr, torch.Tensor)
    present = sum(1 << k for k, b in enumerate(buffers) if b is not None)
    hyper = tuple(launch.fp32(h) for h in hyper) + (0.0,) * (HYPER_SLOTS - len(hyper))
    block = launch.block_size()
    for i, param in enumerate(params):
        grad_args, grid, table, by_address = grad_arguments(grads, i, param)
        if grid[0] == 0:
            continue
        slots = [b[i] if b is not None else param for b in buffers]
        slots += [param] * (BUFFER_SLOTS - len(slots))
        row = rows[i] if rows[i] is not None else param
        _elementwise_kernel[grid](
            param,
            *grad_args,
            *slots,
            row,
            lr if lr_on_device else param,
            grad_scale if grad_scale is not None else param,
            found_inf if found_inf is not None else param,
            masters[i] if masters is not None else param,
            0.0 if lr_on_device else launch.fp32(lr),
            *hyper,
            param.numel(),
            offsets[i] if stochastic else 0,
            seed_word(rounding_seed) if stochastic else 0,
            MATH=math,
            FLAGS=flags | (LR_ON_DEVICE_FLAG.value if lr_on_device else 0),
            BUFFERS=present,
            STEP_COLUMN=step_column,
            MAXIMIZE=maximize,
            LR_ON_DEVICE=lr_on_device,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            HAS_MASTER=masters is not None,
            STOCHASTIC_ROUNDING=stochastic and param.dtype == torch.bfloat16,
            GRAD_TABLE=table,
            PARAM_TABLE=by_address,
            BLOCK_SIZE=block,
            num_warps=launch.NUM_WARPS,
            # Each multiply and add rounds on its own unless the math asks for tl.fma, as
            # torch's ops do (and as the interpreter computes): the GPU agrees with CI.
            enable_fp_fusion=False,
        )
