"""The per-step plan of one bucket: which params take part, where their grads are, which call.

``check_grads`` runs before anything is written (a failed step changes nothing): it reads every
param's ``.grad`` and checks it against its param. ``make_plan`` then turns the checked grads
into a :class:`StepPlan`, which the optimizer's ``update`` reads its tensors from. Its routes:

- ``"flat"``: every grad already lives in the bucket's flat grad buffer (a loop that keeps its
  grads, ``zero_grad(set_to_none=False)``): one call over the whole buffer.
- ``"tensors"``: every param has a fresh grad of its own (autograd's, after ``zero_grad()``):
  one fused call with one entry per param, each grad read where it lies.
- ``"gather"``: fresh grads are first copied into the flat grad buffer with one multi-tensor
  copy, then one call runs over the whole buffer. On CPUs a fused call pays a fixed cost per
  tensor (a few microseconds), far more than copying a small tensor, so many small tensors take
  this route (``gather_pays``, from measured costs); the Triton path takes it on every bucket it
  cannot serve through an address table.
- ``"table"`` (Triton, CUDA): one launch over the whole bucket that reads each fresh grad where
  it lies through a device table of grad addresses (``fastopt.grad_table``).
- ``"chunks"``: anything else (some params without grads, grads in and out of the buffer,
  steps that differ between params, complex or external params): maximal runs of params that
  can share one call.

A plan's tensors come in entries (one per chunk, or one per param): ``pieces(name)`` is each
entry's part of buffer ``name``, ``grads`` their grads, ``rows`` their scalar rows. A widened
CPU step (fp32 math on copies of narrower params or state) costs a dozen torch ops per entry:
``merge_widened`` joins back-to-back small params into one entry first.
"""

from __future__ import annotations

import functools
import itertools
import operator
from typing import NamedTuple

import torch
from torch import Tensor

from fastopt import grad_table
from fastopt.flat import SLOT_ALIGN, Bucket, as_real, runs
from fastopt.precision import widens
from fastopt.validation import check_fused_param, check_grad

_GRAD = operator.attrgetter("grad")
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_DEVICE_INDEX = Tensor.get_device  # -1 on CPU: cheaper than building a torch.device
_DATA_PTR = Tensor.data_ptr
_CONTIGUOUS = Tensor.is_contiguous

# Measured costs of one fused call and of the gather on a CPU, in seconds: a fixed cost per
# tensor entry and a cost per element (fp32, torch 2.13, 2 threads, 2-core machine; measured by
# ``python benchmarks/route_costs.py``, which prints this table). The route only depends on
# their ratios: gathering pays below about 3600 elements per tensor for Adam, 1700 for SGD.
# "elementwise" (every declared optimizer's torch twin) is not fitted: a twin is a chain of 4 to
# 12 torch ops per entry (30 us is the order of such a chain's fixed cost on a small tensor), so
# one call over the gathered bucket pays whenever a bucket has more than a few tensors.
# "adafactor" is priced the same: a param alone is a dozen ops, a run of vectors in the
# gathered buffer a dozen ops in all; a matrix is stepped alone either way ("matrices_apart":
# the call over the gathered buffer has an entry per matrix and per run of vectors).
CPU_COSTS = {
    "adam": {"per_tensor": 3.7e-6, "per_element": 0.97e-9, "flat_per_element": 0.88e-9},
    "elementwise": {"per_tensor": 30e-6, "per_element": 3.0e-9, "flat_per_element": 3.0e-9},
    "sgd": {"per_tensor": 2.4e-6, "per_element": 0.69e-9, "flat_per_element": 0.64e-9},
    "copy": {"per_tensor": 1.1e-6, "per_element": 0.81e-9},
    "cat": {"per_tensor": 0.41e-6, "per_element": 0.82e-9},  # the gather of gapless vectors
}
CPU_COSTS["adafactor"] = {**CPU_COSTS["elementwise"], "matrices_apart": True}


