"""The step of a declared elementwise optimizer (``fastopt.declaration``), on either backend.

For one bucket and its step plan (``fastopt.plan``):

1. the scalar math advances each run's kept scalars (``step``, ``mu_product``...) and derives
   this step's values from them (bias corrections, step sizes): in Python floats for the torch
   path (the table lives on the CPU, as torch.optim keeps ``step``: no sync, no tiny ops); for
   the Triton path in Python floats too, on the host mirror of the device's table, which one
   non-blocking copy then updates, wherever the host knows the table's values (no sync, one
   copy instead of a dozen tiny ops per run), and else on the table's columns on the device
   (with GradScaler's ``found_inf``, whose step may not count; inside a CUDA graph capture,
   whose replays must advance the scalars themselves; with a hyperparameter on the device;
   after anything else wrote the table);
2. one call updates the plan's entries: ``fastopt.kernels.elementwise_update`` with the
   optimizer's per-element Triton function, or ``fastopt.torch_path.elementwise_update`` with
   its torch twin (the same signature);
3. with GradScaler's ``found_inf`` set, the scalars are put back as they were (on the GPU
   without reading it: ``torch.where``).
"""

from __future__ import annotations

import bisect
import importlib

import torch
from torch import Tensor

from fastopt import dispatch
from fastopt.declaration import Columns, FloatOps, TensorOps
from fastopt.plan import merge_widened


def update(opt, group: dict, bucket, plan, grad_scale, found_inf) -> None:
    """Update ``plan``'s entries of ``bucket`` (a bucket of ``group``) in place."""
    declared = opt.declaration
    table = bucket.state.scalars
    triton = bucket.backend == "triton"
    if not triton and found_inf is not None and bool(found_inf):
        return  # torch path: nothing changes (see torch_path.elementwise_update)
    if not triton and isinstance(group["lr"], Tensor):  # torch.optim's _to_scalar(lr)
        group = dict(group, lr=float(group["lr"]))
    runs = plan.step_runs
    before = []
    plan = merge_widened(plan, group)  # small params' widened copies in one entry
    entries = plan.rows
    if table is None:
        rows = [None] * len(entries)
    elif triton:
        mirror = host_mirror(declared, group, bucket, found_inf)
        if mirror is not None:
            for lo, hi, _ in runs:
                _advance_mirror(declared, group, mirror, lo, hi)
            bucket.state.upload_mirror(mirror)
        else:
            for lo, hi, _ in runs:
                if found_inf is not None:
                    before.append(table[lo:hi].clone())
                _advance_columns(declared, group, table, lo, hi)
        rows = [table[first] for first in entries]
    elif len(runs) == 1:  # every entry in one run (the common step): one set of values
        rows = [_advance_floats(declared, group, bucket.state, runs[0][0], runs[0][1])] \
            * len(entries)
    else:
        values = _advance_runs(declared, group, bucket.state, runs)
        starts = [lo for lo, _, _ in runs]
        rows = [values[bisect.bisect_right(starts, first) - 1] for first in entries]
    hyper = declared.hyper(opt, group)
    if not triton and declared.fused is not None and fused_serves(bucket):
        declared.fused(plan.pieces("param"), plan.grads,
                       [plan.pieces(b.name) for b in declared.buffers if b.name in bucket.state],
                       plan.scalar_views("step"), group["lr"], hyper[0],
                       bool(group.get("maximize", False)), grad_scale)
        opt.renumber(bucket, plan)
        return
    dispatch.implementation("elementwise_update", bucket.backend)(
        _math(declared, bucket.backend),
        plan.pieces("param"),
        plan.grads,
        [plan.pieces(b.name) if b.name in bucket.state else None for b in declared.buffers],
        rows,
        lr=_on(group["lr"], bucket.device) if triton else group["lr"],
        hyper=hyper[0],
        flags=hyper[1],
        maximize=bool(group.get("maximize", False)),
        grad_scale=_on(grad_scale, bucket.device),
        found_inf=_on(found_inf, bucket.device),
        step_column=declared.step_column,
        **opt.precision_options(group, bucket, plan),
    )
    if before:
        skip = found_inf.to(table.device) != 0
        for (lo, hi, _), old in zip(runs, before):
            table[lo:hi] = torch.where(skip, old, table[lo:hi])
    if table is not None:
        opt.renumber(bucket, plan)


def fused_serves(bucket) -> bool:
    """Can the declaration's ``fused`` op (torch's own, CPU) update ``bucket``: fp32 or fp64
    params (so no masters or stochastic rounding, which only half-precision params take),
    state in their dtype?"""
    return bucket.device.type == "cpu" and bucket.dtype in (torch.float32, torch.float64) \
        and bucket.state.dtypes <= {bucket.dtype}


def step_cost(opt, bucket) -> str:
    """The row of ``fastopt.plan.CPU_COSTS`` that prices ``bucket``'s step (decided once for
    each set of dtypes its state is kept in)."""
    key = ("cost", bucket.state.dtypes)
    cost = bucket.decided.get(key)
    if cost is None:
        cost = bucket.decided[key] = opt.declaration.cpu_cost(fused_serves(bucket))
    return cost


