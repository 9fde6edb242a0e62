"""Adafactor's step (``torch.optim.Adafactor``) in four to six launches per entry, whatever its
params.

Every param is seen as ``B`` matrices of ``R x C`` (a param of rank two or more: its last two
dimensions; a vector: rows of ``TILE_COLS`` elements, ``B = 1``) cut into tiles of
``TILE_ROWS x TILE_COLS``, and each tile is one program of the tile passes. Its math needs
four reductions over a whole param or a whole row or column: the param's norm, the grad's
squares per row and per column, the mean of the row statistics, and the update's norm. Each
is summed per tile first, then the tiles' sums in a fixed order: no atomics, so the step is
deterministic. With :math:`G` the grad (divided by ``grad_scale``), :math:`w = 1 - \\hat\\beta_t`
and :math:`\\rho_t` (the host's ``scalars``):

1. ``_stats``: per tile, :math:`\\sum \\theta^2`; for a matrix, the row and column sums of
   :math:`G^2` over the tile.
2. ``_statistics`` (matrices only; a program per ``LANES`` rows or columns of a matrix):
   :math:`R \\leftarrow R + w(\\operatorname{mean}_{-1} G^2 - R)` from the rows' tile sums, the
   same for :math:`C`, and the sum of those rows of :math:`R`. The updated statistics are
   stored in the state (in its dtype) and in fp32 beside it, which the next passes read (as
   torch.optim's own math does). A matrix of at most ``LANES`` rows has its
   :math:`\\max(\\operatorname{mean}_{-2} R, \\epsilon_1)` here too.
3. ``_means`` (a program per matrix of more rows): that mean, from its row sums.
4. ``_tiles`` without ``APPLY``: per tile, :math:`\\sum U^2` of the update
   :math:`U = G/\\sqrt{\\max(\\hat V, \\epsilon_1^2)}`, :math:`\\hat V = RC/\\max(\\operatorname
   {mean}_{-2}R, \\epsilon_1)` (a vector: :math:`\\hat V = V + w(G^2 - V)`).
5. ``_coefficients`` (a program per param): :math:`\\alpha = \\max(\\epsilon_2,
   \\operatorname{RMS}(\\theta))\\rho_t` and :math:`c = -\\alpha/\\max(1, \\operatorname{RMS}(U)
   /d)` (positive for ``maximize``).
6. ``_tiles`` with ``APPLY``: :math:`U` again, the same ops, then
   :math:`\\theta \\leftarrow \\theta(1-\\gamma\\lambda) + cU` (a vector's :math:`V` stored).

Every pass spreads its work over programs of bounded size (a tile, ``LANES`` statistics, a
matrix, a param's sums): a large matrix's statistics are not one program's serial loop.

bf16/fp16 params without fp32 masters take torch.optim's math op by op in their own type
(``HALF``: every op's result rounded to it, as torch's for-loop rounds it), so that the kernels
give torch's numbers there too; with masters, and for fp32, the math is fp32.

A step moves 24 bytes an fp32 element (the grad read three times, the param twice and written
once) where one pass would move 12: the update's norm is needed before any element moves.
Ops round as torch.optim's do (``kernels/ops.py``): ``lerp`` on either side, ``add_(alpha=)``
as one fma, ``1/sqrt`` as the GPU's reciprocal square root (as torch's CUDA ``rsqrt``); in
fp32 the estimate :math:`RC/m` multiplies the rows by :math:`1/m` first, and a clip's grad
divisor is taken as its reciprocal (each within 2 ulp: no IEEE division an element, whose
slow path costs a stack frame). A row (column) statistic is torch's norm rounded, squared and
divided, as torch.optim computes it on the CPU (torch's CUDA ``div_`` by a number multiplies by
its fp32 reciprocal: 1 ulp apart at most); the step's coefficient is computed in double from the two
norms, as torch.optim computes it from ``norm().item()`` (``rho_t`` as two fp32 words, the
options as int64 bits), and rounded once to fp32. What is left between the kernels and torch
is the order of the sums. The grads are read from the flat grad buffer, or where autograd left
them (``GRAD_TABLE``: the default loop's fresh grads, one address a param).

Kernels know pointers, sizes and scalars only: the host gives them a table per param (``INFO``
int64 columns), one per tile (its param, matrix, row and column tile), one per chunk of
statistics (its param, matrix, rows or columns, first one) and one per matrix of more than
``LANES`` rows (its param and matrix).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .ops import fma, lerp
from .rounding import load_param, store_param, to_storage

TILE_ROWS = tl.constexpr(64)
TILE_COLS = tl.constexpr(64)
# A sum of many fp32 values (a param's tile sums, a matrix's row sums) is taken BLOCKS x REDUCE
# at a time, in a fixed order: that many loads in flight instead of a chain of dependent ones.
REDUCE = tl.constexpr(256)
BLOCKS = tl.constexpr(16)
# The statistics pass: LANES rows (columns) of a matrix a program, each statistic's partial sums
# (one per tile along its row or column: hundreds for a long column) loaded PARTS at a time.
# (Triton 3.6 gives a [64, 64] block 255 registers and spills; [32, 64] takes 168 there, 48
# under Triton 3.9.)
LANES = tl.constexpr(64)
PARTS = tl.constexpr(32)
# No multiply-add is fused but those the math spells out (``kernels/ops.py``).
LAUNCH = dict(num_warps=4, enable_fp_fusion=False)
# A thread takes 32 elements of a tile, 16 in the pass that updates the params (registers)
APPLY_LAUNCH = dict(LAUNCH, num_warps=8)
# The per-param table's int64 columns: the param's first element (from the entry's), its
# elements, rows, columns and matrices (a vector: rows of TILE_COLS, one matrix), factored or
# not, its packed state's offsets, its tiles, its statistics' offsets in the workspace, its
# index in the bucket (its row of a grad table), the offset of its matrices' row sums (one
# per LANES rows) in the workspace, and the bits of ``numel ** 0.5`` as Python's float has it
# (torch.optim divides by it in double; a correctly rounded sqrt differs for some sizes).
COLUMNS = ("start", "numel", "rows", "cols", "batches", "factored", "row_var", "col_var",
           "variance", "first_tile", "tiles", "col_tiles", "wide_rows", "wide_cols", "means",
           "index", "row_sums", "root")
START, NUMEL, ROWS, COLS, BATCHES, FACTORED, ROW_VAR, COL_VAR, VARIANCE, FIRST_TILE, TILES, \
    COL_TILES, WIDE_ROWS, WIDE_COLS, MEANS, INDEX, ROW_SUMS, ROOT = \
    (tl.constexpr(k) for k in range(len(COLUMNS)))
INFO = tl.constexpr(len(COLUMNS))
# The fp32 scalars the host computes once per step (``scalars``): 1 - beta2_t, rho_t, the
# weight decay's factor 1 - lr * weight_decay, and rho_t's remainder (rho_t - fp32(rho_t), in
# fp32: the two sum to torch.optim's double rho_t within 2**-48 of it).
ONE_MINUS_BETA2, RHO, DECAY, RHO_LOW = (tl.constexpr(k) for k in range(4))


@triton.jit
def _tile(tile_ptr, info_ptr):
    """This program's tile (its row of ``tile``): its param ``p`` and that param's row of
    ``info``; ``corner``, the offset of the tile's first element from the param's start
    (int64); ``local``, its elements' offsets from that corner (int32: a tile spans 64 rows
    of its matrix) and their ``mask``; whether it is ``whole`` (every element inside, rows a
    multiple of 16 elements apart); its matrix ``batch``, first row ``row0`` and column
    ``col0``, and the matrix's rows and columns."""
    tile = tile_ptr + tl.program_id(0) * 4
    p = tl.load(tile).to(tl.int64)
    info = info_ptr + p * INFO
    n_rows, n_cols = tl.load(info + ROWS), tl.load(info + COLS)
    batch = tl.load(tile + 1).to(tl.int64)
    row0 = tl.load(tile + 2).to(tl.int64) * TILE_ROWS
    col0 = tl.load(tile + 3).to(tl.int64) * TILE_COLS
    corner = (batch * n_rows + row0) * n_cols + col0
    rows, cols = tl.arange(0, TILE_ROWS), tl.arange(0, TILE_COLS)
    local = rows[:, None] * n_cols.to(tl.int32) + cols[None, :]
    # the elements left in the param from the corner (a vector's last rows end inside a row)
    left = tl.minimum(tl.load(info + NUMEL) - corner, TILE_ROWS * n_cols).to(tl.int32)
    mask = (rows[:, None] < n_rows - row0) & (cols[None, :] < n_cols - col0) & (local < left)
    whole = (row0 + TILE_ROWS <= n_rows) & (col0 + TILE_COLS <= n_cols) \
        & (TILE_ROWS * n_cols <= left) & (n_cols % 16 == 0)
    return p, info, corner, local, mask, whole, batch, row0, col0, n_rows, n_cols


