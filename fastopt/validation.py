"""Hyperparameter checks, in torch.optim's words.

Every check raises the exception type and message that ``torch.optim`` raises for the same input,
so code that catches or matches them keeps working. The optimizers call these before
``Optimizer.__init__`` and nothing is allocated until they pass.
"""

from __future__ import annotations

import functools
import inspect
import operator

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor

from fastopt import dispatch
from fastopt.declaration import BACKEND_OPTIONS, PRECISION_OPTIONS
from fastopt.flat import is_dtensor
from fastopt.precision import REMAINDERS
from fastopt.quantization import FORMATS


def check_lr(lr, nan_ok: bool = False) -> None:
    """torch.optim's learning-rate check; ``nan_ok``: SGD's form, ``lr < 0.0``, which lets a
    nan through (the others' ``not 0.0 <= lr`` refuses it)."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if (lr < 0.0) if nan_ok else not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_adam(lr, betas, eps, weight_decay, foreach=None, capturable=False) -> tuple:
    """Validate Adam's hyperparameters; return betas as torch stores them (0-d tensors or floats).
    Tensor lr and betas need ``capturable`` when ``foreach=True`` (torch's foreach ops take
    them as Python scalars)."""
    if isinstance(lr, Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    check_lr(lr)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    both_floats = isinstance(betas[0], float) and isinstance(betas[1], float)
    both_tensors = isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor)
    if not (both_floats or both_tensors):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if foreach and not capturable:
                raise ValueError(f"betas[{index}] as a Tensor is not supported for "
                                 "capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")
    return tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas)


def check_sgd(lr, momentum, dampening, weight_decay, nesterov) -> None:
    check_lr(lr, nan_ok=True)
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def check_precision(master_weights, state_dtype, stochastic_rounding, rounding_seed,
                    max_grad_norm, *, quantized_ok: bool = False, amsgrad: bool = False) -> None:
    """The mixed-precision options (see fastopt.precision); ``quantized_ok`` where blockwise
    quantized state (``"int8"``, ``"int4"``: ``fastopt.quantization``) exists (Adam, AdamW)."""
    if not isinstance(master_weights, bool) and master_weights not in REMAINDERS:
        raise ValueError(f"Invalid master_weights: {master_weights!r} (expected True, False, "
                         "'remainder' or 'remainder8')")
    if isinstance(state_dtype, str) and state_dtype in FORMATS:
        bits = FORMATS[state_dtype].bits
        if not quantized_ok:
            raise ValueError(f"state_dtype={state_dtype!r} (blockwise {bits}-bit moments) is "
                             "available for Adam and AdamW; use torch.bfloat16 here")
        if amsgrad:
            raise ValueError(f"amsgrad=True keeps a running max of exp_avg_sq that {bits}-bit "
                             "state does not hold; use state_dtype=torch.bfloat16 with amsgrad")
    elif state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (expected None, torch.float32, "
                         "torch.bfloat16, torch.float16"
                         + (", 'int8' or 'int4')" if quantized_ok else ")"))
    if stochastic_rounding and master_weights:
        raise ValueError("stochastic_rounding=True rounds the params themselves; with "
                         "master_weights=True the fp32 master copy already keeps every bit of "
                         "the update: use one or the other")
    if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int) \
            or not 0 <= rounding_seed < 2**32:
        raise ValueError(f"Invalid rounding_seed: {rounding_seed!r} (an int in [0, 2**32))")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                          and not isinstance(max_grad_norm, bool)
                                          and max_grad_norm > 0.0):
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (a positive number or None)")


def check_saga(lr, num_samples, weight_decay) -> None:
    check_lr(lr)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"Invalid num_samples: {num_samples!r} (a positive int: the number of "
                         "training samples, one gradient-table row each)")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_sample_index(index, num_samples: int) -> int:
    """SAGA's ``step(index=i)``: an int (or 1-element tensor) in ``[0, num_samples)``."""
    if index is None:
        raise TypeError("SAGA.step() needs index=i, the training sample whose loss was just "
                        "backpropagated")
    if isinstance(index, Tensor):
        if index.numel() != 1 or index.is_floating_point():
            raise TypeError(f"index must be an int or a 1-element integer tensor, got {index}")
        index = int(index)
    if isinstance(index, bool):
        raise TypeError("index must be an int, got bool")
    try:
        index = operator.index(index)  # ints, numpy integers
    except TypeError:
        raise TypeError(f"index must be an int, got {type(index).__name__}") from None
    if not 0 <= index < num_samples:
        raise IndexError(f"index {index} is out of range for num_samples={num_samples}")
    return index


@functools.cache
def _step_keys(cls) -> tuple:
    """(key, default) for each hyperparameter ``cls``'s step reads from a group (its
    declaration's ``group_keys``, and ``maximize``): None is a value where the default has
    it (Adafactor's ``eps``: ``(None, 1e-3)``)."""
    defaults = cls._option_defaults()
    keys = cls.declaration.group_keys + (("maximize",) if "maximize" in defaults else ())
    return tuple((key, defaults.get(key, 0.0)) for key in keys)


