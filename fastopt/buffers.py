"""A bucket's state: named flat buffers and a per-param scalar table.

- ``tensors``: one flat buffer per state name (``exp_avg``, ``square_avg``...), with the
  bucket's slots, or ``rows`` rows of them (a per-sample table, SAGA's), or one entry per block
  of a param (``blockwise``: quantized state's scales, with ``block_starts`` and the kernels' ``block_table``),
  or ``nibbles``: two elements to a byte (4-bit codes: param i's are bytes
  ``[start // 2, start // 2 + ceil(numel / 2))``, slots being even), or
  ``packed``: shapes of their own per param (Adafactor's ``row_var``), each piece in an aligned
  slot of its own (laid out as the params are, so a run of params that all keep a
  param-shaped packed state spans one range of it with the params' own spacing);
- ``scalars``: float32 ``[params, width]``: per param the scalars its declaration keeps
  (``step``, ``mu_product``...) and then the values the scalar math derives from them each step
  (the kernels read a param's row); ``ids`` are equal for params whose kept scalars are equal,
  so that they can share one call. A Triton bucket's table also has a host mirror: its values
  as the host last wrote them, valid while the table's version counter says no one else has
  written it since (``host_mirror``), so that the scalar math can run on Python floats and
  reach the device in one non-blocking copy (``fastopt.elementwise``).

Which buffers and scalars exist is the optimizer's declaration (``fastopt.declaration``); this
module only holds them.
"""

from __future__ import annotations

import math

import numpy
import torch
from torch import Tensor

from fastopt.flat import DTensor, aligned_offsets, is_dtensor, own_storage_view


