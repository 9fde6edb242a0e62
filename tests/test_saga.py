"""SAGA: parity with a plain reference written here, state_dict, errors, the memory refusal,
and convergence on L2-regularised softmax regression over scikit-learn's digits."""

import io

import numpy as np
import pytest
import torch
from helpers import BACKENDS, TOLERANCES, make_params

import fastopt
from examples import saga_digits as saga_demo
from fastopt import memory, shapes

SHAPES = [(129,), (), (0,), (4, 5), (1,), (3, 7)]


class ReferenceSAGA:
    """Defazio, Bach & Lacoste-Julien (2014), one tensor at a time, zero-initialised table;
    the L2 term applied at every step, not stored. Params without a grad are skipped."""

    def __init__(self, groups):
        self.groups = groups
        self.table = {id(p): p.new_zeros(g["num_samples"], *p.shape) for g in groups
                      for p in g["params"]}
        self.mean = {id(p): torch.zeros_like(p) for g in groups for p in g["params"]}

    @torch.no_grad()
    def step(self, index):
        for group in self.groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                row, mean = self.table[id(p)][index], self.mean[id(p)]
                delta = p.grad - row
                p -= group["lr"] * (delta + mean + group.get("weight_decay", 0.0) * p)
                mean += delta / group["num_samples"]
                row.copy_(p.grad)


def make_pair(shapes, backend, groups_options):
    init = make_params(shapes, seed=4)
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    half = len(shapes) // 2
    split = [(0, half), (half, len(shapes))]
    ours = fastopt.SAGA([dict(params=ours_params[a:b], **o) for (a, b), o in
                         zip(split, groups_options)], lr=0.05, num_samples=7, backend=backend)
    ref = ReferenceSAGA([dict(params=ref_params[a:b], **{"lr": 0.05, "num_samples": 7, **o})
                         for (a, b), o in zip(split, groups_options)])
    return ours, ref, ours_params, ref_params


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_reference_over_many_steps(backend):
    groups = [dict(weight_decay=0.1), dict(lr=0.02, num_samples=5)]
    ours, ref, ours_params, ref_params = make_pair(SHAPES, backend, groups)
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        index = int(torch.randint(0, 5, (), generator=gen))
        for i, (p, q) in enumerate(zip(ours_params, ref_params)):
            if (step + i) % 7 == 3:  # now and then a param without a grad
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step(index=index)
        ref.step(index)
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])
    for p, q in zip(ours_params, ref_params):
        state = ours.state[p]
        torch.testing.assert_close(state["gradient_table"], ref.table[id(q)],
                                   **TOLERANCES[torch.float32])
        torch.testing.assert_close(state["gradient_mean"], ref.mean[id(q)],
                                   **TOLERANCES[torch.float32])
    # The table is one flat buffer of num_samples rows per bucket.
    bucket = ours._buckets[1][0]
    assert bucket.state.tensors["gradient_table"].shape == (5 * bucket.numel,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_and_a_loaded_state_dict_continue_identically(backend):
    ours, _, params, _ = make_pair(SHAPES, backend, [dict(lr=torch.tensor(0.05)), dict()])
    gen = torch.Generator().manual_seed(1)

    def run(opt, params, steps, gen):
        for _ in range(steps):
            index = int(torch.randint(0, 7, (), generator=gen))
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step(index=index)

    run(ours, params, 6, gen)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["state"][3]["gradient_table"].shape == (7, 4, 5)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin, *_ = make_pair(SHAPES, backend, [dict(lr=torch.tensor(0.05)), dict()])
    twin = fastopt.SAGA([dict(params=twin_params[:3], lr=torch.tensor(0.05)),
                         dict(params=twin_params[3:])], lr=0.05, num_samples=7, backend=backend)
    twin.load_state_dict(saved)
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    run(ours, params, 4, gen_a)
    run(twin, twin_params, 4, gen_b)
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def test_bad_input_gets_a_clear_error_and_changes_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
        fastopt.SAGA([p], lr=-0.1, num_samples=3)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="Invalid num_samples"):
            fastopt.SAGA([p], lr=0.1, num_samples=bad)
    with pytest.raises(ValueError, match="Invalid weight_decay value: -1"):
        fastopt.SAGA([p], lr=0.1, num_samples=3, weight_decay=-1)
    opt = fastopt.SAGA([p], lr=0.1, num_samples=3)
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match="index=i"):
        opt.step()
    with pytest.raises(IndexError, match="index 3 is out of range for num_samples=3"):
        opt.step(index=3)
    with pytest.raises(TypeError, match="index must be"):
        opt.step(index=torch.tensor(1.0))
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state
    with pytest.raises(ValueError, match="SAGA does not take max_grad_norm"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "max_grad_norm": 1.0})
    opt.step(index=np.int64(1))  # numpy integers (np.random.permutation) are fine
    opt.step(index=torch.tensor(2))  # a 1-element integer tensor is fine
    assert torch.equal(opt.state[p]["gradient_table"][2], torch.ones(3))


