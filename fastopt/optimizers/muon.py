"""Muon (Jordan et al., 2024; Liu et al., 2025, arXiv 2502.16982): momentum orthogonalized by
Newton–Schulz iterations, with ``torch.optim.Muon``'s signature, defaults, errors and state,
and AdamW for the params Muon is not meant for, in the same optimizer.

For a param :math:`\\theta` seen as the matrix :math:`W` of shape :math:`(A, B)` (its first
dimension by the product of the others: a conv2d or conv3d weight is ``(out, in*kh*kw...)``), grad :math:`G`
and momentum buffer :math:`M`:

.. math::
    M &\\leftarrow \\mu M + (1-\\mu) G \\qquad
        U = (1-\\mu) G + \\mu M \\text{ (nesterov) or } M \\\\
    X_0 &= U / \\max(\\|U\\|_F, \\epsilon) \\text{ (bf16, transposed when } A > B) \\\\
    X_{k+1} &= a X_k + (b\\,S_k + c\\,S_k^2) X_k, \\quad S_k = X_k X_k^\\top
        \\qquad (k < \\text{ns\\_steps}) \\\\
    \\theta &\\leftarrow \\theta (1 - \\gamma\\lambda) - \\gamma\\,r(A, B)\\, X_{\\text{ns\\_steps}}

with :math:`r = \\sqrt{\\max(1, A/B)}` (``adjust_lr_fn=None`` or ``"original"``) or
:math:`0.2\\sqrt{\\max(A, B)}` (``"match_rms_adamw"``). The momentum, Nesterov's update and the
weight decay run over a bucket's flat buffers in a few multi-tensor calls; the Newton–Schulz
iterations run once per matrix shape, batched over every matrix of that shape in the bucket
(``torch.baddbmm``, in bf16 as torch.optim.Muon computes them, on every device: bf16 matmuls
are also the fastest on CPUs with bf16 instructions). A lone matrix of its shape takes the
same 2-D ops as torch.optim.Muon, so its numbers are torch's.

A param group with ``use_muon=False`` is an AdamW group: fastopt's fused AdamW step (the
options it does not set take ``torch.optim.AdamW``'s defaults, not Muon's), its state
``step``, ``exp_avg`` and ``exp_avg_sq`` as torch's AdamW keeps them. One optimizer, one
``state_dict``, schedulers over both kinds of group.
"""

from __future__ import annotations

__all__ = ["Muon"]

import math

import torch
from torch import Tensor

from fastopt import whole_matrices
from fastopt.clipping import kept_where_found_inf
from fastopt.declaration import Buffer, Declaration, Scalar
from fastopt.flat import is_dtensor
from fastopt.optimizer import FlatOptimizer
from fastopt.optimizers import adam
from fastopt.precision import REMAINDERS
from fastopt.state import MASTER
from fastopt.validation import check_adam

DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's)
# What an AdamW group (use_muon=False) does not set: torch.optim.AdamW's defaults.
ADAMW_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2,
                  "amsgrad": False, "maximize": False}
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
# A Muon group's params: matrices, and conv2d/conv3d weights seen as (out, in*kh*kw...). A
# rank-3 param may be a conv1d weight or a stack of matrices (MoE experts, each to be
# orthogonalized on its own): refused, as torch.optim.Muon refuses it.
TAKEN_RANKS = (2, 4, 5)


def _muon(group: dict) -> bool:
    return group.get("use_muon", True)


def _adamw(group: dict) -> bool:
    return not group.get("use_muon", True)


def matrix_shape(shape) -> tuple:
    """The matrix Muon sees a param of ``shape`` (rank two or more) as: (first dim, the rest)."""
    rows = shape[0]
    return rows, math.prod(shape[1:])


def adjusted_lr(lr, adjust_lr_fn: str | None, rows: int, cols: int):
    """torch.optim.Muon's lr adjustment for a ``rows`` x ``cols`` matrix (``_adjust_lr``)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio


def newton_schulz(x: Tensor, coefficients: tuple, steps: int, eps: float) -> Tensor:
    """The quintic Newton–Schulz iteration on ``x``: one matrix ``(m, n)`` or a batch
    ``(k, m, n)`` of them, bf16, ``m <= n``; each normalized by its own Frobenius norm first.
    A single matrix takes torch.optim.Muon's own ops (``addmm``), a batch their batched form."""
    a, b, c = coefficients
    if x.dim() == 2:
        x = x.div_(x.norm().clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.T
            gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, gram_update, x, beta=a)
        return x
    x = x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x


def check_muon_group(group: dict) -> None:
    """What torch.optim.Muon checks at the step (``_zeropower_via_newtonschulz``), checked here
    for every group before any is updated (``Muon.check_step``)."""
    if group["ns_steps"] >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(group["ns_coefficients"]) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


