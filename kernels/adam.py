"""Adam / AdamW in one fused pass over a flat buffer (Kingma & Ba 2014; Loshchilov & Hutter 2017).

Per element, in fp32 (the param's dtype is only its storage):

    g  = grad / grad_scale            (when a GradScaler scale is given)
    g  = -g                           (MAXIMIZE)
    p  = p * (1 - lr * wd)            (DECOUPLED, AdamW)    or    g = g + wd * p   (Adam)
    m  = m + (1 - beta1) * (g - m)    (torch.optim's lerp)
    v  = beta2 * v + (1 - beta2) * g * g
    vm = max(vm, v)                   (AMSGRAD; vm is what the denominator uses)
    p  = p - lr / (1 - beta1^t) * m / (sqrt(vm) / sqrt(1 - beta2^t) + eps)

``1 - beta1``, ``1 - beta2`` and ``1 - lr * wd`` come from the host, taken in fp64 and rounded
once, as torch.optim's Python floats are (``adam_arguments``).

With an fp32 master copy (HAS_MASTER) the update runs on the master, which is stored, and the
param receives it rounded to nearest; with STOCHASTIC_ROUNDING (bf16 params) the param is
rounded with hashed noise (kernels/rounding.py). Moments may be stored in any float dtype:
they are widened on load and rounded to nearest on store.

The bias corrections are computed once per step and param, not per element:
``count_adam_steps`` launches ``_adam_steps_kernel``, which adds one to each param's step count
and writes beside it ``step_size = lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)``, in fp64
(beta^t by repeated squaring, betas from a small fp64 device tensor) as torch.optim computes them
in Python floats. Each step count is the first of such a row of three fp32 values
(``Bucket.step_rows``); the update kernel reads the row.

The row, a tensor ``lr``, ``grad_scale`` and ``found_inf`` are read from device memory inside the
kernels: a launch never waits on the device, so a step can be captured in a CUDA graph. When
``found_inf`` is nonzero every store is masked off: nothing changes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .ops import fma, lerp
from .rounding import load_param, seed_word, store_param, to_storage
from .table import flat_block, grad_arguments, table_block


_BETAS: dict = {}  # device -> [(beta1, beta2), fp64 tensor on the device]


def _betas(device: torch.device, beta1: float, beta2: float) -> torch.Tensor:
    """[beta1, beta2] in fp64 on ``device``: made once per device, refilled on the device when
    the values change (a scheduler cycling betas): no host-to-device copy, no sync."""
    entry = _BETAS.get(device)
    if entry is None:
        tensor = torch.tensor([beta1, beta2], dtype=torch.float64, device=device)
        _BETAS[device] = [(beta1, beta2), tensor]
        return tensor
    if entry[0] != (beta1, beta2):
        entry[1][0].fill_(beta1)  # stream-ordered after the kernels that read the old values
        entry[1][1].fill_(beta2)
        entry[0] = (beta1, beta2)
    return entry[1]


@triton.jit
def adam_moments(param, grad, exp_avg, exp_avg_sq, grad_scale_ptr, lr, decay,
                 one_minus_beta1, beta2, one_minus_beta2,
                 HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
                 HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                 LR_ON_DEVICE: tl.constexpr):
    """Unscale, weight decay and the moment updates, in fp32: (param, exp_avg, exp_avg_sq)."""
    if HAS_GRAD_SCALE:
        grad = tl.div_rn(grad, tl.load(grad_scale_ptr).to(tl.float32))
    if MAXIMIZE:
        grad = -grad
    # Each line rounds as torch.optim's op for it does (add_ with alpha and lerp are fmas).
    if HAS_WEIGHT_DECAY:  # decay: see adam_arguments
        if DECOUPLED:
            if LR_ON_DEVICE:
                decay = 1.0 - lr * decay
            param = param * decay
        else:
            grad = fma(param, decay, grad)
    # exp_avg.lerp_(grad, 1 - beta1), in torch's two-sided form; the complements come from
    # the host, rounded from fp64 as torch.optim's Python floats are (1 - beta2 taken in fp32
    # would be 1.3e-5 off at beta2 = 0.999)
    exp_avg = lerp(exp_avg, grad, one_minus_beta1)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    return param, exp_avg, exp_avg_sq


@triton.jit
def bias_corrections(step, betas_ptr, lr):
    """(lr / (1 - beta1^t), sqrt(1 - beta2^t)) for a block of step counts ``step``, in fp64 as
    torch.optim computes them on the host: beta^t by repeated squaring (multiplies only), so
    1 - beta2^t keeps its digits when beta2^t is close to 1."""
    base1 = tl.load(betas_ptr) + tl.zeros(step.shape, tl.float64)
    base2 = tl.load(betas_ptr + 1) + tl.zeros(step.shape, tl.float64)
    power1 = tl.full(step.shape, 1.0, tl.float64)
    power2 = tl.full(step.shape, 1.0, tl.float64)
    exponent = step.to(tl.int64)
    for _ in range(32):  # step counts below 2**32
        odd = (exponent % 2) == 1
        power1 = tl.where(odd, power1 * base1, power1)
        power2 = tl.where(odd, power2 * base2, power2)
        base1 = base1 * base1
        base2 = base2 * base2
        exponent = exponent // 2
    step_size = (lr / (1.0 - power1)).to(tl.float32)
    return step_size, tl.sqrt(1.0 - power2).to(tl.float32)


@triton.jit
def _adam_steps_kernel(
    rows_ptr,  # fp32 rows (step, step_size, bias_correction2_sqrt), one per param
    betas_ptr,  # fp64 [beta1, beta2]
    lr_ptr,  # fp32 learning rate on the device (LR_ON_DEVICE only)
    lr,  # learning rate (when not LR_ON_DEVICE)
    n_rows,
    row_stride,  # elements between rows
    LR_ON_DEVICE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """step += 1, and the step's bias corrections beside it."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = rows < n_rows
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    step = tl.load(rows_ptr + rows * row_stride, mask=mask, other=0.0) + 1.0
    step_size, bias_correction2_sqrt = bias_corrections(step, betas_ptr, lr)
    tl.store(rows_ptr + rows * row_stride, step, mask=mask)
    tl.store(rows_ptr + rows * row_stride + 1, step_size, mask=mask)
    tl.store(rows_ptr + rows * row_stride + 2, bias_correction2_sqrt, mask=mask)


