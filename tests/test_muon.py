"""Muon against torch.optim.Muon (and its AdamW groups against torch.optim.AdamW).

Tolerance: Muon's update is the bf16 output of its Newton–Schulz iterations, so a batched
matmul that sums in another order than torch's per-matrix ``addmm`` may move it by a few bf16
units (2**-8 relative). A param's step is compared to torch's within 2 % of the step's largest
element (a few bf16 units of the update) plus fp32 rounding of the param (rtol 2e-6, atol
2e-7); a matrix alone of its shape runs torch's own ops and equals torch bit for bit, as does,
on CPUs, every batch (asserted apart, ``test_batched_newton_schulz_equals_torch_per_matrix``).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopt
from fastopt import memory
from fastopt.optimizers.muon import matrix_shape, newton_schulz

# Same shapes twice (batched), tall and wide (transposed), one of a kind, an empty one.
SHAPES = [(24, 16), (16, 24), (24, 16), (20, 20), (8, 40), (40, 8), (20, 20), (0, 4)]
CONFIGS = [  # torch's own test configurations (common_optimizers.py), then the rest
    ({}, "default"),
    ({"lr": 0.01}, "non-default lr"),
    ({"lr": torch.tensor(0.001)}, "tensor lr"),
    ({"weight_decay": 0.2}, "weight decay"),
    ({"momentum": 0.8}, "momentum"),
    ({"ns_steps": 6}, "ns_steps"),
    ({"ns_coefficients": (3.4, -4.7, 2.0)}, "ns_coefficients"),
    ({"nesterov": False, "lr": 0.02}, "no nesterov"),
    ({"adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0}, "match_rms_adamw"),
    ({"adjust_lr_fn": "original", "momentum": 0.0}, "original, no momentum"),
]


def _params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _grads(params, step: int, skip=()):
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = None if i in skip else g


def assert_step_close(ours, ref, before):
    """``ours`` and ``ref`` (params after a step from ``before``) agree within the bf16
    Newton–Schulz tolerance of the module docstring."""
    for p, q, b in zip(ours, ref, before):
        if p.numel() == 0:
            continue
        delta = (q.detach() - b).abs().max().item()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-7 + 0.02 * delta)


@pytest.mark.parametrize("kwargs,desc", CONFIGS, ids=[d for _, d in CONFIGS])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_equals_torch_muon(kwargs, desc, backend):
    ours_params, ref_params = _params(SHAPES), _params(SHAPES)
    ours = fastopt.Muon(ours_params, backend=backend, **copy.deepcopy(kwargs))
    ref = torch.optim.Muon(ref_params, **copy.deepcopy(kwargs))
    for step in range(6):
        skip = {1} if step in (2, 3) else set()  # a param without a grad for two steps
        before = [p.detach().clone() for p in ref_params]
        _grads(ours_params, step, skip)
        _grads(ref_params, step, skip)
        ours.step()
        ref.step()
        assert_step_close(ours_params, ref_params, before)
        for p, q in zip(ours_params, ref_params):
            if q in ref.state:
                torch.testing.assert_close(ours.state[p]["momentum_buffer"],
                                           ref.state[q]["momentum_buffer"], rtol=2e-6, atol=2e-7)
                assert set(ours.state[p]) == {"momentum_buffer"}
            else:
                assert p not in ours.state


@pytest.mark.parametrize("shape", [(16, 48), (8, 8), (3, 10)])
def test_batched_newton_schulz_equals_torch_per_matrix(shape):
    """A batch against torch's per-matrix iteration, within the tolerance above (on the CPU
    these tests were written on, x86 with AVX-512 BF16, bit for bit)."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(*shape, generator=gen) for _ in range(5)]
    batch = torch.stack(mats).bfloat16()
    ours = newton_schulz(batch, (3.4445, -4.775, 2.0315), 5, 1e-7)
    for m, o in zip(mats, ours):
        ref = _zeropower_via_newtonschulz(m, (3.4445, -4.775, 2.0315), 5, 1e-7)
        torch.testing.assert_close(o.float(), ref.float(), rtol=0,
                                   atol=0.02 * ref.abs().max().item())


