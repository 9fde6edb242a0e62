"""``in_backward=True``: each step group updated inside the backward as its last grad arrives,
its grads released; ``step()`` finishes the rest. Same numbers as the default loop
(``backward(); step(); zero_grad()``), refusals for what cannot run inside a backward."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, TOLERANCES
from optim_db import OPTIM_DB

import fastopt
from fastopt import in_backward

# Every optimizer that takes in_backward, in its richest configuration (tests/optim_db.py),
# and the variants below.
CONFIGS = {f"{info.name.lower()}-richest": (info.cls, {**info.typical, **info.configs[-1][0]})
           for info in OPTIM_DB if info.takes("in_backward")
           and info.name not in ("Adam", "AdamW", "SGD")}
CONFIGS |= {
    "adamw": (fastopt.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adam-amsgrad-maximize": (fastopt.Adam, dict(lr=0.01, amsgrad=True, maximize=True,
                                                 weight_decay=0.01)),
    "sgd-nesterov": (fastopt.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "sgd-plain": (fastopt.SGD, dict(lr=0.05)),
    "adamw-bf16-state": (fastopt.AdamW, dict(lr=0.01, state_dtype=torch.bfloat16)),
}


class Net(torch.nn.Module):
    """Two layers feeding two heads, and a layer no loss reaches (params without grads)."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(7, 33)
        self.head = torch.nn.Linear(33, 5)
        self.unused = torch.nn.Linear(5, 3)
        self.other = torch.nn.Linear(33, 1)

    def forward(self, x):
        hidden = torch.tanh(self.first(x))
        return (self.head(hidden) ** 2).sum() + self.other(hidden).sum()


def make(cls, options, backend, in_backward_on, seed=0):
    torch.manual_seed(seed)
    model = Net()
    groups = [{"params": [*model.first.parameters(), *model.unused.parameters()]},
              {"params": [*model.head.parameters(), *model.other.parameters()], "lr": 0.02}]
    return model, cls(groups, backend=backend, in_backward=in_backward_on, **options)


def train(model, opt, steps, start=0, accumulate=1):
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    for step in range(start, start + steps):
        for micro in range(accumulate):
            x = torch.randn(4, 7, generator=torch.Generator().manual_seed(100 * step + micro))
            with opt.accumulating() if micro < accumulate - 1 else _nothing():
                model(x).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    return [p.detach().clone() for p in model.parameters()]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


@pytest.fixture(autouse=True)
def small_step_groups(monkeypatch):
    """Step groups of about 600 bytes: several per bucket, some of one param."""
    monkeypatch.setattr(in_backward, "STEP_GROUP_BYTES", 600)


def assert_same(expected, got, backend):
    """Bit for bit through the kernels (elementwise: an element's result does not depend on
    the launch it is in). On the CPU torch path, fp32 parity tolerance: torch's CPU fused
    Adam/SGD round an element differently in their vector loop and their scalar tail, and a
    step group's call (or route: gather or per tensor) ends elsewhere than the whole bucket's."""
    for e, g in zip(expected, got):
        if backend == "torch":
            torch.testing.assert_close(g, e, **TOLERANCES[torch.float32])
        else:
            assert torch.equal(g, e), (e - g).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_in_backward_equals_the_default_loop(name, backend):
    cls, options = CONFIGS[name]
    expected = train(*make(cls, options, backend, False), steps=12)
    model, opt = make(cls, options, backend, True)
    got = train(model, opt, steps=12)
    assert_same(expected, got, backend)
    groups = {id(g) for g in opt._step_groups.groups.values()}
    assert len(groups) >= 4  # the updates did run in step groups


@pytest.mark.parametrize("loaded", [False, True], ids=["", "after-load_state_dict"])
def test_grads_are_released_during_backward_and_step_finishes_the_rest(loaded):
    """... and still after ``load_state_dict`` (a resume; accelerate's ``prepare`` loads the
    optimizer's own state_dict into it)."""
    model, opt = make(fastopt.AdamW, dict(lr=0.01), "torch", True)
    train(model, opt, steps=1)  # the first step lays the params out
    if loaded:
        opt.load_state_dict(opt.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(4, 7)).backward()
    updated = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    released = {n for n, p in model.named_parameters() if p.grad is None}
    assert "head.weight" in updated and "head.weight" in released
    # first.bias shares a step group with unused.*, which get no grad: it waits for step().
    assert model.first.bias.grad is not None and "first.bias" not in updated
    opt.step()
    assert not torch.equal(model.first.bias, before["first.bias"])
    assert torch.equal(model.unused.weight, before["unused.weight"])


