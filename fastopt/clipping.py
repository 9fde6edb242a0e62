"""Global grad-norm clipping folded into the update: ``max_grad_norm=`` on Adam, AdamW, SGD.

``torch.nn.utils.clip_grad_norm_(params, max_norm)`` followed by a step reads every grad three
times (norm, scale, step) and writes it once. Here the norm is one reduction pass over the grads
(torch's multi-tensor norm), and the clip factor goes into the update as part of the grad
divisor the update already applies for AMP:

.. math::
    \\|g\\| = \\Big\\|\\big(\\|g_1\\|, \\dots, \\|g_k\\|\\big)\\Big\\|_2 / s, \\qquad
    c = \\min\\Big(1, \\frac{\\text{max\\_norm}}{\\|g\\| + 10^{-6}}\\Big), \\qquad
    g_i \\leftarrow g_i / (s / c)

with :math:`s` GradScaler's scale (1 without AMP). A non-finite norm (an inf or nan grad, as
GradScaler's check would find) skips the step: nothing is written, as for AMP's ``found_inf``
(``clip_grad_norm_`` would instead write nans). No value is read back to the host: the step can
be captured in a CUDA graph. The norm (after unscaling, before clipping: what
``clip_grad_norm_`` returns) is returned by ``step()`` and kept in ``optimizer.grad_norm``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from fastopt.flat import as_real, is_dtensor


def global_norm(grads: list) -> Tensor:
    """The 2-norm of all ``grads`` together, in fp32, on the first grad's device (DTensor
    grads, e.g. FSDP2's shards, count with their full norm across ranks)."""
    by_device: dict = defaultdict(list)
    norms = []
    for g in grads:
        if is_dtensor(g):
            norms.append(torch.linalg.vector_norm(g, dtype=torch.float32).full_tensor())
        else:
            by_device[g.device].append(as_real(g))
    for tensors in by_device.values():
        norms.extend(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    first = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]))


def fold(grads: list, max_norm: float, grad_scale, found_inf):
    """(norm, grad_scale, found_inf) for an update that clips ``grads`` to ``max_norm``."""
    if not grads:
        return None, grad_scale, found_inf
    norm = global_norm(grads)
    if grad_scale is not None:
        norm = norm / grad_scale.to(norm.device)
    clip = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    divisor = (grad_scale.to(norm.device) if grad_scale is not None else 1.0) / clip
    nonfinite = (~torch.isfinite(norm)).to(torch.float32)
    if found_inf is not None:
        nonfinite = torch.maximum(found_inf.to(norm.device), nonfinite)
    return norm, divisor, nonfinite
