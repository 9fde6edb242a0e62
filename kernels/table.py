"""Which elements a program updates, and where its grads are: in one flat grad buffer, or in
each param's own grad, found through a table of addresses (``fastopt.grad_table``).

Flat (``flat_block``): program ``pid`` covers elements ``pid * BLOCK_SIZE + [0, BLOCK_SIZE)``
of the flat buffers, masked at ``n_elements`` (a multiple of 16: whole 16-byte vectors).

Table (``table_block``): each program covers one block of one param. Static tables say which
param (``block_param``) and where in it (``block_offset``, a multiple of ``BLOCK_SIZE``); per
param, ``slot_start`` is its slot in the flat buffers (a multiple of 64 elements) and
``slot_size`` its element count. The grad is read where autograd left it, at the address
``grad_table[param]`` (16-byte aligned, uploaded each step). With ``PARAM_TABLE`` the params
too are read and written where their owner keeps them (``param_table``: FSDP2's local shards,
ZeRO's bucket views), their state still flat. A kernel updates a whole block
unmasked (every access a 16-byte vector: a mask whose bound is read from memory would make
every access scalar) and a param's last block masked at the param's end.

When ``found_inf`` (GradScaler) is nonzero every lane is masked off: nothing is written.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import launch


@triton.jit
def flat_block(found_inf_ptr, n_elements, HAS_FOUND_INF: tl.constexpr,
               BLOCK_SIZE: tl.constexpr):
    """(offsets, mask) of this program's elements of the flat buffers."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    if HAS_FOUND_INF:  # an inf/nan grad this step: every lane masked off, nothing written
        n_elements = tl.where(tl.load(found_inf_ptr) == 0.0, n_elements, 0)
    return offsets, offsets < n_elements


@triton.jit
def table_block(
    param_ptr,  # the flat param buffer, or (PARAM_TABLE) any tensor of the params' dtype
    param_table_ptr,  # int64 address of each param (PARAM_TABLE)
    grad_ptr,  # any tensor of the grads' dtype (gives the grads' pointer type)
    grad_table_ptr,  # int64 address of each param's grad
    block_param_ptr,  # int32 param of each program
    block_offset_ptr,  # int64 first element of each program within its param
    slot_start_ptr,  # int64 slot of each param in the flat buffers
    slot_size_ptr,  # int64 elements of each param
    found_inf_ptr,  # fp32 nonzero when a grad was inf/nan (HAS_FOUND_INF only)
    HAS_FOUND_INF: tl.constexpr,
    PARAM_TABLE: tl.constexpr,  # params left where their owner keeps them, read by address
    BLOCK_SIZE: tl.constexpr,
):
    """(offsets into the flat buffers, offsets within the param, the param's size, pointers
    to the params, pointers to the grads, the block's first element within the param: past
    its end when found_inf is set)."""
    pid = tl.program_id(0).to(tl.int64)
    param = tl.load(block_param_ptr + pid)
    first = tl.multiple_of(tl.load(block_offset_ptr + pid), 16)  # a multiple of BLOCK_SIZE
    start = tl.multiple_of(tl.load(slot_start_ptr + param), 64)
    size = tl.load(slot_size_ptr + param)
    if HAS_FOUND_INF:  # an inf/nan grad this step: the block starts past the param's end, so
        # every lane is masked off and nothing is written (moving the start, not the size,
        # keeps ptxas from spilling the fp16-master variants under Triton 3.6)
        first = tl.multiple_of(tl.where(tl.load(found_inf_ptr) == 0.0, first,
                                        (size + BLOCK_SIZE) // BLOCK_SIZE * BLOCK_SIZE), 16)
    local = first + tl.arange(0, BLOCK_SIZE)
    address = tl.load(grad_table_ptr + param).to(grad_ptr.dtype, bitcast=True)
    if PARAM_TABLE:
        param_address = tl.load(param_table_ptr + param).to(param_ptr.dtype, bitcast=True)
        param_ptrs = tl.multiple_of(param_address, 16) + local
    else:
        param_ptrs = param_ptr + start + local
    return (start + local, local, size, param_ptrs, tl.multiple_of(address, 16) + local,
            first)


class GradTable(NamedTuple):
    """Grads read where they lie, standing in for the flat grad buffer in a launcher's ``grads``
    list (see the module docstring): device tensors the kernel reads, and its grid."""

    addresses: torch.Tensor  # int64 [params]: each param's grad
    param_addresses: torch.Tensor | None  # int64 [params]: each param, if not in a flat buffer
    block_param: torch.Tensor  # int32 [blocks]
    block_offset: torch.Tensor  # int64 [blocks]
    slot_start: torch.Tensor  # int64 [params]
    slot_size: torch.Tensor  # int64 [params]
    blocks: int  # programs of one launch
    block_size: int  # elements per program (the tables were made for it)


def grad_arguments(grads, i: int, param: torch.Tensor) -> tuple:
    """The kernel arguments ``param_table_ptr`` to ``slot_size_ptr`` for entry ``i`` of a
    launcher's ``grads`` (``param``: its params, or for a table with param addresses any
    tensor of their dtype), the grid, and the flags: ``(arguments, grid, GRAD_TABLE,
    PARAM_TABLE)``."""
    grad = grads[i]
    n = param.numel()
    if isinstance(grad, GradTable):
        if grad.block_size != launch.block_size():
            raise ValueError("a grad table made for another block size")
        by_address = grad.param_addresses is not None
        return ((grad.param_addresses if by_address else param, param, grad.addresses,
                 grad.block_param, grad.block_offset, grad.slot_start, grad.slot_size),
                (grad.blocks,), True, by_address)
    # The table arguments are not read without GRAD_TABLE: any tensor stands in.
    return ((param, grad, grad, grad, grad, grad, grad), launch.grid(n, launch.block_size()),
            False, False)