def test_a_conv_weight_is_its_matrix():
    """A param of rank four is orthogonalized as (out, in*kh*kw), as torch.optim.Muon would
    update that matrix (torch's own refuses the conv weight)."""
    conv = _params([(6, 3, 3, 3), (6, 3, 3, 3)])
    flat = [torch.nn.Parameter(p.detach().reshape(6, 27).clone()) for p in conv]
    ours = fastopt.Muon(conv, lr=0.02)
    ref = torch.optim.Muon(flat, lr=0.02)
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        torch.optim.Muon(_params([(6, 3, 3, 3)]))
    for step in range(4):
        before = [p.detach().clone() for p in flat]
        _grads(conv, step)
        for p, q in zip(conv, flat):
            q.grad = p.grad.reshape(6, 27).clone()
        ours.step()
        ref.step()
        assert_step_close([p.reshape(6, 27) for p in conv], flat, before)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def _split(model):
    hidden = [p for p in model.parameters() if p.ndim == 2]
    other = [p for p in model.parameters() if p.ndim != 2]
    return hidden, other


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adamw_groups_take_adamw_step_and_defaults(backend):
    """One optimizer for the whole model: Muon's groups equal torch.optim.Muon, its
    ``use_muon=False`` group torch.optim.AdamW (its defaults where unset), schedulers over
    both, one state_dict with each kind's state."""
    ours_model, ref_model = _model(), _model()
    hidden, other = _split(ours_model)
    ours = fastopt.Muon([{"params": hidden},
                         {"params": other, "use_muon": False, "betas": (0.9, 0.95)}],
                        lr=0.02, backend=backend)
    ref_hidden, ref_other = _split(ref_model)
    refs = [torch.optim.Muon(ref_hidden, lr=0.02),
            torch.optim.AdamW(ref_other, betas=(0.9, 0.95), foreach=False)]
    assert ours.param_groups[1]["lr"] == 1e-3 and ours.param_groups[1]["weight_decay"] == 1e-2
    schedulers = [torch.optim.lr_scheduler.StepLR(ours, 2, gamma=0.5)] + \
        [torch.optim.lr_scheduler.StepLR(r, 2, gamma=0.5) for r in refs]
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    for _ in range(5):
        before = [p.detach().clone() for p in ref_model.parameters()]
        for model, opts in ((ours_model, [ours]), (ref_model, refs)):
            for opt in opts:
                opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            for opt in opts:
                opt.step()
        for s in schedulers:
            s.step()
        assert_step_close(list(ours_model.parameters()), list(ref_model.parameters()), before)
    assert [g["lr"] for g in ours.param_groups] == [refs[0].param_groups[0]["lr"],
                                                     refs[1].param_groups[0]["lr"]]
    saved = ours.state_dict()["state"]
    kinds = [sorted(saved[i]) for i in range(len(hidden) + len(other))]
    assert kinds == [["momentum_buffer"]] * len(hidden) + \
        [["exp_avg", "exp_avg_sq", "step"]] * len(other)
    for p, q in zip(other, ref_other):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(ours.state[p][name], refs[1].state[q][name])


def test_state_dict_both_ways_with_torch_muon():
    params = _params(SHAPES[:4])
    ref = torch.optim.Muon(params, lr=0.02)
    for step in range(3):
        _grads(params, step)
        ref.step()
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = fastopt.Muon(ours_params, lr=0.02)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    for step in range(3, 6):
        before = [p.detach().clone() for p in params]
        _grads(params, step)
        _grads(ours_params, step)
        ref.step()
        ours.step()
        assert_step_close(ours_params, params, before)
    back = torch.optim.Muon([torch.nn.Parameter(p.detach().clone()) for p in ours_params],
                            lr=0.02)
    back.load_state_dict(ours.state_dict())
    for p, q in zip(back.param_groups[0]["params"], ours_params):
        assert torch.equal(back.state[p]["momentum_buffer"], ours.state[q]["momentum_buffer"])


@pytest.mark.parametrize("kwargs,error,message", [
    ({"lr": -0.1}, ValueError, r"^Learning rate should be >= 0 but is: -0\.1$"),
    ({"lr": torch.tensor([0.1, 0.2])}, ValueError, "^Tensor lr must be 1-element$"),
    ({"momentum": -0.5}, ValueError, r"^momentum should be >= 0 but is: -0\.5$"),
    ({"weight_decay": -0.1}, ValueError, r"^weight decay should be >= 0 but is: -0\.1$"),
    ({"adjust_lr_fn": "rms"}, ValueError, "^Adjust learning rate function rms is not supported$"),
])
def test_constructor_errors_are_torchs(kwargs, error, message):
    for cls in (torch.optim.Muon, fastopt.Muon):
        with pytest.raises(error, match=message):
            cls(_params([(4, 4)]), **kwargs)


