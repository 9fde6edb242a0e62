"""Fresh grads read where they lie, by one Triton launch per bucket (the plan's ``"table"`` route).

After ``zero_grad()`` autograd hands every step new grad tensors, each at its own address. The
Triton kernels can read them there (``kernels/table.py``), so a bucket's step is one launch that
moves each element's bytes once (fp32 AdamW: 28 per element), instead of a gather into the flat
grad buffer (36) followed by the launch. What that needs, per bucket:

- static tables, made once per layout: which param and which block of it each program updates,
  and each param's slot and size;
- each step, a device table of the grads' addresses. It is written without a host sync: the
  addresses go into a pinned staging buffer and are copied to the device with a non-blocking
  copy, ordered on the current stream before the launch. A staging buffer is refilled only once
  its copy has run (a CUDA event says so; ``query`` never waits): otherwise another is used. When
  the addresses are those of the previous step, nothing is copied.

Grads must be 16-byte aligned (autograd's always are: the caching allocator hands out 512-byte
aligned blocks), as the kernels read whole 16-byte vectors; otherwise the step gathers.

Params that stay where their owner keeps them (an external bucket: FSDP2's local shards,
ZeRO's bucket views) are read and written through a second, static table of their addresses,
their state still flat: one launch per bucket as well.

CUDA graphs: a step captured on this route reads the table already on the device, so it is
used only when the grads are those of the step before the capture (the same addresses, as a
captured graph's static grads are); a capture that meets new addresses, or a bucket without
tables yet, gathers instead (the copy is captured with the step). A table a graph reads is
never written again: later eager steps with other grads get a new one.
"""

from __future__ import annotations

import functools
import operator

import torch

from fastopt.flat import Bucket, local

# Byte alignment of a grad (or external param) the kernels read in place: one 16-byte vector.
GRAD_ALIGN = 16


def _capturing(device: torch.device) -> bool:
    """Is the current stream being captured into a CUDA graph? (The step runs each Triton
    bucket with its device current.)"""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _to_device(values: list, dtype: torch.dtype, device: torch.device, keep: list):
    """``values`` as a tensor on ``device`` without a host sync (on CUDA: from pinned memory,
    non-blocking; the pinned tensor is kept in ``keep`` while the copy may be pending)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    host = host.pin_memory()
    keep.append(host)
    return host.to(device, non_blocking=True)


class _Tables:
    """A bucket's static tables and its address upload (see the module docstring)."""

    def __init__(self, bucket: Bucket, block_size: int) -> None:
        device = bucket.device
        sizes = [e - s for s, e in zip(bucket.starts, bucket.ends)]
        block_param, block_offset = [], []
        for i, n in enumerate(sizes):
            for offset in range(0, n, block_size):
                block_param.append(i)
                block_offset.append(offset)
        self.device = device
        self.sizes = sizes
        self.block_size = block_size
        self.blocks = len(block_param)
        self.host: list = []  # pinned sources of the copies below
        self.block_param = _to_device(block_param, torch.int32, device, self.host)
        self.block_offset = _to_device(block_offset, torch.int64, device, self.host)
        self.slot_start = _to_device(bucket.starts, torch.int64, device, self.host)
        self.slot_size = _to_device(sizes, torch.int64, device, self.host)
        self.addresses = torch.zeros(len(sizes), dtype=torch.int64, device=device)
        # Params left where their owner keeps them are read and written by address too; they
        # never move while the layout holds (a moved param lays the bucket out again).
        self.param_addresses = _to_device([local(p).data_ptr() for p in bucket.params],
                                          torch.int64, device, self.host) \
            if bucket.external else None
        self.uploaded: list | None = None  # the addresses the device table holds
        self.captured = False  # a CUDA graph reads self.addresses: never write it again
        self.retired: list = []  # what captured graphs read (tables, older ones), kept alive
        self.staging: list = []  # CUDA: [pinned buffer, event of its last copy, its numpy view]

    def upload(self, addresses: list) -> bool:
        """Put ``addresses`` in the device table, stream-ordered; False when that cannot be
        done here (a CUDA graph capture meeting new addresses).

        A capture that finds its addresses already in the table records a launch that reads
        that table at every replay: from then on the table is the graph's, and new addresses
        go into a new one (the old one is kept alive for the graph)."""
        if _capturing(self.device):
            if addresses != self.uploaded:
                return False
            self.captured = True
            return True
        if addresses == self.uploaded:
            return True
        if self.captured:
            self.retired.append(self.addresses)
            self.addresses = torch.zeros_like(self.addresses)
            self.captured = False
        # written through a numpy view of host memory: a tensor made of the list and copied
        # cost about 4 us more a bucket and step
        if self.device.type != "cuda":
            self.addresses.numpy()[:] = addresses
        else:
            buffer = self._free_staging()
            buffer[2][:] = addresses
            self.addresses.copy_(buffer[0], non_blocking=True)
            buffer[1].record()
        self.uploaded = addresses
        return True

    def _free_staging(self) -> list:
        """A pinned staging buffer whose last copy to the device has run."""
        for buffer in self.staging:
            if buffer[1].query():
                return buffer
        pinned = torch.empty(self.addresses.numel(), dtype=torch.int64, pin_memory=True)
        buffer = [pinned, torch.cuda.Event(), pinned.numpy()]
        self.staging.append(buffer)
        return buffer

    def table(self, kernel_table):
        return kernel_table(self.addresses, self.param_addresses, self.block_param,
                            self.block_offset, self.slot_start, self.slot_size, self.blocks,
                            self.block_size)


