"""Pickling and ``copy.deepcopy`` of a fastopt optimizer (``FlatOptimizer.__getstate__`` and
``__setstate__``).

torch.optim pickles ``defaults``, ``state`` and ``param_groups``. fastopt adds its own options
(``backend``, ``flatten_params``, ``in_backward``) and which params live in its flat buffers:
their copies (views of one copied buffer) may be laid out again, unlike views of a buffer
someone else owns. The copy has no layout and no hooks of its own yet: it lays its params out
at its next step, and ``in_backward`` hooks its (copied) params at once. A pickle from an older
fastopt gets the defaults of the options it lacks.
"""

from __future__ import annotations

import itertools

from fastopt import in_backward
from fastopt.checkpoint import loaded_defaults
from fastopt.flat import is_movable, mark_laid_out


def getstate(opt, state: dict) -> dict:
    """``state`` (torch.optim's ``__getstate__``) with fastopt's own options and its laid-out
    params."""
    state["backend"] = opt.backend
    state["flatten_params"] = opt.flatten_params
    state["in_backward"] = opt._step_groups is not None
    state["laid_out"] = [p for group in opt.param_groups for p in group["params"]
                         if is_movable(p)]
    return state


def restore_layout_marks(state: dict) -> dict:
    """``state`` less its ``laid_out`` params, which are marked as fastopt's again (before
    torch.optim's ``__setstate__`` takes the rest)."""
    state = dict(state)
    mark_laid_out(state.pop("laid_out", []))
    return state


def setstate(opt, state: dict) -> None:
    """After torch.optim's ``__setstate__``: fastopt's options (their defaults where ``state``
    lacks them, in ``opt`` and in each group; torch's options as the reference's
    ``__setstate__`` gives them, ``checkpoint.loaded_defaults``), the ``in_backward`` hooks,
    and no layout until
    the next step."""
    opt.__dict__.setdefault("backend", "auto")
    opt.__dict__.setdefault("flatten_params", True)
    defaults = {**opt._option_defaults(), **loaded_defaults(opt.declaration.reference)}
    for group in opt.param_groups:
        for key, value in defaults.items():
            group.setdefault(key, value)
    if "in_backward" in opt.__dict__ or "_step_groups" not in opt.__dict__:  # a copy
        opt._step_groups = in_backward.attach(opt) if opt.__dict__.pop("in_backward", False) \
            else None
    # else load_state_dict's __setstate__ on a live optimizer: its in_backward hooks stay
    opt.__dict__.setdefault("_reference", bool(opt.defaults.get("differentiable")))
    opt.__dict__.setdefault("_ids", itertools.count())
    opt._step_supports_amp_scaling = opt.declaration.grad_scaling
    if "_buckets" not in state:
        opt._buckets = None  # unpickled or deep-copied: lay out again at the next step
        opt._outsiders = []
        opt._group_ids = []
