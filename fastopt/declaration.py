"""What an optimizer keeps and which of fastopt's options apply to it: its declaration.

Every fastopt optimizer is a class (torch.optim's signature, defaults and errors) with one
:class:`Declaration`. The engine (``fastopt.optimizer``, the layout, ``fastopt.memory``, the
kernel report, the benchmarks and the tests) reads everything else from it:

- ``buffers``: the state tensors shaped like their param (``exp_avg``, ``square_avg``...), each
  one flat buffer per bucket, with its initial value (a number, or the group option holding it,
  as Rprop's ``step_size`` from ``lr``) and, for optional ones, the group option that
  switches it on (``amsgrad``, ``centered``); a buffer with a ``shape`` rule is shaped by it
  instead (Adafactor's factored ``row_var`` and ``col_var``), its pieces packed back to back
  in aligned slots, and kept only by the params the rule gives a shape;
- ``scalars``: per-param scalars kept in the state (``step``, NAdam's ``mu_product``, ASGD's
  ``eta`` and ``mu``), the first columns of one small table per bucket (a scalar with a
  ``when`` is kept only by the groups it holds for: Muon's AdamW groups count steps, its Muon
  groups keep none); ``derived`` names the
  values the scalar math computes from them each step (bias corrections, step sizes), the
  columns after them, which the kernels read;
- the math, written once per backend with one signature: ``math`` (the torch twin, on single
  flat tensors, in ``fastopt/optimizers/<name>.py``) and ``kernel`` (the per-element Triton
  function ``fastopt.kernels.<kernel>``), plus ``scalar_math`` (written once for both: Python
  floats on the torch path, the table's columns on the GPU, see ``Columns``) and ``hyper`` (the
  group's options as the kernel's scalars and flags). An optimizer whose step is not elementwise (Adam's fused ops, SAGA's table) gives its
  own ``update`` instead.

``options`` lists fastopt's own keywords that mean something for the optimizer; any other is
refused at construction with a clear error.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass, field
from typing import Callable

import torch

# fastopt's keyword-only options, beyond torch.optim's signature, and their defaults.
BACKEND_OPTIONS = {"backend": "auto", "flatten_params": True, "in_backward": False}
PRECISION_OPTIONS = {"master_weights": False, "state_dtype": None,
                     "stochastic_rounding": False, "rounding_seed": 0, "max_grad_norm": None}
# The variant bits of an elementwise optimizer's FLAGS (its kernel module reads the same bits
# from kernels/ops.py; tests/test_registry.py holds the two to each other).
WEIGHT_DECAY, DECOUPLED, MOMENTUM, CENTERED, NESTEROV = 1, 2, 4, 8, 16
# The options every elementwise optimizer takes (stochastic rounding needs a step count).
ELEMENTWISE = frozenset({"master_weights", "state_dtype", "max_grad_norm", "in_backward",
                         "stochastic_rounding", "rounding_seed"})


@dataclass(frozen=True)
class Buffer:
    """A state tensor of its param's shape, held in one flat buffer per bucket."""

    name: str
    init: float | str = 0.0  # initial value, or the name of the group option holding it
    when: Callable | None = None  # group -> present? (None: always)
    # param shape -> this state's shape for that param, or None where the param keeps none
    # (None: the param's own shape, for every param)
    shape: Callable | None = None

    def present(self, group: dict) -> bool:
        return self.when is None or bool(self.when(group))

    def shape_for(self, param_shape: tuple) -> tuple | None:
        """The shape this state has for a param of ``param_shape`` (None: it keeps none)."""
        return tuple(param_shape) if self.shape is None else self.shape(tuple(param_shape))

    def initial(self, group: dict) -> float:
        value = group[self.init] if isinstance(self.init, str) else self.init
        return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


@dataclass(frozen=True)
class Scalar:
    """A per-param scalar kept in the state (a 0-d float32 tensor, as torch keeps ``step``)."""

    name: str
    init: float | str = 0.0  # initial value, or the name of the group option holding it
    when: Callable | None = None  # group -> kept? (None: always; Muon's AdamW groups count steps)

    def present(self, group: dict) -> bool:
        return self.when is None or bool(self.when(group))

    def initial(self, group: dict) -> float:
        value = group[self.init] if isinstance(self.init, str) else self.init
        return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


