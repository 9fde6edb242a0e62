"""The one place that picks an implementation: Triton kernels or the pure-torch path.

``backend`` is ``"auto"``, ``"triton"`` or ``"torch"``; the environment variable
``FASTOPT_BACKEND`` overrides what the constructor was given.

- ``auto``: Triton kernels for CUDA tensors when Triton imports, the torch path otherwise.
- ``triton``: the kernels; on CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's
  interpreter, which is how CI runs the kernels without a GPU). The kernels compute in fp32, so
  fp64 params take the torch path (torch's fused ops support fp64 on CPU and CUDA).
- ``torch``: the pure-torch path on any device.

Params fastopt may not lay out (DTensors, views into another owner's buffer: see ``flat.py``)
are separate tensors. ``auto`` gives them the kernels when they can be updated by address in one
launch (contiguous, 16-byte aligned: ``fastopt.grad_table``), else the torch path, whose fused
ops take a whole list of tensors in one multi-tensor launch (the caller says which:
``external``).

Both implementations of an update share one signature (see ``torch_path.py``).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (expected one of 'auto', 'triton', 'torch')")


def requested_backend(backend: str) -> str:
    """The constructor's choice, unless ``FASTOPT_BACKEND`` says otherwise."""
    env = os.environ.get("FASTOPT_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(
                f"Invalid FASTOPT_BACKEND: {env!r} (expected one of 'auto', 'triton', 'torch')"
            )
        return env
    check_backend(backend)
    return backend


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
            external: bool = False) -> str:
    """The implementation that will update ``dtype`` tensors on ``device`` (``external``: params
    left where their owner keeps them that the kernels cannot update by address).

    fp64 buckets always take the torch path: the kernels compute in fp32.
    """
    backend = requested_backend(backend)
    if backend == "torch" or dtype == torch.float64:
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' needs Triton, which could not be imported "
                "(pip install 'fastopt[gpu]'), or use backend='torch'"
            )
        if device.type != "cuda" and not interpreter_on():
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors; params on {device} need "
                "TRITON_INTERPRET=1 (Triton's CPU interpreter) or backend='torch'"
            )
        return "triton"
    return "triton" if device.type == "cuda" and not external and triton_available() else "torch"


@functools.lru_cache(maxsize=None)
def update_fn(name: str, backend: str):
    """The ``<name>_update`` function of ``backend`` (``"adam"``, ``"sgd"`` or ``"saga"``)."""
    return implementation(f"{name}_update", backend)


@functools.lru_cache(maxsize=None)
def implementation(name: str, backend: str):
    """Function ``name`` of ``backend``: ``fastopt.kernels`` or ``fastopt.torch_path``."""
    if backend == "triton":
        from fastopt import kernels

        return getattr(kernels, name)
    from fastopt import torch_path

    return getattr(torch_path, name)