def check_group_values(opt, group: dict) -> dict | None:
    """The hyperparameters a step reads from ``group``, checked in every group before any is
    updated, so that one set to something unusable since construction (deleted, None, a
    tensor of several elements, a pair that is not two) fails the step before anything is
    written: a missing key raises KeyError, as torch.optim's step does; any other the error
    of reading it as the update does. Tensors are checked by size only (reading one on a GPU
    would sync). A number of another kind, which torch's for-loop reads as a number (numpy's
    0-d array), is set as a Python float, which fused ops take, for the step: the values it
    replaced are returned (None if none), for the step to put back when it is done."""
    originals = None
    for key, default in _step_keys(type(opt)):
        value = group[key]
        kind = type(value)
        if kind is float or kind is bool:  # the common cases, read as they are
            continue
        if isinstance(value, (tuple, list)):  # betas, etas, step_sizes, Adafactor's eps
            first, second = value
            if type(first) is float and type(second) is float:
                continue
            pair = default if isinstance(default, tuple) else (0.0, 0.0)
            numbers = (_number(first, pair[0]), _number(second, pair[1]))
            if numbers[0] is not first or numbers[1] is not second:
                originals = {**(originals or {}), key: value}
                group[key] = type(value)(numbers)
        else:
            number = _number(value, default)
            if number is not value:
                originals = {**(originals or {}), key: value}
                group[key] = number
    return originals


def _number(value, default):
    """``value`` as a step reads it: a tensor of one element, an int or float, or None where
    the default is None, as it is; another number as a Python float; else the error of
    reading it as a number."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise RuntimeError(f"a Tensor with {value.numel()} elements cannot be converted "
                               "to Scalar")
        return value
    if isinstance(value, (int, float)) or (value is None and default is None):
        return value
    return float(value)


def check_flags(foreach, fused, differentiable) -> None:
    """torch.optim's conflicting-flag errors."""
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_grad(param: Tensor, grad: Tensor, where: str, sparse_error: str | None) -> None:
    """A grad must match its param in shape, dtype and device; a sparse grad raises
    ``sparse_error`` (torch.optim's message) unless that is None."""
    if grad.is_sparse and sparse_error is not None:
        raise RuntimeError(sparse_error)
    if grad.shape != param.shape:
        raise RuntimeError(
            f"{where}: gradient has shape {tuple(grad.shape)} but the parameter has shape "
            f"{tuple(param.shape)}"
        )
    if grad.dtype != param.dtype:
        raise RuntimeError(
            f"{where}: gradient has dtype {grad.dtype} but the parameter has dtype {param.dtype}"
        )
    if grad.device != param.device:
        raise RuntimeError(
            f"{where}: gradient is on {grad.device} but the parameter is on {param.device}"
        )


def check_fused_param(param: Tensor, devices: list) -> None:
    """torch.optim's check when a param first gets state in a ``fused=True`` group: ``devices``
    are those ``fused_devices`` gives for the optimizer's torch class."""
    if not (param.device.type in devices and torch.is_floating_point(param)):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {devices} but {param.dtype} and {param.device.type}"
        )


def kept_while_frozen(declaration, param: Tensor) -> bool:
    """Is frozen ``param`` (no ``requires_grad``, no grad) laid out with state all the same:
    where the optimizer makes every param's state at construction (torch's Adagrad) and a flat
    buffer can hold it (strided, floating or complex)?"""
    return declaration.eager_state and param.layout == torch.strided \
        and (param.is_floating_point() or param.is_complex())


def check_param(param: Tensor) -> None:
    """Params a flat buffer can hold: strided floating or complex tensors. Any other is taken,
    as torch.optim takes it, while nothing can step it (no ``requires_grad``, no grad: a frozen
    integer weight of a quantized model); laid out it never is (``fastopt.layout``)."""
    if not param.requires_grad and param.grad is None:
        return
    if param.layout != torch.strided:
        raise ValueError(f"fastopt supports only strided (dense) parameters, got {param.layout}")
    if not (param.is_floating_point() or param.is_complex()):
        raise ValueError(f"fastopt can only optimize floating-point or complex tensors, got {param.dtype}")


@functools.cache
def fused_devices(reference: type | None) -> list:
    """The device types on which torch.optim's class ``reference`` takes ``fused=True``: torch's
    list of devices with fused kernels, less CUDA where the installed torch's class checks
    its params with ``cuda_unsupported=True`` (Adagrad up to torch 2.11 fused on CPU only)."""
    get = getattr(_torch_optimizer, "_get_fused_kernels_supported_devices", None)
    devices = list(get()) if get is not None else ["mps", "cuda", "xpu", "hpu", "cpu", "mtia",
                                                   "privateuseone"]
    try:
        source = inspect.getsource(reference) if reference is not None else ""
    except (OSError, TypeError):  # no source shipped: torch's list as it is
        source = ""
    if "cuda_unsupported=True" in source and "cuda" in devices:
        devices.remove("cuda")
    return devices