@functools.lru_cache(maxsize=4096)  # pure, and asked every step
def gather_pays(op: str, device: torch.device, tensors: int, elements: int,
                dtype: torch.dtype = torch.float32, gapless: bool = False,
                entries: int = 1) -> bool:
    """Is one gather of ``tensors`` fresh grads (``elements`` in all) plus one fused call over
    the flat buffer cheaper than one fused call with an entry per tensor (``op``: ``"adam"`` or
    ``"sgd"``)? Only on CPUs and for fp32 (the costs measured): on GPUs a fused call's cost per
    tensor is small, and the gather is a whole extra pass over the grads; CPU bf16/fp16 math
    rounds differently in torch's vectorized loop and its scalar tail, so those keep one entry
    per tensor, as torch.optim computes them. ``gapless``: a bucket of gapless vectors, gathered
    with one ``torch.cat`` (see ``gather``); ``entries``: the fused call over the flat buffer
    has that many (runs of params whose grads are there, when not every param has one).
    Deterministic: the same shapes always take the same route."""
    costs = CPU_COSTS.get(op)
    if device.type != "cpu" or costs is None or dtype != torch.float32:
        return False
    copy = CPU_COSTS["cat" if gapless else "copy"]
    per_tensor = tensors * costs["per_tensor"] + elements * costs["per_element"]
    # the call over the flat buffer pays its own fixed cost per entry, as a call per tensor
    # does (so a bucket of one param never gathers: the copy alone would be the difference)
    gathered = tensors * copy["per_tensor"] + entries * costs["per_tensor"] \
        + elements * (copy["per_element"] + costs["flat_per_element"])
    return gathered < per_tensor


class Chunk(NamedTuple):
    """Params ``lo:hi`` of a bucket, elements ``start:end`` of its flat buffers, their grad and
    the run key they share (``run_key`` before this step's state was made)."""

    lo: int
    hi: int
    start: int
    end: int
    grad: Tensor
    key: object


class CheckedGrads(NamedTuple):
    """A bucket's grads, checked: the params that have one (``participants``), their grads,
    and which live in the flat grad buffer (``in_place``: a list of bools, or True for all,
    False for none); for fresh grads checked in bulk, their data pointers (``ptrs``, read
    for the check: the address table's, ``fastopt.grad_table.attach``)."""

    participants: list
    grads: list
    in_place: object
    ptrs: list | None = None


def check_grads(bucket: Bucket, index: int, name: str, sparse_error: str | None,
                fused: list | None, any_strides: bool = False) -> CheckedGrads | None:
    """Read and check every grad of ``bucket`` (None if no param has one), a bucket of param
    group ``index``; ``name`` words the errors as torch.optim does, ``sparse_error`` is its
    error for a sparse grad (None: sparse grads are taken); ``fused``: None, or the group
    asked for ``fused=True`` and these are the device types whose params torch's fused kernels
    take (checked on params stepped for the first time); ``any_strides``: fresh grads are
    copied into the flat grad buffer (``gathers_fresh``), which takes them in any strides.

    The common cases cost a few attribute reads per param: every grad in the flat buffer
    (pointers compared), or every grad (of the params that have one) a fresh dense tensor of
    its param's shape, dtype and device, contiguous unless ``any_strides`` and every param has
    one (compared as lists). Anything else is checked grad by grad. Shapes are compared one
    at a time: a list of a thousand ``torch.Size`` tuples would start a garbage collection on
    every step (each tuple counts towards CPython's threshold of 700 new container objects)."""
    params = bucket.params
    grads = list(map(_GRAD, params))
    if all(map(operator.is_not, grads, itertools.repeat(None))):
        participants = range(len(grads))
    else:
        participants = [i for i, g in enumerate(grads) if g is not None]
        if not participants:
            return None
        grads = [grads[i] for i in participants]
    dense = True
    try:
        grad_ptrs = list(map(_DATA_PTR, grads))
    except RuntimeError:  # a sparse grad has no data pointer
        grad_ptrs = [g.data_ptr() if g.layout == torch.strided else -1 for g in grads]
        dense = False
    ptrs = bucket.grads.ptrs
    everyone = len(grads) == len(params)
    if everyone and ptrs and grad_ptrs == ptrs:
        return CheckedGrads(participants, grads, True)  # kept grads, all in the flat buffer
    held_apart = not ptrs or bucket.grads.ptr_set.isdisjoint(grad_ptrs)
    shapes = bucket.param_shapes if everyone else map(bucket.param_shapes.__getitem__,
                                                       participants)
    if held_apart and dense and bucket.plain and (not fused or all(bucket.state.stepped)) \
            and all(map(operator.eq, map(_SHAPE, grads), shapes)) \
            and set(map(_DTYPE, grads)) == {bucket.dtype} \
            and set(map(_DEVICE_INDEX, grads)) == {bucket.device_index} \
            and ((any_strides and everyone) or all(map(_CONTIGUOUS, grads))):
        return CheckedGrads(participants, grads, False, grad_ptrs)  # fresh, every one fine
    if held_apart:
        in_place = [False] * len(grads)
    else:
        in_place = [q == ptrs[i] for i, q in zip(participants, grad_ptrs)]
    for j, (i, g) in enumerate(zip(participants, grads)):
        p = params[i]
        if fused and not bucket.state.stepped[i]:
            check_fused_param(p, fused)
        if in_place[j] and g.shape == p.shape and g.dtype == p.dtype and not g.is_sparse:
            continue
        in_place[j] = False
        check_grad(p, g, f"{name}: param group {index}", sparse_error)
    return CheckedGrads(participants, grads, in_place)