def count_adam_steps(table: torch.Tensor, runs: list | None, *, lr, beta1: float,
                     beta2: float) -> None:
    """Add one to the step count of every param in ``runs`` (``[lo, hi, ...]`` each; None:
    every param) and write the step's bias corrections beside it (``_adam_steps_kernel``);
    the signature of ``fastopt.torch_path.count_adam_steps``."""
    lr_on_device = isinstance(lr, torch.Tensor)
    for rows in [table] if runs is None else [table[r[0] : r[1]] for r in runs]:
        n = rows.shape[0]
        if n == 0:
            continue
        _adam_steps_kernel[launch.grid(n, STEPS_BLOCK)](
            rows, _betas(rows.device, float(beta1), float(beta2)),
            lr if lr_on_device else rows, 0.0 if lr_on_device else launch.fp32(lr), n,
            rows.stride(0), LR_ON_DEVICE=lr_on_device, BLOCK_SIZE=STEPS_BLOCK, num_warps=1)


STEPS_BLOCK = 32  # step rows per program of _adam_steps_kernel


@triton.jit
def step_row(step_ptr):
    """(t, step_size, bias_correction2_sqrt): this step's row, written by _adam_steps_kernel."""
    return tl.load(step_ptr), tl.load(step_ptr + 1), tl.load(step_ptr + 2)


@triton.jit
def adam_step(param, exp_avg, denom_sq, step_size, bias_correction2_sqrt, eps):
    """param - step_size * exp_avg / (sqrt(denom_sq) / bias_correction2_sqrt + eps), with IEEE
    sqrt and division (torch's addcdiv_; tl.sqrt is approximate)."""
    denom = tl.div_rn(tl.sqrt_rn(denom_sq), bias_correction2_sqrt) + eps
    return param + tl.div_rn(-step_size * exp_avg, denom)