def test_a_lazy_module_is_updated_in_the_backward_once_materialized():
    """An ``nn.LazyLinear`` not yet run when the optimizer is built: its params are hooked
    once the first step lays them out, then updated inside later backwards, as the default
    loop updates them."""
    models, opts = [], []
    for in_backward_on in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.LazyLinear(6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        models.append(model)
        opts.append(fastopt.AdamW(model.parameters(), lr=0.01, in_backward=in_backward_on))
    for step in range(4):
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        for model, opt in zip(models, opts):
            torch.manual_seed(1)  # the lazy layer's initial values, drawn at its first run
            model(x).sum().backward()
            if step > 0 and opt is opts[0]:
                assert models[0][0].weight.grad is None  # updated and released in the backward
            opt.step()
            opt.zero_grad()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulating_sums_backward_passes_before_the_update(backend):
    cls, options = CONFIGS["adamw"]
    expected = train(*make(cls, options, backend, False), steps=4, accumulate=3)
    got = train(*make(cls, options, backend, True), steps=4, accumulate=3)
    assert_same(expected, got, backend)


@pytest.mark.parametrize("name", ["adamw", "sgd-nesterov"])
def test_resume_from_a_checkpoint(name):
    cls, options = CONFIGS[name]
    model, opt = make(cls, options, "torch", True)
    train(model, opt, steps=5)
    saved_model, saved_opt = model.state_dict(), opt.state_dict()
    model, opt = make(cls, options, "torch", True, seed=1)
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    # The scheduler restarts at 0 in train(); the saved lr is what it scales.
    for group, saved in zip(opt.param_groups, saved_opt["param_groups"]):
        group["lr"] = saved["initial_lr"]
    got = train(model, opt, steps=5, start=5)
    reference_model, reference_opt = make(cls, options, "torch", False)
    train(reference_model, reference_opt, steps=5)
    for group, saved in zip(reference_opt.param_groups, saved_opt["param_groups"]):
        group["lr"] = saved["initial_lr"]
    resumed = train(reference_model, reference_opt, steps=5, start=5)
    assert_same(resumed, got, "torch")


def test_refusals():
    params = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(TypeError, match="in_backward must be a bool"):
        fastopt.AdamW(params, in_backward=1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fastopt.AdamW(params, in_backward=True, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="differentiable"):
        fastopt.SGD(params, in_backward=True, differentiable=True)
    opt = fastopt.AdamW(params, in_backward=True)
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))],
                             "max_grad_norm": 1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError):
        fastopt.SAGA(params, num_samples=3, in_backward=True)


def test_grad_scaler_is_refused_at_its_step():
    model, opt = make(fastopt.AdamW, dict(lr=0.01), "torch", True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    scaler.scale(model(torch.randn(4, 7))).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


def test_pickled_optimizer_keeps_stepping_in_backward():
    import copy

    model, opt = make(fastopt.AdamW, dict(lr=0.01), "torch", True)
    train(model, opt, steps=2)
    both = copy.deepcopy({"model": model, "opt": opt})
    model2, opt2 = both["model"], both["opt"]
    assert opt2._step_groups is not None
    expected = train(model, opt, steps=3, start=2)
    got = train(model2, opt2, steps=3, start=2)
    # The copy lays its params out again at its first step(), so that step updates the whole
    # bucket at once where the original updated step groups: on the CPU torch path equal within
    # fp32 tolerance (see assert_same), not bit for bit.
    assert_same(expected, got, "torch")


def test_memory_estimate_holds_to_the_measured_peak(monkeypatch):
    """The peak of an iteration (``torch.profiler``, profile_memory) drops by what
    ``fastopt.memory.estimate(..., in_backward=True)`` says: all grads but the largest step
    group's. Six 4 MiB layers: six step groups."""
    from benchmarks.in_backward_memory import iteration, peak_bytes

    monkeypatch.setattr(in_backward, "STEP_GROUP_BYTES", 4 << 20)
    peaks, estimates = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(6)])
        x = torch.randn(2, 1024)
        opt = fastopt.AdamW(model.parameters(), lr=1e-3, in_backward=on)
        loss = lambda: model(x).square().sum()  # noqa: E731
        for _ in range(2):
            iteration(loss, opt)
        peaks[on] = peak_bytes(lambda: iteration(loss, opt))
        estimates[on] = fastopt.memory.estimate(model, "adamw", in_backward=on).grad_bytes
    measured, predicted = peaks[False] - peaks[True], estimates[False] - estimates[True]
    assert predicted > 0.8 * estimates[False]
    assert abs(measured - predicted) <= 0.05 * predicted, (measured, predicted)


def test_a_compiled_model_steps_in_backward():
    """torch.compile(model): the hooks run on the leaf params' grad accumulation, outside the
    compiled graph; the numbers are the default loop's."""
    def run(on):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 4))
        compiled = torch.compile(model)
        opt = fastopt.AdamW(model.parameters(), lr=0.01, in_backward=on)
        for i in range(6):
            x = torch.randn(5, 8, generator=torch.Generator().manual_seed(i))
            compiled(x).square().sum().backward()
            if on and i:
                assert model[2].weight.grad is None  # updated and released in the backward
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    assert_same(run(False), run(True), "torch")


def test_a_dropped_optimizer_is_freed_and_its_hooks_stop():
    import gc
    import weakref

    model, opt = make(fastopt.AdamW, dict(lr=0.01), "torch", True)
    train(model, opt, steps=2)
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None
    other = torch.optim.SGD(model.parameters(), lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 7)).backward()
    other.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_a_second_grad_after_an_update_in_one_round_is_refused():
    """Two backward passes without step() (or reentrant checkpointing, which runs an inner
    backward) would update a param twice on partial grads."""
    model, opt = make(fastopt.AdamW, dict(lr=0.01), "torch", True)
    train(model, opt, steps=1)
    model(torch.randn(4, 7)).backward()
    with pytest.raises(RuntimeError, match="second grad"):
        model(torch.randn(4, 7)).backward()
    opt.zero_grad()  # a new round
    model(torch.randn(4, 7)).backward()
    opt.step()
