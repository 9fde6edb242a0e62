"""State interchange: ``optimizer.state`` as torch.optim shows it, the flat buffers behind it.

Each param's entry in ``optimizer.state`` is a plain-looking dict of views into its bucket's flat
state buffers (see ``flat.py``), so what torch.optim users read and write is what the update
uses. This module owns the two directions:

- **in**: state that arrives from outside (``load_state_dict``, an older layout, a hook or
  ZeroRedundancyOptimizer writing ``optimizer.state``) is copied into the flat buffers
  (``adopt_state``); state made by a step is its initial value in the buffers (``create_state``);
- **out**: ``State`` and ``Entry`` note any change made from outside, so the next step copies
  it in instead of updating stale buffers; they pickle and deep-copy as torch.optim's plain
  ``defaultdict`` of dicts.

The optimizer supplies what its state is (its declaration, ``buffer_names``, ``buffer_dtype``,
``buffer_rows``, ``buffer_init``, ``adopt_value``); nothing here knows one optimizer from
another.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import torch
from torch import Tensor

from fastopt.flat import Bucket, local_value
from fastopt.precision import MASTER, REMAINDER, rebuild_master, split_master

MASTERS = (MASTER, REMAINDER)  # the two forms a master is kept in (fastopt.precision)


def ensure_buffer(opt, group: dict, bucket: Bucket, name: str) -> Tensor:
    """Bucket's flat buffer for state ``name`` (its initial value when new), in the dtype the
    optimizer stores it in."""
    return bucket.state.ensure(name, opt.buffer_rows(group, name),
                               opt.buffer_dtype(group, bucket, name),
                               opt.buffer_init(group, name), opt.buffer_shapes(bucket, name))


def ensure_scalars(opt, group: dict, bucket: Bucket) -> Tensor | None:
    """Bucket's scalar table (``fastopt.buffers``), when params of ``group`` keep scalars."""
    declared = opt.declaration
    width = declared.table_width(group)
    if not width:
        return None
    names = tuple(s.name for s in declared.scalars_in(group))
    return bucket.state.ensure_scalars(names, width, opt.scalar_device(bucket))


def live_state(opt, group: dict, p) -> bool:
    """Does ``p`` have state worth keeping: a tensor under one of the names its optimizer
    keeps (``saved_state_names``), or a master? SGD's ``momentum_buffer=None`` is none, and
    so is a note written before its first step, even a tensor one: it stays beside the state
    that step makes (``create_state``)."""
    state = opt.state.get(p)
    if not state:
        return False
    required, known = opt.saved_state_names(group, p, state)
    names = {*required, *known, *MASTERS}
    return any(isinstance(v, Tensor) for k, v in state.items() if k in names)


def flat_extra(bucket: Bucket, i: int, value) -> bool:
    """Is an unknown state entry a per-element tensor worth a flat buffer (a param-shaped
    float)? Anything else (counters, other shapes, non-tensors) is kept as it is."""
    p = bucket.params[i]
    return isinstance(value, Tensor) and value.is_floating_point() == p.is_floating_point() \
        and value.is_complex() == p.is_complex() and tuple(value.shape) == tuple(p.shape)


def state_views(opt, bucket: Bucket, i: int, names: list) -> dict:
    """Param i's state as ``optimizer.state`` shows it: its scalars and a view per name it
    keeps (a packed buffer's shape rule may give it none)."""
    views = {name: column[i] for name, column in bucket.state.views.items()}
    for name in names:
        view = bucket.state.state_view(name, i)
        if view is not None:
            views[name] = view
    return views


def set_state(opt, p: Tensor, views: dict) -> None:
    """Make ``views`` param ``p``'s state (fastopt's own write: not an outside change)."""
    dict.__setitem__(opt.state, p, Entry(opt.state, views))