@triton.jit
def _adam_kernel(
    param_ptr,  # params, updated in place (fp32, fp16 or bf16)
    param_table_ptr,  # PARAM_TABLE: int64 address of each param (left where its owner keeps it)
    grad_ptr,  # grads (same dtype as params): the flat grad buffer (see kernels/table.py)
    grad_table_ptr,  # GRAD_TABLE: int64 address of each param's grad
    block_param_ptr,  # GRAD_TABLE: int32 param of each program
    block_offset_ptr,  # GRAD_TABLE: int64 first element of each program within its param
    slot_start_ptr,  # GRAD_TABLE: int64 slot of each param in the flat buffers
    slot_size_ptr,  # GRAD_TABLE: int64 elements of each param
    exp_avg_ptr,  # first moment m, updated in place
    exp_avg_sq_ptr,  # second moment v, updated in place
    max_exp_avg_sq_ptr,  # running max of v (AMSGRAD only), updated in place
    step_ptr,  # fp32 row (t, step_size, bias_correction2_sqrt) of these params' step
    lr_ptr,  # fp32 learning rate on the device (LR_ON_DEVICE only)
    grad_scale_ptr,  # fp32 GradScaler scale (HAS_GRAD_SCALE only)
    found_inf_ptr,  # fp32 nonzero when a grad was inf/nan (HAS_FOUND_INF only)
    master_ptr,  # fp32 master copy of the params, updated in place (HAS_MASTER only)
    lr,  # learning rate (when not LR_ON_DEVICE)
    decay,  # the weight decay, or AdamW's factor 1 - lr * weight_decay (see adam_arguments)
    one_minus_beta1,  # 1 - beta1, beta2, 1 - beta2: from the host (adam_arguments)
    beta2,
    one_minus_beta2,
    eps,
    n_elements,  # elements in this flat buffer
    base_offset,  # offset of this buffer's first element in its flat layout (STOCHASTIC_ROUNDING)
    seed_word,  # the rounding seed, mixed (STOCHASTIC_ROUNDING)
    AMSGRAD: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
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
            _adam_elements(param_ptrs, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                           master_ptr, step_ptr, lr_ptr, grad_scale_ptr, offsets,
                           None, grad_ptrs, lr, decay, one_minus_beta1, beta2,
                           one_minus_beta2, eps,
                           base_offset, seed_word, AMSGRAD, HAS_WEIGHT_DECAY, DECOUPLED,
                           MAXIMIZE, LR_ON_DEVICE, HAS_GRAD_SCALE, HAS_MASTER,
                           STOCHASTIC_ROUNDING)
        else:  # a param's last block, masked at its end
            _adam_elements(param_ptrs, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                           master_ptr, step_ptr, lr_ptr, grad_scale_ptr, offsets,
                           local < size, grad_ptrs, lr, decay, one_minus_beta1,
                           beta2, one_minus_beta2, eps, base_offset, seed_word,
                           AMSGRAD, HAS_WEIGHT_DECAY, DECOUPLED, MAXIMIZE, LR_ON_DEVICE,
                           HAS_GRAD_SCALE, HAS_MASTER, STOCHASTIC_ROUNDING)
    else:
        offsets, mask = flat_block(found_inf_ptr, n_elements, HAS_FOUND_INF, BLOCK_SIZE)
        _adam_elements(param_ptr + offsets, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                       master_ptr, step_ptr, lr_ptr, grad_scale_ptr, offsets, mask,
                       grad_ptr + offsets, lr, decay, one_minus_beta1, beta2,
                       one_minus_beta2, eps, base_offset, seed_word, AMSGRAD,
                       HAS_WEIGHT_DECAY, DECOUPLED, MAXIMIZE, LR_ON_DEVICE, HAS_GRAD_SCALE,
                       HAS_MASTER, STOCHASTIC_ROUNDING)


@triton.jit
def _adam_elements(param_ptrs, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr,
                   step_ptr, lr_ptr, grad_scale_ptr, offsets, mask, grad_ptrs, lr,
                   decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                   base_offset, seed_word,
                   AMSGRAD: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                   DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
                   HAS_GRAD_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr,
                   STOCHASTIC_ROUNDING: tl.constexpr):
    """The update of the elements at ``offsets`` of the flat buffers (``mask``: None for a
    whole block), whose params are at ``param_ptrs`` and grads at ``grad_ptrs``."""
    step, step_size, bias_correction2_sqrt = step_row(step_ptr)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)

    param = load_param(param_ptrs, master_ptr + offsets, mask, HAS_MASTER)
    grad = tl.load(grad_ptrs, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)

    param, exp_avg, exp_avg_sq = adam_moments(
        param, grad, exp_avg, exp_avg_sq, grad_scale_ptr, lr, decay, one_minus_beta1,
        beta2, one_minus_beta2, HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY,
        DECOUPLED, LR_ON_DEVICE)
    # Where the moments are stored decides how many values live across the IEEE division's
    # slow-path call; these places keep every variant from spilling on sm_90 (see
    # benchmarks/kernel_report.py).
    if not AMSGRAD:
        _store_moments(exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, exp_avg, exp_avg_sq)
    if AMSGRAD:
        max_exp_avg_sq = tl.load(max_exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
        # NaN propagates into the running max, as torch.maximum does
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq,
                                    propagate_nan=tl.PropagateNan.ALL)
        tl.store(max_exp_avg_sq_ptr + offsets,
                 to_storage(max_exp_avg_sq, max_exp_avg_sq_ptr.dtype.element_ty), mask=mask)
        param = adam_step(param, exp_avg, max_exp_avg_sq, step_size, bias_correction2_sqrt, eps)
    else:
        param = adam_step(param, exp_avg, exp_avg_sq, step_size, bias_correction2_sqrt, eps)

    store_param(param_ptrs, master_ptr + offsets, mask, param, base_offset + offsets, step,
                seed_word, HAS_MASTER, STOCHASTIC_ROUNDING)
    if AMSGRAD:
        _store_moments(exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, exp_avg, exp_avg_sq)


