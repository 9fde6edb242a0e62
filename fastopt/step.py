"""The step of a ``FlatOptimizer``: check everything, then write; and the grads it leaves.

``step_body`` picks the algorithm: torch.optim's own (the declaration's ``reference`` class) for
``differentiable=True``, inside a make_fx / fake-tensor trace, or when params and state were
swapped in from outside; else the fused step, which

1. runs the closure (with grad enabled, as torch.optim does), then turns autograd off;
2. lays out again what changed (``fastopt.layout``);
3. checks every grad of every group (``fastopt.plan.check_grads``) before anything is written;
4. with ``max_grad_norm``, folds the global clip into the update's grad divisor
   (``fastopt.clipping``);
5. per bucket: makes the state this step needs, plans the step (``fastopt.plan``) and calls the
   optimizer's update.

``step_group`` is the same for one step group inside a backward (``in_backward=True``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import torch
from torch import Tensor

from fastopt import clipping, layout
from fastopt.elementwise import step_cost
from fastopt.flat import local
from fastopt.plan import CheckedGrads, check_grads, gathers_fresh, make_plan
from fastopt.state import State, add_state_buffer, create_state, refresh_ids
from fastopt.in_backward import check_clipping
from fastopt.validation import (LAYOUT_OPTIONS, check_group_values, check_option_names,
                                check_precision, checked_options, fused_devices)

_EAGER_STEP = None
_EAGER_ZERO_GRAD = None
MIXED = object()  # ``uniform_key``'s answer when a bucket's params do not share one run key


def step_body(opt, closure=None):
    """torch.optim's own algorithm where the flat layout cannot serve (see the module
    docstring), else the fused step."""
    reference = opt.declaration.reference
    if opt._reference or (reference is not None and (_tracing() or _swapped_in(opt))):
        step = reference.step
        while getattr(step, "hooked", False):  # torch wraps it to run hooks: ours already ran
            step = step.__wrapped__
        return step(opt, closure)
    if torch.compiler.is_compiling():  # dynamo traces this call: break the graph here
        return _EAGER_STEP(opt, closure)
    return fused_step(opt, closure)  # eager: no wrapper to pay for (a few us a step)


def make_eager_step() -> None:
    """``fused_step`` behind ``torch._dynamo.disable``, for steps dynamo traces: a function
    compiled with ``torch.compile`` that calls ``optimizer.step()`` (torch's documented recipe)
    gets a clean graph break and runs the eager fused step, instead of inductor tracing torch's fused ops on
    views of flat buffers (which it refuses). Made at the first construction, outside any
    compiled region (importing dynamo takes a second; torch.optim's own step imports it too)."""
    global _EAGER_STEP, _EAGER_ZERO_GRAD
    if _EAGER_STEP is None:
        import torch._dynamo

        _EAGER_STEP = torch._dynamo.disable(fused_step)
        _EAGER_ZERO_GRAD = torch._dynamo.disable(_zero_grad)


def _zero_grad(opt, set_to_none: bool) -> None:
    opt.zero_grad(set_to_none)  # run eagerly: dynamo is not tracing it


def eager_zero_grad(opt, set_to_none: bool) -> None:
    """``zero_grad`` for a call dynamo traces: one graph break and the eager zero_grad, as
    torch.optim's (``torch._disable_dynamo``), instead of tracing its flat-buffer work."""
    _EAGER_ZERO_GRAD(opt, set_to_none)


def fused_step(opt, closure=None):
    """The step: check every grad, lay out what changed, one fused update per bucket."""
    loss = None
    if closure is not None:
        with torch.enable_grad():  # as torch.optim runs it
            loss = closure()
    grad_mode = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # no context object: a few us less a step
    try:
        return _update_all(opt, closure, loss)
    finally:
        torch._C._set_grad_enabled(grad_mode)


def _update_all(opt, closure, loss):
    """``fused_step`` after the closure, with autograd off."""
    converted = None  # (group, its values before check_group_values made numbers of them)
    for index, group in enumerate(opt.param_groups):  # changed since? (a scheduler, a user)
        check_group_options(opt, group, index)
        originals = check_group_values(opt, group)
        if originals:
            converted = [*(converted or ()), (group, originals)]
        opt.check_step(group)
    if converted is None:
        return _update_checked(opt, closure, loss)
    try:
        return _update_checked(opt, closure, loss)
    finally:  # the group keeps what the user set (a numpy lr), as torch's does
        for group, originals in converted:
            group.update(originals)


def _update_checked(opt, closure, loss):
    """``_update_all`` once every group's options and values are checked."""
    layout.ensure_layout(opt)
    grad_scale = getattr(opt, "grad_scale", None)
    found_inf = getattr(opt, "found_inf", None)
    checked = []
    for index, group in enumerate(opt.param_groups):
        for bucket in opt._buckets[index]:
            op = step_cost(opt, bucket)
            grads = _check(opt, bucket, index, group, op)
            if grads is not None:
                checked.append((group, bucket, grads, op))
    if grad_scale is not None and checked and all(b.backend == "torch" for _, b, _, _ in checked):
        unscale([g for _, _, bucket_grads, _ in checked for g in bucket_grads.grads], grad_scale)
        grad_scale = None
    max_norm = max_grad_norm(opt)
    clip = None
    if max_norm is not None:
        grads = [g for _, _, bucket_grads, _ in checked for g in bucket_grads.grads]
        clip = clipping.fold(grads, max_norm, grad_scale, found_inf)
        opt.grad_norm = clip.norm if clip is not None else None
    for group, bucket, grads, op in checked:
        if clip is None:
            step_bucket(opt, group, bucket, grads, grad_scale, found_inf, op)
        elif bucket.dtype == torch.float64:  # fp64: scale the grads themselves, in fp64
            factor = clip.factor.to(bucket.device, torch.float64)
            torch._foreach_mul_([_in_place(g) for g in grads.grads], factor)
            step_bucket(opt, group, bucket, grads, grad_scale, clip.found_inf, op)
        else:
            step_bucket(opt, group, bucket, grads, clip.divisor, clip.found_inf, op)
    if max_norm is not None and closure is None:
        return opt.grad_norm
    return loss


def unscale(grads: list, grad_scale: Tensor) -> None:
    """GradScaler's unscale, as torch.optim's steps leave the grads after ``scaler.step``:
    each grad divided by the scale in place (a power of two: exact) before a torch-path update,
    which then divides by nothing. (The kernels divide as they read, and write no grad.)"""
    dense = [g for g in grads if g.layout == torch.strided]
    if dense:
        torch._foreach_div_(dense, grad_scale.to(dense[0].device).reshape(()))
    for g in grads:
        if g.layout != torch.strided:  # sparse grads (SGD, Adagrad)
            g.div_(grad_scale.to(g.device).reshape(()))


@functools.cache
def _wording(cls) -> tuple:
    """How torch.optim's errors name ``cls``'s optimizer, and its sparse-grad refusal."""
    declared = cls.declaration
    name = declared.error_name or cls.__name__
    return name, declared.sparse_error.format(name=name) if declared.sparse_error else None


def _check(opt, bucket, index: int, group: dict, op: str) -> CheckedGrads | None:
    """``check_grads`` for one bucket (``op``: the row of ``fastopt.plan.CPU_COSTS`` that
    prices its step), then what torch.optim refuses only at the step."""
    declared = opt.declaration
    name, refusal = _wording(type(opt))
    fused = fused_devices(declared.reference) if group.get("fused") else None
    checked = check_grads(bucket, index, name, refusal, fused, gathers_fresh(bucket, op))
    if checked is None:
        return None
    if not declared.complex and bucket.params[0].is_complex():
        raise RuntimeError(f"{name} does not support complex parameters")  # at the step, as torch
    if bucket.external and _overlapping(bucket):  # before any state is written, unlike torch
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers to a "
            "single memory location. Please clone() the tensor before performing the operation.")
    # A sparse grad got past check_grads only where it is taken, and never in bulk (dense).
    if refusal is None and isinstance(checked.in_place, list) \
            and declared.sparse_weight_decay_error and group.get("weight_decay", 0) != 0 \
            and any(g.is_sparse for g in checked.grads):
        raise RuntimeError(declared.sparse_weight_decay_error)
    return checked


def _by_value(bucket, participants, keys: list) -> list:
    """CPU run keys that stand for the kept scalars they share (read once per key from the
    table), not for the history that made them equal: two runs whose counts have come to
    agree step as one, as they do after a resume (whose keys follow the values), so that a
    resumed run splits its entries, and rounds (torch's fused CPU ops round an element in
    their vector loop and in their scalar tail differently), as the run never stopped."""
    rows = bucket.state.host_scalars()
    kept = len(bucket.state.scalar_names)
    values: dict = {None: None}  # a param without state yet keeps its own key
    for i, key in zip(participants, keys):
        if key not in values:
            values[key] = tuple(rows[i, :kept].tolist())
    return [values[key] for key in keys]


def _overlapping(bucket) -> bool:
    """Does a param of external ``bucket`` have elements that share memory (an expanded
    tensor), which no update can write? Asked once per layout."""
    overlapping = bucket.decided.get("overlapping")
    if overlapping is None:
        overlapping = bucket.decided["overlapping"] = any(
            torch._debug_has_internal_overlap(local(p)) == 1 for p in bucket.params)
    return overlapping


def step_group(opt, index: int, bucket, params: list) -> None:
    """``in_backward=True``: update ``params`` (a step group of ``bucket``, group ``index``)
    now, with the step's own checks and update; the bucket's other grads wait."""
    chosen = {id(p) for p in params}
    waiting = [(q, q.grad) for q in bucket.params if q.grad is not None and id(q) not in chosen]
    for q, _ in waiting:
        q.grad = None
    group = opt.param_groups[index]
    originals = check_group_values(opt, group)
    opt.check_step(group)
    grad_mode = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        op = step_cost(opt, bucket)
        checked = _check(opt, bucket, index, group, op)
        if checked is not None:
            step_bucket(opt, group, bucket, checked, None, None, op, in_backward=True)
    finally:
        torch._C._set_grad_enabled(grad_mode)
        if originals:
            group.update(originals)
        for q, grad in waiting:
            q.grad = grad


def _in_place(grad: Tensor) -> Tensor:
    """``grad`` itself, to scale in place (its local piece; complex as real), in whatever
    strides it has: a contiguous copy would be scaled instead of the grad the step reads."""
    grad = local(grad)
    return torch.view_as_real(grad) if grad.is_complex() else grad


def step_bucket(opt, group: dict, bucket, checked: CheckedGrads, grad_scale,
                found_inf, op: str, in_backward: bool = False) -> None:
    """Make the state this step needs, plan the bucket's step (``fastopt.plan``; ``op``, the
    row of ``CPU_COSTS`` that prices it), update (``in_backward``: a step group's, inside
    the backward)."""
    has_state = bucket.state.has_state
    if any(has_state):
        for name in opt.buffer_names(group, bucket):
            if name not in bucket.state:
                add_state_buffer(opt, group, bucket, name)  # switched on mid-run (amsgrad)
    participants = checked.participants
    if bucket.state.written_elsewhere():  # a kept scalar edited in place since the last step
        refresh_ids(opt, bucket)
    key = opt.uniform_key(bucket)  # run keys before this step's state is made
    keys = None if key is not MIXED else [opt.run_key(bucket, i) for i in participants]
    if keys is not None and bucket.backend == "torch" and bucket.state.scalars is not None:
        keys = _by_value(bucket, participants, keys)
    stepped = bucket.state.stepped
    if not (all(has_state) and all(stepped)):
        fresh = [i for i in participants if not has_state[i]]
        if fresh:
            create_state(opt, group, bucket, fresh)
        for i in participants:
            stepped[i] = True
    if bucket.backend == "torch":
        plan = make_plan(bucket, checked, keys, key, op, False, not in_backward)
        opt.update(group, bucket, plan, grad_scale, found_inf)
    else:  # Triton launches (and the address table's upload) go to the bucket's device
        with torch.cuda.device(bucket.device) if bucket.device.type == "cuda" \
                else contextlib.nullcontext():
            by_address = opt.reads_by_address(group, bucket.external) \
                and bucket.variant is None and not bucket.params[0].is_complex()
            plan = make_plan(bucket, checked, keys, key, op, by_address)
            opt.update(group, bucket, plan, grad_scale, found_inf)
    bucket.state.note_written()  # torch's fused ops count steps in the table in place
    bucket.finish()


_OWN_OPTIONS = frozenset(("master_weights", "state_dtype", "stochastic_rounding", "rounding_seed",
                          "max_grad_norm"))


def check_group_options(opt, group: dict, index: int | None = None) -> None:
    """fastopt's own group options (``fastopt.precision``), checked at construction and at
    every step (a scheduler or a user may change them) as the constructor checks them: what
    this optimizer takes, what ``in_backward`` allows. Group ``index`` (already laid out) is
    checked only where its values changed since (``validation.checked_options``: one tuple
    compared a step); where its ``LAYOUT_OPTIONS`` did, it is laid out again before the step
    (its state converted; what only a layout refuses, ``check_bucket_options``, refused
    then, before anything is written)."""
    if _OWN_OPTIONS.isdisjoint(group):
        return
    buckets = opt._buckets[index] if index is not None and opt._buckets \
        and index < len(opt._buckets) else None
    values = checked_options(group)
    if buckets and buckets[0].options == values:
        return  # as when it was laid out, or last checked
    check_precision(group.get("master_weights", False), group.get("state_dtype"),
                    group.get("stochastic_rounding", False), group.get("rounding_seed", 0),
                    group.get("max_grad_norm"), quantized_ok="int8" in opt.declaration.options,
                    amsgrad=group.get("amsgrad", False))
    check_option_names(type(opt).__name__, group, opt._takes)
    if getattr(opt, "_step_groups", None) is not None:
        check_clipping(group)
    if not buckets:
        return
    laid_out = len(LAYOUT_OPTIONS)
    if buckets[0].options[:laid_out] != values[:laid_out]:
        opt._group_ids[index] = None  # ensure_layout lays the group out again
    else:
        for bucket in buckets:
            bucket.options = values


def max_grad_norm(opt):
    """The groups' ``max_grad_norm`` (one global norm: every group must agree)."""
    groups = opt.param_groups
    if len(groups) == 1:  # most optimizers (asked on every step)
        return groups[0].get("max_grad_norm")
    values = {group.get("max_grad_norm") for group in groups}
    if len(values) > 1:
        raise ValueError(f"max_grad_norm clips the norm of all grads together, so every "
                         f"param group needs the same value, got {sorted(values, key=str)}")
    return values.pop() if values else None


# ---------------------------------------------------------------------- grads after a step
def drop_grads(opt) -> None:
    """``zero_grad()``: every grad set to None, as torch.optim does. A torch-path bucket that
    reads fresh grads where they lie frees its flat grad buffer (autograd hands over new ones);
    one that gathers them keeps it for the next step."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = None
    for bucket in itertools.chain.from_iterable(opt._buckets or []):
        if bucket.backend == "torch" and not bucket.grads.gathers:
            bucket.release_grad_buffer()


@torch.no_grad()
def zero_grads_in_place(opt) -> None:
    """``zero_grad(set_to_none=False)``: each bucket's flat grad buffer zeroed whole (grads
    held elsewhere are re-pointed into it, ``fastopt.grads.Grads.adopt``)."""
    layout.ensure_layout(opt)
    for index, buckets in enumerate(opt._buckets):
        for bucket in buckets:
            _zero_bucket_grads(bucket)
        for p in opt._outsiders[index]:
            _zero_in_place(p)


def _zero_bucket_grads(bucket) -> None:
    grads = [(i, p.grad) for i, p in enumerate(bucket.params) if p.grad is not None]
    if not grads:
        return
    holder = bucket.grads
    if all(holder.holds(i, g) for i, g in grads):
        holder.buffer.zero_()
        return
    for i, g in grads:
        if holder.holds(i, g):
            g.zero_()
        elif g.dtype == bucket.params[i].dtype and g.shape == bucket.params[i].shape \
                and g.device == bucket.device and holder.adopt(i, g):
            continue
        else:
            _zero_in_place(bucket.params[i])


def _zero_in_place(p: Tensor) -> None:
    """torch.optim's ``zero_grad(set_to_none=False)`` for one param."""
    if p.grad is None:
        return
    if p.grad.grad_fn is not None:
        p.grad.detach_()
    else:
        p.grad.requires_grad_(False)
    p.grad.zero_()