def test_named_params_and_ranks():
    """(name, param) pairs as torch takes them; rank 3 refused as torch refuses it (it may be
    a stack of matrices), ranks 4 and 5 (conv weights) taken."""
    named = [("w", torch.nn.Parameter(torch.randn(4, 4)))]
    opt = fastopt.Muon(named)
    assert opt.param_groups[0]["param_names"] == ["w"]
    for cls in (torch.optim.Muon, fastopt.Muon):
        with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
            cls(_params([(2, 3, 4)]))
    fastopt.Muon(_params([(4, 2, 3, 3), (4, 2, 1, 3, 3)]))


def test_vectors_are_refused_in_muon_groups_and_taken_in_adamw_groups():
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters whereas we found a "
                                         r"parameter with size: torch.Size\(\[4\]\)"):
        fastopt.Muon(_params([(4, 4), (4,)]))
    opt = fastopt.Muon([{"params": _params([(4, 4)])},
                        {"params": _params([(4,)]), "use_muon": False}])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        opt.add_param_group({"params": _params([(3,)])})
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.5"):
        opt.add_param_group({"params": _params([(3,)]), "use_muon": False, "betas": (0.9, 1.5)})


@pytest.mark.parametrize("change,error,message", [
    ({"ns_steps": 100}, ValueError, "^Number of steps must be less than 100"),
    ({"ns_coefficients": (1.0, 2.0)}, ValueError, "^Coefficients must be a tuple of exactly 3"),
])
def test_step_errors_change_nothing(change, error, message):
    """A bad option in the last group: no group is updated (torch's Muon would have updated
    the groups before it)."""
    params = _params(SHAPES[:3])
    opt = fastopt.Muon([{"params": params[:2]}, {"params": params[2:]}], lr=0.02)
    _grads(params, 0)
    opt.step()
    opt.param_groups[1].update(change)
    before = [p.detach().clone() for p in params]
    state = [opt.state[p]["momentum_buffer"].clone() for p in params]
    _grads(params, 1)
    with pytest.raises(error, match=message):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], s) for p, s in zip(params, state))


def test_complex_and_sparse_are_refused_as_torch_does():
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
        fastopt.Muon([p]).step()
    q = torch.nn.Parameter(torch.randn(4, 4))
    q.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="Muon does not support sparse gradients"):
        fastopt.Muon([q]).step()


@pytest.mark.parametrize("options", [{"in_backward": True}, {"max_grad_norm": 0.5}])
def test_options_match_the_default_loop(options):
    """``in_backward`` updates as the default loop does; ``max_grad_norm`` as torch's clip
    followed by torch.optim.Muon."""
    ours_model, ref_model = _model(), _model()
    hidden, other = _split(ours_model)
    ours = fastopt.Muon([{"params": hidden}, {"params": other, "use_muon": False}], lr=0.02,
                        **options)
    ref_hidden, ref_other = _split(ref_model)
    refs = [torch.optim.Muon(ref_hidden, lr=0.02), torch.optim.AdamW(ref_other, foreach=False)]
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    for _ in range(4):
        before = [p.detach().clone() for p in ref_model.parameters()]
        ours.zero_grad()
        torch.nn.functional.cross_entropy(ours_model(x), y).backward()
        ours.step()
        for opt in refs:
            opt.zero_grad()
        torch.nn.functional.cross_entropy(ref_model(x), y).backward()
        if "max_grad_norm" in options:
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), options["max_grad_norm"])
        for opt in refs:
            opt.step()
        assert_step_close(list(ours_model.parameters()), list(ref_model.parameters()), before)


def test_master_weights_update_fp32_masters_as_torch_updates_fp32_params():
    shapes = SHAPES[:4]
    ours_params = _params(shapes, torch.bfloat16)
    ref_params = [torch.nn.Parameter(p.detach().float()) for p in ours_params]
    ours = fastopt.Muon(ours_params, lr=0.02, master_weights=True)
    ref = torch.optim.Muon(ref_params, lr=0.02)
    for step in range(4):
        before = [p.detach().clone() for p in ref_params]
        _grads(ours_params, step)
        for p, q in zip(ours_params, ref_params):
            q.grad = p.grad.float()
        ours.step()
        ref.step()
        masters = [ours.state[p]["master_param"] for p in ours_params]
        assert_step_close(masters, ref_params, before)
        for p, m in zip(ours_params, masters):
            assert torch.equal(p, m.bfloat16())


def test_remainders_are_refused_in_muon_groups():
    with pytest.raises(ValueError, match="Muon updates whole fp32 masters"):
        fastopt.Muon(_params([(4, 4)], torch.bfloat16), master_weights="remainder")
    with pytest.raises(TypeError, match="unexpected keyword argument .stochastic_rounding."):
        fastopt.Muon(_params([(4, 4)], torch.bfloat16), stochastic_rounding=True)


