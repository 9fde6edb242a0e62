"""Parity with torch.optim (foreach=False) on every option, odd sizes, dtypes and edge cases.

Params and every state tensor are compared after every step (see helpers.compare_runs).
"""

import pytest
import torch

from helpers import BACKENDS, compare_runs

# (optimizer, options, what the row checks)
CONFIGS = [
    ("Adam", {}, "defaults"),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6), "custom lr, betas, eps"),
    ("Adam", dict(weight_decay=0.1), "L2 weight decay added to the grad"),
    ("Adam", dict(amsgrad=True, weight_decay=0.1), "amsgrad with L2 decay"),
    ("Adam", dict(maximize=True, amsgrad=True, lr=1e-2), "maximize with amsgrad"),
    ("Adam", dict(decoupled_weight_decay=True, weight_decay=0.1), "Adam with decoupled decay"),
    ("Adam", dict(betas=(0.0, 0.0)), "betas of zero: no averaging"),
    ("AdamW", {}, "defaults (weight_decay=1e-2)"),
    ("AdamW", dict(lr=1e-2, weight_decay=0.3, amsgrad=True, maximize=True), "all flags on"),
    ("AdamW", dict(lr=0.0, weight_decay=0.5), "lr of zero changes nothing but state"),
    ("AdamW", dict(weight_decay=0.0, eps=0.0, lr=1e-3), "no decay, eps of zero"),
    ("SGD", dict(lr=0.1), "plain SGD"),
    ("SGD", dict(lr=0.1, momentum=0.9), "momentum"),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5), "momentum with dampening"),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2), "nesterov and decay"),
    ("SGD", dict(lr=0.05, momentum=0.5, dampening=0.1, weight_decay=0.1, maximize=True),
     "maximize with dampened momentum and decay"),
]
IDS = [f"{name}-{desc}" for name, _, desc in CONFIGS]

