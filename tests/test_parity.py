"""Parity with torch.optim (foreach=False) on every option, odd sizes, dtypes and edge cases.

Params and every state tensor are compared after every step (see helpers.compare_runs).
"""

import pytest
import torch

from helpers import BACKENDS, TOLERANCES, compare_rounded_once, compare_runs, interpreter_ready
from optim_db import BY_NAME, NAMES, OPTIM_DB, every_config

# (optimizer, options, what the row checks): every configuration of tests/optim_db.py
CONFIGS = [(info.name, kwargs, desc) for info, kwargs, desc in every_config()]
IDS = [f"{name}-{desc}" for name, _, desc in CONFIGS]
# The tests of the step's routes (params without grads, grads in the flat buffer, late
# starters) exercise the engine, which every optimizer shares: every configuration on the torch
# path, and on the Triton kernels (under the interpreter, slow) each optimizer's last
# configuration (its most options at once).
ROUTES = [(name, kwargs, desc, "torch") for name, kwargs, desc in CONFIGS] + \
    [(info.name, *info.configs[-1], backend) for info in OPTIM_DB
     for backend in BACKENDS if backend != "torch"]
ROUTE_IDS = [f"{name}-{desc}-{backend}" for name, _, desc, backend in ROUTES]

# Odd sizes: empty, one element, 0-d, not a multiple of any block, a 4-D param.
SHAPES = [(0,), (1,), (), (129,), (4097,), (65537,), (3, 4, 5, 7)]


# fp64 params always take the torch path (the kernels compute in fp32): one run covers them.
DTYPE_BACKENDS = [(torch.float32, b) for b in BACKENDS] + [(torch.float64, "torch")]


@pytest.mark.parametrize("dtype,backend", DTYPE_BACKENDS,
                         ids=[f"{str(d)[6:]}-{b}" for d, b in DTYPE_BACKENDS])
@pytest.mark.parametrize("name,kwargs,desc", CONFIGS, ids=IDS)
def test_every_option_every_size(name, kwargs, desc, dtype, backend):
    compare_runs(name, kwargs, SHAPES, dtype=dtype, steps=10, backend=backend)


@pytest.mark.parametrize("in_place", [False, True], ids=["fresh-grads", "flat-grads"])
@pytest.mark.parametrize("name,kwargs,desc,backend", ROUTES, ids=ROUTE_IDS)
def test_params_without_grads_in_some_steps(name, kwargs, desc, in_place, backend):
    # Each param misses its grad in a different pattern of steps: its state must neither be
    # created nor advanced in those steps, exactly as torch skips it.
    compare_runs(name, kwargs, SHAPES, steps=12, skip=lambda step, i: (step * 7 + i) % 3 == 0,
                 in_place=in_place, backend=backend)


@pytest.mark.parametrize("name,kwargs,desc,backend", ROUTES, ids=ROUTE_IDS)
def test_flat_grads_with_every_size(name, kwargs, desc, backend):
    compare_runs(name, kwargs, SHAPES, steps=8, in_place=True, backend=backend)


@pytest.mark.parametrize("name,kwargs,desc,backend", ROUTES, ids=ROUTE_IDS)
def test_param_that_never_gets_a_grad(name, kwargs, desc, backend):
    ours, ref, ours_params, ref_params = compare_runs(
        name, kwargs, [(5,), (6,), (7,)], steps=4, skip=lambda step, i: i == 1, backend=backend)
    # No state for it (Adagrad makes its state at construction, and so keeps it: as torch)
    assert bool(ours.state.get(ours_params[1])) == bool(ref.state.get(ref_params[1]))


# torch's for-loop reference computes in the half type: with eps=1e-8 (0 in fp16) and
# beta2=0.999, (1 - beta2) * g**2 underflows to 0 for |g| < ~8e-3 and its update blows up to
# lr * g / eps (inf with eps=0). Each optimizer's ``half`` configurations keep the reference
# meaningful (larger eps, shorter averages); the math here is fp32.
HALF = [(info.name, kwargs) for info in OPTIM_DB for kwargs in info.half]


@pytest.mark.parametrize("name,kwargs", HALF, ids=[f"{n}-{k}" for n, k in HALF])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params(name, kwargs, dtype):
    compare_runs(name, kwargs, [(1,), (129,), (4097,)], dtype=dtype, steps=10)