class StepPlan:
    """What one step does for one bucket (see the module docstring): ``route``, the runs of
    params sharing a run key (``step_runs``: ``[lo, hi, key]``, params that have a grad) and
    the entries of the call."""

    __slots__ = ("bucket", "route", "step_runs", "key", "_chunks", "_grads")

    def __init__(self, bucket: Bucket, route: str, step_runs: list, key=None,
                 chunks: list | None = None, grads: list | None = None) -> None:
        self.bucket = bucket
        self.route = route
        self.step_runs = step_runs
        self.key = key  # the run key of every param ("tensors"/"table" routes)
        self._chunks = chunks
        self._grads = grads

    @property
    def whole(self) -> bool:
        """Does this step cover every param of the bucket in one run?"""
        return len(self.step_runs) == 1 and self.step_runs[0][0] == 0 \
            and self.step_runs[0][1] == len(self.bucket.params)

    @property
    def chunks(self) -> list:
        if self._chunks is None:
            b = self.bucket
            # made by tuple.__new__: a NamedTuple's own __new__ is Python (400 params' chunks
            # took 129 us a step, these 50)
            n = len(b.params)
            self._chunks = list(map(tuple.__new__, itertools.repeat(Chunk), zip(
                range(n), range(1, n + 1), b.starts, b.ends, self._grads,
                itertools.repeat(self.key))))
        return self._chunks

    @property
    def grads(self) -> list:
        return self._grads if self._chunks is None else [c.grad for c in self._chunks]

    def pieces(self, name: str) -> list:
        """Each entry's part of buffer ``name`` ("param", "grad" or a state name)."""
        if self._chunks is None:
            return self.bucket.param_pieces(name)
        return self.bucket.pieces(name, self._chunks)

    @property
    def rows(self) -> list:
        """Each entry's first param: the row of the scalar table its params share."""
        if self._chunks is None:
            return range(len(self.bucket.params))
        return [c.lo for c in self._chunks]

    def scalar_views(self, name: str) -> list:
        """Each entry's scalar ``name`` (a 0-d view of the bucket's scalar table)."""
        views = self.bucket.state.views[name]
        return views if self._chunks is None else [views[c.lo] for c in self._chunks]

    @property
    def starts(self) -> list:
        """Each entry's offset in the flat layout."""
        return self.bucket.starts if self._chunks is None else [c.start for c in self._chunks]

    def with_key(self, key) -> StepPlan | None:
        """The entries whose run key is ``key`` (None if there are none)."""
        if self._chunks is None:
            return self if self.key == key else None
        chunks = [c for c in self._chunks if c.key == key]
        if not chunks:
            return None
        return StepPlan(self.bucket, self.route, self.step_runs, key, chunks)