def check_with(reference: type, options: dict) -> None:
    """Raise what torch.optim's class ``reference`` raises for these options, with its exact
    exception type and message (whatever torch version is installed): the class is built
    once on a one-element tensor, before fastopt allocates anything."""
    reference([torch.zeros(1, requires_grad=True)], **options)


def check_options(name: str, declaration, takes, options: dict, defaults: dict) -> tuple:
    """fastopt's keyword ``options`` given to optimizer ``name`` (``takes(option)``: does it
    take that one?), before anything is built: ``(backend, flatten_params, chosen)``, where
    ``chosen`` are the precision options set to other than their defaults."""
    for option in options:
        if option not in PRECISION_OPTIONS and option not in BACKEND_OPTIONS \
                or not takes(option):
            raise TypeError(f"{name}.__init__() got an unexpected keyword argument '{option}'")
    backend = options.get("backend", "auto")
    dispatch.check_backend(backend)
    flatten = options.get("flatten_params", True)
    if not isinstance(flatten, bool):
        raise TypeError(f"flatten_params must be a bool, got {flatten!r}")
    precision = {k: options.get(k, v) for k, v in PRECISION_OPTIONS.items()}
    check_precision(**precision, quantized_ok="int8" in declaration.options,
                    amsgrad=defaults.get("amsgrad", False))
    chosen = {k: v for k, v in precision.items() if v != PRECISION_OPTIONS[k]}
    if defaults.get("differentiable"):
        if chosen:
            raise ValueError("differentiable=True runs torch.optim's own algorithm; it does not "
                             "take " + ", ".join(sorted(chosen)))
        if not declaration.differentiable:
            raise ValueError(f"{name} has no differentiable algorithm in torch.optim; "
                             "use differentiable=False")
    return backend, flatten, chosen


def check_group_params(name: str, group: dict, takes) -> None:
    """A param group added to optimizer ``name``: params a flat buffer can hold, and only
    the fastopt options it takes (``takes(option)``)."""
    for p in group["params"]:
        check_param(p)
    check_option_names(name, group, takes)


def check_option_names(name: str, group: dict, takes) -> None:
    """Only the fastopt options optimizer ``name`` takes (``takes(option)``) in ``group``."""
    unsupported = sorted(k for k in set(group) & set(PRECISION_OPTIONS) if not takes(k))
    if unsupported:
        raise ValueError(f"{name} does not take {', '.join(unsupported)} (param group options)")


# The options that decide how a group's state is laid out (its buffers' dtypes and forms):
# a group whose values changed since it was laid out is laid out again (``fastopt.step``);
# then the rest of what ``check_precision`` reads.
LAYOUT_OPTIONS = ("master_weights", "state_dtype", "stochastic_rounding")
CHECKED_OPTIONS = LAYOUT_OPTIONS + ("rounding_seed", "max_grad_norm", "amsgrad")


def checked_options(group: dict) -> tuple:
    """``group``'s values of ``CHECKED_OPTIONS`` (None where absent): what its buckets were
    laid out, and its options last checked, with."""
    return tuple(map(group.get, CHECKED_OPTIONS))


def check_bucket_options(name: str, declaration, group: dict, bucket) -> None:
    """Params or a group option ``bucket`` (params of one device and dtype) cannot take,
    refused when it is laid out."""
    if declaration.whole_params and bucket.external \
            and any(is_dtensor(p) for p in bucket.params):
        raise ValueError(
            f"{name} reduces over whole params (per-param norms, row and column statistics); "
            "DTensor params (FSDP2, tensor parallel) hold only a shard of each")
    state_dtype = group.get("state_dtype")
    if state_dtype is not None and state_dtype != bucket.dtype \
            and any(p.is_complex() for p in bucket.params):
        raise ValueError(
            f"state_dtype={state_dtype!r} applies to real params; complex params keep their "
            "state in their own dtype (put them in a param group without state_dtype)")
    if declaration.math_in_param_dtype and isinstance(state_dtype, torch.dtype) \
            and state_dtype.itemsize > bucket.dtype.itemsize and not bucket.dtype.is_complex \
            and not group.get("master_weights"):
        raise ValueError(
            f"{name} computes in its params' dtype ({bucket.dtype}) without master_weights, so "
            f"state_dtype={state_dtype} would only hold values rounded to it; use "
            "master_weights=True for fp32 math, or a state_dtype no wider than the params'")
    if group.get("master_weights") in REMAINDERS and bucket.dtype == torch.float16:
        raise ValueError(
            f"master_weights={group['master_weights']!r} keeps the bits a bfloat16 param lacks "
            "of its fp32 master; for float16 params use master_weights=True")
    if group.get("stochastic_rounding") and bucket.dtype == torch.float16:
        raise ValueError(
            "stochastic_rounding=True supports bfloat16 params (fp32 bits truncated to 16); "
            "for float16 params use master_weights=True")
