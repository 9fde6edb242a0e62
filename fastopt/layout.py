"""Laying a group's params out in buckets, and noticing when that must be done again.

``build_group`` sorts a param group's params into buckets (``flat.group_params``: one per
device, dtype and variant, external where fastopt may not move them), picks each bucket's
implementation (``dispatch.resolve``), builds it (``flat.build_bucket``) and copies any state
its params already have in (``state.adopt_state``). ``ensure_layout`` runs before every step,
``zero_grad(set_to_none=False)`` and ``load_state_dict``: it lays out again every group whose
params left their slots (``p.data = ...``, ``model.to()``), gained a grad while kept out, or
were swapped in the group, and all groups when ``optimizer.state`` was changed from outside;
``check_unchanged`` first refuses a param whose dtype or shape changed after it got state.
"""

from __future__ import annotations

import operator

from torch.nn.parameter import is_lazy

from fastopt import dispatch, grad_table
from fastopt.flat import Bucket, build_bucket, group_params, layout_parts, local, real_dtype
from fastopt.state import State, adopt_state, create_state
from fastopt.validation import check_param, checked_options, kept_while_frozen


def build_group(opt, index: int, own: set | None = None, previous: tuple = ()) -> None:
    """(Re)lay out group ``index``: copy its params and their state into new flat buffers
    (``own``: the storages of the layout being replaced, see ``flat.is_movable``; a bucket of
    ``previous``, the buckets being replaced, that holds the same params keeps their buffer:
    ``kept_flat``)."""
    group = opt.param_groups[index]
    members, outsiders, seen = [], [], set()
    for p in group["params"]:
        if id(p) in seen:
            continue  # duplicates are warned about by torch's add_param_group
        seen.add(id(p))
        if is_lazy(p):  # an nn.Lazy* module's param before its first forward
            outsiders.append(p)
        elif p.requires_grad or p.grad is not None or opt.state.get(p) \
                or kept_while_frozen(opt.declaration, p):
            check_param(p)  # a frozen integer or sparse param given a grad since: refused
            members.append(p)
        else:
            outsiders.append(p)
    buckets = []
    for external, params in group_params(members, lambda p: opt.bucket_variant(group, p),
                                         own, opt.flatten_params):
        for part in ([params] if external else split_for_layout(params)):
            buckets.append(_build_bucket(opt, group, part, external, previous))
    opt._buckets[index] = buckets
    opt._outsiders[index] = outsiders
    opt._group_ids[index] = [id(p) for p in group["params"]]
    if getattr(opt, "_step_groups", None) is not None:  # in_backward: params that came in
        opt._step_groups.hook_params(members)  # (a lazy module's, now materialized)


def add_group(opt) -> None:
    """Lay out the group ``add_param_group`` just added (checked), unless the optimizer lays
    out at its next step anyway. Called from ``torch.optim.Optimizer.__init__``, with its
    empty state: the state becomes fastopt's and the layout made here is kept (no second one
    at the first step), so ``in_backward=True`` steps from the first backward."""
    if type(opt.state) is not State and not opt.state:
        opt.state = State()
        opt.state.changed = False
    if opt._buckets is not None:
        opt._buckets.append(None)
        opt._outsiders.append(None)
        opt._group_ids.append(None)
        build_group(opt, len(opt.param_groups) - 1)


def drop_last_group(opt) -> None:
    """Forget what ``add_group`` made of the last param group before it was refused: its
    buckets, and the state made for its params (an optimizer that makes state eagerly), so
    that the groups before it step as if it had never been added. Its params keep their
    values (a bucket laid out before the refusal holds them)."""
    index = len(opt.param_groups) - 1
    if opt._buckets is None or len(opt._buckets) <= index:
        return
    others = {id(p) for group in opt.param_groups[:index] for p in group["params"]}
    for p in opt.param_groups[index]["params"]:
        if id(p) not in others and p in opt.state:
            dict.__delitem__(opt.state, p)  # made here, not from outside: no relayout
    for kept in (opt._buckets, opt._outsiders, opt._group_ids):
        del kept[index:]


def split_for_layout(params: list) -> list:
    """The buckets params of one device and dtype are laid out in (``flat.layout_parts``):
    one after another, so that each one's originals are freed before the next is allocated."""
    nbytes = [local(p).numel() * p.element_size() for p in params]
    return [params[lo:hi] for lo, hi in layout_parts(nbytes)]


def kept_flat(previous, params: list):
    """The flat buffer of a bucket of ``previous`` that holds exactly ``params``, each still in
    its slot with its shape, or None. A layout made again for new state (a loaded
    state_dict, state replaced through ``optimizer.state``) keeps it: the params do not move,
    as torch.optim never moves them (a tensor aliasing one keeps following it)."""
    for old in previous:
        if old.flat is not None and not old.external and len(old.params) == len(params) \
                and all(map(operator.is_, old.params, params)) and old.is_intact() \
                and old.param_shapes == [tuple(local(p).shape) for p in params] \
                and old.param_dtypes == [p.dtype for p in params]:
            return old.flat
    return None


