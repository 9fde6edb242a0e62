"""The shared base: a ``torch.optim.Optimizer`` whose params and state live in flat buffers.

What a subclass supplies: its ``defaults`` (validated before ``__init__``), the names of its
per-param state (``state_names``), which params may share one fused call (``run_key``), and
``update``, which calls the backend's update function on the tensors of the step's plan
(``fastopt.plan``).

What this class does:

- lays each group's params out in buckets (one per device and dtype, see ``flat.py``), and
  again when they move (``layout.py``); params that do not require grad stay out until they
  get a grad;
- ``step``: checks every grad first (a failed step changes nothing), creates state lazily for
  params that have a grad (as torch does), then updates whole runs of params in one call;
- ``state_dict`` is torch.optim's per-param format (per-param views, never the flat layout);
  ``load_state_dict`` copies into the flat buffers;
- ``zero_grad(set_to_none=False)`` zeroes a bucket's flat grad buffer in one call.

Grads: ``step()`` never writes into or replaces a grad. A grad that is a view of the bucket's
flat grad buffer is used in place; ``zero_grad(set_to_none=False)`` re-points plain grads into
that buffer (the same tensor objects, via ``Tensor.set_``, so references others hold stay the
grads), so loops that keep their grads run flat. Other grads (fresh tensors from autograd after
``zero_grad(set_to_none=True)``, tensors assigned by hand, DDP's bucket views) are read where
they are, one tensor each in the same fused call, or first gathered into the flat grad buffer
with one multi-tensor copy when that is cheaper (many small tensors on a CPU; on the Triton path
whenever the kernel cannot read them through an address table). Which of these a step takes is
its plan (``fastopt.plan``); the state behind ``optimizer.state`` is ``fastopt.state``'s.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastopt import clipping, dispatch, hooks, layout
from fastopt import in_backward as backward_steps
from fastopt.checkpoint import check_loadable, tensor_steps
from fastopt.flat import Bucket, as_real, is_movable, mark_laid_out
from fastopt.plan import CheckedGrads, StepPlan, check_grads, make_plan
from fastopt.precision import HALF_DTYPES
from fastopt.state import (MASTER, Entry, State, add_state_buffer, create_state,
                           keep_saved_dtypes, plain_state)
from fastopt.validation import check_param, check_precision

PRECISION_KEYS = {"master_weights", "state_dtype", "stochastic_rounding", "rounding_seed",
                  "max_grad_norm"}
_MIXED = object()  # uniform_key's answer when a bucket's params do not share one run key


class FlatOptimizer(Optimizer):
    """Base class of fastopt's optimizers (see the module docstring)."""

    # Subclasses set these.
    sparse_grads_ok = False  # SGD densifies sparse grads; Adam refuses them as torch does
    uses_step = False  # Adam keeps a per-param step count; SGD does not
    error_name = ""  # the name torch.optim's errors use ("Adam" for Adam and AdamW)
    int8_state_ok = False  # state_dtype="int8" (blockwise 8-bit moments) is implemented
    precision_keys: tuple = ()  # which of PRECISION_KEYS its groups take
    amp_scaling_supported = True  # takes GradScaler's grad_scale / found_inf in step (fused)
    required_group_keys: tuple = ()  # options every saved param group must have

    # The torch.optim class whose own algorithm runs when ``differentiable=True`` (set by
    # subclasses that take that option).
    reference_class: type | None = None
    update_name = ""  # which update (``"adam"``, ``"sgd"``) the plan's cost model prices
    grad_table_ok = False  # its kernels read fresh grads through an address table

    def __init__(self, params, defaults: dict, *, backend: str = "auto",
                 flatten_params: bool = True, in_backward: bool = False) -> None:
        dispatch.check_backend(backend)
        if not isinstance(flatten_params, bool):
            raise TypeError(f"flatten_params must be a bool, got {flatten_params!r}")
        self.backend = backend
        # False: params stay where they are (their state is still flat); see flat.py.
        self.flatten_params = flatten_params
        # differentiable=True: params stay where they are and torch.optim's own differentiable
        # algorithm runs (per-param state, autograd through the update); nothing is laid out.
        self._reference = bool(defaults.get("differentiable"))
        if self._reference and PRECISION_KEYS.intersection(defaults):
            raise ValueError(
                "differentiable=True runs torch.optim's own algorithm; it does not take "
                + ", ".join(sorted(PRECISION_KEYS.intersection(defaults))))
        _make_eager_step()
        self._buckets: list | None = []  # per group: list[Bucket]
        self._outsiders: list = []  # per group: params kept out of the layout (no grad yet)
        self._group_ids: list = []  # per group: the ids of group["params"] when laid out
        self._ids = itertools.count()
        self._step_groups = None
        super().__init__(params, defaults)
        self._step_supports_amp_scaling = self.amp_scaling_supported
        backward_steps.check_in_backward(in_backward, self.param_groups, defaults)
        if in_backward:
            self._step_groups = backward_steps.StepGroups(self)
            for group in self.param_groups:
                self._step_groups.hook_params(group["params"])

    # ------------------------------------------------------------------ subclass interface
    def state_names(self, group: dict, bucket: Bucket) -> list:
        raise NotImplementedError

    def state_dtype(self, group: dict, bucket: Bucket, name: str) -> torch.dtype:
        """The dtype state ``name`` is stored in (see fastopt.precision): fp32 for the master
        copy; else ``state_dtype`` if the group sets one, fp32 beside fp32 masters, or the
        param's dtype as torch.optim keeps it."""
        if name == MASTER:
            return torch.float32
        if group.get("state_dtype") is not None:
            return group["state_dtype"]
        if self._has_master(group, bucket):
            return torch.float32
        return bucket.dtype

    @staticmethod
    def _has_master(group: dict, bucket: Bucket) -> bool:
        return bool(group.get("master_weights")) and bucket.dtype in HALF_DTYPES

    def precision_names(self, group: dict, bucket: Bucket) -> list:
        """``["master_param"]`` where the group keeps fp32 masters for this bucket's params."""
        return [MASTER] if self._has_master(group, bucket) else []

    def precision_options(self, group: dict, bucket: Bucket, plan: StepPlan) -> dict:
        """The keywords an update function takes for masters and stochastic rounding."""
        options = {}
        if MASTER in bucket.state:
            options["masters"] = plan.pieces(MASTER)
        if group.get("stochastic_rounding") and bucket.dtype == torch.bfloat16:
            options["rounding_seed"] = int(group.get("rounding_seed", 0))
            options["offsets"] = plan.starts
        return options

    def check_bucket(self, group: dict, bucket: Bucket) -> None:
        """Refuse a group option this bucket's params cannot take (clear error, at layout)."""
        state_dtype = group.get("state_dtype")
        if state_dtype is not None and state_dtype != bucket.dtype \
                and any(p.is_complex() for p in bucket.params):
            raise ValueError(
                f"state_dtype={state_dtype!r} applies to real params; complex params keep their "
                "state in their own dtype (put them in a param group without state_dtype)"
            )
        if group.get("stochastic_rounding") and bucket.dtype == torch.float16:
            raise ValueError(
                "stochastic_rounding=True supports bfloat16 params (fp32 bits truncated to 16); "
                "for float16 params use master_weights=True"
            )

    def run_key(self, bucket: Bucket, i: int):
        """Adjacent params with equal keys can be updated by one call (default: has state)."""
        return bucket.has_state[i]

    def bucket_variant(self, group: dict, p: Tensor):
        """Params with different variants never share a bucket (Adam: 8-bit state or not)."""
        return None

    def state_rows(self, group: dict, name: str) -> int | None:
        """Rows of a table state (one per sample, e.g. SAGA's gradient table); None for a
        state tensor shaped like its param."""
        return None

    def uniform_key(self, bucket: Bucket):
        """The run key all params of ``bucket`` share, or ``_MIXED``."""
        return _same(bucket.has_state)

    def update(self, group: dict, bucket: Bucket, plan: StepPlan, grad_scale,
               found_inf) -> None:
        """Update the entries of ``plan`` in place (``plan.pieces(name)``, ``plan.grads``; see
        ``fastopt.plan``). ``plan.step_runs`` are the runs ``[lo, hi, key]`` of params that
        have a grad and share a run key; each entry lies within one of them."""
        raise NotImplementedError

    # ------------------------------------------------------------------ layout
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                check_param(p)
            unsupported = sorted((set(group) & PRECISION_KEYS) - set(self.precision_keys))
            if unsupported:
                raise ValueError(f"{type(self).__name__} does not take {', '.join(unsupported)}"
                                 " (param group options)")
            self._check_group_options(group)
            self._max_grad_norm()
            if self._step_groups is not None:
                backward_steps.check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        if self._step_groups is not None:
            self._step_groups.hook_params(group["params"])
        if self._reference:
            return
        if self._buckets is not None:
            self._buckets.append(None)
            self._outsiders.append(None)
            self._group_ids.append(None)
            layout.build_group(self, len(self.param_groups) - 1)

    def adopt_value(self, bucket: Bucket, i: int, name: str, value: Tensor) -> None:
        """Copy a saved state tensor of param i into the bucket's buffer ``name``."""
        view = bucket.local_view(name, i)
        view.copy_(value.to(device=view.device, dtype=view.dtype))

    # ------------------------------------------------------------------ step
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.

        Inside a function compiled with ``torch.compile`` the step is a graph break: the fused
        step below runs eagerly, as it would outside (see ``_make_eager_step``).
        """
        if self._step_groups is not None:
            self._refuse_grad_scaler()
        try:
            if type(self).step is FlatOptimizer.step:  # not wrapped by torch (fastopt.hooks)
                return hooks.run_hooked(self, closure)
            return self._step_body(closure)
        finally:
            if self._step_groups is not None:
                self._step_groups.reset()

    # torch.optim wraps an optimizer class's ``step`` to run the step hooks inside a profiler
    # range unless it is marked ``hooked``; this one runs them itself (``fastopt.hooks``).
    step.hooked = True

    def accumulating(self):
        """``in_backward=True``: a context inside which backward passes only accumulate grads
        (gradient accumulation); the next backward outside it updates with their sum."""
        if self._step_groups is None:
            return contextlib.nullcontext()
        return self._step_groups.accumulating()

    def _refuse_grad_scaler(self) -> None:
        if getattr(self, "grad_scale", None) is not None \
                or getattr(self, "found_inf", None) is not None:
            raise RuntimeError(
                "in_backward=True updates params during backward, before GradScaler can "
                "unscale the grads and check them for inf/nan; use in_backward=False with "
                "GradScaler")

    def _step_group(self, index: int, bucket: Bucket, params: list) -> None:
        """``in_backward=True``: update ``params`` (a step group of ``bucket``, group ``index``)
        now, with the step's own checks and update; the bucket's other grads wait."""
        chosen = {id(p) for p in params}
        waiting = [(q, q.grad) for q in bucket.params
                   if q.grad is not None and id(q) not in chosen]
        for q, _ in waiting:
            q.grad = None
        group = self.param_groups[index]
        grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            checked = check_grads(bucket, index, self.error_name or type(self).__name__,
                                  self.sparse_grads_ok, group.get("fused"))
            if checked is not None:
                self._step_bucket(group, bucket, checked, None, None)
        finally:
            torch.set_grad_enabled(grad_mode)
            for q, grad in waiting:
                q.grad = grad

    def _step_body(self, closure=None):
        if self._reference or (self.reference_class is not None
                               and (_tracing() or self._swapped_in())):
            return self._reference_step(closure)
        return _EAGER_STEP(self, closure)

    def _swapped_in(self) -> bool:
        """Were params and state swapped in from outside, both at once, as
        ``torch.optim._stateless.swap_in_optimizer_params_and_state`` does (a plain state dict
        keyed only by tensors this optimizer never laid out, and groups holding those)? Such a
        step acts on the caller's tensors where they are, with torch.optim's own algorithm:
        nothing is moved, and in-place state updates reach the caller's state dict."""
        if isinstance(self.state, State) or not self.state or self._buckets is None:
            return False
        ids = [[id(p) for p in g["params"]] for g in self.param_groups]
        if ids == self._group_ids:
            return False
        known = {i for group_ids in self._group_ids if group_ids for i in group_ids}
        return not any(id(k) in known for k in self.state if isinstance(k, Tensor))

    def _reference_step(self, closure=None):
        """torch.optim's own step (``reference_class``), for ``differentiable=True``."""
        step = self.reference_class.step
        while getattr(step, "hooked", False):  # torch wraps it to run hooks: ours already ran
            step = step.__wrapped__
        return step(self, closure)

    def _init_group(self, *args, **kwargs):
        """torch.optim's ``_init_group``, which ``reference_class.step`` calls."""
        return self.reference_class._init_group(self, *args, **kwargs)

    def _fused_step(self, closure=None):
        """The step: check every grad, lay out what changed, one fused update per bucket."""
        loss = None
        if closure is not None:
            with torch.enable_grad():  # as torch.optim runs it
                loss = closure()
        grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            return self._update_all(closure, loss)
        finally:
            torch.set_grad_enabled(grad_mode)

    def _update_all(self, closure, loss):
        """``_fused_step`` after the closure, with autograd off."""
        if self.precision_keys:  # options may have been changed since (a scheduler)
            for group in self.param_groups:
                if PRECISION_KEYS.intersection(group):
                    self._check_group_options(group)
        layout.ensure_layout(self)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Check every grad of every group before anything is written.
        checked = []
        name = self.error_name or type(self).__name__
        for index, group in enumerate(self.param_groups):
            for bucket in self._buckets[index]:
                grads = check_grads(bucket, index, name, self.sparse_grads_ok,
                                    group.get("fused"))
                if grads is not None:
                    checked.append((group, bucket, grads))
        max_norm = self._max_grad_norm() if self.precision_keys else None
        clip = None
        if max_norm is not None:
            grads = [g for _, _, bucket_grads in checked for g in bucket_grads.grads]
            clip = clipping.fold(grads, max_norm, grad_scale, found_inf)
            self.grad_norm = clip.norm if clip is not None else None
        for group, bucket, grads in checked:
            if clip is None:
                self._step_bucket(group, bucket, grads, grad_scale, found_inf)
            elif bucket.dtype == torch.float64:  # fp64: scale the grads themselves, in fp64
                factor = clip.factor.to(bucket.device, torch.float64)
                torch._foreach_mul_([as_real(g) for g in grads.grads], factor)
                self._step_bucket(group, bucket, grads, grad_scale, clip.found_inf)
            else:
                self._step_bucket(group, bucket, grads, clip.divisor, clip.found_inf)
        if max_norm is not None and closure is None:
            return self.grad_norm
        return loss

    def _check_group_options(self, group: dict) -> None:
        check_precision(group.get("master_weights", False), group.get("state_dtype"),
                        group.get("stochastic_rounding", False), group.get("rounding_seed", 0),
                        group.get("max_grad_norm"), int8_ok=self.int8_state_ok,
                        amsgrad=group.get("amsgrad", False))

    def _max_grad_norm(self):
        """The groups' ``max_grad_norm`` (one global norm: every group must agree)."""
        values = {group.get("max_grad_norm") for group in self.param_groups}
        if len(values) > 1:
            raise ValueError(f"max_grad_norm clips the norm of all grads together, so every "
                             f"param group needs the same value, got {sorted(values, key=str)}")
        return values.pop() if values else None

    def _step_bucket(self, group: dict, bucket: Bucket, checked: CheckedGrads, grad_scale,
                     found_inf) -> None:
        """Make the state this step needs, plan the bucket's step (``fastopt.plan``), update."""
        if any(bucket.has_state):
            for name in self.state_names(group, bucket):
                if name not in bucket.state:
                    add_state_buffer(self, group, bucket, name)  # switched on mid-run (amsgrad)
        participants = checked.participants
        key = self.uniform_key(bucket)  # run keys before this step's state is made
        keys = None if key is not _MIXED else [self.run_key(bucket, i) for i in participants]
        if len(participants) == len(bucket.params):
            if not all(bucket.has_state):
                create_state(self, group, bucket,
                             [i for i, s in enumerate(bucket.has_state) if not s])
        else:
            fresh = [i for i in participants if not bucket.has_state[i]]
            if fresh:
                create_state(self, group, bucket, fresh)
        # Triton launches (and the address table's upload) go to the current device.
        on_device = torch.cuda.device(bucket.device) if bucket.backend == "triton" \
            and bucket.device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            plan = make_plan(bucket, checked, keys, key, self.update_name,
                             self._reads_by_address(bucket))
            self.update(group, bucket, plan, grad_scale, found_inf)
        bucket.finish()

    def _reads_by_address(self, bucket: Bucket) -> bool:
        """Can this bucket's kernels read fresh grads where they lie, through an address table
        (``fastopt.grad_table``)? Otherwise they are gathered first."""
        return bucket.backend == "triton" and self.grad_table_ok and bucket.variant is None \
            and not bucket.params[0].is_complex()

    # ------------------------------------------------------------------ grads
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the grads, as torch.optim does; ``set_to_none=False`` zeroes flat buffers whole."""
        if self._step_groups is not None:
            self._step_groups.reset()
        if set_to_none:
            hooks.profiled(f"Optimizer.zero_grad#{type(self).__name__}.zero_grad", _drop_grads,
                           self)
            return
        if self._buckets is None or self._reference:
            super().zero_grad(set_to_none)
            return
        layout.ensure_layout(self)
        for index, buckets in enumerate(self._buckets):
            for bucket in buckets:
                self._zero_bucket_grads(bucket)
            for p in self._outsiders[index]:
                _zero_in_place(p)

    @torch.no_grad()
    def _zero_bucket_grads(self, bucket: Bucket) -> None:
        grads = [(i, p.grad) for i, p in enumerate(bucket.params) if p.grad is not None]
        if not grads:
            return
        if all(bucket.holds_grad(i, g) for i, g in grads):
            bucket.grad.zero_()
            return
        for i, g in grads:
            if bucket.holds_grad(i, g):
                g.zero_()
            elif g.dtype == bucket.params[i].dtype and g.shape == bucket.params[i].shape \
                    and g.device == bucket.device and bucket.adopt_grad(i, g):
                continue
            else:
                _zero_in_place(bucket.params[i])

    # ------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        """torch.optim's format; per-param entries are plain dicts of (views of) the state.
        Entries whose key is not a param (written by hooks) pass through as torch keeps them."""
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) if isinstance(v, Entry) else v
                               for k, v in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch.optim's per-param format (from any torch variant or fastopt) into the flat
        buffers. A dict that does not fit raises ``ValueError`` and changes nothing."""
        if self._reference:
            super().load_state_dict(state_dict)
            tensor_steps(self.state)
            return
        check_loadable(self, state_dict)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            # Options a checkpoint does not know (an older fastopt, torch.optim) keep the values
            # this optimizer was built with: a master_weights=True run stays one.
            state_dict = dict(state_dict, param_groups=[
                {**{k: v for k, v in group.items() if k != "params"}, **saved}
                for group, saved in zip(self.param_groups, saved_groups)])
        super().load_state_dict(state_dict)
        keep_saved_dtypes(self, state_dict)
        self._buckets = None
        layout.ensure_layout(self)

    def saved_state_names(self, group: dict) -> tuple:
        """(required, known) names of a param's saved state (besides ``step``): the tensors a
        saved param state must hold, and those it may hold (checked when present)."""
        return [], [MASTER]

    def saved_state_shape(self, group: dict, p: Tensor, name: str) -> tuple:
        """The shape state ``name`` of param ``p`` has in a state_dict."""
        rows = self.state_rows(group, name)
        return tuple(p.shape) if rows is None else (rows, *p.shape)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["backend"] = self.backend
        state["flatten_params"] = self.flatten_params
        state["in_backward"] = self._step_groups is not None
        # Which params live in fastopt buffers: their copies (views of one copied buffer after
        # pickling) may be laid out again, unlike views of someone else's buffer.
        state["laid_out"] = [p for group in self.param_groups for p in group["params"]
                             if is_movable(p)]
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        mark_laid_out(state.pop("laid_out", []))
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("flatten_params", True)
        self._step_groups = None
        if self.__dict__.pop("in_backward", False):  # hooks on the new params
            self._step_groups = backward_steps.StepGroups(self)
            for group in self.param_groups:
                self._step_groups.hook_params(group["params"])
        self.__dict__.setdefault("_reference", bool(self.defaults.get("differentiable")))
        self.__dict__.setdefault("_ids", itertools.count())
        self._step_supports_amp_scaling = self.amp_scaling_supported
        if "_buckets" not in state:
            self._buckets = None  # unpickled or deep-copied: lay out again at the next step
            self._outsiders = []
            self._group_ids = []