# Odd sizes: empty, one element, 0-d, not a multiple of any block, a 4-D param.
SHAPES = [(0,), (1,), (), (129,), (4097,), (65537,), (3, 4, 5, 7)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,kwargs,desc", CONFIGS, ids=IDS)
def test_every_option_every_size(name, kwargs, desc, dtype, backend):
    compare_runs(name, kwargs, SHAPES, dtype=dtype, steps=10, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_place", [False, True], ids=["fresh-grads", "flat-grads"])
@pytest.mark.parametrize("name,kwargs,desc", CONFIGS, ids=IDS)
def test_params_without_grads_in_some_steps(name, kwargs, desc, in_place, backend):
    # Each param misses its grad in a different pattern of steps: its state must neither be
    # created nor advanced in those steps, exactly as torch skips it.
    compare_runs(name, kwargs, SHAPES, steps=12, skip=lambda step, i: (step * 7 + i) % 3 == 0,
                 in_place=in_place, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs,desc", CONFIGS, ids=IDS)
def test_flat_grads_with_every_size(name, kwargs, desc, backend):
    compare_runs(name, kwargs, SHAPES, steps=8, in_place=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs,desc", CONFIGS, ids=IDS)
def test_param_that_never_gets_a_grad(name, kwargs, desc, backend):
    ours, ref, ours_params, _ = compare_runs(name, kwargs, [(5,), (6,), (7,)], steps=4,
                                             skip=lambda step, i: i == 1, backend=backend)
    assert ours_params[1] not in ours.state or not ours.state[ours_params[1]]


# torch's for-loop reference computes in the half type: with eps=1e-8 (0 in fp16) and
# beta2=0.999, (1 - beta2) * g**2 underflows to 0 for |g| < ~8e-3 and its update blows up to
# lr * g / eps (inf with eps=0). beta2=0.99, eps=1e-3 keep the reference meaningful; the fp32 math
# here is exact to torch's fused=True (test below).
@pytest.mark.parametrize("name,kwargs", [
    ("AdamW", dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-3)),
    ("Adam", dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1, amsgrad=True)),
    ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1)),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params(name, kwargs, dtype):
    compare_runs(name, kwargs, [(1,), (129,), (4097,)], dtype=dtype, steps=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adam_equals_torch_fused_exactly(dtype):
    # The torch path computes in fp32 like torch's fused=True: bit-identical to it.
    import fastopt

    init = torch.randn(4097, dtype=dtype)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours = fastopt.AdamW([a], lr=1e-2, backend="torch")
    ref = torch.optim.AdamW([b], lr=1e-2, fused=True)
    for _ in range(5):
        g = torch.randn(4097, dtype=dtype)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a, b)
    assert torch.equal(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2, maximize=True)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_params(name, kwargs, backend):
    compare_runs(name, kwargs, [(3, 4), (5,), ()], dtype=torch.complex64, steps=8,
                 backend=backend)


@pytest.mark.parametrize("name,opts", [
    ("Adam", [dict(lr=1e-2, betas=(0.5, 0.9)), dict(lr=1e-3, amsgrad=True, weight_decay=0.2)]),
    ("AdamW", [dict(lr=3e-2, weight_decay=0.0), dict(lr=1e-3, maximize=True, eps=1e-3)]),
    ("SGD", [dict(lr=0.1, momentum=0.0), dict(lr=0.01, momentum=0.9, nesterov=True)]),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_groups_with_different_hyperparameters(name, opts, backend):
    groups = [([0, 2, 4], opts[0]), ([1, 3], opts[1])]
    base = dict(lr=1e-3) if name != "SGD" else dict(lr=0.05, momentum=0.5)
    compare_runs(name, base, [(7,), (129,), (1,), (33, 3), ()], groups=groups, steps=8,
                 skip=lambda step, i: step == 3 and i == 2, backend=backend)


@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(amsgrad=True)),
    ("AdamW", dict(weight_decay=0.1)),
    ("SGD", dict(momentum=0.9)),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_given_as_a_tensor(name, kwargs, backend):
    compare_runs(name, dict(lr=torch.tensor(0.01), **kwargs), [(129,), (4,)], steps=6,
                 backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheduler", ["StepLR", "OneCycleLR", "CosineAnnealingLR"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_lr_schedulers(name, scheduler, backend):
    import fastopt
    from helpers import PAIRS, clone_params, make_params

    ours_cls, ref_cls = PAIRS[name]
    kwargs = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=0.05)
    init = make_params([(129,), (3, 5)])
    ours_params, ref_params = clone_params(init), clone_params(init)
    ours = ours_cls(ours_params, backend=backend, **kwargs)
    ref = ref_cls(ref_params, foreach=False, **kwargs)

    def make_scheduler(opt):
        cls = getattr(torch.optim.lr_scheduler, scheduler)
        if scheduler == "StepLR":
            return cls(opt, step_size=2, gamma=0.5)
        if scheduler == "OneCycleLR":  # also cycles Adam's beta1 / SGD's momentum
            return cls(opt, max_lr=0.1, total_steps=12)
        return cls(opt, T_max=5)

    ours_sched, ref_sched = make_scheduler(ours), make_scheduler(ref)
    assert isinstance(ours, fastopt.FlatOptimizer)
    for step in range(12):
        for p, q in zip(ours_params, ref_params):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        ours_sched.step()
        ref_sched.step()
        assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_a_model_with_backward(backend):
    """Grads from autograd (accumulated over two backwards), zero_grad both ways."""
    import fastopt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 3))
    twin.load_state_dict(model.state_dict())
    ours = fastopt.AdamW(model.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
    for step in range(12):
        x = torch.randn(16, 13)
        for net, opt in ((model, ours), (twin, ref)):
            opt.zero_grad(set_to_none=step % 2 == 0)
            for half in (x[:8], x[8:]):
                net(half).pow(2).mean().backward()
            opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs,desc", CONFIGS, ids=IDS)
def test_late_starters_share_a_flat_buffer_with_older_params(name, kwargs, desc, backend):
    # Even params get their first grad at step 3: from then on every grad lives in the flat
    # buffer, but the step counts (and SGD's first-step buffers) differ between neighbours.
    compare_runs(name, kwargs, SHAPES, steps=9, skip=lambda step, i: step < 3 and i % 2 == 0,
                 in_place=True, backend=backend)
