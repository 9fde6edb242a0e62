"""The aligned flat layout: every slot of every flat buffer starts at a multiple of 64 elements,
every buffer holds a multiple of 128, runs over the flat grad buffer end on such a boundary,
and the padding is never visible and stays zero."""

from __future__ import annotations

import pytest
import torch

import fastopt
from fastopt.flat import BUFFER_ALIGN, SLOT_ALIGN, aligned_offsets, padded_size
from helpers import BACKENDS, clone_params, make_params

ODD_SHAPES = [(3,), (), (0,), (129,), (5, 13), (1,), (4097,), (2, 3, 7)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def slot(t, buffer) -> int:
    """Where ``t`` starts in ``buffer``, in elements."""
    return (t.data_ptr() - buffer.data_ptr()) // buffer.element_size()


def test_aligned_offsets():
    starts, ends, size = aligned_offsets([3, 0, 129, 64, 1])
    assert starts == [0, 64, 64, 256, 320] and ends == [3, 64, 193, 320, 321]
    assert size == 384 == padded_size([3, 0, 129, 64, 1])
    assert aligned_offsets([]) == ([], [], 0) and padded_size([64, 64]) == 128


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_slot_is_aligned_and_the_padding_stays_invisible_and_zero(dtype):
    """Params, grads (laid out by zero_grad(set_to_none=False)) and every state buffer: slots
    at multiples of 64 elements, buffers of a multiple of 128; after steps with weight decay the
    padding of every buffer is still zero, and state_dict, p.grad and the model's state_dict
    hold each param's own elements only."""
    params = clone_params(make_params(ODD_SHAPES, dtype=dtype))
    opt = fastopt.AdamW(params, lr=0.1, weight_decay=0.1, amsgrad=True, backend="torch")
    for step in range(3):
        opt.zero_grad(set_to_none=step == 0)
        for p in params:
            if step == 0:
                p.grad = torch.randn_like(p)
            else:
                p.grad.copy_(torch.randn_like(p))
        opt.step()
    bucket = opt._buckets[0][0]
    buffers = {"param": bucket.flat, "grad": bucket.grads.buffer, **bucket.state.tensors}
    assert all(b.numel() % BUFFER_ALIGN == 0 for b in buffers.values())
    for i, p in enumerate(params):
        assert bucket.starts[i] % SLOT_ALIGN == 0
        if not p.numel():
            continue  # an empty param has no address to place
        assert slot(p, bucket.flat) == bucket.starts[i]
        assert slot(p.grad, bucket.grads.buffer) == bucket.starts[i]
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert slot(opt.state[p][name], bucket.state.tensors[name]) == bucket.starts[i]
    used = torch.zeros(bucket.numel, dtype=torch.bool)
    for s, e in zip(bucket.starts, bucket.ends):
        used[s:e] = True
    for name, buffer in buffers.items():
        assert not buffer[~used].any(), f"padding of {name} changed"
    saved = opt.state_dict()["state"]
    for i, p in enumerate(params):
        assert p.grad.shape == p.shape
        assert all(saved[i][k].shape == p.shape for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_runs_over_flat_grads_start_aligned_and_count_multiples_of_16(backend, monkeypatch):
    """What the update functions get when grads live in the flat buffer (a loop keeping its
    grads, one param without a grad splitting the run): every chunk starts on a slot boundary
    and has a length that is a multiple of 16 (128-bit accesses on a GPU)."""
    params = clone_params(make_params(ODD_SHAPES))
    opt = fastopt.SGD(params, lr=0.1, momentum=0.9, backend=backend)
    seen = []
    original = type(opt).update

    def spy(self, group, bucket, plan, *args):
        seen.extend((c.start, c.end) for c in plan.chunks)
        return original(self, group, bucket, plan, *args)

    monkeypatch.setattr(type(opt), "update", spy)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    seen.clear()
    params[2].grad = None  # a param without a grad splits the run
    for p in params:
        if p.grad is not None:
            p.grad.copy_(torch.randn_like(p))
    opt.step()
    assert len(seen) >= 2
    for start, end in seen:
        assert start % SLOT_ALIGN == 0 and (end - start) % 16 == 0
