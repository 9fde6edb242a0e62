"""fastopt: drop-in fused optimizers for PyTorch.

``fastopt.AdamW`` is ``torch.optim.AdamW`` with the params and state of each group laid out in
flat buffers and updated in one fused pass per buffer: Triton kernels for CUDA tensors, torch's
ops on a flat buffer for CPU tensors. Every optimizer is listed in ``fastopt.registry``.
"""

import os as _os

# An installed fastopt maps kernels/ to fastopt.kernels (pyproject.toml's package-dir). Run from a
# source checkout without installing (e.g. on a bare GPU machine), look for it beside the package.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "kernels", "__init__.py")):
    __path__.append(_checkout)  # noqa: F821 (a package's own __path__)

from fastopt import registry as _registry  # noqa: E402
from fastopt.optimizer import FlatOptimizer  # noqa: E402

globals().update(_registry.classes())

__all__ = [*_registry.classes(), "FlatOptimizer", "memory", "verify"]

_SUBMODULES = ("memory", "verify", "quantization", "precision", "shapes", "registry")


def __getattr__(name):
    """``fastopt.memory`` and ``fastopt.verify`` (a callable module) without importing them up
    front, so ``python -m fastopt.verify`` / ``-m fastopt.memory`` run them cleanly."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"fastopt.{name}")
    raise AttributeError(f"module 'fastopt' has no attribute {name!r}")


__version__ = "0.1.0"