def _update(opt, group, bucket, plan, grad_scale, found_inf) -> None:
    """A Muon group's step (see the module docstring), or an AdamW group's (Adam's update)."""
    if _adamw(group):
        return adam.ADAM.update(opt, group, bucket, plan, grad_scale, found_inf)
    if bucket.external:  # DTensors this update can take whole (one mesh), before any write
        meshes = [p.device_mesh for p in bucket.params
                  if is_dtensor(p) and whole_matrices.placement(p) == "rows"]
        if any(mesh != meshes[0] for mesh in meshes):
            raise ValueError("Muon gathers the shards of a param group's matrices over one "
                             "device mesh; these params are sharded over several")
    if found_inf is not None and bucket.device.type == "cpu" and bool(found_inf):
        return  # a non-finite grad norm (max_grad_norm): the CPU reads it, nothing changes
    if found_inf is not None:  # on a GPU: written, then put back where found_inf says
        kept_where_found_inf(bucket, found_inf,
                             lambda: _muon_step(group, bucket, plan, grad_scale))
    else:
        _muon_step(group, bucket, plan, grad_scale)


def _muon_step(group: dict, bucket, plan, grad_scale) -> None:
    chunks = plan.chunks
    masters = MASTER in bucket.state.tensors
    params = bucket.pieces("param", chunks)
    work = bucket.pieces(MASTER, chunks) if masters else params  # what the math updates
    dtype = work[0].dtype
    grads = [c.grad if c.grad.dtype == dtype else c.grad.to(dtype) for c in chunks]
    if grad_scale is not None:  # max_grad_norm's divisor
        grads = torch._foreach_div(grads, grad_scale.to(bucket.device, dtype))
    momentum = group["momentum"]
    buffers = bucket.pieces("momentum_buffer", chunks)
    wide = buffers if buffers[0].dtype == dtype else [b.to(dtype) for b in buffers]
    torch._foreach_lerp_(wide, grads, 1 - momentum)
    if wide is not buffers:  # state_dtype narrower than the math
        torch._foreach_copy_(buffers, wide)
    updates = torch._foreach_lerp(grads, wide, momentum) if group["nesterov"] else wide
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.device.type == "cpu":
        lr = lr.item()  # torch's _to_scalar (a CPU tensor: no device sync)
    weight_decay = group["weight_decay"]
    if weight_decay != 0:
        factor = 1 - lr * weight_decay
        if dtype in (torch.bfloat16, torch.float16):  # a multi-tensor mul rounds these otherwise
            for piece in work:
                piece.mul_(factor)
        else:
            torch._foreach_mul_(work, factor)
    matrices, sharded = [], []  # (update, target): as matrices, or their local rows
    for chunk, piece, update in zip(chunks, work, updates):
        piece, update = piece.view(-1), update.view(-1)
        for k in range(chunk.lo, chunk.hi):
            p = bucket.params[k]
            rows, cols = matrix_shape(p.shape)  # the whole matrix, for a DTensor too
            if rows * cols == 0:
                continue
            offset = bucket.starts[k] - chunk.start
            size = bucket.ends[k] - bucket.starts[k]
            local_rows = size // cols
            pair = (update[offset : offset + size].view(local_rows, cols),
                    piece[offset : offset + size].view(local_rows, cols))
            if is_dtensor(p) and whole_matrices.placement(p) == "rows":
                sharded.append((*pair, p))
            else:
                matrices.append(pair)
    coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]

    def orthogonalize(batch: list) -> list:
        return _orthogonalize(batch, coefficients, steps, eps, bucket.device)

    outs = orthogonalize([update for update, _ in matrices])
    targets = [target for _, target in matrices]
    shapes = [target.shape for target in targets]
    if sharded:
        mesh = sharded[0][2].device_mesh
        exchange = whole_matrices.Exchange(
            mesh, [update for update, _, _ in sharded], [p.shape[0] for *_, p in sharded],
            whole_matrices.owners([_oriented(matrix_shape(p.shape)) for *_, p in sharded],
                                  mesh.size()), torch.bfloat16)
        owned = exchange.gather()
        results = dict(zip(owned, orthogonalize(list(owned.values()))))
        outs += exchange.scatter(results)
        targets += [target for _, target, _ in sharded]
        shapes += [matrix_shape(p.shape) for *_, p in sharded]
    _apply(outs, targets, shapes, lr, group["adjust_lr_fn"])
    if masters:  # each param: its master rounded to nearest
        torch._foreach_copy_(params, work)


# ATen's CPU bmm takes a plain loop, summing in another order than its matmul library, when a
# product is this small (m^3 < 400 for the m x m Gram products): a batch of such tiny matrices
# would round otherwise than torch.optim.Muon's per-matrix addmm, and gains nothing, so on a
# CPU they go one by one. Larger batches equal torch's per-matrix results bit for bit there.
TINY = 400


