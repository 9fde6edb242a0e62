"""Entries of whole vectors for torch's fused CPU SGD, so that it equals torch.optim.SGD's
for-loop bit for bit.

torch's fused CPU kernels step an entry of ``n`` elements in SIMD vectors (16 fp32 or 8 fp64
lanes with AVX-512, half as many with AVX2) and its last ``n mod width`` elements in a scalar
loop. ``_fused_sgd_``'s scalar loop writes ``b * mu + g * (1 - tau)`` and ``theta - g * gamma``,
which the compiler may contract into fused multiply-adds that round once, where its vector loop
and torch.optim.SGD's for-loop ops round every product and sum: measured, an element of that
tail is an ulp off now and then, the others never. A momentum buffer near 2 (an ulp there is
2.4e-7) that later cancels towards zero carries such an ulp past the fp32 atol of 2e-7.

A call over a whole bucket ends in padding (the buffers' sizes are multiples of ``SLOT_ALIGN``),
but an entry of one param (a fresh grad held apart from the flat buffer, a chunk of one param)
ends inside it. ``split`` cuts such an entry at its last whole ``VECTOR`` of elements and steps
the rest as an entry of ``VECTOR`` elements: the param's and the state's slices run on into their
slots' zero padding (which stays zero: a zero param with a zero grad and a zero buffer steps to
zero), and the grad's last elements are copied into a zeroed scratch as long. Every element then
goes through the vector loop. Only SGD needs this: Adam's, AdamW's and Adagrad's fused ops
differ from their for-loops by an ulp now and then on sizes of whole vectors too (measured), so
cutting their tails would not make them equal.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastopt.flat import SLOT_ALIGN, Bucket

VECTOR = 16  # elements: a multiple of every SIMD width torch's CPU kernels step fp32 or fp64 in
assert SLOT_ALIGN % VECTOR == 0  # so that a param's last vector stays inside its slot


class Tail(NamedTuple):
    """Param ``i``'s cut (cached on its bucket): its whole vectors (``heads``, a 1-D view of each
    buffer, None when it has fewer than ``VECTOR`` elements), its last ``VECTOR`` elements
    (``ends``), the grad's scratch of ``VECTOR`` zeros and the part of it the grad's last
    elements are copied into (``into``: shaped as the param when the whole param is the tail)."""

    cut: int
    heads: list | None
    ends: list
    scratch: Tensor
    into: Tensor


def applies(bucket: Bucket, names: tuple) -> bool:
    """Does a torch-path SGD step of ``bucket`` with state buffers ``names`` go straight to
    torch's fused CPU op (state in its params' dtype, fp32 or fp64: no widened copies), on
    buffers with slots of their own? Decided once per bucket (asked every step; a state dtype
    is a layout option, so a bucket's state buffers keep theirs)."""
    key = ("whole vectors", names)
    decided = bucket.decided.get(key)
    if decided is None:
        decided = bucket.decided[key] = bucket.backend == "torch" \
            and bucket.device.type == "cpu" and bucket.plain \
            and bucket.dtype in (torch.float32, torch.float64) \
            and all(bucket.state.tensors[name].dtype == bucket.dtype for name in names)
    return decided


def split(bucket: Bucket, plan, params: list, grads: list, states: dict) -> tuple:
    """``params``, ``grads`` and the lists of ``states`` (name -> list): the entries of one
    fused call over ``bucket`` that ``plan`` (a ``fastopt.plan.StepPlan``) makes, with every
    entry whose length is not a multiple of ``VECTOR`` (a single param: runs of several end in
    padding) cut into its whole vectors and its padded last vector (see the module
    docstring)."""
    if plan.route not in ("tensors", "chunks") and len(bucket.params) > 1:
        return params, grads, states  # one entry over the whole bucket: it ends in padding
    if plan.route == "tensors":  # an entry per param, each a cached piece: the cut is cached
        return _split_all(bucket, grads, states)
    odd = [j for j, n in enumerate(map(Tensor.numel, params)) if n % VECTOR]
    if not odd:
        return params, grads, states
    names = tuple(states)
    params, grads = list(params), list(grads)
    states = {name: list(entries) for name, entries in states.items()}
    rows = plan.rows
    for j in odd:
        tail = _tail(bucket, rows[j], names)
        _cut_grad(tail, grads, j)
        _cut_entry(tail, params, states, j)
    return params, grads, states


class _Cut(NamedTuple):
    """``split`` of a bucket's entries of one per param: the params' and states' entries, and
    each param with a tail beside its ``Tail``."""

    params: list
    states: dict
    tails: list  # (param, Tail)


def _split_all(bucket: Bucket, grads: list, states: dict) -> tuple:
    """``split`` of an entry per param: the params' and states' entries made once per bucket
    (views of its buffers, which live as long as it does), the grads' each step."""
    names = tuple(states)
    key = ("vector cut", names)
    cut = bucket.real_views.get(key)
    if cut is None:
        params, states = list(bucket.param_pieces("param")), {
            name: list(entries) for name, entries in states.items()}
        tails = [(i, _tail(bucket, i, names)) for i, (start, end)
                 in enumerate(zip(bucket.starts, bucket.ends)) if (end - start) % VECTOR]
        for i, tail in tails:
            _cut_entry(tail, params, states, i)
        cut = bucket.real_views[key] = _Cut(params, states, tails)
    if not cut.tails:
        return cut.params, grads, cut.states
    grads = list(grads)
    for i, tail in cut.tails:
        _cut_grad(tail, grads, i)
    return cut.params, grads, cut.states


def _cut_entry(tail: Tail, params: list, states: dict, j: int) -> None:
    """Entry j of ``params`` and of each list of ``states`` becomes its param's whole vectors,
    its padded last vector appended (or, with no whole vector, becomes that last vector)."""
    views = tail.heads or tail.ends
    params[j] = views[0]
    for entries, view in zip(states.values(), views[1:]):
        entries[j] = view
    if tail.heads:
        params.append(tail.ends[0])
        for entries, view in zip(states.values(), tail.ends[1:]):
            entries.append(view)


def _cut_grad(tail: Tail, grads: list, j: int) -> None:
    """``_cut_entry`` for the grads: the grad's elements past its whole vectors are copied into
    ``tail``'s scratch (each step), which is the entry of its last vector."""
    grad = grads[j]
    if tail.heads is None:
        tail.into.copy_(grad)
        grads[j] = tail.scratch
        return
    flat = grad.reshape(-1)
    tail.into.copy_(flat[tail.cut:])
    grads[j] = flat[: tail.cut]
    grads.append(tail.scratch)


def _tail(bucket: Bucket, i: int, names: tuple) -> Tail:
    """Param ``i``'s ``Tail`` over the param buffer and the state buffers ``names``: made once
    per bucket (its buffers live as long as it does; ``fastopt.flat.Bucket.real_views``)."""
    key = ("vector tail", i, names)
    tail = bucket.real_views.get(key)
    if tail is not None:
        return tail
    buffers = [bucket._buffer(name) for name in ("param", *names)]
    start, n = bucket.starts[i], bucket.ends[i] - bucket.starts[i]
    cut = n - n % VECTOR
    heads = None if cut == 0 else [b[start : start + cut] for b in buffers]
    ends = [b[start + cut : start + cut + VECTOR] for b in buffers]
    scratch = torch.zeros(VECTOR, dtype=bucket.dtype, device=bucket.device)
    into = scratch[: n - cut]
    if cut == 0:  # the grad copied in as it is shaped
        into = into.view(bucket.param_pieces("param")[i].shape)
    tail = bucket.real_views[key] = Tail(cut, heads, ends, scratch, into)
    return tail
