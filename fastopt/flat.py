"""Flat buffers: the params of a group that share (device, dtype) as views into one buffer.

A :class:`Bucket` owns one contiguous 1-D buffer per quantity — the params, their grads and each
state tensor (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...) — and hands out per-param
views of it. Each param keeps its identity (the same ``Parameter`` the model holds), shape, values
and ``requires_grad``; only its storage moves (``p.data = view``). Complex params are stored as
their real view (2 reals per element), as torch.optim's Adam computes on them.

Params whose storage belongs to someone else stay where they are, in an *external* bucket:
DTensors (FSDP2's ``fully_shard``, tensor parallelism: fastopt works on their local shards) and
views into another buffer (ZeroRedundancyOptimizer's ``parameters_as_bucket_view``, FSDP1's flat
params, a user's own flat buffer). Moving those would leave the owner reading a stale copy. Their
state is still flat (over the local shards), and the update reads the params where they lie.

Each view a user can reach (a param's data, its state in ``optimizer.state``, a grad kept in
the flat grad buffer) has a storage of its own that aliases its slice of the flat buffer (see
``own_storage_view``): one param's storage is that param's bytes, not the whole buffer. So
``torch.save`` of one layer's ``state_dict``, ``pickle`` of a model or an optimizer, safetensors'
``save_model``/``load_model`` and accelerate's ``save_state`` (which group tensors by storage)
see each param as torch.optim leaves it, while the update still makes one pass over the buffer.

Offsets are Python ints (int64): buffers over 2**31 elements are fine.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None

# The storages of the flat buffers fastopt made, by StorageImpl address, each with a weak
# reference to it. While the weak reference lives, no other storage can take that address (the
# StorageImpl's memory is kept), so a live entry can never be confused with a user's buffer
# allocated where a freed fastopt buffer was. A param still in one of these storages may be laid
# out again (a second optimizer over the same model, a copy made by pickling); a view of any
# other buffer may not.
_OWN_STORAGES: dict = {}

# Alignment of the flat layout, in elements (as Megatron-LM's buffers): every slot starts at a
# multiple of SLOT_ALIGN (128 bytes of fp16, 256 of fp32), every buffer is padded to a multiple
# of BUFFER_ALIGN. Aligned pointers and element counts that are multiples of 16 let the Triton
# kernels use 128-bit loads and stores on every stream, and keep params aligned for cuBLAS and
# torch's vectorized kernels.
SLOT_ALIGN = 64
BUFFER_ALIGN = 128


def own_storage_view(piece: Tensor) -> Tensor:
    """``piece`` (a slice of a flat buffer) as a tensor whose storage is exactly its own bytes,
    aliasing the buffer's memory (through DLPack: the new storage holds a reference to the
    buffer, so the buffer lives as long as any such view does). Writes through either are seen
    by the other. Meta tensors, which DLPack cannot describe, stay plain views."""
    from torch.utils import dlpack

    try:
        return dlpack.from_dlpack(dlpack.to_dlpack(piece))
    except BufferError:  # a device DLPack cannot describe (meta): the plain view
        return piece


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor holding ``t``'s elements on this rank (``t`` itself unless a DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def is_movable(p: Tensor, own: set | None = None) -> bool:
    """May fastopt move ``p``'s storage into a flat buffer? Only when it is a fastopt buffer or
    ``p`` alone holds it: never a DTensor, a view into another owner's buffer, or a tensor that
    someone else also references (ZeroRedundancyOptimizer's bucket for a rank with one param):
    they would keep reading the old storage (a param made as a part of a laid-out one is
    such a view). With ``own`` (the storage addresses of the
    caller's own buffers), a param in another fastopt optimizer's buffer stays there: two
    optimizers sharing a param would otherwise take it from each other at every step."""
    if is_dtensor(p) or p.device.type == "meta":
        return False
    storage = p.untyped_storage()
    if p.device.type == "cpu" and storage.is_shared():
        return False  # shared with other processes (Hogwild): the copy would train alone
    whole = p.storage_offset() == 0 and storage.nbytes() == p.numel() * p.element_size()
    if _is_own(storage):  # laid out: a slot of its own (a part of one is a view, external)
        return whole and (own is None or storage._cdata in own)
    return whole and _holders(storage) <= 2  # p's own tensor and ``storage`` above


def _holders(storage) -> int:
    """How many references the storage has (torch's own test helper; 0 if unavailable)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count(storage._cdata) if use_count is not None else 0


def mark_laid_out(params: list) -> None:
    """Note that ``params`` live in a fastopt buffer where they are now."""
    for key, ref in list(_OWN_STORAGES.items()):  # a copy: other threads may lay out too
        if ref.expired():
            _OWN_STORAGES.pop(key, None)  # a buffer freed since: drop its entry
    for p in params:
        storage = p.untyped_storage()
        if storage._cdata not in _OWN_STORAGES:
            _OWN_STORAGES[storage._cdata] = StorageWeakRef(storage)


def _is_own(storage) -> bool:
    """Is ``storage`` one of fastopt's flat buffers (see ``_OWN_STORAGES``)?"""
    ref = _OWN_STORAGES.get(storage._cdata)
    return ref is not None and not ref.expired()


def local_value(value: Tensor, param: Tensor) -> Tensor:
    """A state tensor (loaded, or a DTensor from a checkpoint) as ``param``'s local piece."""
    if is_dtensor(param):
        if is_dtensor(value):
            if value.placements != param.placements:
                value = value.redistribute(param.device_mesh, param.placements)
            return value.to_local()
        if value.shape == param.shape:  # a full tensor: take this rank's piece, no collective
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(
                param.shape, param.device_mesh, param.placements)
            index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            return value[index]
    return local(value)


def real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def real_shape(t: Tensor) -> tuple:
    """The shape of ``t``'s real view (complex tensors gain a trailing 2); local for DTensors."""
    t = local(t)
    return (*t.shape, 2) if t.is_complex() else tuple(t.shape)


def as_real(t: Tensor) -> Tensor:
    """``t`` (its local piece, for a DTensor) as a dense, contiguous, real tensor of
    ``real_shape(t)`` (a view when it can be)."""
    t = local(t)
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t if t.is_contiguous() else t.contiguous()


def bucket_key(p: Tensor, own: set | None = None, flatten: bool = True) -> tuple:
    """Complex params get buckets of their own: their real views need even offsets. Params that
    stay where they are (``flatten=False``, or not ``is_movable``) get external buckets."""
    return (p.device, real_dtype(p), p.is_complex(), not (flatten and is_movable(p, own)))


@dataclass(eq=False)
class Bucket:
    """The params of one group that share (device, dtype), each in an aligned slot: where they
    live (fixed once laid out), with their grads (``grads``: a ``fastopt.grads.Grads``) and
    their state (``state``: a ``fastopt.buffers.Buffers``).

    ``starts[i]:ends[i]`` is param i's slice of every flat buffer of this bucket. An external
    bucket (``external``; see the module docstring) has no param buffer (``flat`` is None): its
    params stay where they are.
    """

    params: list
    device: torch.device
    dtype: torch.dtype
    starts: list
    ends: list
    numel: int  # elements of each flat buffer: the slots and their padding (aligned_offsets)
    flat: Tensor | None
    backend: str
    external: bool = False
    variant: object = None  # what set this bucket apart (e.g. "int8": 8-bit Adam state)
    options: tuple = ()  # its group's ``validation.checked_options``, laid out and checked
    grads: object = None  # fastopt.grads.Grads
    state: object = None  # fastopt.buffers.Buffers
    # What each param was when laid out: (dtype, local shape, data pointer); and the params'
    # own storages (see is_movable).
    param_dtypes: list = field(default_factory=list)
    param_shapes: list = field(default_factory=list)
    data_ptrs: list = field(default_factory=list)
    storage_keys: set = field(default_factory=set)
    real_views: dict = field(default_factory=dict)  # buffer name -> per-param real views
    write_back: list = field(default_factory=list)  # (copy, param): non-contiguous external params
    # Decisions made once, read every step: those that follow from the layout alone
    # (``fastopt.plan.gathers_fresh``; a new layout is a new bucket), and those that follow from
    # it and the state's dtypes, keyed by them (``fastopt.elementwise.step_cost``).
    decided: dict = field(default_factory=dict)

    def chunk_end(self, hi: int) -> int:
        """Where a chunk ending with param ``hi - 1`` may end: that param's end rounded up to
        ``SLOT_ALIGN`` (into padding only), so that a run's element count stays a multiple of
        16 for the kernels' vector accesses."""
        return min(round_up(self.ends[hi - 1], SLOT_ALIGN), self.numel)

    def view(self, buffer: Tensor, i: int, rows: int | None = None, own: bool = False) -> Tensor:
        """Param i's slice of ``buffer`` with the param's (local) shape and complex dtype; of a
        table buffer (``rows`` rows of ``numel``), the ``[rows, *shape]`` column block. With
        ``own``, a view with a storage of its own (``own_storage_view``), for what users see."""
        p = local(self.params[i])
        if rows is None:
            piece, lead = buffer[self.starts[i] : self.ends[i]], ()
        else:
            piece, lead = buffer.view(rows, self.numel)[:, self.starts[i] : self.ends[i]], (rows,)
        if p.is_complex():
            piece = torch.view_as_complex(piece.view((*lead, *p.shape, 2)))
        else:
            piece = piece.view((*lead, *p.shape))
        return own_storage_view(piece) if own else piece

    @functools.cached_property
    def device_index(self) -> int:
        """What ``Tensor.get_device()`` returns for tensors on this bucket's device."""
        return torch.empty(0, device=self.device).get_device()

    @functools.cached_property
    def plain(self) -> bool:
        """Are the params laid out here and real (each grad is then used as it is)? (A param
        whose dtype changes is laid out again, in a new bucket.)"""
        return not self.external and not self.params[0].is_complex()

    @functools.cached_property
    def flat_entries(self) -> int:
        """``flat_entries`` of this bucket's params."""
        return flat_entries(self.param_shapes)

    @functools.cached_property
    def gapless_vectors(self) -> bool:
        """Are the params all 1-D and back to back, no padding between them (sizes that are
        multiples of SLOT_ALIGN)? Their grads then gather into the flat buffer with one
        ``torch.cat``, a third of a multi-tensor copy's cost per tensor on CPUs."""
        return self.plain and gapless(self.param_shapes)

    def _buffer(self, name: str) -> Tensor:
        if name == "param":
            return self.flat
        if name == "grad":
            return self.grads.buffer
        return self.state.tensors[name]

    def param_pieces(self, name: str) -> list:
        """Every param's part of buffer ``name`` ("param", "grad" or a state name), shaped as
        the param's real view: made once and cached, so a step over many separately-held grads
        does not slice every buffer anew."""
        if name == "param" and self.external:
            return [self._external_param(i) for i in range(len(self.params))]
        views = self.real_views.get(name)
        if views is None:
            buffer = self._buffer(name)
            views = self.real_views[name] = [
                buffer[s:e].view(real_shape(p)) for p, s, e in zip(self.params, self.starts, self.ends)
            ]
        return views

    def whole_piece(self, name: str) -> Tensor:
        """Buffer ``name`` over every slot (its trailing padding left out): made once."""
        key = (name, "whole")
        view = self.real_views.get(key)
        if view is None:
            view = self.real_views[key] = self._buffer(name)[: self.numel]
        return view

    def pieces(self, name: str, chunks: list) -> list:
        """The part of buffer ``name`` ("param", "grad" or a state name) each chunk covers (a
        chunk of one param: its cached view, see ``param_pieces``)."""
        if name == "param" and self.external:
            return [self._external_param(c.lo) for c in chunks]
        whole = chunks[0] if len(chunks) == 1 else None
        if whole is not None and whole.hi - whole.lo > 1 and whole.end - whole.start == self.numel:
            return [self.whole_piece(name)]  # (a chunk of one param: its view, shaped as its grad)
        views = self.param_pieces(name)
        buffer = None
        out = []
        for c in chunks:
            if c.hi - c.lo == 1 and c.end == self.ends[c.lo]:
                out.append(views[c.lo])
            else:
                buffer = self._buffer(name) if buffer is None else buffer
                out.append(buffer[c.start : c.end])
        return out

    def _external_param(self, i: int) -> Tensor:
        """Param i of an external bucket as a real, contiguous tensor the update may write into
        (a copy, written back by ``finish``, if the param is not contiguous)."""
        p = local(self.params[i])
        real = torch.view_as_real(p) if p.is_complex() else p
        if real.is_contiguous():
            return real
        copy = real.contiguous()
        self.write_back.append((copy, real))
        return copy

    def finish(self) -> None:
        """After an update: copy results into the non-contiguous params it worked on copies of."""
        for copy, param in self.write_back:
            param.copy_(copy)
        self.write_back.clear()

    def is_intact(self) -> bool:
        """True while every param still lives where this bucket put (or found) it."""
        if not self.external:  # plain tensors (checked every step: keep it cheap)
            try:
                return list(map(Tensor.data_ptr, self.params)) == self.data_ptrs
            except RuntimeError:  # one became a tensor subclass without storage: lay out again
                return False
        return [local(p).data_ptr() for p in self.params] == self.data_ptrs

    def release_grad_buffer(self) -> None:
        """Drop the flat grad buffer (``fastopt.grads.Grads.release``) and its cached views."""
        self.grads.release()
        self.real_views.pop("grad", None)
        self.real_views.pop(("grad", "whole"), None)


def build_bucket(params: list, backend: str, external: bool = False, variant=None,
                 flat: Tensor | None = None) -> Bucket:
    """Move ``params`` (same device and real dtype) into one new contiguous buffer, or keep
    them in ``flat``, the buffer of a bucket of the same params being replaced; an external
    bucket leaves them where they are and only lays out their state."""
    from fastopt.buffers import Buffers
    from fastopt.grads import Grads

    first = params[0]
    device, dtype = first.device, real_dtype(first)
    starts, ends, size = aligned_offsets([local(p).numel() * (2 if p.is_complex() else 1)
                                          for p in params])
    kept = flat is not None
    if not kept and not external:
        flat = torch.zeros(size, dtype=dtype, device=device)
    bucket = Bucket(params=list(params), device=device, dtype=dtype, starts=starts, ends=ends,
                    numel=size, flat=flat, backend=backend, external=external, variant=variant)
    if flat is not None and not kept:
        with torch.no_grad():
            for i, p in enumerate(params):
                view = bucket.view(flat, i, own=True)
                view.copy_(p.data)
                p.data = view
        mark_laid_out(params)
    if flat is not None:
        bucket.storage_keys = {p.untyped_storage()._cdata for p in params}
    bucket.data_ptrs = [local(p).data_ptr() for p in params]
    bucket.param_dtypes = [p.dtype for p in params]
    bucket.param_shapes = [tuple(local(p).shape) for p in params]
    bucket.grads = Grads(bucket)
    bucket.state = Buffers(bucket)
    return bucket


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def aligned_offsets(sizes: list) -> tuple:
    """``(starts, ends, size)`` of slots of ``sizes`` elements in one flat buffer: each slot
    starts at a multiple of ``SLOT_ALIGN`` elements and the buffer holds a multiple of
    ``BUFFER_ALIGN``. The padding is zeros, and stays zeros: an update of zero params with
    zero grads and zero state writes zeros (every optimizer here), and nothing a user sees
    covers it."""
    starts, ends, offset = [], [], 0
    for n in sizes:
        offset = round_up(offset, SLOT_ALIGN)
        starts.append(offset)
        offset += n
        ends.append(offset)
    return starts, ends, round_up(offset, BUFFER_ALIGN)


def padded_size(sizes: list) -> int:
    """The elements of a flat buffer holding slots of ``sizes`` (``aligned_offsets``)."""
    return round_up(sum(round_up(n, SLOT_ALIGN) for n in sizes), BUFFER_ALIGN)


def group_params(params: list, variant=None, own: set | None = None,
                 flatten: bool = True) -> list:
    """Split params into ``(external, params)`` pairs sharing (device, real dtype, external,
    ``variant(p)``), in order of first appearance (``own``: see ``is_movable``; ``flatten``:
    see ``bucket_key``)."""
    groups: dict = {}
    for p in params:
        key = bucket_key(p, own, flatten) + ((variant(p),) if variant is not None else ())
        groups.setdefault(key, []).append(p)
    return [(key[3], members) for key, members in groups.items()]


# Moving params into a flat buffer holds the bucket's params twice until each original is
# freed: a bucket holds at most max(LAYOUT_MIN_BYTES, 1/LAYOUT_PARTS of its params' bytes), so
# laying a group out holds at most that much twice (and a step makes at most about LAYOUT_PARTS
# calls per device and dtype). A param larger than that is a bucket of its own.
LAYOUT_MIN_BYTES = 64 << 20
LAYOUT_PARTS = 8


def layout_parts(nbytes: list) -> list:
    """``[lo, hi)`` ranges of consecutive params of ``nbytes`` bytes, one per bucket (see
    ``LAYOUT_MIN_BYTES``)."""
    return bounded_runs(nbytes, max(LAYOUT_MIN_BYTES, -(-sum(nbytes) // LAYOUT_PARTS)))


def bounded_runs(nbytes: list, cap: int) -> list:
    """``[lo, hi)`` ranges of consecutive items of ``nbytes`` bytes, each at most ``cap`` bytes
    (an item larger than that is a range of its own)."""
    parts, lo, size = [], 0, 0
    for i, n in enumerate(nbytes):
        if i > lo and size + n > cap:
            parts.append((lo, i))
            lo, size = i, 0
        size += n
    if lo < len(nbytes):
        parts.append((lo, len(nbytes)))
    return parts


def flat_entries(shapes: list) -> int:
    """Calls a step over the flat buffer makes when it takes params of rank two or more one by
    one and runs of consecutive params of rank one or zero together (Adafactor): one per such
    param, one per run (an empty param breaks a run and takes none)."""
    entries, in_run = 0, False
    for shape in shapes:
        nonempty = math.prod(shape) > 0
        vector = nonempty and len(shape) <= 1
        entries += nonempty and not (vector and in_run)  # a matrix, or a run's first vector
        in_run = vector
    return entries


def gapless(shapes: list) -> bool:
    """Do params of these (real) shapes lie back to back in a flat buffer, no padding between
    them: all 1-D, every size but the last a multiple of ``SLOT_ALIGN``?"""
    return all(len(shape) == 1 for shape in shapes) \
        and all(shape[0] % SLOT_ALIGN == 0 for shape in shapes[:-1])


def runs(indices: list, keys: list) -> list:
    """Maximal runs of consecutive param indices sharing a key, as ``[first, last + 1, key]``."""
    out: list = []
    for i, key in zip(indices, keys):
        if out and out[-1][1] == i and out[-1][2] == key:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1, key])
    return out