def adopt_state(opt, group: dict, bucket: Bucket) -> None:
    """Copy whatever state the bucket's params have (loaded, or from an older layout) in."""
    stated = [i for i, p in enumerate(bucket.params) if live_state(opt, group, p)]
    if not stated:
        return
    scalars = opt.declaration.scalars_in(group)
    declared = list(opt.buffer_names(group, bucket))
    names = list(declared)
    own_extras = {}  # param -> the extra entries it keeps flat (e.g. max_exp_avg_sq kept
    for i in stated:  # from an amsgrad run): its own, not given to the bucket's other params
        own_extras[i] = [key for key, value in opt.state[bucket.params[i]].items()
                         if key not in declared and key not in opt.declaration.scalar_names
                         and key not in MASTERS and flat_extra(bucket, i, value)]
        names += [key for key in own_extras[i] if key not in names]
    for name in names:
        ensure_buffer(opt, group, bucket, name)
    with torch.no_grad():
        if scalars:
            ensure_scalars(opt, group, bucket)
            rows = [[_scalar(opt.state[bucket.params[i]].get(s.name), s.initial(group))
                     for s in scalars] for i in stated]
            bucket.state.write_scalars(stated, torch.tensor(rows, dtype=torch.float32))
            _number_by_value(opt, bucket.state, stated, rows)
        for i in stated:
            state = opt.state[bucket.params[i]]
            mine = declared + own_extras[i]
            for name in mine:
                value = state.get(name)
                if bucket.state.local_view(name, i) is None:
                    continue  # a packed state this param does not keep
                if isinstance(value, Tensor):
                    opt.adopt_value(bucket, i, name, local_value(value, bucket.params[i]))
                elif name in MASTERS:  # the master in its other form, or none: from the param
                    _adopt_master(bucket, i, name, state)
            extras = {k: v for k, v in state.items()
                      if k not in mine and k not in opt.declaration.scalar_names
                      and not (k in MASTERS and any(m in mine for m in MASTERS))}
            set_state(opt, bucket.params[i], {**state_views(opt, bucket, i, mine), **extras})
            bucket.state.has_state[i] = True


def _adopt_master(bucket: Bucket, i: int, name: str, state: dict) -> None:
    """Param i's master ``name`` (``master_param`` or ``master_remainder``) from the other
    form in its saved ``state``, or from the param where it has neither."""
    p = bucket.params[i]
    view = bucket.state.local_view(name, i)
    other = state.get(REMAINDER if name == MASTER else MASTER)
    with torch.no_grad():
        if name == MASTER:
            value = local_value(p.detach(), p)
            if isinstance(other, Tensor):  # the param and its remainder
                value = rebuild_master(value, other.to(view.device))
            view.copy_(value)
        elif isinstance(other, Tensor):  # the fp32 master's bits below its rounding
            master = local_value(other, p).to(device=view.device, dtype=torch.float32)
            split_master(master, torch.empty_like(master, dtype=torch.bfloat16), view)
        else:
            view.zero_()  # the param is the master


def saved_masters(opt, state_dict: dict) -> None:
    """``state_dict()``'s form of remainders: each param's fp32 master as ``master_param``
    (loadable into ``master_weights=True``, and back), rebuilt from the param and its
    ``master_remainder``."""
    saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = itertools.chain.from_iterable(g["params"] for g in opt.param_groups)
    for key, p in zip(saved_ids, params):
        entry = state_dict["state"].get(key)
        if isinstance(entry, dict) and isinstance(entry.get(REMAINDER), Tensor):
            remainder = entry.pop(REMAINDER)
            entry[MASTER] = rebuild_master(p.detach(), remainder)


def _scalar(value, default: float) -> float:
    """A saved scalar (a tensor, or a number in old checkpoints) as a float."""
    if value is None:
        return default
    return float(value.item() if isinstance(value, Tensor) else value)


def refresh_ids(opt, bucket: Bucket) -> None:
    """The run keys of ``bucket``'s params with state, from the kept scalars' values (read
    from the table: on a GPU a sync, paid only after someone edited the table in place,
    ``Buffers.written_elsewhere``): params whose scalars now differ step apart."""
    state = bucket.state
    rows = state.scalars[:, : len(state.scalar_names)].tolist()
    held = [i for i, made in enumerate(state.has_state) if made]
    _number_by_value(opt, state, held, [rows[i] for i in held])
    state.note_written()