ROUNDED_ONCE = [(n, k) for n, k in HALF if BY_NAME[n].half_kernel_rounding == "once"]


@pytest.mark.skipif(not interpreter_ready(), reason="the Triton kernels under the interpreter")
@pytest.mark.parametrize("name,kwargs", ROUNDED_ONCE, ids=[f"{n}-{k}" for n, k in ROUNDED_ONCE])
def test_fp16_kernels_round_once(name, kwargs):
    """The kernels on fp16 params compute torch.optim's math in fp32 and round once per step
    (helpers.compare_rounded_once; bf16 runs on a GPU only, tests/test_gpu.py)."""
    compare_rounded_once(name, kwargs, [(1,), (129,), (4097,)], dtype=torch.float16,
                         fp32_tol=TOLERANCES[torch.float32], device="cpu")


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


COMPLEX = [name for name in NAMES if BY_NAME[name].declaration.complex]


@pytest.mark.parametrize("name", COMPLEX)
@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_params(name, backend):
    # each optimizer's last configuration: the most options at once
    compare_runs(name, BY_NAME[name].configs[-1][0], [(3, 4), (5,), ()], dtype=torch.complex64,
                 steps=8, backend=backend)


@pytest.mark.parametrize("name", COMPLEX)
@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_params_stepped_later_than_others(name, backend):
    """A complex param's first step after its bucket's others: its state starts as torch's
    (Rprop's step size at complex(lr, lr): both parts)."""
    compare_runs(name, BY_NAME[name].configs[-1][0], [(3, 4), (5,), ()], dtype=torch.complex64,
                 steps=5, skip=lambda step, i: step < 2 and i == 1, backend=backend)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_groups_with_different_hyperparameters(name, backend):
    info = BY_NAME[name]
    configs = [{k: v for k, v in kwargs.items() if k not in info.constructor_only}
               for kwargs, _ in info.configs]
    groups = [([0, 2, 4], configs[1]), ([1, 3], configs[-1])]
    compare_runs(name, BY_NAME[name].typical, [(7,), (129,), (1,), (33, 3), ()], groups=groups,
                 steps=8, skip=lambda step, i: step == 3 and i == 2, backend=backend)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(), (1, 1)], ids=["0d", "1x1"])
def test_lr_given_as_a_tensor(name, backend, shape):
    """A tensor lr of any 1-element shape, as torch's own tests give it (``[1, 1]``: the
    scalar math of the kernels' route broadcasts it against a column of params)."""
    if shape and name == "Lion":
        pytest.skip("lion-pytorch's own step broadcasts a [1, 1] lr into its params and fails")
    kwargs = dict(BY_NAME[name].typical)
    kwargs["lr"] = torch.tensor(kwargs["lr"]).reshape(shape)
    compare_runs(name, kwargs, [(129,), (4,)], steps=6, backend=backend)


# OneCycleLR also cycles beta1 or the momentum; on the kernels it alone is run.
SCHEDULES = [(s, "torch") for s in ("StepLR", "OneCycleLR", "CosineAnnealingLR")] + \
    [("OneCycleLR", b) for b in BACKENDS if b != "torch"]


@pytest.mark.parametrize("scheduler,backend", SCHEDULES, ids=[f"{s}-{b}" for s, b in SCHEDULES])
@pytest.mark.parametrize("name", NAMES)
def test_lr_schedulers(name, scheduler, backend):
    import fastopt
    from helpers import PAIRS, clone_params, make_params, reference_step

    ours_cls, reference = PAIRS[name]
    kwargs = BY_NAME[name].typical
    init = make_params([(129,), (3, 5)])
    ours_params, ref_params = clone_params(init), clone_params(init)
    ours = ours_cls(ours_params, backend=backend, **kwargs)
    ref = reference(ref_params, **kwargs)

    def make_scheduler(opt):
        cls = getattr(torch.optim.lr_scheduler, scheduler)
        if scheduler == "StepLR":
            return cls(opt, step_size=2, gamma=0.5)
        if scheduler == "OneCycleLR":  # also cycles beta1 or momentum where there is one
            return cls(opt, max_lr=0.1, total_steps=12,
                       cycle_momentum="momentum" in opt.defaults or "betas" in opt.defaults)
        return cls(opt, T_max=5)

    ours_sched, ref_sched = make_scheduler(ours), make_scheduler(ref)
    assert isinstance(ours, fastopt.FlatOptimizer)
    for step in range(12):
        for p, q in zip(ours_params, ref_params):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        reference_step(ref, backend)
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


