"""The shared base: a ``torch.optim.Optimizer`` whose params and state live in flat buffers.

A subclass is torch.optim's constructor (its signature, defaults and checks) plus a
``declaration`` (``fastopt.declaration``): what it keeps and its math. This class knows no
optimizer; from the declaration it

- lays each group's params out in buckets (one per device and dtype, see ``flat.py``), and
  again when they move (``layout.py``); params that do not require grad stay out until they
  get a grad;
- makes the state: one flat buffer per declared buffer and a per-param scalar table
  (``buffers.py``), shown in ``optimizer.state`` as torch.optim shows it (``state.py``);
- steps: checks every grad first (a failed step changes nothing), creates state lazily for
  params that have a grad (as torch does), then updates whole runs of params in one call per
  bucket (``step.py``, ``plan.py``, ``elementwise.py``);
- ``state_dict`` is torch.optim's per-param format (per-param views, never the flat layout);
  ``load_state_dict`` copies into the flat buffers;
- ``zero_grad(set_to_none=False)`` zeroes a bucket's flat grad buffer in one call.

Grads: ``step()`` replaces no grad, and writes into one only as torch's own steps do: after
``scaler.step(optimizer)`` (GradScaler) a torch-path step leaves every grad unscaled in place,
as torch.optim's do (the Triton kernels divide as they read and leave the grads scaled); with
``max_grad_norm`` the clip joins the update's grad divisor, which torch's fused CPU kernels
also write back into the grads they step in place (fp64 grads are clipped in place, as
``clip_grad_norm_`` does). A grad that is a view of the bucket's
flat grad buffer is used in place; ``zero_grad(set_to_none=False)`` re-points plain grads into
that buffer (the same tensor objects, via ``Tensor.set_``), so loops that keep their grads run
flat. Other grads (fresh tensors from autograd after ``zero_grad()``, DDP's bucket views) are
read where they are, or first gathered into the flat grad buffer when that is cheaper
(``fastopt.plan``).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastopt import checkpoint, elementwise, hooks, layout, pickling
from fastopt import step as stepper
from fastopt import in_backward as backward_steps
from fastopt.declaration import BACKEND_OPTIONS, PRECISION_OPTIONS, Declaration
from fastopt.flat import Bucket
from fastopt.plan import StepPlan
from fastopt.precision import REMAINDER, REMAINDERS, has_master, master_name
from fastopt.state import MASTER, make_reference_state
from fastopt.validation import check_bucket_options, check_group_params, check_options

class FlatOptimizer(Optimizer):
    """Base class of fastopt's optimizers (see the module docstring)."""

    declaration = Declaration()

    def __init_subclass__(cls, **kwargs) -> None:
        """The class's signature: torch.optim's arguments, then fastopt's keyword-only options
        that its declaration takes (so ``inspect.signature`` and help() show them)."""
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        own = inspect.signature(cls.__init__)
        kept = [p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD]
        names = {p.name for p in kept}
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
                 for name, default in {**PRECISION_OPTIONS, **BACKEND_OPTIONS}.items()
                 if name not in names and cls._takes(name)]
        cls.__init__.__signature__ = own.replace(parameters=kept + extra)

    @classmethod
    def _takes(cls, option: str) -> bool:
        """Does this optimizer take fastopt's keyword ``option``?"""
        if option in ("backend", "flatten_params"):
            return True
        return option in cls.declaration.options

    def __init__(self, params, defaults: dict, **options) -> None:
        backend, flatten, chosen = check_options(type(self).__name__, self.declaration,
                                                 self._takes, options, defaults)
        # differentiable=True: params stay where they are and torch.optim's own differentiable
        # algorithm runs (per-param state, autograd through the update); nothing is laid out.
        self._reference = bool(defaults.get("differentiable"))
        self.backend = backend
        self.flatten_params = flatten  # False: params stay where they are (state still flat)
        stepper.make_eager_step()
        self._buckets: list | None = []  # per group: list[Bucket]
        self._outsiders: list = []  # per group: params kept out of the layout (no grad yet)
        self._group_ids: list = []  # per group: the ids of group["params"] when laid out
        self._ids = itertools.count()
        self._step_groups = None
        in_backward = options.get("in_backward", False)
        super().__init__(params, {**defaults, **chosen})
        self._step_supports_amp_scaling = self.declaration.grad_scaling
        if self._reference and self.declaration.eager_state:
            make_reference_state(self)
        backward_steps.check_in_backward(in_backward, self.param_groups, defaults)
        if in_backward:
            self._step_groups = backward_steps.attach(self)

    # ------------------------------------------------------------------ from the declaration
    def buffer_names(self, group: dict, bucket: Bucket) -> list:
        """The state buffers a param of ``group`` in ``bucket`` keeps: the declared ones the
        group's options switch on, and the fp32 master where the group keeps one."""
        return self.declaration.buffer_names(group) + self.precision_names(group, bucket)

    def buffer_dtype(self, group: dict, bucket: Bucket, name: str) -> torch.dtype:
        """The dtype state ``name`` is stored in (see fastopt.precision): fp32 for the master
        copy; else ``state_dtype`` if the group sets one, fp32 beside fp32 masters, or the
        param's dtype as torch.optim keeps it."""
        if name == MASTER:
            return torch.float32
        if name == REMAINDER:
            return REMAINDERS[group["master_weights"]]
        if group.get("state_dtype") is not None:
            return group["state_dtype"]
        if has_master(group, bucket.dtype):
            return torch.float32
        return bucket.dtype

    def buffer_rows(self, group: dict, name: str) -> int | None:
        """Rows of a table buffer (one per sample, SAGA's); None for one shaped like a param."""
        return None

    def buffer_shapes(self, bucket: Bucket, name: str) -> list | None:
        """Per param, the shape of packed state ``name`` (None where it keeps none), for a
        buffer declared with a shape rule; None for a buffer shaped like the params."""
        declared = self.declaration.buffer(name)
        if declared is None or declared.shape is None:
            return None
        return [declared.shape_for(shape) for shape in bucket.param_shapes]

    def buffer_init(self, group: dict, name: str) -> float:
        declared = self.declaration.buffer(name)
        return declared.initial(group) if declared is not None else 0.0

    def scalar_device(self, bucket: Bucket) -> torch.device:
        """Where the scalar table lives: with the params for the Triton kernels (which read
        it), or where the optimizer's own update reads it; else on the CPU, as torch.optim
        keeps ``step`` (the torch path reads its values as Python numbers, with no sync)."""
        if bucket.backend == "triton" or self.declaration.update is not None:
            return bucket.device
        return torch.device("cpu")

    def precision_names(self, group: dict, bucket: Bucket) -> list:
        """``["master_param"]`` where the group keeps fp32 masters for this bucket's params
        (``["master_remainder"]`` for their remainders, ``master_weights="remainder"``)."""
        return [master_name(group)] if has_master(group, bucket.dtype) else []

    def precision_options(self, group: dict, bucket: Bucket, plan: StepPlan) -> dict:
        """The keywords an update function takes for masters and stochastic rounding
        (``masters``: fp32 masters, or int16/int8 remainders: see ``fastopt.precision``)."""
        options = {}
        if has_master(group, bucket.dtype) and master_name(group) in bucket.state:
            options["masters"] = plan.pieces(master_name(group))
        if group.get("stochastic_rounding") and bucket.dtype == torch.bfloat16:
            options["rounding_seed"] = int(group.get("rounding_seed", 0))
            options["offsets"] = plan.starts  # computed only where rounding needs them
        return options

    def prepare_bucket(self, group: dict, bucket: Bucket) -> None:
        """Refuse params or a group option this bucket cannot take (clear error, at layout)."""
        check_bucket_options(type(self).__name__, self.declaration, group, bucket)

    def check_step(self, group: dict) -> None:
        """What torch.optim checks of ``group`` only when it steps (Muon's ``ns_steps``),
        checked for every group before any is updated."""

    def reads_by_address(self, group: dict, external: bool = False) -> bool:
        """Can this group's kernels read fresh grads (and, ``external``, params left where
        their owner keeps them) where they lie, through an address table
        (``fastopt.grad_table``)? The declaration says, for every group but Muon's mixed
        kinds, and but Adafactor's external params."""
        return self.declaration.by_address

    def bucket_variant(self, group: dict, p: Tensor):
        """Params with different variants never share a bucket (Adam: 8-bit state or not)."""
        return None

    def run_key(self, bucket: Bucket, i: int):
        """Adjacent params with equal keys can be updated by one call: equal kept scalars (or,
        without scalars, whether they have state yet)."""
        if self.declaration.scalars:
            return bucket.state.ids[i]
        return bucket.state.has_state[i]

    def uniform_key(self, bucket: Bucket):
        """The run key all params of ``bucket`` share, or ``fastopt.step.MIXED``."""
        keys = bucket.state.ids if self.declaration.scalars else bucket.state.has_state
        return keys[0] if keys and keys.count(keys[0]) == len(keys) else stepper.MIXED

    def renumber(self, bucket: Bucket, plan: StepPlan) -> None:
        """After a step: the params of each run share new kept scalars (a new run key)."""
        if plan.whole:
            bucket.state.ids = [next(self._ids)] * len(bucket.params)
            return
        new_ids: dict = {}
        for lo, hi, key in plan.step_runs:
            new_id = new_ids.setdefault(key, next(self._ids))
            bucket.state.ids[lo:hi] = [new_id] * (hi - lo)

    def update(self, group: dict, bucket: Bucket, plan: StepPlan, grad_scale,
               found_inf) -> None:
        """Update the entries of ``plan`` in place (``fastopt.plan``): the declaration's own
        update, or the elementwise one (``fastopt.elementwise``)."""
        own = self.declaration.update
        if own is not None:
            return own(self, group, bucket, plan, grad_scale, found_inf)
        return elementwise.update(self, group, bucket, plan, grad_scale, found_inf)

    def adopt_value(self, bucket: Bucket, i: int, name: str, value: Tensor) -> None:
        """Copy a saved state tensor of param i into the bucket's buffer ``name`` (a sparse one,
        torch SGD's momentum buffer after sparse grads, densified as fastopt keeps it)."""
        view = bucket.state.local_view(name, i)
        if value.layout != torch.strided:
            value = value.to_dense()
        view.copy_(value.to(device=view.device, dtype=view.dtype))

    def saved_state_names(self, group: dict, p: Tensor, entry=None) -> tuple:
        """(required, known) names of param ``p``'s saved state tensors: those a saved param
        state must hold, and those it may hold (checked when present)."""
        declared = self.declaration
        kept = [b.name for b in declared.buffers if b.shape_for(p.shape) is not None]
        return [n for n in declared.buffer_names(group) if n in kept], kept + [MASTER]

    def saved_state_shape(self, group: dict, p: Tensor, name: str, entry=None) -> tuple:
        """The shape state ``name`` of param ``p`` has in a state_dict (``entry``: the param's
        saved state, where its other entries tell the form)."""
        declared = self.declaration.buffer(name)
        if declared is not None and declared.shape is not None:
            return declared.shape_for(p.shape)
        rows = self.buffer_rows(group, name)
        return tuple(p.shape) if rows is None else (rows, *p.shape)

    # ------------------------------------------------------------------ torch.optim's interface
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group_params(type(self).__name__, group, self._takes)
            stepper.check_group_options(self, group)
            stepper.max_grad_norm(self)
            if self._step_groups is not None:
                backward_steps.check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        if not self._reference:
            try:  # what only its layout refuses (check_bucket_options): as if never added
                layout.add_group(self)
            except Exception:
                layout.drop_last_group(self)
                self.param_groups.pop()
                raise
        if self._step_groups is not None:
            self._step_groups.hook_params(group["params"])

    def step(self, *args, **kwargs):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.

        Inside a function compiled with ``torch.compile`` the step is a graph break: the fused
        step runs eagerly, as it would outside (see ``fastopt.step.make_eager_step``).
        """
        if self._step_groups is not None:
            backward_steps.refuse_grad_scaler(self)
        try:
            if type(self).step is FlatOptimizer.step:  # not wrapped by torch (fastopt.hooks)
                return hooks.run_hooked(self, args, kwargs)
            return self._step_body(*args, **kwargs)
        finally:
            if self._step_groups is not None:
                self._step_groups.reset()

    # torch.optim wraps an optimizer class's ``step`` to run the step hooks inside a profiler
    # range unless it is marked ``hooked``; this one runs them itself (``fastopt.hooks``),
    # handing them the arguments as they came (``closure`` by position or by keyword).
    step.hooked = True
    step.__signature__ = hooks.STEP_SIGNATURE

    _step_body = stepper.step_body  # (self, closure=None): the step without its hooks

    def _init_group(self, *args, **kwargs):
        """torch.optim's ``_init_group``, which the reference class's ``step`` calls."""
        return self.declaration.reference._init_group(self, *args, **kwargs)

    def accumulating(self):
        """``in_backward=True``: a context inside which backward passes only accumulate grads
        (gradient accumulation); the next backward outside it updates with their sum."""
        if self._step_groups is None:
            return contextlib.nullcontext()
        return self._step_groups.accumulating()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the grads, as torch.optim does; ``set_to_none=False`` zeroes flat buffers whole.
        Inside a function compiled with ``torch.compile`` it runs eagerly, as torch.optim's
        (``torch._disable_dynamo``): one graph break, nothing traced."""
        if torch.compiler.is_compiling():
            return stepper.eager_zero_grad(self, set_to_none)
        if self._step_groups is not None:
            self._step_groups.reset()
        if set_to_none:
            hooks.profiled(f"Optimizer.zero_grad#{type(self).__name__}.zero_grad",
                           stepper.drop_grads, self)
        elif self._buckets is None or self._reference:
            super().zero_grad(set_to_none)
        else:
            stepper.zero_grads_in_place(self)

    def state_dict(self) -> dict:
        """torch.optim's format; per-param entries are plain dicts of (views of) the state.
        Entries whose key is not a param (written by hooks) pass through as torch keeps them."""
        return checkpoint.save(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch.optim's per-param format (from any torch variant or fastopt) into the flat
        buffers. A dict that does not fit raises ``ValueError`` and changes nothing."""
        checkpoint.load(self, state_dict)

    def __getstate__(self) -> dict:
        return pickling.getstate(self, super().__getstate__())

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(pickling.restore_layout_marks(state))
        pickling.setstate(self, state)

    @classmethod
    def _option_defaults(cls) -> dict:
        """torch.optim's options of this class and their defaults (the keys a group holds)."""
        signature = inspect.signature(cls.__init__)
        return {name: p.default for name, p in signature.parameters.items()
                if name not in ("self", "params") and p.kind != p.VAR_KEYWORD
                and name not in PRECISION_OPTIONS and name not in BACKEND_OPTIONS
                and p.default is not inspect.Parameter.empty}