def make_plan(bucket: Bucket, checked: CheckedGrads, keys: list | None, key, op: str,
              by_address: bool, gather_runs: bool = True) -> StepPlan:
    """The plan for ``checked`` grads. ``keys``: each participant's run key (None when they
    all share ``key``); ``op``: the update (``"adam"``, ``"sgd"``...) the cost model prices;
    ``by_address``: the bucket's kernels can read fresh grads where they lie through an
    address table (``fastopt.grad_table``); ``gather_runs``: a torch-path step of some params
    may copy their fresh grads into the flat grad buffer, where it pays (``_gathers_runs``),
    and update runs of them (not inside a backward: ``in_backward`` holds no such buffer)."""
    participants, grads, in_place, ptrs = checked
    n = len(bucket.params)
    if keys is None:
        step_runs = [[0, n, key]] if len(participants) == n else runs(participants,
                                                                    [key] * len(participants))
    else:
        step_runs = runs(participants, keys)

    if keys is not None or len(participants) != n:
        copy = gather_runs and _gathers_runs(bucket, op, participants, step_runs)
        return StepPlan(bucket, "chunks", step_runs, key,
                        _chunks(bucket, participants, grads, in_place, keys, key, step_runs,
                                copy))
    if in_place is True:
        return _whole(bucket, "flat", bucket.grads.buffer, step_runs, key)
    # Fresh grads: checked in bulk (in_place False), or grad by grad for an external bucket.
    fresh = in_place is False or (bucket.external and not any(in_place))
    if fresh and by_address:
        table = grad_table.attach(bucket, grads, ptrs)  # one launch reads each grad in place
        if table is not None:
            return _whole(bucket, "table", table, step_runs, key)
    if in_place is False and (bucket.backend == "triton" or gathers_fresh(bucket, op)):
        gather(bucket, grads)
        return _whole(bucket, "gather", bucket.grads.buffer, step_runs, key)
    if in_place is False:
        return StepPlan(bucket, "tensors", step_runs, key, grads=grads)
    return StepPlan(bucket, "chunks", step_runs, key,
                    _chunks(bucket, participants, grads, in_place, keys, key, step_runs))


def _whole(bucket: Bucket, route: str, grad, step_runs: list, key) -> StepPlan:
    """A plan of one entry: the whole bucket, with ``grad`` (the flat grad buffer, or the
    address table)."""
    n = len(bucket.params)
    chunk = Chunk(0, n, 0, bucket.numel, grad, key)
    if n == 1 and route != "table":  # shaped as the param's piece (Bucket.pieces' rule)
        chunk = chunk._replace(grad=bucket.pieces("grad", [chunk])[0])
    return StepPlan(bucket, route, step_runs, key, [chunk])


def _gathers_runs(bucket: Bucket, op: str, participants: list, step_runs: list) -> bool:
    """A torch-path step of ``participants`` (some of the bucket's params, or params whose
    run keys differ: ``step_runs``): does copying their grads into the flat grad buffer and
    one entry per run cost less than an entry per param? (Their elements are counted as the
    bucket's average: the per-tensor costs decide on small params.)"""
    if bucket.backend != "torch" or bucket.external or len(step_runs) == len(participants):
        return False
    elements = bucket.numel * len(participants) // max(len(bucket.params), 1)
    return gather_pays(op, bucket.device, len(participants), elements, bucket.dtype, False,
                       len(step_runs))