class Buffers:
    """The state of one bucket (see the module docstring)."""

    def __init__(self, bucket) -> None:
        self.bucket = bucket
        n = len(bucket.params)
        self.tensors: dict = {}  # name -> flat buffer (changed only by ensure and drop)
        self._dtypes: frozenset | None = None  # dtypes' cache: the dtypes of ``tensors``
        self.rows: dict = {}  # name -> rows, for table buffers (SAGA)
        self.packed: dict = {}  # name -> per param (start, end, shape), or None: keeps none
        self.blockwise: set = set()  # names with one entry per block (quantized state's scales)
        self.nibbles: set = set()  # names holding two elements to a byte (4-bit codes)
        self.block: int | None = None  # quantized state's block, in elements (None: none)
        self._block_table: Tensor | None = None  # see block_table
        self.block_starts: list = []  # param i's blocks: [block_starts[i], block_starts[i + 1])
        self.scalars: Tensor | None = None  # float32 [params, width] (see the module docstring)
        self.scalar_names: tuple = ()  # the kept columns
        self.views: dict = {}  # kept scalar name -> its 0-d view per param
        self._host = None  # host_scalars' cache: (array, the table it covers)
        self._mirror = None  # host_mirror's (array, the table's version it matches)
        self.ids: list = [None] * n  # host-side: equal ids => equal kept scalars
        self.seen_version = None  # the table's version counter when fastopt last wrote it
        self.has_state: list = [False] * n
        self.stepped: list = [False] * n  # updated at least once (torch's fused checks before)
        # buffer name -> params given it after they had other state (SGD's momentum switched on
        # mid-run beside a master): their first step with it is still to come
        self.added_late: dict = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def ensure(self, name: str, rows: int | None = None, dtype: torch.dtype | None = None,
               fill: float = 0.0, shapes: list | None = None) -> Tensor:
        """The flat state buffer ``name`` (``fill`` when new): the bucket's slots, or ``rows``
        rows of them, or one per block for a blockwise name (``*_absmax``), or packed pieces
        of ``shapes`` (one per param, None for a param that keeps none), in ``dtype``
        (default: the params')."""
        if name not in self.tensors:
            b = self.bucket
            size = b.numel * (1 if rows is None else rows)
            if shapes is not None:
                size = self._pack(name, shapes)
            elif name in self.nibbles:
                size = b.numel // 2
            elif name.endswith("_absmax") and self.block is not None:
                self.blockwise.add(name)
                size = self.block_starts[-1]
            self.tensors[name] = torch.full((size,), fill, dtype=dtype or b.dtype,
                                            device=b.device)
            self._dtypes = None
            if fill != 0.0 and rows is None and name not in self.blockwise \
                    and name not in self.packed:
                _zero_padding(b, self.tensors[name])
            if rows is not None:
                self.rows[name] = rows
        return self.tensors[name]

    def drop(self, name: str) -> None:
        """Forget state buffer ``name`` (a master replaced by its other form)."""
        del self.tensors[name]
        self._dtypes = None

    @property
    def dtypes(self) -> frozenset:
        """The dtypes the state buffers are stored in (read every step: made once)."""
        if self._dtypes is None:
            self._dtypes = frozenset(t.dtype for t in self.tensors.values())
        return self._dtypes

    def _pack(self, name: str, shapes: list) -> int:
        """Lay out packed buffer ``name``: a slot per param that keeps it; its size."""
        kept = [shape for shape in shapes if shape is not None]
        starts, ends, size = aligned_offsets([math.prod(shape) for shape in kept])
        slots = iter(zip(starts, ends, kept))
        self.packed[name] = [None if shape is None else next(slots) for shape in shapes]
        return size

    def ensure_scalars(self, names: tuple, width: int, device: torch.device) -> Tensor:
        """The scalar table: ``names`` kept per param, ``width`` columns in all."""
        if self.scalars is None:
            self.scalars = torch.zeros(len(self.bucket.params), width, dtype=torch.float32,
                                       device=device)
            self.scalar_names = tuple(names)
            self.views = {name: list(self.scalars[:, k].unbind())
                          for k, name in enumerate(names)}
            if self.bucket.backend == "triton":
                self._mirror = (numpy.zeros(tuple(self.scalars.shape), dtype=numpy.float32),
                                self.scalars._version)
            self.note_written()
        return self.scalars

    def note_written(self) -> None:
        """fastopt has written the scalar table (torch ops count in its version counter; the
        host's numpy writes and the kernels' do not): what it holds is what ``ids`` say."""
        if self.scalars is not None:
            self.seen_version = self.scalars._version

    def written_elsewhere(self) -> bool:
        """Has anyone but fastopt written the table since it last did: a kept scalar edited
        in place through ``optimizer.state`` (``state[p]["step"].zero_()``), which ``ids``
        do not know of?"""
        return self.scalars is not None and self.scalars._version != self.seen_version

    def host_scalars(self):
        """The CPU scalar table as a numpy array over the same memory (made once: reading and
        writing a few Python floats through it costs far less than torch ops)."""
        if self._host is None or self._host[1] is not self.scalars:
            self._host = (self.scalars.numpy(), self.scalars)
        return self._host[0]

    def host_mirror(self):
        """A Triton bucket's scalar table as the host last wrote it (a numpy array), or None
        where the host does not know it without reading the device: something else has
        written the table since (the scalar math on the device's columns, a ``found_inf``
        restore, a user through ``state``), which its version counter tells."""
        if self._mirror is None or self._mirror[1] != self.scalars._version:
            return None
        return self._mirror[0]

    def forget_mirror(self) -> None:
        """The table was written where its version counter does not see (the kernels' CPU
        table through ``host_scalars``): the host mirror no longer knows it."""
        self._mirror = None

    def write_scalars(self, index: list, rows: Tensor) -> None:
        """Rows ``index`` of the kept columns set to ``rows`` (CPU float32), on the table and,
        while it is valid, on its host mirror."""
        mirror = self.host_mirror()
        self.scalars[index, : rows.shape[1]] = rows.to(self.scalars.device)
        self.note_written()
        if mirror is not None:
            mirror[index, : rows.shape[1]] = rows.numpy()
            self._mirror = (mirror, self.scalars._version)

    def upload_mirror(self, mirror) -> None:
        """The table set to ``mirror`` (from ``host_mirror``, updated by the host) without a
        host sync: on CUDA a non-blocking copy from pinned memory (the caching host allocator
        keeps it until the copy has run)."""
        host = torch.from_numpy(mirror)
        if self.scalars.device.type == "cuda":
            host = host.pin_memory()
        self.scalars.copy_(host, non_blocking=True)
        self.note_written()
        self._mirror = (mirror, self.scalars._version)

    def __getstate__(self) -> dict:
        """A copy (deepcopy, pickle) makes its own ``host_scalars`` over its own table, and
        keeps the host mirror where it is valid (its table's version counter starts anew)."""
        mirror = self.host_mirror() if self.scalars is not None else None
        return {**self.__dict__, "_host": None, "_mirror": mirror}

    def __setstate__(self, state: dict) -> None:
        mirror = state.pop("_mirror", None)
        self.__dict__.update(state)
        self._mirror = None if mirror is None else (mirror, self.scalars._version)
        self.note_written()  # a copy's version counter starts anew

    def column(self, name: str) -> Tensor:
        return self.scalars[:, self.scalar_names.index(name)]

    def add_blocks(self, block: int) -> None:
        """Blocks of ``block`` elements from each param's start (the last one of a param may be
        shorter): which blocks each param owns (``block_starts``)."""
        self.block = block
        starts = [0]
        for s, e in zip(self.bucket.starts, self.bucket.ends):
            starts.append(starts[-1] + -(-(e - s) // block))
        self.block_starts = starts

    @property
    def block_table(self) -> Tensor:
        """int64 [blocks, 2]: each block's flat [start, end), the kernels' map from a block to
        its elements; made when a kernel first asks (the torch path walks the params instead,
        so a CPU bucket never holds it: 16 bytes a block)."""
        if self._block_table is None:
            b = self.bucket
            rows = []
            for s, e in zip(b.starts, b.ends):
                block_starts = torch.arange(s, e, self.block, dtype=torch.int64)
                rows.append(torch.stack([block_starts,
                                         (block_starts + self.block).clamp(max=e)], dim=1))
            self._block_table = torch.cat(rows).to(b.device)
        return self._block_table

    def local_view(self, name: str, i: int) -> Tensor | None:
        """Param i's part of buffer ``name``: param-shaped, ``[rows, *shape]`` for a table, its
        run of block scales for a blockwise buffer (8-bit state), its own shape for a packed
        one (None where param i keeps none), its bytes for 4-bit codes."""
        buffer = self.tensors[name]
        if name in self.packed:
            slot = self.packed[name][i]
            return None if slot is None else buffer[slot[0] : slot[1]].view(slot[2])
        if name in self.blockwise:
            return buffer[self.block_starts[i] : self.block_starts[i + 1]]
        if name in self.nibbles:
            start, end = self.bucket.starts[i], self.bucket.ends[i]
            return buffer[start // 2 : (end + 1) // 2]
        return self.bucket.view(buffer, i, self.rows.get(name))

    def state_view(self, name: str, i: int) -> Tensor | None:
        """What ``optimizer.state`` holds for param i: its view of buffer ``name`` (with a
        storage of its own), as a DTensor laid out like the param when the param is one (as
        torch.optim's would be)."""
        view = self.local_view(name, i)
        if view is None:
            return None
        view = own_storage_view(view)
        p = self.bucket.params[i]
        if is_dtensor(p) and self.rows.get(name) is None and name not in self.blockwise \
                and name not in self.nibbles:
            return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                                      shape=p.shape, stride=p.stride())
        return view

    def nbytes(self) -> int:
        """Bytes held: every buffer and the scalar table."""
        tables = [self.scalars] if self.scalars is not None else []
        return sum(t.numel() * t.element_size() for t in [*self.tensors.values(), *tables])


def _zero_padding(bucket, buffer: Tensor) -> None:
    """Keep the alignment padding of a buffer filled with a nonzero initial value at zero
    (nothing a user sees covers it, and zeros stay zeros through every update)."""
    edges = [0, *(x for s, e in zip(bucket.starts, bucket.ends) for x in (s, e)), bucket.numel]
    for lo, hi in zip(edges[::2], edges[1::2]):
        if hi > lo:
            buffer[lo:hi] = 0
