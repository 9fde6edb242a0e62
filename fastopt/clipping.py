"""Global grad-norm clipping folded into the update: ``max_grad_norm=`` on Adam, AdamW, SGD.

``torch.nn.utils.clip_grad_norm_(params, max_norm)`` followed by a step reads every grad three
times (norm, scale, step) and writes it once. Here the norm is one reduction pass over the grads
(torch's multi-tensor norm), and the clip factor goes into the update as part of the grad
divisor the update already applies for AMP:

.. math::
    \\|g\\| = \\Big\\|\\big(\\|g_1\\|, \\dots, \\|g_k\\|\\big)\\Big\\|_2 / s, \\qquad
    c = \\min\\Big(1, \\frac{\\text{max\\_norm}}{\\|g\\| + 10^{-6}}\\Big), \\qquad
    g_i \\leftarrow g_i / (s / c)

with :math:`s` GradScaler's scale (1 without AMP). fp64 grads are instead multiplied by
:math:`c` in place (in fp64, as ``clip_grad_norm_`` does: torch's fused ops take an fp32 scale). A non-finite norm (an inf or nan grad, as
GradScaler's check would find) skips the step: nothing is written, as for AMP's ``found_inf``
(``clip_grad_norm_`` would instead write nans). No value is read back to the host: the step can
be captured in a CUDA graph. The norm (after unscaling, before clipping: what
``clip_grad_norm_`` returns) is returned by ``step()`` and kept in ``optimizer.grad_norm``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
from torch import Tensor

from fastopt.flat import as_real, is_dtensor, local


def global_norm(grads: list) -> Tensor:
    """The 2-norm of all ``grads`` together, on the first grad's device: in fp32, or fp64 when
    there are fp64 grads (DTensor grads, e.g. FSDP2's shards, count with their full norm
    across ranks)."""
    by_key: dict = defaultdict(list)
    sharded: dict = defaultdict(list)
    norms = []
    for g in grads:
        dtype = torch.float64 if g.dtype in (torch.float64, torch.complex128) else torch.float32
        if is_dtensor(g):
            sharded[(g.device_mesh, dtype)].append(g)
        else:
            by_key[(g.device, dtype)].append(as_real(g))
    for (_, dtype), tensors in by_key.items():
        norms.extend(torch._foreach_norm(tensors, 2, dtype=dtype))
    for (_, dtype), tensors in sharded.items():
        # the norms of the local shards, combined into one partial norm: one collective per
        # mesh (as clip_grad_norm_ does), not one per grad
        partial = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2,
                                                                           dtype=dtype)))
        norms.append(partial.full_tensor())
    first = norms[0].device
    total = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(first, total) for n in norms]))


class Clip(NamedTuple):
    norm: Tensor  # the unscaled global norm (what clip_grad_norm_ returns)
    factor: Tensor  # min(1, max_norm / (norm + 1e-6))
    divisor: Tensor  # fp32 GradScaler scale / factor: what fp32 and narrower updates divide by
    found_inf: Tensor  # 1.0 when the norm is not finite (or AMP found an inf), else 0.0


def fold(grads: list, max_norm: float, grad_scale, found_inf) -> Clip | None:
    """How an update clips ``grads`` to ``max_norm`` (None without grads)."""
    if not grads:
        return None
    norm = global_norm(grads)
    if grad_scale is not None:
        norm = norm / grad_scale.to(norm.device)
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    scale = grad_scale.to(norm.device) if grad_scale is not None else 1.0
    divisor = (scale / factor).to(torch.float32)
    nonfinite = (~torch.isfinite(norm)).to(torch.float32)
    if found_inf is not None:
        nonfinite = torch.maximum(found_inf.to(norm.device), nonfinite)
    return Clip(norm, factor, divisor, nonfinite)


def kept_where_found_inf(bucket, found_inf: Tensor, update) -> None:
    """Run ``update()`` on ``bucket``, then put back, where ``found_inf`` is set, everything a
    step writes (its params, where they lie for an external bucket, its scalar table and
    state): for an update of torch ops that cannot skip itself on the device (no sync)."""
    saved = [t.clone() for t in _written(bucket)]
    update()
    skip = found_inf.to(bucket.device) != 0
    for old, new in zip(saved, _written(bucket)):
        new.copy_(torch.where(skip, old, new))


def _written(bucket) -> list:
    params = [bucket.flat] if not bucket.external else [local(p) for p in bucket.params]
    table = [bucket.state.scalars] if bucket.state.scalars is not None else []
    return [*params, *table, *bucket.state.tensors.values()]