def _apply(outs: list, targets: list, shapes: list, lr, adjust_lr_fn) -> None:
    """``target -= adjusted_lr * out`` for each matrix: one multi-tensor call per adjusted lr
    (per shape), each bf16 update widened first (exactly) as torch's ``add_`` promotes it; a
    device lr multiplies the updates instead (no sync)."""
    by_step: dict = {}
    for out, target, (rows, cols) in zip(outs, targets, shapes):
        step = adjusted_lr(lr, adjust_lr_fn, rows, cols)
        key = (rows, cols) if isinstance(step, Tensor) else step
        entry = by_step.setdefault(key, (step, [], []))
        entry[1].append(out)
        entry[2].append(target)
    for step, outs, targets in by_step.values():
        # bf16 goes exactly into fp32, fp64 and bf16; fp16 targets add it as fp32, as torch's
        # add_ of a bf16 tensor into an fp16 one promotes
        dtype = torch.float32 if targets[0].dtype == torch.float16 else targets[0].dtype
        wide = [out.to(dtype, memory_format=torch.contiguous_format) for out in outs]
        if isinstance(step, Tensor):
            torch._foreach_mul_(wide, step.to(targets[0].device, targets[0].dtype))
            torch._foreach_sub_(targets, wide)
        else:
            torch._foreach_add_(targets, wide, alpha=-step)


def _oriented(shape: tuple) -> tuple:
    return min(shape), max(shape)


def _orthogonalize(matrices: list, coefficients: tuple, steps: int, eps: float,
                   device) -> list:
    """Newton–Schulz on each matrix of ``matrices`` (as torch.optim.Muon: in bf16, a tall one
    transposed), batched over the matrices of each shape; the results in bf16, in order."""
    batches: dict = {}
    for i, matrix in enumerate(matrices):
        batches.setdefault(_oriented(matrix.shape), []).append(i)
    outs: list = [None] * len(matrices)
    for (m, n), members in list(batches.items()):
        if len(members) > 1 and torch.device(device).type == "cpu" and m ** 3 < TINY:
            for i in members[1:]:  # one at a time, as torch computes them (see TINY)
                batches[(m, n, i)] = [i]
            del members[1:]
    for (m, n, *_), members in batches.items():
        oriented = [matrices[i].T if matrices[i].shape[0] > matrices[i].shape[1] else matrices[i]
                    for i in members]
        if len(members) == 1:
            x = oriented[0].bfloat16()
        else:
            x = torch.empty(len(members), m, n, dtype=torch.bfloat16, device=device)
            torch._foreach_copy_(list(x.unbind(0)), oriented)
        x = newton_schulz(x, coefficients, steps, eps)
        for j, i in enumerate(members):
            out = x if len(members) == 1 else x[j]
            outs[i] = out.T if matrices[i].shape[0] > matrices[i].shape[1] else out
    return outs


# Newton–Schulz's buffers per matrix (m x n, m <= n), in bf16 elements at their most: the
# iterate, the next one, the Gram matrix and its update; on CPUs also baddbmm's product before
# it is added (measured with torch.profiler: 3mn + 2m^2 on a CPU, 2mn + 2m^2 with cuBLAS,
# which adds in place).
def _newton_schulz_elements(m: int, n: int, device_type: str) -> int:
    return (3 if device_type == "cpu" else 2) * m * n + 2 * m * m


def _scratch(options: dict, bucket: dict, dtype: torch.dtype, device_type: str) -> int | None:
    """Bytes a Muon group's step allocates and frees (``fastopt.memory``): the grads widened
    for fp32 masters, the clipped grads, widened momentum and the Nesterov update (each the
    size of the params in the math's dtype), and the Newton–Schulz buffers of the largest
    shape batch. With ``in_backward=True`` a step covers one step group (``group_bounds``):
    the largest group's."""
    if _adamw(options):
        return None  # Adam's rules
    shapes = bucket["shapes"]
    if options.get("in_backward"):
        from fastopt.in_backward import group_bounds

        sizes = [math.prod(s) * dtype.itemsize for s in shapes]
        return max((_step_scratch(options, shapes[lo:hi], dtype, device_type)
                    for lo, hi in group_bounds(sizes)), default=0)
    return _step_scratch(options, shapes, dtype, device_type, bucket["elements"])


def _step_scratch(options: dict, shapes: list, dtype: torch.dtype, device_type: str,
                  elements: int | None = None) -> int:
    if elements is None:
        elements = sum(math.prod(s) for s in shapes)
    masters = bool(options.get("master_weights")) and dtype in (torch.bfloat16, torch.float16)
    wide = 4 if masters else dtype.itemsize
    copies = int(masters)  # the grads in fp32
    copies += options.get("max_grad_norm") is not None
    state_dtype = options.get("state_dtype")
    copies += state_dtype is not None and state_dtype.itemsize < wide
    copies += options.get("nesterov", True)
    batches: dict = {}
    for shape in shapes:
        key = _oriented(matrix_shape(shape))
        batches[key] = batches.get(key, 0) + 1
    workspace = max((count * _newton_schulz_elements(m, n, device_type) * 2
                     for (m, n), count in batches.items()), default=0)
    return copies * elements * wide + workspace


