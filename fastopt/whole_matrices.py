"""Whole matrices from sharded params, for an update that needs each matrix whole (Muon's
Newton–Schulz iterations) while FSDP2 keeps only some rows of it on each rank.

A param sharded on its first dimension (FSDP2's ``Shard(0)`` on a 1-D mesh: rank ``r`` holds
rows ``r*c : (r+1)*c`` with ``c = ceil(rows / world)``, the last ranks fewer or none) is seen
as its matrix ``(rows, cols)``. For a list of such matrices, every rank of the mesh runs:

1. ``gather``: each matrix's rows go to one rank, its owner (``owners``: whole shape batches
   spread over the ranks so that each owner still batches its matrices by shape), padded to
   ``c`` rows so that every rank sends the same size;
2. the owners compute on the whole matrices they own (the caller's function);
3. ``scatter``: each owner sends every rank its rows of the result.

Each matrix crosses the network twice (to its owner and back), rather than ``world`` times
for an all-gather on every rank, and the work is spread over the ranks. Collectives are
issued asynchronously, all at once, then waited for. A replicated DTensor is whole on every
rank already. Other placements (tensor parallel's ``Shard(1)``, 2-D meshes) are refused
with a clear error before anything is written.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def placement(p) -> str:
    """``"replicate"`` or ``"rows"`` (sharded on dim 0 over a 1-D mesh); else a ValueError."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    if all(isinstance(x, Replicate) for x in placements):
        return "replicate"
    if p.device_mesh.ndim == 1 and placements == (Shard(0),):
        return "rows"
    raise ValueError(
        f"Muon orthogonalizes each matrix whole: it takes DTensor params sharded on their first "
        f"dimension over a 1-D mesh (FSDP2) or replicated, not placements {placements}")


def rows_per_rank(rows: int, world: int) -> int:
    """Rows of the largest shard (torch.chunk's split, as DTensor's ``Shard(0)``)."""
    return math.ceil(rows / world) if rows else 0


def owners(shapes: list, world: int) -> list:
    """The rank that computes each matrix of ``shapes`` (oriented ``(m, n)`` shapes): each
    shape's matrices dealt out in turn, continuing from rank to rank across shapes, so owners
    batch by shape and their loads differ by at most one matrix per shape."""
    out, turn = [0] * len(shapes), 0
    for shape in dict.fromkeys(shapes):
        for i, s in enumerate(shapes):
            if s == shape:
                out[i] = turn % world
                turn += 1
    return out


class Exchange:
    """The gather and scatter of a list of row-sharded matrices on one mesh (see the module
    docstring). ``locals_``: each matrix's local rows ``(local_rows, cols)``; ``rows``: each
    matrix's global row count; ``owned``: the owner of each."""

    def __init__(self, mesh, locals_: list, rows: list, owned: list, dtype) -> None:
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.locals = locals_
        self.rows = rows
        self.owned = owned
        self.dtype = dtype

    def _padded(self, i: int, value: Tensor) -> Tensor:
        local = self.locals[i]
        chunk = rows_per_rank(self.rows[i], self.world)
        out = torch.zeros(chunk, local.shape[1], dtype=self.dtype, device=local.device)
        out[: value.shape[0]].copy_(value)
        return out

    def gather(self) -> dict:
        """``{i: whole matrix i}`` for the matrices this rank owns (in ``dtype``)."""
        pending, received = [], {}
        for i, local in enumerate(self.locals):
            owner = self.owned[i]
            sent = self._padded(i, local)
            parts = [torch.empty_like(sent) for _ in range(self.world)] \
                if owner == self.rank else None
            pending.append(dist.gather(sent, parts, dst=dist.get_global_rank(self.group, owner),
                                       group=self.group, async_op=True))
            if parts is not None:
                received[i] = parts
        for work in pending:
            work.wait()
        return {i: torch.cat(parts)[: self.rows[i]] for i, parts in received.items()}

    def scatter(self, results: dict) -> list:
        """Each matrix's rows of its owner's result (``results``: ``{i: whole result}`` for
        the matrices this rank owns), as this rank's local rows."""
        pending, outs = [], []
        for i, local in enumerate(self.locals):
            owner = self.owned[i]
            out = torch.empty(rows_per_rank(self.rows[i], self.world), local.shape[1],
                              dtype=self.dtype, device=local.device)
            parts = None
            if owner == self.rank:
                whole = results[i]
                padded = torch.zeros(out.shape[0] * self.world, out.shape[1], dtype=self.dtype,
                                     device=out.device)
                padded[: whole.shape[0]].copy_(whole)
                parts = list(padded.chunk(self.world))
            pending.append(dist.scatter(out, parts, src=dist.get_global_rank(self.group, owner),
                                        group=self.group, async_op=True))
            outs.append(out)
        for work in pending:
            work.wait()
        return [out[: local.shape[0]] for out, local in zip(outs, self.locals)]