def _number_by_value(opt, state, indices: list, rows: list) -> None:
    """Run keys for params ``indices`` from their kept scalars ``rows``: one key for equal
    scalars, a new one for each set."""
    ids: dict = {}
    for i, row in zip(indices, rows):
        state.ids[i] = ids.setdefault(tuple(row), next(opt._ids))


def create_state(opt, group: dict, bucket: Bucket, fresh: list) -> None:
    """Initial state (and masters copied from the params) for params ``fresh`` of ``bucket``."""
    names = opt.buffer_names(group, bucket)
    scalars = opt.declaration.scalars_in(group)
    if not names and not scalars:
        return  # SGD without momentum keeps no state at all, as torch's does
    for name in names:
        made = name not in bucket.state
        ensure_buffer(opt, group, bucket, name)
        declared = opt.declaration.buffer(name)
        if not made and declared is not None and isinstance(declared.init, str):
            # a group option's value (Rprop's step_size starts at lr) as it is now, not as it
            # was when the buffer was made for the params stepped before
            value = declared.initial(group)
            for i in fresh:
                view = bucket.state.local_view(name, i)
                if view is not None:  # a complex param's both parts (torch: complex(lr, lr))
                    (torch.view_as_real(view) if view.is_complex() else view).fill_(value)
        if name == MASTER:  # the fp32 copy starts as the param (a remainder as zero)
            for i in fresh:
                bucket.state.local_view(name, i).copy_(local_value(bucket.params[i].detach(),
                                                                   bucket.params[i]))
    if scalars:
        ensure_scalars(opt, group, bucket)
        initial = [s.initial(group) for s in scalars]
        if any(initial):
            bucket.state.write_scalars(fresh, torch.tensor([initial] * len(fresh),
                                                           dtype=torch.float32))
    for i in fresh:
        p = bucket.params[i]
        views = state_views(opt, bucket, i, names)
        notes = opt.state.get(p)  # written before the first step (a per-param note): kept
        if notes:
            views = {**{k: v for k, v in notes.items() if k not in views}, **views}
        set_state(opt, p, views)
        bucket.state.has_state[i] = True


def add_state_buffer(opt, group: dict, bucket: Bucket, name: str) -> None:
    """A new state tensor (its initial value) for every param of ``bucket`` that has state
    (an option switched on mid-run: amsgrad, master_weights, momentum)."""
    ensure_buffer(opt, group, bucket, name)
    other = REMAINDER if name == MASTER else MASTER if name == REMAINDER else None
    replaced = other is not None and other in bucket.state  # master_weights changed its form
    late = bucket.state.added_late.setdefault(name, set())
    for i, p in enumerate(bucket.params):
        view = bucket.state.state_view(name, i)
        if bucket.state.has_state[i] and view is not None:
            if name in MASTERS:
                _adopt_master(bucket, i, name, opt.state[p])
            dict.__setitem__(opt.state[p], name, view)
            late.add(i)
            if replaced:
                dict.pop(opt.state[p], other, None)
    if replaced:
        bucket.state.drop(other)
        bucket.real_views.pop(other, None)


def keep_saved_dtypes(opt, state_dict: dict) -> None:
    """torch.optim casts loaded state to the param's dtype (all but ``step``: NAdam's
    ``mu_product`` and ASGD's ``eta`` of a bf16 param would lose their digits); fastopt's
    buffers decide their own dtype (fp32 masters, state and scalars beside bf16 params), so
    take the saved values as they were and let the layout convert them (exactly, when the
    dtypes agree)."""
    saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = itertools.chain.from_iterable(g["params"] for g in opt.param_groups)
    for key, p in zip(saved_ids, params):
        saved = state_dict["state"].get(key)
        if not saved or p not in opt.state:
            continue
        entry = opt.state[p]
        for name, value in saved.items():
            if isinstance(value, Tensor) and value.dtype != p.dtype:
                dict.__setitem__(entry, name, value)


