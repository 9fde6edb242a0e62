"""Checkpoints: ``state_dict`` out and ``load_state_dict`` in, in torch.optim's per-param format.

Out (``save``): torch's own dict, each param's entry a plain dict of (views of) its state, the
fp32 master or remainder as a plain fp32 ``master_param`` where the group asks
(``fastopt.state.saved_masters``); post-hooks run on it as torch runs them.

In (``load``): torch.optim's ``load_state_dict`` checks group and param counts and state
shapes; a state_dict of another optimizer, or one with a moment missing or replaced by a
non-tensor, loads and fails later (or silently starts from zero moments). fastopt refuses
those, with ``ValueError`` and nothing changed (``check_loadable``), and keeps what torch
keeps (counters, notes under other keys). Pre-hooks run first (they may mend the dict),
post-hooks last (what they change is what steps); a dict only the layout refuses leaves the
optimizer as it was.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastopt import hooks, layout
from fastopt.state import Entry, keep_saved_dtypes, saved_masters
from fastopt.step import check_group_options


@functools.cache
def loaded_defaults(reference: type | None) -> dict:
    """The options ``reference``'s (a torch.optim class's) ``__setstate__`` gives a param group
    that lacks them: what a group of an older checkpoint takes for them (SGD's ``fused``:
    False, where its signature says None). Read off that ``__setstate__`` run on a bare
    group."""
    if reference is None or "__setstate__" not in vars(reference):
        return {}
    probe = reference.__new__(reference)
    reference.__setstate__(probe, {"state": {}, "param_groups": [{"params": []}],
                                   "defaults": {}})
    return {k: v for k, v in probe.param_groups[0].items() if k != "params"}


def check_loadable(optimizer, state_dict: dict) -> None:
    """Refuse, before anything changes, a state_dict that does not fit ``optimizer`` (a
    FlatOptimizer, whose class says what its checkpoints hold): a param group without one of
    its declaration's ``group_keys`` (another optimizer's checkpoint; an older one may lack
    those ``loaded_defaults`` gives), or a param state that
    ``check_param_state`` refuses. Group and param counts are left to torch's own checks."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        return  # torch's load_state_dict raises its own ValueError
    name_of = type(optimizer).__name__
    for index, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            return
        older = loaded_defaults(optimizer.declaration.reference)
        missing = [k for k in optimizer.declaration.group_keys
                   if k not in saved and k not in older]
        if missing:
            raise ValueError(
                f"loaded state dict's param group {index} has no {', '.join(map(repr, missing))}"
                f": it is not a state_dict of {name_of} (its group keys: "
                f"{sorted(k for k in saved if k != 'params')})")
        merged = {**group, **saved, "params": group["params"]}
        for p, key in zip(group["params"], saved["params"]):
            entry = state_dict["state"].get(key)
            if entry:
                check_param_state(optimizer, merged, p, entry,
                                  f"parameter {key} (param group {index})")


def check_param_state(optimizer, group: dict, p: Tensor, entry, where: str) -> None:
    """One param's saved state: a dict holding each declared scalar (``step``...) as a number
    or 1-element tensor, every required state tensor, and known entries as tensors of
    the expected shape. Entries the class does not know (a counter another library wrote) are
    kept as torch keeps them."""
    name_of = type(optimizer).__name__
    if not isinstance(entry, dict):
        raise ValueError(f"loaded state dict has a {type(entry).__name__} as the state of "
                         f"{where}; expected a dict")
    required, known = optimizer.saved_state_names(group, p, entry)
    scalars = [s.name for s in optimizer.declaration.scalars_in(group)]
    absent = [n for n in scalars + list(required) if n not in entry]
    if absent:
        raise ValueError(
            f"loaded state dict has no {', '.join(map(repr, absent))} in the state of {where}: "
            f"it is not a state_dict of {name_of} (its state keys: {sorted(entry)})")
    for name in scalars:
        value = entry[name]
        if not (isinstance(value, Tensor) and value.numel() == 1
                or isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ValueError(f"loaded state dict has {name}={value!r} for {where}; expected a "
                             "number or a 1-element tensor")
    for name in set(required) | set(known):
        value = entry.get(name)
        if value is None and name not in required:
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"loaded state dict has '{name}' of type {type(value).__name__} "
                             f"for {where}; expected a Tensor")
        expected = optimizer.saved_state_shape(group, p, name, entry)
        if expected is None:
            raise ValueError(f"loaded state dict has '{name}' for a parameter of shape "
                             f"{tuple(p.shape)}, which keeps no '{name}'")
        expected = tuple(expected)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"loaded state dict has '{name}' of shape {tuple(value.shape)} for a parameter "
                f"of shape {tuple(p.shape)}"
                + ("" if expected == tuple(p.shape) else f" (expected {expected})"))


def tensor_steps(state) -> None:
    """torch.optim's ``__setstate__`` for differentiable runs: float ``step`` entries (old
    checkpoints) become the 0-d tensors its algorithm expects."""
    from torch.optim.optimizer import _get_scalar_dtype

    for entry in state.values():
        if isinstance(entry, dict) and "step" in entry and not isinstance(entry["step"], Tensor):
            entry["step"] = torch.tensor(float(entry["step"]), dtype=_get_scalar_dtype())


def save(optimizer) -> dict:
    """``optimizer.state_dict()`` (see the module docstring)."""
    with hooks.held_back(optimizer, "state_dict_post") as post_hooks:
        state_dict = Optimizer.state_dict(optimizer)
    state_dict["state"] = {k: dict(v) if isinstance(v, Entry) else v
                           for k, v in state_dict["state"].items()}
    saved_masters(optimizer, state_dict)
    for post_hook in post_hooks.values():  # as torch runs them: each may replace it
        result = post_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def load(optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict(state_dict)`` (see the module docstring)."""
    if optimizer._reference:
        Optimizer.load_state_dict(optimizer, state_dict)
        tensor_steps(optimizer.state)
        return
    state_dict = hooks.run_load_pre_hooks(optimizer, state_dict)  # they may mend it: first
    check_loadable(optimizer, state_dict)
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) == len(optimizer.param_groups):
        # Options a checkpoint does not know keep the values this optimizer was built with
        # (a master_weights=True run stays one), but for torch's own options an older
        # checkpoint lacks: those take what torch's __setstate__ gives them.
        older = loaded_defaults(optimizer.declaration.reference)
        state_dict = dict(state_dict, param_groups=[
            {**{k: v for k, v in group.items() if k != "params"}, **older, **saved}
            for group, saved in zip(optimizer.param_groups, saved_groups)])
        for group in state_dict["param_groups"]:  # the options it brings, as if built so
            check_group_options(optimizer, group)
    # What only the layout refuses (fp16 params and a remainder checkpoint) is refused with
    # the optimizer as it was: it is put back whole.
    before = (optimizer.param_groups, optimizer.state, optimizer._buckets,
              optimizer._outsiders, optimizer._group_ids)
    try:
        with hooks.held_back(optimizer, "load_state_dict_pre"), \
                hooks.held_back(optimizer, "load_state_dict_post") as post_hooks:
            Optimizer.load_state_dict(optimizer, state_dict)
        keep_saved_dtypes(optimizer, state_dict)
        optimizer._buckets = None
        layout.ensure_layout(optimizer, before[2])  # params stay where they are (kept_flat)
    except Exception:
        (optimizer.param_groups, optimizer.state, optimizer._buckets, optimizer._outsiders,
         optimizer._group_ids) = before
        raise
    for post_hook in post_hooks.values():  # last: what they change is what steps
        post_hook(optimizer)