def test_a_table_that_cannot_fit_raises_memory_error_before_allocating(monkeypatch):
    # The seed's case: its trainable head on ResNet-18 with a table row per image. At 10**6
    # samples the table is ~8.4 TB, more than any machine this runs on has free.
    head = [torch.nn.Parameter(torch.zeros(s)) for s in shapes.resnet18_head()]
    pointers = [p.data_ptr() for p in head]
    with pytest.raises(MemoryError) as info:
        fastopt.SAGA(head, lr=0.1, num_samples=10**6)
    message = str(info.value)
    report = memory.estimate(head, "saga", num_samples=10**6)
    assert f"{report.devices['cpu'].new_bytes:,} bytes" in message
    assert "are free" in message and "Nothing was allocated" in message
    assert [p.data_ptr() for p in head] == pointers  # nothing was laid out
    # At the boundary, with the free memory pinned: one sample more than fits is refused.
    params = [torch.nn.Parameter(torch.zeros(100))]
    per_row = 100 * 4
    fixed = memory.estimate(params, "saga", num_samples=10).devices["cpu"].new_bytes - 10 * per_row
    monkeypatch.setattr(memory, "free_bytes", lambda device: fixed + 10 * per_row)
    fastopt.SAGA(params, lr=0.1, num_samples=10)
    with pytest.raises(MemoryError):
        fastopt.SAGA(params, lr=0.1, num_samples=11)


def test_converges_where_sgd_at_the_same_lr_does_not():
    """Digits softmax regression (n = 1797, L2 = 1e-2): after 5 epochs of one-sample steps at
    lr = 0.1, SAGA is within 2e-3 of the L-BFGS optimum; SGD stays 10x further away."""
    x, y = saga_demo.digits()
    best = saga_demo.optimum(x, y)
    saga = saga_demo.train("saga", x, y, lr=0.1, epochs=5, backend="torch")
    sgd = saga_demo.train("sgd", x, y, lr=0.1, epochs=5, backend="torch")
    saga_gap, sgd_gap = saga[-1] - best, sgd[-1] - best
    assert 0 <= saga_gap < 2e-3, saga
    assert sgd_gap > 10 * saga_gap, (saga, sgd)


def test_groups_generators_named_params_and_checks_per_group(monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = fastopt.SAGA([{"params": model.parameters()}], lr=0.1, num_samples=4)
    assert len(opt.param_groups[0]["params"]) == 2  # the generator was not used up
    named = fastopt.SAGA(model.named_parameters(), lr=0.1, num_samples=4)
    assert len(named.param_groups[0]["params"]) == 2
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="Invalid num_samples"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))],
                                 "num_samples": bad})
    with pytest.raises(MemoryError, match="10,000,000,000,000 samples"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))],
                             "num_samples": 10**13})
    assert len(opt.param_groups) == 1
    big = [torch.nn.Parameter(torch.zeros(1000, 1000))]
    with pytest.raises(MemoryError, match="10,000,000 samples"):
        fastopt.SAGA([{"params": big, "num_samples": 10**7}], lr=0.1, num_samples=1)


def test_grad_scaler_after_load_state_dict():
    """SAGA lets GradScaler unscale the grads itself; a loaded (or copied) SAGA must too."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = fastopt.SAGA(model.parameters(), lr=0.05, num_samples=3)
    fresh = fastopt.SAGA(model.parameters(), lr=0.05, num_samples=3)
    fresh.load_state_dict(opt.state_dict())
    assert fresh._step_supports_amp_scaling is False
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    grads = [p.grad.detach() / 1024.0 for p in model.parameters()]
    scaler.step(fresh, index=0)
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.05 * g)  # table and mean were zero