@triton.jit
def _aligned(info, batch, row0, col0):
    """A whole tile's corner (from its param's start), its flat offset and its elements'
    offsets from it, with what the compiler may assume of them (rows of 64 contiguous
    elements, each starting on a multiple of 16: the param's slot is 64-aligned, its columns a
    multiple of 16, the corner on a multiple of 64 columns), so that its accesses are 16-byte
    vectors. Made from fresh loads of the table: hints on values the masked path shares would
    be merged away with them."""
    n_cols = tl.multiple_of(tl.load(info + COLS), 16)
    corner = tl.multiple_of((batch * tl.load(info + ROWS) + row0) * n_cols + col0, 16)
    base = tl.multiple_of(tl.load(info + START) + corner, 16)
    local = tl.arange(0, TILE_ROWS)[:, None] * n_cols.to(tl.int32) \
        + tl.arange(0, TILE_COLS)[None, :]
    return corner, base, tl.max_contiguous(tl.multiple_of(local, [16, 16]), [1, TILE_COLS])


@triton.jit
def _grads(grad_ptr, grad_table_ptr, info, corner, base, GRAD_TABLE: tl.constexpr):
    """Where a tile's grads start: in the flat grad buffer, or (``GRAD_TABLE``) in its
    param's own grad, where autograd left it (16-byte aligned, ``fastopt.grad_table``)."""
    if GRAD_TABLE:
        address = tl.load(grad_table_ptr + tl.load(info + INDEX))
        return tl.multiple_of(address.to(grad_ptr.dtype, bitcast=True), 16) + corner
    else:
        return grad_ptr + base