def precision_defaults(master_weights: bool = False, state_dtype=None,
                       stochastic_rounding: bool = False, rounding_seed: int = 0,
                       max_grad_norm=None, *, rounding: bool = True) -> dict:
    """The mixed-precision entries of a group's defaults (see fastopt.precision and
    ``_clip``): only those that differ from the default, so a run without them has exactly
    torch.optim's param_groups (groups may still set them; absent means default). SGD
    (``rounding=False``: no step count to seed it) takes no stochastic rounding."""
    chosen = {"master_weights": master_weights, "state_dtype": state_dtype,
              "max_grad_norm": max_grad_norm}
    if rounding:
        chosen.update(stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)
    default = {"master_weights": False, "state_dtype": None, "max_grad_norm": None,
               "stochastic_rounding": False, "rounding_seed": 0}
    return {k: v for k, v in chosen.items() if v != default[k]}


_EAGER_STEP = None


def _drop_grads(opt: FlatOptimizer) -> None:
    """``zero_grad()``: every grad set to None, as torch.optim does. A torch-path bucket that
    reads fresh grads where they lie frees its flat grad buffer (autograd hands over new ones);
    one that gathers them keeps it for the next step."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = None
    for bucket in itertools.chain.from_iterable(opt._buckets or []):
        if bucket.backend == "torch" and not bucket.gathers:
            bucket.release_grad_buffer()


def _tracing() -> bool:
    """Is a make_fx / fake-tensor trace recording this step? It then runs torch.optim's own
    per-param algorithm on the traced tensors (the fused step would lay out, and so copy, the
    traced params into a buffer of its own, recording the update on that copy)."""
    modes = torch._C._TorchDispatchModeKey
    return (torch._C._get_dispatch_mode(modes.PROXY) is not None
            or torch._C._get_dispatch_mode(modes.FAKE) is not None)


def _make_eager_step() -> None:
    """``FlatOptimizer._fused_step`` behind ``torch._dynamo.disable``: a function compiled with
    ``torch.compile`` that calls ``optimizer.step()`` (torch's documented recipe) gets a clean
    graph break and runs the eager fused step, instead of inductor tracing torch's fused ops on
    views of flat buffers (which it refuses). Made at the first construction, outside any
    compiled region (importing dynamo takes a second; torch.optim's own step imports it too)."""
    global _EAGER_STEP
    if _EAGER_STEP is None:
        import torch._dynamo

        _EAGER_STEP = torch._dynamo.disable(FlatOptimizer._fused_step)


_plain_state = plain_state  # optimizers pickled by fastopt before fastopt.state name it here


def _same(values: list):
    """The value every entry of ``values`` holds, or ``_MIXED``."""
    if values and values.count(values[0]) == len(values):
        return values[0]
    return _MIXED


def _zero_in_place(p: Tensor) -> None:
    """torch.optim's ``zero_grad(set_to_none=False)`` for one param."""
    if p.grad is None:
        return
    if p.grad.grad_fn is not None:
        p.grad.detach_()
    else:
        p.grad.requires_grad_(False)
    p.grad.zero_()
