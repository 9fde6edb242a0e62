"""The Triton path's scalar math on the host mirror of its scalar table (fastopt.elementwise):
taken in the default loop, left for the device's columns wherever the host cannot know the
table (a user's write, GradScaler's found_inf, a device lr), taken again after load_state_dict;
the numbers are torch.optim's on every path."""

import pytest
import torch

import fastopt
from fastopt import elementwise
from helpers import TOLERANCES, clone_params, interpreter_ready, make_params, reference_step

pytestmark = pytest.mark.skipif(not interpreter_ready(),
                                reason="the Triton path under the interpreter")

# optimizers whose scalar math derives values from kept scalars (NAdam's mu_product, ASGD's
# eta/mu/ax, RAdam's rectification, Adagrad's decayed lr, Adamax's bias correction)
NAMES = ["NAdam", "RAdam", "ASGD", "Adagrad", "Adamax"]
SHAPES = [(5,), (3, 4), (129,)]


def counting(monkeypatch, module=elementwise,
             routes=(("mirror", "_advance_mirror"), ("device", "_advance_columns"))) -> dict:
    """Counts of the calls, from here on, of ``module``'s functions ``routes`` (route name,
    function name): by default the scalar math's two routes."""
    calls = {route: 0 for route, _ in routes}
    for route, name in routes:
        original = getattr(module, name)

        def counted(*args, _original=original, _route=route, **kwargs):
            calls[_route] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def pair(name, kwargs):
    init = make_params(SHAPES, seed=3)
    ours_params, ref_params = clone_params(init), clone_params(init)
    ours = getattr(fastopt, name)(ours_params, backend="triton", **kwargs)
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **kwargs)
    return ours, ref, ours_params, ref_params


def step_and_compare(ours, ref, ours_params, ref_params, gen):
    for p, q in zip(ours_params, ref_params):
        g = torch.randn(p.shape, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    reference_step(ref, "triton")
    for p, q in zip(ours_params, ref_params):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])
        for key, value in ref.state[q].items():
            torch.testing.assert_close(ours.state[p][key].float(), value.float(),
                                       **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", NAMES)
def test_default_loop_runs_the_scalar_math_on_the_host(name, monkeypatch):
    calls = counting(monkeypatch)
    ours, ref, ours_params, ref_params = pair(name, dict(lr=0.01))
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        step_and_compare(ours, ref, ours_params, ref_params, gen)
    assert calls == {"mirror": 4, "device": 0}


@pytest.mark.parametrize("name", NAMES)
def test_a_write_to_the_state_sends_the_math_to_the_device(name, monkeypatch):
    """The user sets every param's step (as a checkpoint surgery would): the host no longer
    knows the table, the device's columns take over, and the numbers follow the edit."""
    calls = counting(monkeypatch)
    ours, ref, ours_params, ref_params = pair(name, dict(lr=0.01))
    gen = torch.Generator().manual_seed(0)
    step_and_compare(ours, ref, ours_params, ref_params, gen)
    for p, q in zip(ours_params, ref_params):
        ours.state[p]["step"].fill_(7.0)
        ref.state[q]["step"].fill_(7.0)
    for _ in range(2):
        step_and_compare(ours, ref, ours_params, ref_params, gen)
    assert calls == {"mirror": 1, "device": 2}


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_gives_the_host_the_table_again(name, monkeypatch):
    ours, ref, ours_params, ref_params = pair(name, dict(lr=0.01))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        step_and_compare(ours, ref, ours_params, ref_params, gen)
    for p, q in zip(ours_params, ref_params):
        ours.state[p]["step"].fill_(5.0)  # the mirror is stale from here...
        ref.state[q]["step"].fill_(5.0)
    ours.load_state_dict(ref.state_dict())  # ...and known again from the loaded values
    calls = counting(monkeypatch)
    for _ in range(2):
        step_and_compare(ours, ref, ours_params, ref_params, gen)
    assert calls == {"mirror": 2, "device": 0}


def test_found_inf_and_a_tensor_lr_keep_the_math_on_the_device(monkeypatch):
    calls = counting(monkeypatch)
    ours, ref, ours_params, ref_params = pair("NAdam", dict(lr=torch.tensor(0.01)))
    gen = torch.Generator().manual_seed(0)
    step_and_compare(ours, ref, ours_params, ref_params, gen)
    assert calls == {"mirror": 0, "device": 1}
    ours, _, ours_params, _ = pair("NAdam", dict(lr=0.01))
    for p in ours_params:
        p.grad = torch.ones_like(p)
    ours.step()
    before = [ours.state[p]["step"].clone() for p in ours_params]
    ours.grad_scale, ours.found_inf = torch.ones(1), torch.ones(1)  # as GradScaler sets them
    ours.step()
    assert calls["device"] == 2
    assert all(torch.equal(ours.state[p]["step"], b) for p, b in zip(ours_params, before))


def test_adafactor_takes_its_step_scalars_from_the_host(monkeypatch):
    """Adafactor's kernels get [1 - beta2_t, rho_t, decay] computed on the host from the
    mirror in the default loop, and from the device's step counts after a write to them."""
    from fastopt.optimizers import adafactor

    calls = counting(monkeypatch, adafactor,
                     (("host", "_host_scalars"), ("device", "_device_scalars")))
    ours, ref, ours_params, ref_params = pair("Adafactor", dict(lr=0.01, weight_decay=0.1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        step_and_compare(ours, ref, ours_params, ref_params, gen)
    assert calls["host"] > 0 and calls["device"] == 0
    for p, q in zip(ours_params, ref_params):
        ours.state[p]["step"].fill_(9.0)
        ref.state[q]["step"].fill_(9.0)
    step_and_compare(ours, ref, ours_params, ref_params, gen)
    assert calls["device"] > 0


def test_a_deep_copy_keeps_the_host_mirror(monkeypatch):
    import copy

    ours, ref, ours_params, ref_params = pair("NAdam", dict(lr=0.01))
    gen = torch.Generator().manual_seed(0)
    step_and_compare(ours, ref, ours_params, ref_params, gen)
    twin = copy.deepcopy(ours)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    calls = counting(monkeypatch)
    ref_twin = copy.deepcopy(ref)
    ref_twin_params = [p for group in ref_twin.param_groups for p in group["params"]]
    step_and_compare(twin, ref_twin, twin_params, ref_twin_params, gen)
    assert calls == {"mirror": 1, "device": 0}