@triton.jit
def _total(x):
    """The sum of a tile (in an order of the compiler's, the same every run)."""
    return tl.sum(tl.reshape(x, [TILE_ROWS * TILE_COLS]), axis=0)


@triton.jit
def _load(ptrs, mask, other):
    """``ptrs``' values in fp32 (``other`` where ``mask`` is off; no mask: all of them)."""
    if mask is None:
        return tl.load(ptrs).to(tl.float32)
    else:
        return tl.load(ptrs, mask=mask, other=other).to(tl.float32)


@triton.jit
def _r(x, HALF: tl.constexpr):
    """``x`` rounded as torch.optim's op would leave it in the params' half type (``HALF``: 1
    bf16, 2 fp16; 0: fp32 math, nothing rounded)."""
    if HALF == 1:
        return to_storage(x, tl.bfloat16).to(tl.float32)
    elif HALF == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _grad(grad_ptrs, grad_scale_ptr, mask, HAS_GRAD_SCALE: tl.constexpr, HALF: tl.constexpr):
    grad = _load(grad_ptrs, mask, 0.0)
    if HAS_GRAD_SCALE:  # times its reciprocal (within 2 ulp of a division: no IEEE division's
        # slow path, whose call takes a stack frame)
        grad = _r(grad * tl.fdiv(1.0, tl.load(grad_scale_ptr).to(tl.float32)), HALF)
    return grad


@triton.jit
def _stats_kernel(param_ptr, master_ptr, grad_ptr, grad_table_ptr, grad_scale_ptr, tile_ptr,
                  info_ptr, row_part_ptr, col_part_ptr, squares_ptr, HAS_MASTER: tl.constexpr,
                  HAS_GRAD_SCALE: tl.constexpr, HALF: tl.constexpr, GRAD_TABLE: tl.constexpr):
    """Pass 1: a tile's sum of the param's squares; a matrix's row and column sums of the
    grad's squares over the tile."""
    p, info, corner, local, mask, whole, batch, row0, col0, n_rows, n_cols = _tile(tile_ptr,
                                                                                  info_ptr)
    if whole:
        corner, base, local = _aligned(info, batch, row0, col0)
        _stats(param_ptr + base, master_ptr + base,
               _grads(grad_ptr, grad_table_ptr, info, corner, base, GRAD_TABLE), grad_scale_ptr,
               info, local, None, row_part_ptr, col_part_ptr, squares_ptr, HAS_MASTER,
               HAS_GRAD_SCALE, HALF)
    else:
        base = tl.load(info + START) + corner
        _stats(param_ptr + base, master_ptr + base,
               _grads(grad_ptr, grad_table_ptr, info, corner, base, GRAD_TABLE), grad_scale_ptr,
               info, local, mask, row_part_ptr, col_part_ptr, squares_ptr, HAS_MASTER,
               HAS_GRAD_SCALE, HALF)