@dataclass(frozen=True)
class Declaration:
    """See the module docstring."""

    buffers: tuple = ()
    scalars: tuple = ()
    derived: tuple = ()  # names of the values scalar_math derives each step
    scalar_math: Callable | None = None  # (Columns, group, ops): advance scalars, set derived
    math: Callable | None = None  # torch twin: (param, grad, buffers: list, values, group)
    # torch's own fused CPU op for the same math, if it has one (Adagrad's), run on a whole
    # plan at once where nothing is widened: (params, grads, buffers: a list of entries per
    # buffer, steps: each entry's 0-d step count, lr, hyper, maximize, grad_scale)
    fused: Callable | None = None
    kernel: str | None = None  # the per-element function in fastopt.kernels
    hyper: Callable | None = None  # (opt, group) -> (hyperparameters, FLAGS int) for the kernel
    update: Callable | None = None  # (optimizer, group, bucket, plan, grad_scale, found_inf)
    options: frozenset = ELEMENTWISE
    # torch.optim's error for a sparse grad ({name}: the optimizer's), or None: sparse grads are
    # densified (SGD, Adagrad take them)
    sparse_error: str | None = "{name} does not support sparse gradients"
    # torch.optim's error for a sparse grad in a group with a weight decay, or None: taken
    sparse_weight_decay_error: str | None = None
    eager_state: bool = False  # state made for every param at construction (torch's Adagrad)
    complex: bool = True  # complex params (their real views); else refused with a clear error
    error_name: str = ""  # how torch.optim's messages name it (Adam for AdamW); "" = class name
    grad_scaling: bool = True  # takes GradScaler's grad_scale / found_inf (its fused path)
    reference: type | None = None  # the torch.optim class (differentiable=True, verify, checks)
    group_keys: tuple = ("lr",)  # options every saved param group has (checkpoint check)
    cost: str = "elementwise"  # which row of fastopt.plan.CPU_COSTS prices its step
    # the row that prices a CPU step its ``fused`` op serves: one torch fused kernel per entry,
    # as torch's Adam (a chain of ops per entry costs far more: gathering pays sooner)
    fused_cost: str = "adam"
    by_address: bool = True  # its kernels read fresh grads through an address table
    differentiable: bool = True  # differentiable=True runs ``reference``'s own algorithm
    whole_params: bool = False  # its math reduces over whole params: DTensor shards refused
    # its math runs in the params' (or fp32 masters') dtype, whatever ``state_dtype`` says: a
    # state_dtype wider than the params' is refused (it would only hold values rounded to them)
    math_in_param_dtype: bool = False
    # the temporaries its own update allocates for one bucket, in bytes, for fastopt.memory:
    # (options, bucket: a dict of sizes, shapes, elements..., dtype, device type) -> bytes, or
    # None where fastopt's rules for its ``cost`` apply (Muon's AdamW groups)
    scratch: Callable | None = None
    extra: dict = field(default_factory=dict)  # anything an optimizer's own update needs

    def cpu_cost(self, fused_serves: bool) -> str:
        """The row of ``fastopt.plan.CPU_COSTS`` that prices a step: ``fused_cost`` where
        its torch ``fused`` op serves the bucket, else ``cost``."""
        return self.fused_cost if self.fused is not None and fused_serves else self.cost

    def buffer_names(self, group: dict) -> list:
        """The names of the buffers a param of ``group`` keeps, in declared order (asked on
        every step: each buffer's condition read straight from ``_conditions``)."""
        return [name for name, when in self._conditions if when is None or when(group)]

    @functools.cached_property
    def _conditions(self) -> tuple:
        """(name, when) of each declared buffer."""
        return tuple((b.name, b.when) for b in self.buffers)

    def buffer(self, name: str) -> Buffer | None:
        return next((b for b in self.buffers if b.name == name), None)

    def scalars_in(self, group: dict) -> tuple:
        """The scalars a param of ``group`` keeps (every declared one whose ``when`` holds)."""
        return tuple(s for s in self.scalars if s.present(group))

    def table_width(self, group: dict) -> int:
        """Columns of the scalar table of a bucket of ``group`` (0: it keeps none)."""
        kept = len(self.scalars_in(group))
        return kept + len(self.derived) if kept else 0

    @functools.cached_property
    def scalar_names(self) -> tuple:
        return tuple(s.name for s in self.scalars)

    @functools.cached_property
    def counts_steps(self) -> bool:
        return "step" in self.scalar_names

    @functools.cached_property
    def step_column(self) -> int:
        """The scalar table's column of ``step`` (0 when none is kept)."""
        return self.scalar_names.index("step") if self.counts_steps else 0


class Columns:
    """A run's scalars as attributes, for the declaration's ``scalar_math(s, group, ops)``: the
    kept scalars (``s.step``...), which it updates, and the derived values it sets.

    The same function runs on two kinds of values, through ``ops``: Python floats on the torch
    path (a run's first row, every row of a run holding the same; rounded to float32 where torch
    keeps a float32 tensor, so the numbers are torch.optim's), and float32 columns of the table
    on the GPU for the Triton path (``TensorOps``, no host sync). Write it with arithmetic
    operators and ``ops``: ``ops.double(x)`` (torch reads a scalar tensor as a Python float),
    ``ops.float32(x)`` (stored as a float32 tensor), ``ops.where(c, a, b)``, ``ops.maximum(a, b)``,
    ``ops.sqrt(x)``."""

    def __init__(self, kept: dict) -> None:
        self.__dict__.update(kept)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class FloatOps:
    """``Columns`` ops on Python floats (the torch path)."""

    @staticmethod
    def double(x):
        return float(x)

    @staticmethod
    def float32(x) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]

    @staticmethod
    def where(condition, a, b):
        return a if condition else b

    @staticmethod
    def maximum(a, b):
        return max(a, b)

    @staticmethod
    def sqrt(x) -> float:
        return math.sqrt(x)


class TensorOps:
    """``Columns`` ops on tensors: the scalar table's columns, on the GPU (the Triton path)."""

    @staticmethod
    def double(x):
        return x.double()

    @staticmethod
    def float32(x):
        return x.float() if isinstance(x, torch.Tensor) else FloatOps.float32(x)

    @staticmethod
    def where(condition, a, b):
        return torch.where(condition, a, b)

    @staticmethod
    def maximum(a, b):
        return torch.clamp(a, min=b) if isinstance(a, torch.Tensor) else max(a, b)

    @staticmethod
    def sqrt(x):
        return x.sqrt()


def decay_factor(lr, weight_decay: float) -> float:
    """``1 - lr * weight_decay`` in double, as torch.optim computes it from a float lr (rounded
    to the params' dtype where it multiplies them). A device tensor ``lr`` (the Triton path) is
    left to the kernel, which computes the factor itself (``kernels/ops.py``)."""
    if isinstance(lr, torch.Tensor):
        return 1.0
    return 1.0 - lr * weight_decay