def _build_bucket(opt, group: dict, params: list, external: bool, previous: tuple = ()):
    """One bucket of ``params`` (in the flat buffer ``kept_flat`` finds in ``previous``, or
    moved into a new one): built, its options checked, its state adopted (and made now for an
    optimizer that makes state eagerly)."""
    # Params left where they are take the kernels only if they can be updated by
    # address in one launch (grad_table.py); else torch's multi-tensor ops.
    by_address = external and opt.reads_by_address(group, external=True) \
        and opt.bucket_variant(group, params[0]) is None \
        and grad_table.addressable(params, real_dtype(params[0]))
    backend = dispatch.resolve(opt.backend, params[0].device, real_dtype(params[0]),
                               external=external and not by_address)
    bucket = build_bucket(params, backend, external, opt.bucket_variant(group, params[0]),
                          flat=None if external else kept_flat(previous, params))
    opt.prepare_bucket(group, bucket)
    bucket.options = checked_options(group)
    adopt_state(opt, group, bucket)
    if opt.declaration.eager_state:  # state for every param now, as torch's Adagrad makes
        fresh = [i for i, made in enumerate(bucket.state.has_state) if not made]
        if fresh:
            create_state(opt, group, bucket, fresh)
    return bucket


def ensure_layout(opt, previous: list | None = None) -> None:
    """Rebuild any group whose params left their buffers or which gained a new grad; rebuild
    all when ``opt.state`` was changed from outside (its values are then copied in). A
    rebuild keeps the flat buffers of the buckets it replaces (``previous``, or the current
    ones) that hold the same params (``kept_flat``)."""
    if not isinstance(opt.state, State):
        opt.state = State(opt.state)
        previous, opt._buckets = previous or opt._buckets, None
    elif opt.state.changed:
        for index, buckets in enumerate(opt._buckets or []):
            check_unchanged(opt, index, buckets or [])
        previous, opt._buckets = previous or opt._buckets, None
    if opt._buckets is None or len(opt._buckets) != len(opt.param_groups):
        kept = tuple(b for buckets in (previous or opt._buckets or []) for b in buckets or [])
        opt._buckets = [None] * len(opt.param_groups)
        opt._outsiders = [None] * len(opt.param_groups)
        opt._group_ids = [None] * len(opt.param_groups)
        try:
            for index in range(len(opt.param_groups)):
                build_group(opt, index, previous=kept)
        except Exception:  # state that does not fit (a wrong shape set from outside): the
            opt._buckets = None  # next step tries again, and fails again, as torch's does
            raise
        opt.state.changed = False
        return
    for index, (group, buckets) in enumerate(zip(opt.param_groups, opt._buckets)):
        outsiders = opt._outsiders[index]
        if (outsiders and any(p.grad is not None for p in outsiders)) \
                or opt._group_ids[index] != list(map(id, group["params"])) \
                or not all(map(Bucket.is_intact, buckets)):  # grads, params swapped or moved
            check_unchanged(opt, index, buckets)
            own = set().union(*(b.storage_keys for b in buckets))
            build_group(opt, index, own, tuple(buckets))

def check_unchanged(opt, index: int, buckets: list) -> None:
    """Refuse a param whose dtype or shape changed after it got state (``model.half()``,
    ``.to(torch.float64)`` or a resized ``p.data`` after steps): its moments would be cast
    silently (fp16 second moments underflow) or no longer fit. Raised before anything is
    laid out again, so nothing changes."""
    group = opt.param_groups[index]
    for bucket in buckets:
        for i, p in enumerate(bucket.params):
            if not bucket.state.has_state[i]:
                continue
            was = (bucket.param_dtypes[i], bucket.param_shapes[i])
            now = (p.dtype, tuple(local(p).shape))
            if now == was:
                continue
            what = "dtype" if now[0] != was[0] else "shape"
            before, after = (was[0], now[0]) if what == "dtype" else (was[1], now[1])
            position = next((k for k, q in enumerate(group["params"]) if q is p), "?")
            advice = ("its state would be cast silently. Change the model's dtype before "
                      "building the optimizer (or build a new one and load the old "
                      "state_dict into it)" if what == "dtype" else
                      "its state no longer fits. Build a new optimizer for the new shape")
            raise RuntimeError(
                f"param {position} of param group {index} (shape {tuple(p.shape)}) changed "
                f"{what} from {before} to {after} after the optimizer made its state; "
                + advice)