MUON = Declaration(
    buffers=(Buffer("momentum_buffer", when=_muon), Buffer("exp_avg", when=_adamw),
             Buffer("exp_avg_sq", when=_adamw),
             Buffer("max_exp_avg_sq", when=lambda g: _adamw(g) and g.get("amsgrad", False))),
    scalars=(Scalar("step", when=_adamw),),  # AdamW groups' (Muon's state is its momentum)
    derived=adam.ADAM.derived,
    update=_update,
    options=frozenset({"master_weights", "state_dtype", "max_grad_norm", "in_backward"}),
    complex=False,
    grad_scaling=False,  # GradScaler unscales the grads itself first, as for torch's Muon
    reference=torch.optim.Muon,
    differentiable=False,  # torch.optim.Muon has no differentiable mode
    group_keys=("lr", "weight_decay"),
    cost="adam",
    # Muon groups gather their grads on GPUs (Newton–Schulz reads each as a matrix); AdamW
    # groups read them by address as fastopt.AdamW does (Muon.reads_by_address)
    by_address=False,
    # DTensor shards taken: each matrix is gathered whole to one rank (fastopt.whole_matrices)
    scratch=_scratch,
)


class Muon(FlatOptimizer):
    r"""Muon, a drop-in for ``torch.optim.Muon`` (see the module docstring for the math), plus
    AdamW groups.

    Args are torch.optim.Muon's: ``lr`` (default 1e-3), ``weight_decay`` (0.1), ``momentum``
    (0.95), ``nesterov`` (True), ``ns_coefficients``, ``eps`` (1e-7), ``ns_steps`` (5) and
    ``adjust_lr_fn`` (None, ``"original"`` or ``"match_rms_adamw"``); plus fastopt's keyword
    options (``master_weights``, ``state_dtype``, ``max_grad_norm``, ``in_backward``,
    ``backend``, ``flatten_params``).

    What differs from torch.optim.Muon: conv weights of rank 4 or 5 are taken too (a conv
    weight is orthogonalized as ``(out, in*kh*kw)``, and its lr adjusted for that matrix),
    while torch's takes only matrices (a rank-3 param stays refused: it may be a stack of
    matrices); every matrix of one shape in a bucket goes through one batched
    Newton–Schulz chain; and a group with ``use_muon=False`` takes AdamW's step, options and
    state (``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``; unset ones
    are ``torch.optim.AdamW``'s defaults).
    """

    declaration = MUON

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple = DEFAULT_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        **options,
    ) -> None:
        check_lr_muon(lr)
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "nesterov": nesterov, "ns_coefficients": ns_coefficients, "eps": eps,
                    "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn, "use_muon": True}
        super().__init__(params, defaults, **options)

    def add_param_group(self, param_group: dict) -> None:
        """torch's, with the checks of each kind of group: a Muon group's params have rank two
        or more; an AdamW group (``use_muon=False``) takes AdamW's defaults and checks."""
        group = dict(param_group)
        if not group.get("use_muon", True):
            for key, value in ADAMW_DEFAULTS.items():
                group.setdefault(key, value)
            group["betas"] = check_adam(group["lr"], group["betas"], group["eps"],
                                        group["weight_decay"])
            group["decoupled_weight_decay"] = True
        else:
            params = group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            for p in params:
                p = p[1] if isinstance(p, tuple) else p  # a named param: (name, tensor)
                if isinstance(p, Tensor) and p.ndim not in TAKEN_RANKS:
                    raise ValueError("Muon only supports 2D parameters whereas we found a "
                                     f"parameter with size: {p.size()} (fastopt's also takes "
                                     "conv weights of rank 4 or 5 as (out, in*k*k...); a "
                                     "rank-3 param may be a stack of matrices, so it is "
                                     "refused, as torch refuses it)")
        super().add_param_group(group)

    def reads_by_address(self, group: dict, external: bool = False) -> bool:
        return _adamw(group)

    def check_step(self, group: dict) -> None:
        if _muon(group):
            check_muon_group(group)

    def prepare_bucket(self, group: dict, bucket) -> None:
        super().prepare_bucket(group, bucket)
        if _muon(group) and group.get("master_weights") in REMAINDERS:
            raise ValueError(
                f"Muon updates whole fp32 masters; master_weights={group['master_weights']!r} "
                "keeps remainders: use master_weights=True")


def check_lr_muon(lr) -> None:
    """torch.optim.Muon's lr check (its own wording)."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