def gathers_fresh(bucket: Bucket, op: str) -> bool:
    """Does a torch-path step copy ``bucket``'s fresh grads, all of them present, into its
    flat grad buffer (``gather``) before one call over it? (``gather_pays``, for this bucket's
    shapes: the same every step, so decided once per bucket.) The copy takes grads in any
    strides."""
    decided = bucket.decided.get(("gathers", op))
    if decided is None:
        decided = bucket.decided[("gathers", op)] = bucket.backend == "torch" and gather_pays(
            op, bucket.device, len(bucket.params), bucket.numel, bucket.dtype,
            bucket.gapless_vectors, gathered_entries(op, bucket.flat_entries))
    return decided


def gathered_entries(op: str, flat_entries: int) -> int:
    """Entries of ``op``'s call over a whole gathered bucket: one, or ``flat_entries`` (see
    ``fastopt.flat.flat_entries``) where its matrices are stepped apart."""
    return flat_entries if CPU_COSTS.get(op, {}).get("matrices_apart") else 1


def gather(bucket: Bucket, grads: list, slots: list | None = None) -> None:
    """Copy ``grads`` (of params ``slots``, default all) into the flat grad buffer with one
    multi-tensor copy (one ``torch.cat`` for every grad of a bucket of gapless vectors: the
    grads were checked to match their params, so their sizes fill the slots exactly)."""
    bucket.grads.ensure()
    # keep the buffer for the next step after a whole-bucket gather, and on the torch path,
    # which gathers only where every step of the default loop does (``gathers_fresh``)
    bucket.grads.gathers = slots is None or bucket.backend == "torch"
    if slots is None and bucket.gapless_vectors:
        torch.cat(grads, out=bucket.whole_piece("grad")[: bucket.ends[-1]])
        return
    views = bucket.param_pieces("grad")
    if slots is not None:
        views = [views[i] for i in slots]
    torch._foreach_copy_(views, grads)


def _chunks(bucket: Bucket, participants: list, grads: list, in_place, keys, key,
            step_runs: list, copy: bool = False) -> list:
    """Maximal runs of participants that share a run key and whose grads are all in the flat
    buffer (one chunk each), and one chunk per param whose grad is held apart. Grads held
    apart are first copied into the flat buffer on the Triton path (its kernels take runs)
    and where ``copy`` says so; every grad is then there, and the chunks are ``step_runs``
    (the participants' maximal runs by key)."""
    checked_fresh = in_place is False  # checked in bulk: dense, real if plain
    if in_place is True:
        in_place = [True] * len(grads)
    elif in_place is False:
        in_place = [False] * len(grads)
    if keys is None:
        keys = [key] * len(participants)
    if not (checked_fresh and bucket.plain):
        grads = [as_real(g) for g in grads]
    if (bucket.backend == "triton" or copy) and not bucket.external and not all(in_place):
        todo = [j for j, ok in enumerate(in_place) if not ok]  # the kernels see whole runs
        gather(bucket, [grads[j] for j in todo], [participants[j] for j in todo])
        return [_flat_chunk(bucket, lo, hi, k) for lo, hi, k in step_runs]
    if checked_fresh and not all(map(_CONTIGUOUS, grads)):
        # checked in bulk for a bucket that gathers (``check_grads``' ``any_strides``), but
        # stepped entry by entry here: the fused calls read a grad's memory in order
        grads = [as_real(g) for g in grads]
    starts, ends = bucket.starts, bucket.ends
    if not any(in_place):  # every grad held apart: one chunk each
        return [Chunk(i, i + 1, starts[i], ends[i], g, k)
                for i, g, k in zip(participants, grads, keys)]
    chunks = []
    split_keys = [(k, True) if ok else (k, False, i)
                  for i, k, ok in zip(participants, keys, in_place)]
    grad_of = dict(zip(participants, grads))
    for lo, hi, (k, ok, *_) in runs(participants, split_keys):
        if ok:
            chunks.append(_flat_chunk(bucket, lo, hi, k))
        else:
            chunks.append(Chunk(lo, hi, starts[lo], ends[hi - 1], grad_of[lo], k))
    return chunks