@triton.jit
def _stats(param_ptr, master_ptr, grad_ptr, grad_scale_ptr, info, local, mask, row_part_ptr,
           col_part_ptr, squares_ptr, HAS_MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
           HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    param = load_param(param_ptr + local, master_ptr + local, mask, HAS_MASTER)
    if mask is not None:
        param = tl.where(mask, param, 0.0)
    tl.store(squares_ptr + t, _total(param * param))
    if tl.load(info + FACTORED) != 0:
        grad = _grad(grad_ptr + local, grad_scale_ptr, mask, HAS_GRAD_SCALE, HALF)
        square = grad * grad
        tl.store(row_part_ptr + t * TILE_ROWS + tl.arange(0, TILE_ROWS), tl.sum(square, axis=1))
        tl.store(col_part_ptr + t * TILE_COLS + tl.arange(0, TILE_COLS), tl.sum(square, axis=0))


@triton.jit
def _sum(ptr, count):
    """The sum of ``count`` fp32 values from ``ptr``, BLOCKS x REDUCE at a time in a fixed
    order. (Its loop is a ``while`` loop: Triton 3.6's interpreter cannot take a loaded bound in
    ``range``.)"""
    at = tl.arange(0, BLOCKS)[:, None] * REDUCE + tl.arange(0, REDUCE)[None, :]
    total = tl.zeros([REDUCE], tl.float32)
    k = count * 0
    while k < count:
        total += tl.sum(tl.load(ptr + k + at, mask=k + at < count, other=0.0), axis=0)
        k += BLOCKS * REDUCE
    return tl.sum(total, axis=0)


@triton.jit
def _rms(squares_ptr, info, HALF: tl.constexpr):
    """The root mean square of a param's elements from its tiles' sums of squares (a norm
    rounded as torch's in the half type), without the division by ``sqrt(numel)``."""
    return _r(tl.sqrt_rn(_sum(squares_ptr + tl.load(info + FIRST_TILE), tl.load(info + TILES))),
              HALF)


@triton.jit
def _statistics_kernel(chunk_ptr, info_ptr, row_part_ptr, col_part_ptr, row_var_ptr,
                       col_var_ptr, wide_rows_ptr, wide_cols_ptr, row_sums_ptr, means_ptr,
                       scalars_ptr, eps1, HALF: tl.constexpr):
    """Pass 2: the program's chunk (its row of ``chunk``: param, matrix, 0 for rows or 1 for
    columns, first one) of LANES row (column) statistics of a matrix, from the tiles' sums;
    a chunk of rows leaves their sum, or (the matrix's only chunk) the matrix's mean."""
    chunk = chunk_ptr + tl.program_id(0) * 4
    p = tl.load(chunk).to(tl.int64)
    batch = tl.load(chunk + 1).to(tl.int64)
    first = tl.load(chunk + 3).to(tl.int64)
    info = info_ptr + p * INFO
    weight = tl.load(scalars_ptr + ONE_MINUS_BETA2)
    n_rows, n_cols = tl.load(info + ROWS), tl.load(info + COLS)
    col_tiles = tl.load(info + COL_TILES)
    row_tiles = (n_rows + TILE_ROWS - 1) // TILE_ROWS
    tile0 = tl.load(info + FIRST_TILE) + batch * row_tiles * col_tiles
    if tl.load(chunk + 2) == 0:
        at = batch * n_rows
        total = _statistics(row_part_ptr, row_var_ptr + tl.load(info + ROW_VAR) + at,
                            wide_rows_ptr + tl.load(info + WIDE_ROWS) + at, tile0, first,
                            n_rows, n_cols, col_tiles, col_tiles, TILE_ROWS, weight, TILE_ROWS,
                            HALF)
        chunks = (n_rows + LANES - 1) // LANES
        if chunks == 1:
            _store_mean(means_ptr + tl.load(info + MEANS) + batch, total, n_rows, eps1, HALF)
        else:
            tl.store(row_sums_ptr + tl.load(info + ROW_SUMS) + batch * chunks + first // LANES,
                     total)
    else:
        at = batch * n_cols
        _statistics(col_part_ptr, col_var_ptr + tl.load(info + COL_VAR) + at,
                    wide_cols_ptr + tl.load(info + WIDE_COLS) + at, tile0, first, n_cols,
                    n_rows, 1, row_tiles, col_tiles * TILE_COLS, weight, TILE_COLS, HALF)


@triton.jit
def _statistics(part_ptr, state_ptr, wide_ptr, tile0, first, count, length, tile_step, parts,
                part_stride, weight, TILE: tl.constexpr, HALF: tl.constexpr):
    """Statistics ``first`` to ``first + LANES`` of a matrix's ``count`` row (column) ones,
    each the mean of ``length`` squares, from the sums its tiles left: its rows (columns) are
    ``TILE`` to a tile and ``tile_step`` tiles apart from the matrix's first tile ``tile0``, a
    tile's sums lie at ``part_ptr + tile * TILE`` and each statistic has ``parts`` of them,
    ``part_stride`` apart. Each is moved to its mean by ``weight`` (``_moment``); returns their
    sum."""
    index = first + tl.arange(0, LANES)
    inside = index < count
    start = (tile0 + index // TILE * tile_step) * TILE + index % TILE
    block = tl.arange(0, PARTS)
    squares = tl.zeros([LANES], tl.float32)
    j = parts * 0
    while j < parts:  # PARTS partial sums of each lane at once, added in a fixed order
        at = j + block
        sums = tl.load(part_ptr + start[None, :] + at[:, None] * part_stride,
                       mask=inside[None, :] & (at < parts)[:, None], other=0.0)
        squares += tl.sum(sums, axis=0)
        j += PARTS
    # torch's norm over the row (column), rounded (to the half type, if HALF), squared, divided:
    # the squares' sum itself would round once less than torch.optim's statistics
    norm = _r(tl.sqrt_rn(squares), HALF)
    squares = _r(norm * norm, HALF)
    value = _moment(state_ptr + index, wide_ptr + index, inside,
                    _r(tl.div_rn(squares, length.to(tl.float32)), HALF), weight, HALF)
    return tl.sum(tl.where(inside, value, 0.0), axis=0)


@triton.jit
def _store_mean(mean_ptr, total, count, eps1, HALF: tl.constexpr):
    """The mean of a matrix's ``count`` row statistics (their sum ``total``), at least eps1
    (the divisor of the estimate)."""
    mean = _r(tl.div_rn(total, count.to(tl.float32)), HALF)
    # clamp_(min=eps1), as torch's: a NaN stays NaN (the GPU's max would drop it)
    tl.store(mean_ptr, _r(tl.maximum(mean, eps1, propagate_nan=tl.PropagateNan.ALL), HALF))


@triton.jit
def _means_kernel(matrix_ptr, info_ptr, row_sums_ptr, means_ptr, eps1, HALF: tl.constexpr):
    """Pass 3: the program's matrix (its row of ``matrix``: param and matrix, one of more than
    LANES rows): the mean of its row statistics from their chunks' sums."""
    matrix = matrix_ptr + tl.program_id(0) * 2
    p = tl.load(matrix).to(tl.int64)
    batch = tl.load(matrix + 1).to(tl.int64)
    info = info_ptr + p * INFO
    n_rows = tl.load(info + ROWS)
    chunks = (n_rows + LANES - 1) // LANES
    total = _sum(row_sums_ptr + tl.load(info + ROW_SUMS) + batch * chunks, chunks)
    _store_mean(means_ptr + tl.load(info + MEANS) + batch, total, n_rows, eps1, HALF)


@triton.jit
def _moment(state_ptrs, wide_ptrs, mask, mean, weight, HALF: tl.constexpr):
    """``state.lerp_(mean, weight)``: stored in the state's dtype, and in fp32 at
    ``wide_ptrs``; returned in fp32."""
    value = _r(lerp(_r(tl.load(state_ptrs, mask=mask).to(tl.float32), HALF), mean, weight), HALF)
    tl.store(state_ptrs, to_storage(value, state_ptrs.dtype.element_ty), mask=mask)
    tl.store(wide_ptrs, value, mask=mask)
    return value


@triton.jit
def _tiles_kernel(param_ptr, master_ptr, grad_ptr, grad_table_ptr, grad_scale_ptr, tile_ptr,
                  info_ptr,
                  variance_ptr, wide_rows_ptr, wide_cols_ptr, means_ptr, squares_ptr, coef_ptr,
                  scalars_ptr, eps1_squared, HAS_MASTER: tl.constexpr,
                  HAS_GRAD_SCALE: tl.constexpr, HAS_DECAY: tl.constexpr,
                  APPLY: tl.constexpr, HALF: tl.constexpr, GRAD_TABLE: tl.constexpr):
    """Passes 3 (the update's squares per tile) and 5 (``APPLY``: the params updated)."""
    p, info, corner, local, mask, whole, batch, row0, col0, n_rows, n_cols = _tile(tile_ptr,
                                                                                  info_ptr)
    # the tile's row statistics, its column statistics (matrices), its variance (vectors)
    rows_at = wide_rows_ptr + tl.load(info + WIDE_ROWS) + batch * n_rows + row0
    cols_at = wide_cols_ptr + tl.load(info + WIDE_COLS) + batch * n_cols + col0
    variance_at = variance_ptr + tl.load(info + VARIANCE) + corner
    if whole:
        corner, base, local = _aligned(info, batch, row0, col0)
        _update(param_ptr + base, master_ptr + base,
                _grads(grad_ptr, grad_table_ptr, info, corner, base, GRAD_TABLE), grad_scale_ptr,
                p, info,
                local, None, None, None, rows_at, cols_at, variance_at, batch,
                means_ptr, squares_ptr, coef_ptr, scalars_ptr, eps1_squared, HAS_MASTER,
                HAS_GRAD_SCALE, HAS_DECAY, APPLY, HALF)
    else:
        base = tl.load(info + START) + corner
        rows, cols = tl.arange(0, TILE_ROWS), tl.arange(0, TILE_COLS)
        _update(param_ptr + base, master_ptr + base,
                _grads(grad_ptr, grad_table_ptr, info, corner, base, GRAD_TABLE), grad_scale_ptr,
                p, info,
                local, mask, rows < n_rows - row0, cols < n_cols - col0, rows_at, cols_at,
                variance_at, batch, means_ptr, squares_ptr, coef_ptr, scalars_ptr, eps1_squared,
                HAS_MASTER, HAS_GRAD_SCALE, HAS_DECAY, APPLY, HALF)


@triton.jit
def _update(param_ptr, master_ptr, grad_ptr, grad_scale_ptr, p, info, local, mask, row_mask,
            col_mask, rows_at, cols_at, variance_at, batch, means_ptr, squares_ptr, coef_ptr,
            scalars_ptr, eps1_squared, HAS_MASTER: tl.constexpr,
            HAS_GRAD_SCALE: tl.constexpr, HAS_DECAY: tl.constexpr, APPLY: tl.constexpr,
            HALF: tl.constexpr):
    """A tile's update ``U`` (its elements at ``local`` from the pointers, which point at its
    corner), then its squares' sum, or (``APPLY``) the params updated."""
    grad = _grad(grad_ptr + local, grad_scale_ptr, mask, HAS_GRAD_SCALE, HALF)
    if tl.load(info + FACTORED) != 0:
        rows_var = _load(rows_at + tl.arange(0, TILE_ROWS), row_mask, 1.0)
        cols_var = _load(cols_at + tl.arange(0, TILE_COLS), col_mask, 1.0)
        mean = tl.load(means_ptr + tl.load(info + MEANS) + batch)
        if HALF != 0:  # torch's ops, each rounded to the half type
            estimate = _r(tl.div_rn(_r(rows_var[:, None] * cols_var[None, :], HALF), mean), HALF)
        else:  # the rows times the mean's reciprocal (within 2 ulp of torch's product divided,
            # no division an element)
            estimate = (rows_var * tl.fdiv(1.0, mean))[:, None] * cols_var[None, :]
    else:
        estimate = _r(lerp(_r(_load(variance_at + local, mask, 0.0), HALF),
                           _r(grad * grad, HALF), tl.load(scalars_ptr + ONE_MINUS_BETA2)), HALF)
        if APPLY:
            tl.store(variance_at + local, to_storage(estimate, variance_at.dtype.element_ty),
                     mask=mask)
    # 1/sqrt as the GPU's reciprocal square root, within 2 ulp, as torch's CUDA rsqrt (the
    # interpreter's is correctly rounded, as torch's CPU one)
    estimate = _r(tl.maximum(estimate, eps1_squared, propagate_nan=tl.PropagateNan.ALL), HALF)
    update = _r(_r(tl.math.rsqrt(estimate), HALF) * grad, HALF)
    if APPLY:
        param = load_param(param_ptr + local, master_ptr + local, mask, HAS_MASTER)
        if HAS_DECAY:
            param = _r(param * tl.load(scalars_ptr + DECAY), HALF)
        param = fma(update, tl.load(coef_ptr + p), param)
        store_param(param_ptr + local, master_ptr + local, mask, param, local, 0.0, 0,
                    HAS_MASTER, False)
    else:
        if mask is not None:
            update = tl.where(mask, update, 0.0)
        tl.store(squares_ptr + tl.program_id(0), _total(update * update))


@triton.jit(do_not_specialize=["eps2_bits", "d_bits"])  # bits of value 1 are not a constexpr
def _coefficients_kernel(info_ptr, param_squares_ptr, update_squares_ptr, coef_ptr, scalars_ptr,
                         eps2_bits, d_bits, MAXIMIZE: tl.constexpr, HALF: tl.constexpr):
    """One param: :math:`\\alpha = \\max(\\epsilon_2, \\operatorname{RMS}(\\theta))\\rho_t` and
    :math:`-\\alpha/\\max(1, \\operatorname{RMS}(U)/d)` (pass 5), from the two norms (fp32, or
    the half type's) in double, as torch.optim computes them from ``norm().item()``, rounded
    once to fp32 (``eps2_bits`` and ``d_bits``: the options' doubles as int64 bits)."""
    p = tl.program_id(0).to(tl.int64)
    info = info_ptr + p * INFO
    root = tl.load(info + ROOT).to(tl.float64, bitcast=True)
    rho = tl.load(scalars_ptr + RHO).to(tl.float64) \
        + tl.load(scalars_ptr + RHO_LOW).to(tl.float64)
    eps2 = eps2_bits.to(tl.int64).to(tl.float64, bitcast=True)
    d = d_bits.to(tl.int64).to(tl.float64, bitcast=True)
    # Python's max(a, x): a unless x > a (a NaN norm gives a, on every backend)
    rms = _rms(param_squares_ptr, info, HALF).to(tl.float64) / root
    alpha = tl.where(rms > eps2, rms, eps2) * rho
    ratio = _rms(update_squares_ptr, info, HALF).to(tl.float64) / (root * d)
    denom = tl.where(ratio > 1.0, ratio, 1.0)
    coef = (alpha / denom).to(tl.float32)
    tl.store(coef_ptr + p, coef if MAXIMIZE else -coef)


class Tiles(NamedTuple):
    """An entry's tables (see the module docstring): ``info`` (int64 ``[params, INFO]``),
    ``tile`` (int32 ``[tiles, 4]``: each tile's param, matrix, row and column tile), ``chunk``
    (int32 ``[chunks, 4]``: each chunk's param, matrix, 0 for rows or 1 for columns, first
    one), ``matrix`` (int32 ``[matrices, 2]``: param and matrix of those of more than LANES
    rows) and the sizes of the fp32 workspace's parts."""

    info: Tensor
    tile: Tensor
    chunk: Tensor
    matrix: Tensor
    wide_rows: int  # fp32 row statistics of every matrix
    wide_cols: int
    means: int  # one per matrix
    row_sums: int  # one per chunk of rows

    @property
    def params(self) -> int:
        return self.info.shape[0]

    @property
    def tiles(self) -> int:
        return self.tile.shape[0]


def workspace_elements(tiles: int, params: int, wide_rows: int, wide_cols: int,
                       means: int, row_sums: int) -> int:
    """fp32 elements of one step's workspace: per tile its row and column sums and two sums
    of squares, the fp32 statistics and their means, a sum per chunk of rows, and per param
    its coefficient."""
    return tiles * (TILE_ROWS.value + TILE_COLS.value + 2) + wide_rows + wide_cols + means \
        + row_sums + params


def tile_count(numel: int, shape: tuple) -> int:
    """Tiles of a param of ``shape`` (``numel`` elements; none when empty)."""
    if numel == 0:
        return 0
    if len(shape) >= 2:
        rows, cols = shape[-2], shape[-1]
        return numel // (rows * cols) * -(-rows // TILE_ROWS.value) * -(-cols // TILE_COLS.value)
    return -(-numel // (TILE_ROWS.value * TILE_COLS.value))


def chunk_counts(numel: int, shape: tuple) -> tuple:
    """A nonempty param's chunks of rows and of columns in the statistics pass, and its
    matrices of more than LANES rows (a program each in the means pass); a vector has none."""
    if len(shape) < 2:
        return 0, 0, 0
    rows, cols = shape[-2], shape[-1]
    batches = numel // (rows * cols)
    row_chunks = -(-rows // LANES.value)
    return batches * row_chunks, batches * -(-cols // LANES.value), \
        batches if row_chunks > 1 else 0


def float_bits(value: float) -> int:
    """A Python float's 64 bits as a signed integer (a double for a kernel: an int64 argument
    or table entry, bitcast back there)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def make_tiles(params: list, device: torch.device) -> Tiles:
    """The tables of an entry's nonempty ``params``: each ``(index, start, numel, shape,
    row_var, col_var, variance)``, its index in the bucket, its offset from the entry's first
    element and its packed state's offsets (None where it keeps none)."""
    info, owners, row_chunks, col_chunks, matrices = [], [], [], [], []
    wide_rows = wide_cols = means = row_sums = first = 0
    lanes = LANES.value
    for k, (index, start, numel, shape, row_var, col_var, variance) in enumerate(params):
        factored = len(shape) >= 2
        rows, cols = (shape[-2], shape[-1]) if factored else (-(-numel // TILE_COLS.value),
                                                              TILE_COLS.value)
        batches = numel // (rows * cols) if factored else 1
        tiles = tile_count(numel, shape)
        row = dict(index=index, start=start, numel=numel, rows=rows, cols=cols, batches=batches,
                   factored=int(factored), first_tile=first, tiles=tiles,
                   col_tiles=-(-cols // TILE_COLS.value), root=float_bits(numel ** 0.5))
        if factored:
            row.update(row_var=row_var, col_var=col_var, wide_rows=wide_rows,
                       wide_cols=wide_cols, means=means, row_sums=row_sums)
            wide_rows += batches * rows
            wide_cols += batches * cols
            means += batches
            row_sums += chunk_counts(numel, shape)[0]
            row_chunks += [(k, b, 0, r) for b in range(batches) for r in range(0, rows, lanes)]
            col_chunks += [(k, b, 1, c) for b in range(batches) for c in range(0, cols, lanes)]
            if rows > lanes:
                matrices += [(k, b) for b in range(batches)]
        else:
            row.update(variance=variance)
        info.append([row.get(name, 0) for name in COLUMNS])
        row_tiles = -(-rows // TILE_ROWS.value)
        owners += [(k, b, r, c) for b in range(batches) for r in range(row_tiles)
                   for c in range(row["col_tiles"])]
        first += tiles

    def table(rows: list, width: int) -> Tensor:
        return torch.tensor(rows, dtype=torch.int32, device=device).view(-1, width)

    # the columns' chunks first: theirs are the longer sums (a column's tiles: one per 64 rows)
    return Tiles(torch.tensor(info, dtype=torch.int64, device=device), table(owners, 4),
                 table(col_chunks + row_chunks, 4), table(matrices, 2), wide_rows, wide_cols,
                 means, row_sums)


def adafactor_update(param: Tensor, grad: Tensor, row_var: Tensor, col_var: Tensor,
                     variance: Tensor, tiles: Tiles, scalars: Tensor, *, eps1: float,
                     eps2: float, d: float, maximize: bool, decay: bool, grad_scale=None,
                     grad_table: Tensor | None = None,
                     master: Tensor | None = None) -> None:
    """One entry's step: the launches of the module docstring. ``param``, ``grad`` (and
    ``master``) are flat from the entry's first element; ``row_var``, ``col_var`` and
    ``variance`` the bucket's packed state buffers (any tensor where none is kept);
    ``scalars`` fp32 ``[1 - beta2_t, rho_t, 1 - lr * weight_decay, rho_t's remainder]`` on the
    device. With
    ``grad_table`` (int64: the address of each param's grad, by its index in the bucket) the
    grads are read where they lie and ``grad`` only gives their dtype."""
    n_tiles, n_params = tiles.tiles, tiles.params
    if n_tiles == 0:
        return
    work = torch.empty(workspace_elements(n_tiles, n_params, tiles.wide_rows, tiles.wide_cols,
                                          tiles.means, tiles.row_sums),
                       dtype=torch.float32, device=param.device)
    sizes = [n_tiles * TILE_ROWS.value, n_tiles * TILE_COLS.value, n_tiles, n_tiles,
             tiles.wide_rows, tiles.wide_cols, tiles.means, tiles.row_sums, n_params]
    row_part, col_part, param_squares, update_squares, wide_rows, wide_cols, means, row_sums, \
        coef = work.split(sizes)
    master = master if master is not None else param
    grad_scale = grad_scale if grad_scale is not None else param
    # bf16/fp16 params without masters: torch.optim's math in the half type, op by op
    half = 0 if master is not param else {torch.bfloat16: 1, torch.float16: 2}.get(param.dtype, 0)
    flags = dict(HAS_MASTER=master is not param, HAS_GRAD_SCALE=grad_scale is not param,
                 HALF=half, GRAD_TABLE=grad_table is not None)
    grad_table = grad_table if grad_table is not None else tiles.info
    _stats_kernel[(n_tiles,)](param, master, grad, grad_table, grad_scale, tiles.tile,
                              tiles.info,
                              row_part, col_part, param_squares, **flags, **LAUNCH)
    if tiles.chunk.shape[0]:  # matrices
        _statistics_kernel[(tiles.chunk.shape[0],)](
            tiles.chunk, tiles.info, row_part, col_part, row_var, col_var, wide_rows, wide_cols,
            row_sums, means, scalars, launch.fp32(eps1), HALF=half, **LAUNCH)
    if tiles.matrix.shape[0]:
        _means_kernel[(tiles.matrix.shape[0],)](tiles.matrix, tiles.info, row_sums, means,
                                                launch.fp32(eps1), HALF=half, **LAUNCH)
    eps1_squared = launch.fp32(eps1 * eps1)  # 0 if it underflows
    for apply in (False, True):
        if apply:
            _coefficients_kernel[(n_params,)](tiles.info, param_squares, update_squares, coef,
                                              scalars, float_bits(eps2), float_bits(d),
                                              MAXIMIZE=maximize, HALF=half, **LAUNCH)
        _tiles_kernel[(n_tiles,)](param, master, grad, grad_table, grad_scale, tiles.tile,
                                  tiles.info, variance, wide_rows, wide_cols, means,
                                  update_squares, coef, scalars, eps1_squared,
                                  **flags, HAS_DECAY=decay, APPLY=apply,
                                  **(APPLY_LAUNCH if apply else LAUNCH))