def test_bf16_state_keeps_momentum_narrow():
    params = _params(SHAPES[:3])
    opt = fastopt.Muon(params, lr=0.02, state_dtype=torch.bfloat16)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.Muon(ref_params, lr=0.02)
    _grads(params, 0)
    _grads(ref_params, 0)
    opt.step()
    ref.step()
    for p, q in zip(params, ref_params):
        assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
        torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                   ref.state[q]["momentum_buffer"].bfloat16())


def test_estimate_counts_momentum_and_adamw_state():
    model = _model()
    hidden, other = _split(model)
    groups = [{"params": hidden}, {"params": other, "use_muon": False}]
    report = memory.estimate(groups, "muon")
    opt = fastopt.Muon([dict(g) for g in groups], lr=0.02)
    x = torch.randn(4, 12)
    model(x).sum().backward()
    opt.step()
    held = sum(t.numel() * t.element_size() for b in opt._buckets for bucket in b
               for t in [*bucket.state.tensors.values(),
                         *([bucket.state.scalars] if bucket.state.scalars is not None else [])])
    assert report.state_bytes == held
    assert report.scratch_bytes > 0  # the Newton–Schulz workspace


def test_a_device_lr_multiplies_the_updates_as_a_float_lr_adds_them():
    """On a GPU a tensor lr stays on the device (no sync): the updates are scaled by it and
    subtracted; the same numbers as ``add_`` with the float, within fp32 rounding."""
    from fastopt.optimizers.muon import _apply

    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(4, 6, generator=gen).bfloat16() for _ in range(3)]
    shapes = [(4, 6), (4, 6), (6, 4)]
    by_float = [torch.randn(s, generator=gen) for s in shapes]
    by_tensor = [t.clone() for t in by_float]
    outs[2] = outs[2].T
    _apply(outs, by_float, shapes, 0.02, None)
    _apply(outs, by_tensor, shapes, torch.tensor(0.02), None)
    for a, b in zip(by_float, by_tensor):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)


def test_shards_are_dealt_to_owners_by_shape_and_placements_checked():
    from types import SimpleNamespace

    from torch.distributed.tensor import Replicate, Shard

    from fastopt import whole_matrices

    shapes = [(8, 8), (4, 16), (8, 8), (8, 8), (4, 16)]
    assert whole_matrices.owners(shapes, 2) == [0, 1, 1, 0, 0]
    assert whole_matrices.rows_per_rank(5, 2) == 3 and whole_matrices.rows_per_rank(1, 2) == 1

    def dtensor(placements, ndim=1):
        return SimpleNamespace(placements=placements, device_mesh=SimpleNamespace(ndim=ndim))

    assert whole_matrices.placement(dtensor((Shard(0),))) == "rows"
    assert whole_matrices.placement(dtensor((Replicate(),))) == "replicate"
    for refused in (dtensor((Shard(1),)), dtensor((Shard(0), Shard(0)), ndim=2)):
        with pytest.raises(ValueError, match="Muon orthogonalizes each matrix whole"):
            whole_matrices.placement(refused)


MEMORY_CONFIGS = {
    "fp32": (torch.float32, {}),
    "bf16 + master_weights": (torch.bfloat16, {"master_weights": True}),
    "fp32 + in_backward": (torch.float32, {"in_backward": True}),
    "fp32, bf16 state, no nesterov": (torch.float32, {"nesterov": False,
                                                      "state_dtype": torch.bfloat16}),
}


@pytest.mark.parametrize("name", list(MEMORY_CONFIGS))
def test_the_estimate_holds_to_the_cold_peak(name):
    """``memory.estimate`` against torch.profiler's cold peak (the model, the optimizer's
    construction and three iterations) of six 512 x 512 layers (Muon) and their biases (an
    AdamW group): at least the measured peak less the model's own temporaries (measured in the
    same loop without an optimizer), to 2 % (in_backward: the next step group's grad arriving
    beside a step's temporaries), and at most 5 % over it."""
    from benchmarks.cold_memory import cold_run, mlp
    from test_cold_memory import NoStep

    dtype, options = MEMORY_CONFIGS[name]

    def groups(model):
        hidden, other = _split(model)
        return [{"params": hidden}, {"params": other, "use_muon": False}]

    make_model, loss_fn = mlp(dtype, width=512, depth=6)
    peaks = cold_run(make_model, lambda m: fastopt.Muon(groups(m), lr=0.02, **options), loss_fn)
    bare = cold_run(make_model, NoStep, loss_fn)
    params = sum(p.numel() * p.element_size() for p in make_model().parameters())
    own = bare["cold"] - 2 * params
    assert 0 <= own < 0.1 * params
    estimated = memory.estimate(groups(make_model()), "muon", **options).peak_bytes
    assert 0.98 * (peaks["cold"] - own) <= estimated <= 1.05 * peaks["cold"], (peaks, estimated)