def _flat_chunk(bucket: Bucket, lo: int, hi: int, key) -> Chunk:
    """Params ``lo:hi`` of ``bucket``, whose grads are in its flat grad buffer, as one chunk:
    a run ends on an aligned boundary (into padding)."""
    chunk = Chunk(lo, hi, bucket.starts[lo], bucket.chunk_end(hi), None, key)
    if hi - lo == 1:
        return chunk._replace(grad=bucket.pieces("grad", [chunk])[0])
    return chunk._replace(grad=bucket.grads.buffer[chunk.start : chunk.end])


# A widened torch-path step (fp32 math on copies of bf16/fp16 params: see fastopt.precision)
# pays a dozen torch ops per entry: back-to-back params of at most WIDENED_SMALL elements step
# as one entry of at most WIDENED_MERGE elements (their fresh grads copied together, the gaps
# between slots filled with zeros, as the flat buffers' padding is), which also bounds the copy.
WIDENED_SMALL = 1 << 16
WIDENED_MERGE = 1 << 18


def merge_spans(starts: list, ends: list) -> list:
    """``(lo, hi)`` for each entry of a widened step over params with these slots: maximal
    runs of params of at most ``WIDENED_SMALL`` elements spanning at most ``WIDENED_MERGE``
    (from the first's start to the last's end), and each larger param alone."""
    spans, lo = [], None
    for i, (start, end) in enumerate(zip(starts, ends)):
        small = end - start <= WIDENED_SMALL
        if lo is not None and small and end - starts[lo] <= WIDENED_MERGE:
            continue
        if lo is not None:
            spans.append((lo, i))
        lo = i if small else None
        if not small:
            spans.append((i, i + 1))
    if lo is not None:
        spans.append((lo, len(starts)))
    return spans


_GAPS: dict = {}  # (dtype, device) -> zeros longer than any gap between two slots


def merge_widened(plan: StepPlan, group: dict) -> StepPlan:
    """``plan`` with runs of its one-param entries merged (``merge_spans``) where ``group``'s
    options widen its CPU torch-path step (``precision.widens``): back-to-back params sharing
    a run key whose grads are held apart, exactly their size."""
    bucket = plan.bucket
    if plan.route not in ("tensors", "chunks") or not widens(group, bucket.dtype) \
            or bucket.backend != "torch" or bucket.device.type != "cpu" or bucket.external:
        return plan
    chunks = plan.chunks
    alone = [c.hi - c.lo == 1 and c.grad is not None and c.grad.numel() == c.end - c.start
             for c in chunks]
    merged, k = [], 0
    while k < len(chunks):
        if not alone[k]:
            merged.append(chunks[k])
            k += 1
            continue
        j = k + 1
        while j < len(chunks) and alone[j] and chunks[j].lo == chunks[j - 1].hi \
                and chunks[j].key == chunks[k].key:
            j += 1
        for lo, hi in merge_spans([c.start for c in chunks[k:j]], [c.end for c in chunks[k:j]]):
            merged.append(_joined(chunks[k + lo : k + hi]) if hi - lo > 1 else chunks[k + lo])
        k = j
    if len(merged) == len(chunks):
        return plan
    return StepPlan(bucket, plan.route, plan.step_runs, plan.key, merged)


def _joined(chunks: list) -> Chunk:
    """One chunk for back-to-back ``chunks``: their grads copied together, zeros between (by
    one C++ call, ``flatten_dense_tensors``: a Python ``reshape`` a grad cost as much as the
    copy)."""
    grad = chunks[0].grad
    key = (grad.dtype, grad.device)
    if key not in _GAPS:
        _GAPS[key] = torch.zeros(SLOT_ALIGN, dtype=grad.dtype, device=grad.device)
    parts = []
    end = None
    for c in chunks:
        if end is not None and c.start > end:
            parts.append(_GAPS[key][: c.start - end])
        parts.append(c.grad)
        end = c.end
    first, last = chunks[0], chunks[-1]
    return Chunk(first.lo, last.hi, first.start, last.end,
                 torch._C._nn.flatten_dense_tensors(parts), first.key)
