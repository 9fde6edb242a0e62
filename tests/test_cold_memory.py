"""Memory from a cold start (``torch.profiler``, the model's construction included): the layout
holds at most one bucket's params twice, ``in_backward=True`` saves the grads from the first
iteration on, and ``fastopt.memory.estimate`` predicts the peak."""

from __future__ import annotations

import pytest
import torch

import fastopt
from benchmarks.cold_memory import CONFIGS, cold_run, mlp
from fastopt import flat, in_backward


def test_the_layout_holds_one_bucket_twice_at_most(monkeypatch):
    """Eight 1 MiB layers, buckets of at most 1 MiB: building the optimizer holds the params
    and one bucket's flat buffer, never a second copy of the whole model; the estimate's
    ``layout_bytes`` is that bucket; the numbers are those of one bucket."""
    make_model, loss_fn = mlp(torch.float32, width=512, depth=8)
    results = {}
    for min_bytes in (1 << 20, 1 << 30):
        monkeypatch.setattr(flat, "LAYOUT_MIN_BYTES", min_bytes)
        built = {}

        def make_optimizer(model):
            built["opt"] = fastopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            built["model"] = model
            return built["opt"]

        peaks = cold_run(make_model, make_optimizer, loss_fn, iterations=3)
        opt, model = built["opt"], built["model"]
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        largest = max(b.numel * b.dtype.itemsize for b in opt._buckets[0])
        assert peaks["construction"] - params <= largest + (64 << 10), (peaks, largest)
        estimate = fastopt.memory.estimate(model, "adamw")
        assert estimate.devices["cpu"].layout_bytes == largest
        results[min_bytes] = (len(opt._buckets[0]), [p.detach().clone() for p in model.parameters()])
    assert results[1 << 20][0] == 8 and results[1 << 30][0] == 1
    for ours, one_bucket in zip(results[1 << 20][1], results[1 << 30][1]):
        assert torch.equal(ours, one_bucket)


def test_in_backward_saves_the_grads_from_the_first_iteration(monkeypatch):
    """Six 1 MiB layers, step groups of one layer: the first iteration's peak with
    ``in_backward=True`` is the default loop's less all grads but about one layer's, as in
    every later iteration."""
    monkeypatch.setattr(in_backward, "STEP_GROUP_BYTES", 1 << 20)
    make_model, loss_fn = mlp(torch.float32, width=512, depth=6)
    peaks = {on: cold_run(make_model, lambda m, on=on: fastopt.AdamW(
        m.parameters(), lr=1e-3, in_backward=on), loss_fn) for on in (False, True)}
    grads = sum(p.numel() * 4 for p in make_model().parameters())
    layer = (512 * 512 + 512) * 4
    for iteration in ("iteration 1", "iteration 2", "iteration 3"):
        saved = peaks[False][iteration] - peaks[True][iteration]
        assert grads - layer - (64 << 10) <= saved <= grads, (iteration, saved, grads)


class NoStep:
    """A loop's optimizer that only drops the grads: the run then holds params, grads and the
    model's own temporaries (activations, autograd's buffers)."""

    def __init__(self, model):
        self.params = list(model.parameters())

    def step(self):
        pass

    def zero_grad(self):
        for p in self.params:
            p.grad = None


@pytest.fixture(scope="module")
def bf16_mlp():
    """The bf16 model of the estimate's tests and its loop's own cold peak without an
    optimizer (``NoStep``): measured once for every configuration."""
    make_model, loss_fn = mlp(torch.bfloat16, width=512, depth=6)
    return make_model, loss_fn, cold_run(make_model, NoStep, loss_fn)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_estimate_holds_to_the_cold_peak(name, bf16_mlp):
    """``memory.estimate(...).peak_bytes`` against the profiler's cold peak (the model, the
    optimizer's construction and three iterations) of a bf16 model, for AdamW's default and
    each memory option: at least the measured peak less the model's own temporaries (which
    the estimate does not count: measured in the same loop without an optimizer), to 1 %
    (in_backward's next grad arriving beside a step group's), and at most 5 % over the
    measured peak (the widened slices' temporaries are counted at their largest)."""
    make_model, loss_fn, bare = bf16_mlp
    options = CONFIGS[name]
    peaks = cold_run(make_model, lambda m: fastopt.AdamW(m.parameters(), lr=1e-3, **options),
                     loss_fn)
    params = sum(p.numel() * p.element_size() for p in make_model().parameters())
    own = bare["cold"] - 2 * params  # beyond the params and their grads
    assert 0 <= own < 0.1 * params
    estimated = fastopt.memory.estimate(make_model(), "adamw", **options).peak_bytes
    assert 0.99 * (peaks["cold"] - own) <= estimated <= 1.05 * peaks["cold"], (peaks, estimated,
                                                                               own)