@st.composite
def muon_runs(draw):
    """Random matrices (rank 2, or 4 for conv weights; empty, one row, tall, wide, repeated
    shapes), options and grad patterns."""
    # (no zero columns: torch.optim.Muon's lr adjustment divides by them)
    shapes = draw(st.lists(st.one_of(st.tuples(st.integers(0, 12), st.integers(1, 12)),
                                     st.tuples(st.integers(1, 6), st.integers(1, 3),
                                               st.integers(1, 3), st.integers(1, 3))),
                           min_size=1, max_size=6))
    shapes += draw(st.lists(st.sampled_from(shapes), max_size=3))  # shapes batched together
    kwargs = dict(lr=draw(st.sampled_from([0.0, 1e-3, 0.02, 0.1])),
                  weight_decay=draw(st.sampled_from([0.0, 0.1, 0.3])),
                  momentum=draw(st.sampled_from([0.0, 0.5, 0.95])),
                  nesterov=draw(st.booleans()),
                  ns_steps=draw(st.integers(0, 7)),
                  adjust_lr_fn=draw(st.sampled_from([None, "original", "match_rms_adamw"])))
    steps = draw(st.integers(1, 5))
    missing = draw(st.lists(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
                            min_size=steps, max_size=steps))
    return shapes, kwargs, missing


@settings(max_examples=int(os.environ.get("FASTOPT_MUON_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(run=muon_runs(), backend=st.sampled_from(["torch", "triton"]))
def test_random_runs_equal_torch_muon(run, backend):
    """Any mix of shapes, options and missing grads: every step of fastopt.Muon within the
    bf16 Newton–Schulz tolerance of torch.optim.Muon (a conv weight against its matrix),
    momentum within fp32 tolerance, state only for params that had a grad."""
    shapes, kwargs, missing = run
    ours = _params(shapes)
    ref = [torch.nn.Parameter(p.detach().reshape(matrix_shape(p.shape)).clone()) for p in ours]
    ours_opt = fastopt.Muon(ours, backend=backend, **kwargs)
    ref_opt = torch.optim.Muon(ref, **kwargs)
    for step, absent in enumerate(missing):
        before = [q.detach().clone() for q in ref]
        _grads(ours, step, skip={i for i, a in enumerate(absent) if a})
        for p, q in zip(ours, ref):
            q.grad = None if p.grad is None else p.grad.reshape(q.shape).clone()
        ours_opt.step()
        ref_opt.step()
        assert_step_close([p.reshape(q.shape) for p, q in zip(ours, ref)], ref, before)
        for p, q in zip(ours, ref):
            assert (p in ours_opt.state) == (q in ref_opt.state)
            if q in ref_opt.state:
                torch.testing.assert_close(ours_opt.state[p]["momentum_buffer"].reshape(q.shape),
                                           ref_opt.state[q]["momentum_buffer"],
                                           rtol=2e-6, atol=2e-7)


HALF_AND_DOUBLE = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),  # torch.testing's defaults
                   torch.float16: dict(rtol=1e-3, atol=1e-5),
                   torch.float64: dict(rtol=1e-12, atol=1e-14)}


@pytest.mark.parametrize("dtype", list(HALF_AND_DOUBLE))
def test_half_and_double_params_follow_torch_muon(dtype):
    """Params kept in their own dtype, as torch.optim.Muon keeps them: the same ops in the same
    dtypes (the weight decay as torch's mul_, a bf16 update added to an fp16 param in fp32, as
    torch's add_ promotes it). Each step within the dtype's tolerance plus the bf16
    Newton–Schulz one (on the CPU this was written on, bf16 and fp64 equal torch bit for bit,
    fp16 within one fp16 unit)."""
    shapes = SHAPES[:4]
    ours, ref = _params(shapes, dtype), _params(shapes, dtype)
    ours_opt, ref_opt = fastopt.Muon(ours, lr=0.02), torch.optim.Muon(ref, lr=0.02)
    for step in range(4):
        before = [q.detach().clone() for q in ref]
        _grads(ours, step)
        _grads(ref, step)
        ours_opt.step()
        ref_opt.step()
        for p, q, b in zip(ours, ref, before):
            delta = (q.detach() - b).abs().max().item()
            tol = HALF_AND_DOUBLE[dtype]
            torch.testing.assert_close(p, q, rtol=tol["rtol"], atol=tol["atol"] + 0.02 * delta)