def _advance_columns(declared, group: dict, table: Tensor, lo: int, hi: int) -> None:
    """The scalar math on the table's rows ``lo:hi`` (tensor columns, on the GPU): the kept
    scalars advanced in place, the derived values written beside them (float32, as the
    kernels read them)."""
    names = declared.scalar_names
    columns = Columns({name: table[lo:hi, k] for k, name in enumerate(names)})
    declared.scalar_math(columns, group, TensorOps)
    for k, name in enumerate(names):
        value = getattr(columns, name)
        if value is not table[lo:hi, k]:
            table[lo:hi, k] = value  # (torch's setitem takes a [1, rows] value too)
    derived = [getattr(columns, name) for name in declared.derived]
    if derived:
        table[lo:hi, len(names):] = torch.stack(
            [_column(d, hi - lo, table.device) for d in derived], dim=1).to(torch.float32)


def _column(value, rows: int, device: torch.device) -> Tensor:
    """A derived value for ``rows`` rows of the table (float64): a number, or a tensor of one
    value or one per row, whatever its shape (a tensor lr may be any 1-element shape, such as
    ``[1, 1]``, which the columns broadcast to ``[1, rows]``)."""
    return torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1).expand(rows)


def host_mirror(declared, group: dict, bucket, found_inf):
    """The host mirror of ``bucket``'s scalar table (``Buffers.host_mirror``) where the scalar
    math can run on it: no ``found_inf`` (on the device: whether the step counts is not known
    on the host), no CUDA graph capture (a replay must advance the table itself), no
    hyperparameter on the device (reading it would sync). Else None."""
    if found_inf is not None or (bucket.device.type == "cuda"
                                 and torch.cuda.is_current_stream_capturing()):
        return None
    for key in declared.group_keys:
        value = group.get(key)
        if isinstance(value, Tensor) or (isinstance(value, tuple)
                                         and any(isinstance(v, Tensor) for v in value)):
            return None
    return bucket.state.host_mirror()


def _advance_mirror(declared, group: dict, mirror, lo: int, hi: int) -> None:
    """The scalar math on Python floats for rows ``lo:hi`` of the host mirror (every row of a
    run holds the same): the kept scalars advanced, the derived values written beside them
    (rounded to float32, as ``_advance_columns`` stores them)."""
    columns = _advance_rows(declared, group, mirror, lo, hi)
    kept = len(declared.scalar_names)
    for k, name in enumerate(declared.derived):
        mirror[lo:hi, kept + k] = getattr(columns, name)


def _advance_floats(declared, group: dict, state, lo: int, hi: int) -> Columns:
    """The scalar math on Python floats (the torch path: the table is on the CPU and every row
    of a run holds the same): the kept scalars written back to rows ``lo:hi`` of ``state``'s
    table; returns the run's values, kept and derived."""
    # the CPU table's memory, without torch's per-op cost
    return _advance_rows(declared, group, state.host_scalars(), lo, hi)


def _advance_runs(declared, group: dict, state, runs: list) -> list:
    """``_advance_floats`` for each of ``runs`` (the torch path), the scalar math done once
    per distinct set of kept scalars: runs whose params' counts agree (most of them, when
    params without grads split a bucket into hundreds of runs) only write the values."""
    rows = state.host_scalars()
    names = declared.scalar_names
    done: dict = {}
    values = []
    for lo, hi, _ in runs:
        kept = tuple(rows[lo, : len(names)].tolist())
        columns = done.get(kept)
        if columns is None:
            columns = done[kept] = _advance_rows(declared, group, rows, lo, hi)
        else:
            rows[lo:hi, : len(names)] = [getattr(columns, name) for name in names]
        values.append(columns)
    return values


def _advance_rows(declared, group: dict, rows, lo: int, hi: int) -> Columns:
    """The scalar math on Python floats from row ``lo`` of ``rows`` (a numpy table); the kept
    scalars written back to rows ``lo:hi``; returns the run's values, kept and derived."""
    names = declared.scalar_names
    columns = Columns(dict(zip(names, rows[lo].tolist())))
    declared.scalar_math(columns, group, FloatOps)
    for k, name in enumerate(names):
        rows[lo:hi, k] = getattr(columns, name)
    return columns


def _math(declared, backend: str):
    """The optimizer's per-element function for ``backend``: the Triton kernel's or its torch
    twin."""
    if backend == "triton":  # the function <kernel> of fastopt/kernels/<kernel>.py
        return getattr(importlib.import_module(f"fastopt.kernels.{declared.kernel}"),
                       declared.kernel)
    return declared.math


def _on(value, device: torch.device):
    """A tensor hyperparameter moved to ``device`` (other values pass through)."""
    if isinstance(value, Tensor) and value.device != device:
        return value.to(device)
    return value