class State(defaultdict):
    """``optimizer.state``: notes when someone outside fastopt sets or deletes an entry (as
    ZeroRedundancyOptimizer.load_state_dict does), so the next step copies the new values into
    the flat buffers instead of updating stale ones."""

    changed = False

    def __init__(self, items=()) -> None:
        super().__init__(dict)  # torch's default_factory (``__missing__`` makes the entries)
        for key, value in dict(items).items():
            dict.__setitem__(self, key, Entry(self, value) if is_param_entry(key, value)
                             else value)
        self.changed = True

    def __missing__(self, key):
        entry = Entry(self)
        dict.__setitem__(self, key, entry)
        return entry

    def __setitem__(self, key, value) -> None:
        # Keys that are not params (notes written by hooks, as torch.optim allows) change no
        # layout.
        self.changed = self.changed or isinstance(key, Tensor)
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.changed = self.changed or isinstance(key, Tensor)
        super().__delitem__(key)

    def clear(self) -> None:
        self.changed = True
        super().clear()

    def pop(self, *args):
        self.changed = True
        return super().pop(*args)

    def popitem(self):
        self.changed = True
        return super().popitem()

    def update(self, *args, **kwargs) -> None:
        self.changed = True
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        if key not in self:
            self.changed = True
        return super().setdefault(key, default)

    def __ior__(self, other):
        self.update(other)
        return self

    def copy(self) -> defaultdict:
        """A shallow copy, as torch.optim's ``state.copy()`` gives: a plain defaultdict of the
        same entries."""
        return defaultdict(dict, self)

    __copy__ = copy

    def __or__(self, other) -> defaultdict:
        merged = self.copy()
        merged.update(other)
        return merged

    def __ror__(self, other) -> defaultdict:
        merged = defaultdict(dict, other)
        merged.update(self)
        return merged

    def __repr__(self) -> str:
        return f"defaultdict({dict!r}, {dict.__repr__(self)})"

    def __reduce__(self):  # pickles (and deep-copies) as the plain defaultdict torch.optim has
        return (plain_state, (dict(self),))


class Entry(dict):
    """One param's state; tells its ``State`` when it is changed from outside."""

    def __init__(self, owner: State, items=()) -> None:
        super().__init__(items)
        self._owner = owner

    def _changed(self) -> None:
        self._owner.changed = True

    def __setitem__(self, key, value) -> None:
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self._changed()
        super().__delitem__(key)

    def update(self, *args, **kwargs) -> None:
        self._changed()
        super().update(*args, **kwargs)

    def clear(self) -> None:
        self._changed()
        super().clear()

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def setdefault(self, key, default=None):
        if key not in self:
            self._changed()
        return super().setdefault(key, default)

    def __reduce__(self):
        return (dict, (dict(self),))


def plain_state(items: dict) -> defaultdict:
    """torch.optim's ``optimizer.state``: a ``defaultdict(dict)`` of plain dicts."""
    return defaultdict(dict, {k: dict(v) if isinstance(v, Entry) else v
                              for k, v in items.items()})


def is_param_entry(key, value) -> bool:
    """Is ``(key, value)`` a param's state (a dict under a tensor key)? Other entries (notes
    that hooks write under other keys) are kept as they are."""
    return isinstance(key, Tensor) and isinstance(value, dict)


def make_reference_state(opt) -> None:
    """``differentiable=True`` with a declaration that makes state eagerly (Adagrad): every
    param's state as torch.optim's constructor makes it (per-param tensors, nothing flat)."""
    declared = opt.declaration
    for group in opt.param_groups:
        for p in group["params"]:
            entry = {s.name: torch.tensor(s.initial(group), dtype=torch.float32)
                     for s in declared.scalars_in(group)}
            for b in declared.buffers:
                if b.present(group):
                    value = b.initial(group)
                    entry[b.name] = torch.full_like(p, complex(value, value) if p.is_complex()
                                                    else value)
            opt.state[p] = entry