@pytest.mark.parametrize("name,kwargs,desc,backend", ROUTES, ids=ROUTE_IDS)
def test_late_starters_share_a_flat_buffer_with_older_params(name, kwargs, desc, backend):
    # Even params get their first grad at step 3: from then on every grad lives in the flat
    # buffer, but the step counts (and SGD's first-step buffers) differ between neighbours.
    compare_runs(name, kwargs, SHAPES, steps=9, skip=lambda step, i: step < 3 and i % 2 == 0,
                 in_place=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_place", [False, True], ids=["fresh-grads", "flat-grads"])
@pytest.mark.parametrize("shape", [(2, 64), (0, 1)], ids=["fills-its-buffer", "empty-2d"])
@pytest.mark.parametrize("name", NAMES)
def test_a_lone_param_of_rank_two(name, shape, in_place, backend):
    # One param whose slot is its whole bucket (128 elements, or none): its grad is seen in the
    # param's shape, whichever route the step takes (found by the property test)
    compare_runs(name, BY_NAME[name].typical, [shape], steps=3, in_place=in_place,
                 backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_take_their_float_arguments_as_a_gpu_does(backend):
    # Triton's interpreter hands a kernel its float arguments as Python floats: unrounded,
    # Adamax's lerp took ``weight - 1`` in fp64 and drifted from torch's fp32 past tolerance
    # within three steps (found by the property test). kernels/launch.fp32 rounds them first.
    compare_runs("Adamax", dict(lr=0.5, betas=(0.34819547727153116, 0.0), eps=0.00390625,
                                maximize=True), [(), (), (), (), (9,)], steps=3, seed=12638,
                 backend=backend)


def test_a_float_argument_is_rounded_to_fp32_as_the_gpu_takes_it():
    from kernels import launch

    assert launch.fp32(0.999) == float(torch.tensor(0.999, dtype=torch.float32))
    assert launch.fp32(1.0 - 0.999) == float(torch.tensor(1.0 - 0.999, dtype=torch.float32))
    assert launch.fp32(1e-50) == 0.0  # underflows as fp32 does
    assert launch.fp32(-1e40) == float("-inf")  # past fp32's range


# The CPU route of these optimizers equals torch.optim's for-loop bit for bit, over enough steps
# for a state near 2 to cancel towards zero, where a one-ulp difference would exceed atol: their
# update is torch.optim's own op sequence, or (SGD) torch's fused op with every element in its
# vector loop (fastopt/whole_vectors.py). Sizes with and without elements past their last
# 16-element vector, one large enough to be stepped apart, params without grads in some steps
# (entries of one param), fresh and kept grads. (Adam, AdamW and Adagrad call torch's fused
# CPU ops, whose vector loops round differently from their for-loops: within the tolerance.)
BIT_EXACT = ["SGD", "NAdam", "RAdam", "Adamax", "RMSprop", "Adadelta", "ASGD", "Rprop", "Lion"]
EXACT_CONFIGS = [(name, kwargs, desc) for name, kwargs, desc in CONFIGS if name in BIT_EXACT]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("in_place", [False, True], ids=["fresh-grads", "flat-grads"])
@pytest.mark.parametrize("name,kwargs,desc", EXACT_CONFIGS,
                         ids=[f"{name}-{desc}" for name, _, desc in EXACT_CONFIGS])
def test_cpu_route_equals_torch_bit_for_bit(name, kwargs, desc, in_place, dtype):
    shapes = [(1,), (10,), (37, 3), (16,), (129,), (20003,), (4, 5, 7), ()]
    compare_runs(name, kwargs, shapes, steps=30, dtype=dtype,
                 skip=lambda step, i: (step * 5 + i) % 4 == 0, in_place=in_place,
                 backend="torch", tol=dict(rtol=0, atol=0))
