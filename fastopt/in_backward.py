"""The step inside the backward (``in_backward=True``): each step group of a bucket is updated
the moment its last grad is accumulated, and its grads are released at once.

A **step group** is a run of consecutive slots of one bucket, about ``STEP_GROUP_BYTES`` of
params (a param larger than that is a group of its own). Every param that requires grad gets a
post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``). When every param of
a group has a grad in this backward, one fused update runs for the group (the same update
``step()`` runs, on those params only) and their grads are set to None. ``optimizer.step()``
then updates whatever is left (params whose grad came but whose group did not complete, e.g. a
sibling in an unused branch) and starts the count again; so does ``zero_grad()``.

The params are laid out when the optimizer is built, so the first backward already updates
and releases as it goes (its state is made in the hook, as ``step()`` makes it), and saves as
much memory as every later one. After the model moved or the state was replaced, grads wait
for ``step()`` to lay the params out again: a layout is never made inside a backward, whose
saved tensors still refer to the params.

What cannot run inside the backward is refused or handled:

- gradient accumulation: backward passes inside ``with optimizer.accumulating():`` only
  accumulate; the next backward outside it updates with the summed grads;
- ``max_grad_norm`` and GradScaler need every grad before any update: refused (``ValueError``
  at construction, ``RuntimeError`` when a GradScaler steps);
- DDP and FSDP (a process group of more than one process, DTensor params): grads are not yet
  reduced when the hook runs: refused at construction;
- CUDA graph capture of a backward that would update: refused (``RuntimeError``);
- a second grad for a param already updated in this round (two backward passes without
  ``step()``, reentrant activation checkpointing, which runs an inner backward):
  ``RuntimeError`` (use ``accumulating()``; checkpoint with ``use_reentrant=False``).

Grads are released as ``zero_grad()`` releases them by default: a loop that keeps zeroed grads
(``zero_grad(set_to_none=False)``) still finds them None after an update inside the backward,
so a param that gets no grad in a later iteration is not updated then (as with the default
``set_to_none=True``), where torch.optim would step it on a zero grad.

``torch.compile(model)`` works: the hooks run on the leaf params' grad accumulation, outside
the compiled graph.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import Tensor
from torch.nn.parameter import is_lazy

STEP_GROUP_BYTES = 1 << 20  # params per step group, about: the grads held at once, beside the
# largest param's (a group of its own); each group is one update call (tens of microseconds)


def group_bounds(sizes: list) -> list:
    """Step groups of consecutive params of ``sizes`` bytes: ``[lo, hi)`` index ranges of about
    ``STEP_GROUP_BYTES`` each (a larger param is a group of its own)."""
    from fastopt.flat import bounded_runs

    return bounded_runs(sizes, STEP_GROUP_BYTES)


def attach(opt) -> StepGroups:
    """The step groups of ``opt`` (built with ``in_backward=True``, or unpickled), with a hook
    on every param of its groups."""
    groups = StepGroups(opt)
    for group in opt.param_groups:
        groups.hook_params(group["params"])
    return groups


class StepGroups:
    """The hooks and step groups of one optimizer with ``in_backward=True``."""

    def __init__(self, opt) -> None:
        self.opt = opt
        self.handles: list = []
        self.hooked: set = set()  # ids of the params with a hook
        self.groups: dict = {}  # id(param) -> its step group (a list of params)
        self.arrived: dict = {}  # id(group list) -> ids of its params with a grad this backward
        self.done: set = set()  # ids of the params updated since the last step() / zero_grad()
        self.layout: tuple = ()  # ids of the buckets the groups were made for
        self.paused = 0  # accumulating() depth

    def hook_params(self, params) -> None:
        # The hooks hold the groups weakly: an optimizer that is dropped is freed, and its
        # hooks go with it (they are removed when it is collected).
        if not self.handles:
            weakref.finalize(self, _remove, self.handles)
        ref = weakref.ref(self)
        for p in params:  # a lazy module's param is hooked once laid out (materialized)
            if p.requires_grad and id(p) not in self.hooked and not is_lazy(p):
                self.hooked.add(id(p))
                self.handles.append(p.register_post_accumulate_grad_hook(
                    lambda param, ref=ref: _call(ref, param)))

    def reset(self) -> None:
        """A new round: no grad has arrived (after ``step()`` and ``zero_grad()``)."""
        self.arrived = {}
        self.done = set()

    @contextlib.contextmanager
    def accumulating(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    # ------------------------------------------------------------------
    def _make_groups(self, key: tuple) -> None:
        """Step groups from the current layout (``group_bounds``)."""
        self.groups, self.arrived = {}, {}
        for index, buckets in enumerate(self.opt._buckets):
            for bucket in buckets or []:
                sizes = [p.numel() * p.element_size() for p in bucket.params]
                for lo, hi in group_bounds(sizes):
                    group = (index, bucket, [p for p in bucket.params[lo:hi] if p.requires_grad])
                    for p in group[2]:
                        self.groups[id(p)] = group
        self.layout = key

    def _on_grad(self, p: Tensor) -> None:
        opt = self.opt
        buckets = opt._buckets
        if self.paused or not buckets or len(buckets) != len(opt.param_groups) \
                or getattr(opt.state, "changed", True):
            return  # no layout yet, or one step() must make again: the grad waits for it
        key = tuple(id(b) for group_buckets in buckets for b in group_buckets or [])
        if key != self.layout:
            self._make_groups(key)
        if id(p) in self.done:
            raise RuntimeError(
                "in_backward=True: a param received a second grad after its update in this "
                "round (two backward passes without step(), or reentrant activation "
                "checkpointing). Accumulate inside `with optimizer.accumulating():`, and use "
                "torch.utils.checkpoint with use_reentrant=False")
        group = self.groups.get(id(p))
        if group is None:
            return
        arrived = self.arrived.setdefault(id(group), set())
        arrived.add(id(p))
        index, bucket, params = group
        if len(arrived) < len(params):
            return
        del self.arrived[id(group)]
        if not bucket.is_intact() or any(q.grad is None for q in params):
            return  # params moved, or a grad released meanwhile: step() sees to them
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("in_backward=True cannot update params inside a CUDA graph "
                               "capture; capture with in_backward=False")
        from fastopt.step import step_group

        step_group(opt, index, bucket, params)
        for q in params:
            q.grad = None
            self.done.add(id(q))


def check_clipping(group: dict) -> None:
    """in_backward=True: no ``max_grad_norm`` (checked when a group is added, loaded, or
    changed before a step)."""
    if group.get("max_grad_norm") is not None:
        raise ValueError("max_grad_norm needs every grad before any update, which "
                         "in_backward=True does not wait for; clip with in_backward=False")


def _call(ref, param) -> None:
    groups = ref()
    if groups is not None:
        groups._on_grad(param)


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


def refuse_grad_scaler(opt) -> None:
    """A GradScaler step of an optimizer that updated inside the backward: refused."""
    if getattr(opt, "grad_scale", None) is not None \
            or getattr(opt, "found_inf", None) is not None:
        raise RuntimeError(
            "in_backward=True updates params during backward, before GradScaler can "
            "unscale the grads and check them for inf/nan; use in_backward=False with "
            "GradScaler")


def check_in_backward(in_backward, param_groups: list, defaults: dict) -> None:
    """torch.optim-style validation of ``in_backward`` (ValueError / TypeError)."""
    if not isinstance(in_backward, bool):
        raise TypeError(f"in_backward must be a bool, got {in_backward!r}")
    if not in_backward:
        return
    if defaults.get("differentiable"):
        raise ValueError("in_backward=True does not take differentiable=True")
    for group in param_groups:
        check_group(group)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError(
            "in_backward=True updates each param as soon as its grad is accumulated, before "
            "DDP or FSDP reduce the grads across processes; use in_backward=False")


def check_group(group: dict) -> None:
    check_clipping(group)
    for p in group["params"]:
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise ValueError("in_backward=True on DTensor params (FSDP2, tensor parallel) is "
                             "not supported: their grads are reduced after the hook runs")