@triton.jit
def _store_moments(exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, exp_avg, exp_avg_sq):
    tl.store(exp_avg_ptr + offsets, to_storage(exp_avg, exp_avg_ptr.dtype.element_ty),
             mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, to_storage(exp_avg_sq, exp_avg_sq_ptr.dtype.element_ty),
             mask=mask)


def adam_update(
    params: list,
    grads: list,
    exp_avgs: list,
    exp_avg_sqs: list,
    max_exp_avg_sqs: list,
    steps: list,
    *,
    lr,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    grad_scale=None,
    found_inf=None,
    masters=None,
    rounding_seed=None,
    offsets=None,
) -> None:
    """Launch one kernel per flat buffer; the signature of ``fastopt.torch_path.adam_update``.
    An entry of ``grads`` may be a ``GradTable`` (kernels/table.py): that launch reads each
    param's grad where it lies."""
    stochastic = rounding_seed is not None and masters is None
    block = launch.block_size()
    for i, param in enumerate(params):
        grad_args, grid, table, by_address = grad_arguments(grads, i, param)
        n = param.numel()
        if grid[0] == 0:
            continue
        _adam_kernel[grid](
            param,
            *grad_args,
            exp_avgs[i],
            exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else exp_avg_sqs[i],
            *adam_arguments(param, steps[i], masters[i] if masters is not None else None, lr,
                            beta1, beta2, weight_decay, eps, grad_scale, found_inf,
                            decoupled),
            n,
            offsets[i] if stochastic else 0,
            seed_word(rounding_seed) if stochastic else 0,
            AMSGRAD=amsgrad,
            **adam_flags(param, lr, weight_decay, decoupled, maximize, grad_scale, found_inf,
                         masters, stochastic),
            GRAD_TABLE=table,
            PARAM_TABLE=by_address,
            BLOCK_SIZE=block,
            num_warps=launch.NUM_WARPS,
        )


def adam_arguments(param, step, master, lr, beta1, beta2, weight_decay, eps, grad_scale,
                   found_inf, decoupled: bool) -> tuple:
    """The Adam kernels' arguments from ``step_ptr`` to ``eps`` (a tensor that is absent is
    stood in for by another: its constexpr flag keeps the kernel from reading it). ``step`` is
    a step count in a row that ``count_adam_steps`` filled this step. The scalars are taken
    as torch.optim's Python floats are: computed in fp64, then rounded to fp32 (``1 - beta2``
    taken in fp32 would be 1.3e-5 off at beta2 = 0.999); ``decay`` is AdamW's factor
    ``1 - lr * weight_decay`` where the learning rate is on the host, else the weight decay
    (an argument less keeps every variant's registers off the stack)."""
    lr_on_device = isinstance(lr, torch.Tensor)
    if decoupled and not lr_on_device:
        decay = 1.0 - float(lr) * float(weight_decay)
    else:
        decay = float(weight_decay)
    return (
        step,
        lr if lr_on_device else step,
        grad_scale if grad_scale is not None else step,
        found_inf if found_inf is not None else step,
        master if master is not None else param,
        0.0 if lr_on_device else launch.fp32(lr),
        launch.fp32(decay),
        launch.fp32(1.0 - float(beta1)),
        launch.fp32(beta2),
        launch.fp32(1.0 - float(beta2)),
        launch.fp32(eps),
    )


def adam_flags(param, lr, weight_decay, decoupled, maximize, grad_scale, found_inf, masters,
               stochastic) -> dict:
    """The Adam kernels' shared constexpr flags."""
    return dict(
        HAS_WEIGHT_DECAY=weight_decay != 0,
        DECOUPLED=decoupled,
        MAXIMIZE=maximize,
        LR_ON_DEVICE=isinstance(lr, torch.Tensor),
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_MASTER=masters is not None,
        STOCHASTIC_ROUNDING=stochastic and param.dtype == torch.bfloat16,
    )