# ---------------------------------------------------------------------- torch.optim's own step
def _tracing() -> bool:
    """Is a make_fx / fake-tensor trace recording this step? It then runs torch.optim's own
    per-param algorithm on the traced tensors (the fused step would lay out, and so copy, the
    traced params into a buffer of its own, recording the update on that copy)."""
    modes = torch._C._TorchDispatchModeKey
    return (torch._C._get_dispatch_mode(modes.PROXY) is not None
            or torch._C._get_dispatch_mode(modes.FAKE) is not None)


def _swapped_in(opt) -> bool:
    """Were params and state swapped in from outside, both at once, as
    ``torch.optim._stateless.swap_in_optimizer_params_and_state`` does (a plain state dict
    keyed only by tensors this optimizer never laid out, and groups holding those)? Such a
    step acts on the caller's tensors where they are, with torch.optim's own algorithm:
    nothing is moved, and in-place state updates reach the caller's state dict."""
    if isinstance(opt.state, State) or not opt.state or opt._buckets is None:
        return False
    ids = [[id(p) for p in g["params"]] for g in opt.param_groups]
    if ids == opt._group_ids:
        return False
    known = {i for group_ids in opt._group_ids if group_ids for i in group_ids}
    return not any(id(k) in known for k in opt.state if isinstance(k, Tensor))