def addressable(tensors: list, dtype: torch.dtype) -> bool:
    """Can the kernels read (and write) these tensors by address: dense, contiguous, real,
    of ``dtype``, each 16-byte aligned?"""
    for t in tensors:
        t = local(t)
        if t.layout != torch.strided or t.dtype != dtype or not t.is_contiguous() \
                or t.data_ptr() % GRAD_ALIGN:
            return False
    return True


@functools.cache
def _kernel_side() -> tuple:
    """``launch.block_size`` and ``GradTable``, imported at the first ``attach`` (they need
    Triton; an import statement in ``attach`` itself cost about 1.5 us a bucket and step)."""
    from fastopt.kernels import launch
    from fastopt.kernels.table import GradTable

    return launch.block_size, GradTable


def attach(bucket: Bucket, grads: list, addresses: list | None = None):
    """A ``GradTable`` through which the kernels read ``grads`` (one per param of ``bucket``,
    of the params' shapes and device), and the params too for an external bucket; or None when
    they cannot be read in place (then the plan gathers them, or updates params one by one).
    ``addresses``: the grads' data pointers, where ``fastopt.plan.check_grads`` has read them
    already (a bucket that is not external)."""
    current_block_size, GradTable = _kernel_side()
    if bucket.external:
        if not addressable(grads, bucket.dtype) or not addressable(bucket.params, bucket.dtype) \
                or [local(g).numel() for g in grads] != [local(p).numel() for p in bucket.params]:
            return None
        addresses = [local(g).data_ptr() for g in grads]
    else:  # checked in bulk already: dense, contiguous, the params' dtype
        if addresses is None:
            addresses = list(map(torch.Tensor.data_ptr, grads))
        if functools.reduce(operator.or_, addresses, 0) % GRAD_ALIGN:  # one is misaligned
            return None
    if 0 in addresses and any(a == 0 and g.numel() for a, g in zip(addresses, grads)):
        return None  # a tensor without a plain address (a DTensor grad): the checked path
    block_size = current_block_size()
    tables = bucket.grads.tables
    if tables is None or tables.block_size != block_size:
        if _capturing(bucket.device):
            return None  # no tables yet: a capture gathers (building them copies to the GPU)
        old, tables = tables, _Tables(bucket, block_size)
        if old is not None and old.captured:
            tables.retired.append(old)  # a graph reads it
        bucket.grads.tables = tables
    if not tables.upload(addresses):
        return None
    return tables.table(GradTable)
