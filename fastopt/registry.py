"""Every optimizer fastopt has, by name: one line per optimizer module.

Each module of ``fastopt/optimizers/`` holds one optimizer (or a family: Adam, AdamW and
AdamW8bit) and lists its classes in ``__all__``; everything that loops over fastopt's
optimizers (``fastopt.__init__``, ``fastopt.memory``, the benchmarks, the kernel report, the
tests) asks this registry.
"""

from __future__ import annotations

import importlib

MODULES = (
    "sgd",
    "adam",
    "saga",
    "lion",
    "nadam",
    "radam",
    "adamax",
    "adagrad",
    "rmsprop",
    "adadelta",
    "asgd",
    "rprop",
    "adafactor",
    "muon",
)


def classes() -> dict:
    """``{name: class}`` of every registered optimizer, in registry order."""
    out = {}
    for module in MODULES:
        loaded = importlib.import_module(f"fastopt.optimizers.{module}")
        for name in loaded.__all__:
            out[name] = getattr(loaded, name)
    return out


def get(name) -> type:
    """The optimizer class called ``name`` (any case), or the class itself."""
    known = classes()
    if isinstance(name, type) and name in known.values():
        return name
    if isinstance(name, str):
        for key, cls in known.items():
            if key.lower() == name.lower():
                return cls
        raise ValueError(f"Unknown optimizer {name!r} (expected one of {sorted(known)})")
    raise TypeError(f"optimizer must be a fastopt optimizer class or name, got {name!r}")
