"""Behaviour torch users rely on: flat layout, closures, zero_grad, hooks, GradScaler, groups."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch

import fastopt
from optim_db import BY_NAME
from helpers import (BACKENDS, PAIRS, assert_state_close, check_grad_scaler_with_injected_inf,
                     clone_params, compare_runs, lives_in, make_params, owns_storage, snapshot, step_both)


def test_params_become_views_of_one_buffer_keeping_identity_and_values():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    model[2].bias.requires_grad_(True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    objects = list(model.parameters())
    opt = fastopt.AdamW(model.parameters())
    assert list(model.parameters()) == objects and opt.param_groups[0]["params"] == objects
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], objects))
    flat = opt._buckets[0][0].flat
    # Each param is a slot of one flat buffer, with a storage of its own (its bytes alone).
    assert all(lives_in(p, flat) and owns_storage(p) for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad
        assert isinstance(p, torch.nn.Parameter) and p.is_contiguous()


def test_buckets_per_dtype_in_one_group():
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3).double()),
              torch.nn.Parameter(torch.randn(2))]
    opt = fastopt.Adam(params, lr=0.1)
    assert [len(b.params) for b in opt._buckets[0]] == [2, 1]
    fp32, fp64 = (b.flat for b in opt._buckets[0])
    assert lives_in(params[0], fp32) and lives_in(params[2], fp32) and lives_in(params[1], fp64)


def test_mixed_dtype_group_matches_torch():
    init = [torch.randn(4), torch.randn(3).double(), torch.randn(2)]
    ours_params, ref_params = clone_params(init), clone_params(init)
    ours = fastopt.AdamW(ours_params, lr=0.1)
    ref = torch.optim.AdamW(ref_params, lr=0.1, foreach=False)
    for _ in range(4):
        step_both(ours, ref, ours_params, ref_params)


@pytest.mark.parametrize("name", list(PAIRS))
def test_closure_runs_with_grad_enabled_and_returns_loss(name):
    ours_cls, _ = PAIRS[name]
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = ours_cls([w], lr=0.1)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(torch.is_grad_enabled())
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen == [True] and loss.item() == 5.0
    assert not torch.equal(w.detach(), torch.tensor([1.0, -2.0]))


def test_zero_grad_set_to_none_and_in_place():
    model = torch.nn.Linear(4, 3)
    opt = fastopt.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    bucket = opt._buckets[0][0]
    assert all(lives_in(g, bucket.grads.buffer) and owns_storage(g) for g in grads)
    model(torch.randn(2, 4)).sum().backward()  # accumulates into the flat grad buffer
    assert bucket.grads.buffer.abs().sum() > 0
    opt.zero_grad(set_to_none=False)
    assert not bucket.grads.buffer.any()


def test_foreign_grad_views_are_used_in_place_and_not_replaced():
    """DDP's gradient_as_bucket_view: p.grad is a view of DDP's own bucket; keep it."""
    init = make_params([(3, 4), (5,)])
    ours_params, ref_params = clone_params(init), clone_params(init)
    ddp_bucket = torch.zeros(17)
    views = [ddp_bucket[:12].view(3, 4), ddp_bucket[12:]]
    ours = fastopt.AdamW(ours_params, lr=0.1)
    ref = torch.optim.AdamW(ref_params, lr=0.1, foreach=False)
    for _ in range(4):
        ddp_bucket.copy_(torch.randn(17))
        for p, q, v in zip(ours_params, ref_params, views):
            p.grad, q.grad = v, v.clone()
        ours.step()
        ref.step()
        assert ours_params[0].grad is views[0]
        ours.zero_grad(set_to_none=False)
        assert ours_params[0].grad is views[0] and not ddp_bucket.any()
    for p, q in zip(ours_params, ref_params):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


def test_params_moved_out_of_the_buffer_are_laid_out_again():
    init = make_params([(4,), (6,)])
    ours_params, ref_params = clone_params(init), clone_params(init)
    ours = fastopt.Adam(ours_params, lr=0.1)
    ref = torch.optim.Adam(ref_params, lr=0.1, foreach=False)
    for step in range(6):
        if step == 3:
            new = torch.randn(6)
            ours_params[1].data = new.clone()  # e.g. a checkpoint loaded with assign=True
            ref_params[1].data = new.clone()
        step_both(ours, ref, ours_params, ref_params)
    assert lives_in(ours_params[1], ours._buckets[0][0].flat)


FP32 = dict(rtol=2e-6, atol=2e-7)


def one_frozen(shapes):
    """Two copies of params of ``shapes``, the second of each frozen (no requires_grad)."""
    init = make_params(shapes)
    ours_params, ref_params = clone_params(init), clone_params(init)
    for params in (ours_params, ref_params):
        params[1].requires_grad_(False)
    return ours_params, ref_params


def step_thawing(ours, ref, ours_params, ref_params, steps: int, thaw_at: int,
                 state: bool = False) -> None:
    """``steps`` steps of both on the same grads of the params that require one, the frozen
    param thawed at step ``thaw_at``; params (and ``state``) compared after each."""
    for step in range(steps):
        if step == thaw_at:
            for params in (ours_params, ref_params):
                params[1].requires_grad_(True)
        for p, q in zip(ours_params, ref_params):
            if p.requires_grad:
                g = torch.randn_like(p)
                p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p, q, **FP32)
        if state:
            assert_state_close(ours, ref, ours_params, ref_params, FP32)


def test_frozen_params_stay_out_until_they_get_a_grad():
    ours_params, ref_params = one_frozen([(4,), (5,), (6,)])
    ours = fastopt.AdamW(ours_params, lr=0.1)
    ref = torch.optim.AdamW(ref_params, lr=0.1, foreach=False)
    bucket = ours._buckets[0][0]  # no state will be kept for the frozen one
    assert bucket.params == [ours_params[0], ours_params[2]] and bucket.ends == [4, 70]
    step_thawing(ours, ref, ours_params, ref_params, steps=6, thaw_at=3)
    assert ours._buckets[0][0].ends == [4, 69, 134]  # laid out again with the thawed param


def test_adagrad_keeps_state_for_frozen_params_as_torch_makes_it_at_construction():
    """torch's Adagrad makes every param's state in its constructor, frozen ones included (a
    fine-tuned model's frozen base): the same state, the same state_dict, the same steps once
    a frozen param is thawed."""
    ours_params, ref_params = one_frozen([(4,), (5,), (6,)])
    kwargs = dict(lr=0.1, initial_accumulator_value=0.25)
    ours = fastopt.Adagrad(ours_params, **kwargs)
    ref = torch.optim.Adagrad(ref_params, foreach=False, **kwargs)
    assert_state_close(ours, ref, ours_params, ref_params, FP32)
    assert sorted(ours.state_dict()["state"]) == [0, 1, 2]
    step_thawing(ours, ref, ours_params, ref_params, steps=5, thaw_at=2, state=True)


def test_hooks_fire():
    params = clone_params(make_params([(3,)]))
    opt = fastopt.AdamW(params)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    params[0].grad = torch.ones(3)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_step_hooks_run_as_torch_runs_them():
    """Global and per-optimizer step hooks, in torch's order; a pre-hook may replace the
    step's arguments (here: a closure), and one returning anything else is refused as torch
    refuses it. SAGA, whose class defines its own step, runs each hook once too."""
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    def run(opt, params, **step_kwargs):
        calls = []
        handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
                   register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        try:
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step(**step_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    expected = ["global pre", "pre", "post", "global post"]
    for name in ("AdamW", "SGD"):
        theirs = getattr(torch.optim, name)([torch.nn.Parameter(torch.ones(3))], lr=0.1)
        params = [torch.nn.Parameter(torch.ones(3))]
        ours = getattr(fastopt, name)(params, lr=0.1)
        assert run(ours, params) == run(theirs, theirs.param_groups[0]["params"]) == expected
    params = [torch.nn.Parameter(torch.ones(3))]
    assert run(fastopt.SAGA(params, lr=0.1, num_samples=2), params, index=0) == expected

    params = [torch.nn.Parameter(torch.ones(3))]
    opt = fastopt.Adam(params, lr=0.1)
    params[0].grad = torch.ones(3)
    handle = opt.register_step_pre_hook(
        lambda o, a, k: ((o,), {"closure": lambda: torch.tensor(7.0)}))
    assert opt.step().item() == 7.0  # the closure the hook put in ran
    handle.remove()
    # step() passes its arguments as called: (opt,) and no keywords, as torch does
    opt.register_step_pre_hook(lambda o, a, k: (a, {**k, "closure": lambda: torch.tensor(8.0)}))
    assert opt.step().item() == 8.0
    bad = fastopt.Adam(params, lr=0.1)
    bad.register_step_pre_hook(lambda o, a, k: "nonsense")
    with pytest.raises(RuntimeError, match="must return None or a tuple of"):
        bad.step()


def test_step_hooks_see_the_closure_where_the_caller_put_it():
    """``step(closure=c)`` (Lightning's call) shows hooks ``kwargs={"closure": c}``,
    ``step(c)`` shows ``args=(opt, c)``, as torch's wrapper shows them."""
    def seen(opt, params, *args, **kwargs):
        calls = []
        opt.register_step_pre_hook(lambda o, a, k: calls.append((a[1:], dict(k))))
        opt.register_step_post_hook(lambda o, a, k: calls.append((a[1:], dict(k))))
        params[0].grad = torch.ones(3)
        opt.step(*args, **kwargs)
        return calls

    def closure():
        return torch.tensor(1.0)

    for args, kwargs in (((), {}), ((closure,), {}), ((), {"closure": closure}),
                         ((), {"closure": None})):
        ours_params, ref_params = [torch.nn.Parameter(torch.ones(3))], [
            torch.nn.Parameter(torch.ones(3))]
        ours = seen(fastopt.Adam(ours_params), ours_params, *args, **kwargs)
        assert ours == seen(torch.optim.Adam(ref_params), ref_params, *args, **kwargs)


def test_state_dict_hooks_see_and_may_replace_what_torch_hooks_do():
    """A state_dict post-hook that returns a new object gives the caller that object; a load
    pre-hook may mend a state_dict before it is checked (a renamed moment, a missing option);
    what a load post-hook writes into the state is what the next step uses (fp64 params,
    whose saved state fastopt keeps in its own dtypes, included)."""
    for dtype in (torch.float32, torch.float64):
        results = []
        for cls in (torch.optim.Adam, fastopt.Adam):
            params = [torch.nn.Parameter(torch.arange(1.0, 4.0, dtype=dtype))]
            opt = cls(params, lr=0.1)
            for _ in range(2):
                params[0].grad = torch.ones_like(params[0])
                opt.step()
            opt.register_state_dict_post_hook(lambda o, sd: {"version": 2, "optimizer": sd})
            wrapped = opt.state_dict()
            assert sorted(wrapped) == ["optimizer", "version"]
            saved = copy.deepcopy(wrapped["optimizer"])
            saved["state"][0]["m"] = saved["state"][0].pop("exp_avg")  # another library's name
            del saved["param_groups"][0]["betas"]

            def mend(o, sd):
                sd["state"][0]["exp_avg"] = sd["state"][0].pop("m")
                sd["param_groups"][0]["betas"] = (0.9, 0.999)

            opt.register_load_state_dict_pre_hook(mend)

            def restart(o):
                o.state[o.param_groups[0]["params"][0]]["step"] = torch.tensor(0.0)

            opt.register_load_state_dict_post_hook(restart)
            opt.load_state_dict(saved)
            params[0].grad = torch.ones_like(params[0])
            opt.step()
            results.append((params[0].detach().clone(), opt.state[params[0]]["step"].item()))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-6, atol=0)
        assert results[1][1] == results[0][1] == 1.0


def test_steps_and_zero_grads_show_in_the_profiler_under_torchs_names():
    """torch.optim names a profiler range per step and per zero_grad; fastopt opens the same
    ranges while a profiler records (and skips their cost otherwise)."""
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = fastopt.AdamW(params)
    params[0].grad = torch.ones(3)
    with torch.profiler.profile() as prof:
        opt.step()
        opt.zero_grad()
    names = {event.name for event in prof.events()}
    assert {"Optimizer.step#AdamW.step", "Optimizer.zero_grad#AdamW.zero_grad"} <= names
    assert params[0].grad is None


def test_add_param_group_after_steps():
    init = make_params([(4,), (5,)])
    ours_params, ref_params = clone_params(init), clone_params(init)
    ours = fastopt.Adam([ours_params[0]], lr=0.1)
    ref = torch.optim.Adam([ref_params[0]], lr=0.1, foreach=False)
    for step in range(6):
        if step == 2:
            ours.add_param_group({"params": [ours_params[1]], "lr": 0.01, "amsgrad": True})
            ref.add_param_group({"params": [ref_params[1]], "lr": 0.01, "amsgrad": True})
        step_both(ours, ref, ours_params, ref_params)
    assert ours.state[ours_params[1]]["step"].item() == 4.0


def test_state_that_starts_at_a_group_option_starts_at_its_value_when_first_stepped():
    """Rprop's step_size starts at lr: for a param first stepped after lr changed (a
    scheduler, a layer that gets grads later), at the new lr, as torch.optim's."""
    init = make_params([(4,), (5,)])
    ours_params, ref_params = clone_params(init), clone_params(init)
    ours = fastopt.Rprop(ours_params, lr=0.05)
    ref = torch.optim.Rprop(ref_params, lr=0.05, foreach=False)
    step_both(ours, ref, ours_params[:1], ref_params[:1])  # the second param has no grad yet
    for opt in (ours, ref):
        opt.param_groups[0]["lr"] = 0.01
    for _ in range(3):
        step_both(ours, ref, ours_params, ref_params)
    torch.testing.assert_close(ours.state[ours_params[1]]["step_size"],
                               ref.state[ref_params[1]]["step_size"])


def test_shared_params_rejected_and_duplicates_warned_as_torch_does():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        fastopt.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = fastopt.SGD([p, p], lr=0.1)
    p.grad = torch.ones(3)
    before = p.detach().clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.1)  # updated once


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_grad_scaler_inf_step_changes_nothing_then_matches_torch(name, backend):
    check_grad_scaler_with_injected_inf(name, backend, "cpu")


@pytest.mark.parametrize("shapes", [[(5,)], [(300,), (5,)], [(64,)] * 50, [(3, 4), (40, 50)]],
                         ids=["one", "two", "many-small-gathered", "matrices"])
@pytest.mark.parametrize("name", ["AdamW", "SGD", "NAdam"])
def test_grads_after_a_grad_scaler_step_are_unscaled_as_torch_leaves_them(name, shapes):
    """``scaler.step(optimizer)``: torch.optim's steps (for-loop and fused) leave every grad
    unscaled in place; fastopt's too, whichever route its step takes."""
    init = make_params(shapes)
    grads = {}
    for lib in (torch.optim, fastopt):
        params = clone_params(init)
        opt = getattr(lib, name)(params, **BY_NAME[name].typical)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(sum((p * p).sum() for p in params)).backward()
        scaler.step(opt)
        scaler.update()
        grads[lib] = [p.grad.clone() for p in params]
    for ours, ref, p in zip(grads[fastopt], grads[torch.optim], init):
        assert torch.equal(ours, ref) and torch.equal(ours, 2 * p)  # unscaled: exactly


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Adagrad"])
def test_a_grad_scale_of_shape_one_as_torchs_fused_tests_set_it(name):
    """``optimizer.grad_scale`` as torch's own tests set it (shape (1,), fp64 too) with
    ``found_inf`` set: nothing steps; with it clear, the grads are unscaled and the params
    stepped."""
    for scale_dtype in (torch.float32, torch.float64):
        for inf in (1.0, 0.0):
            params = clone_params(make_params([(3,), (4, 5)]))
            for p in params:
                p.grad = torch.full_like(p, 8.0)
            opt = getattr(fastopt, name)(params, **BY_NAME[name].typical)
            opt.grad_scale = torch.full((1,), 4.0, dtype=scale_dtype)
            opt.found_inf = torch.tensor(inf)
            before = [p.detach().clone() for p in params]
            opt.step()
            moved = [not torch.equal(p.detach(), b) for p, b in zip(params, before)]
            assert moved == [inf == 0.0] * 2
            if inf == 0.0:
                assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params)


def test_foreach_fused_capturable_are_accepted_and_recorded():
    params = clone_params(make_params([(3,)]))
    opt = fastopt.Adam(params, foreach=False, fused=None, capturable=True)
    group = opt.param_groups[0]
    assert group["foreach"] is False and group["capturable"] is True
    opt = fastopt.AdamW(clone_params(make_params([(3,)])), fused=True)
    assert opt.param_groups[0]["fused"] is True


def test_tensor_betas_like_torch():
    compare_runs("Adam", dict(lr=1e-2, betas=(torch.tensor(0.8), torch.tensor(0.99))),
                 [(129,)], steps=5)


def test_no_warnings_in_a_plain_training_step():
    model = torch.nn.Linear(3, 2)
    opt = fastopt.AdamW(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------- found in review
def test_complex_params_after_an_odd_number_of_real_elements():
    init = [torch.randn(5), torch.randn(3, dtype=torch.complex64)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt, ref_opt = fastopt.Adam(ours, lr=0.1), torch.optim.Adam(ref, lr=0.1, foreach=False)
    for _ in range(3):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-7)


def test_lazy_modules_and_swapped_params():
    """An optimizer made before nn.Lazy* params exist, and params swapped by model.to() under
    torch's swap-on-conversion mode, as torch.optim allows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = fastopt.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(8, 3)
    model(x)  # materialises the lazy params
    twin = copy.deepcopy(model)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.1, foreach=False)
    for net, o in ((model, opt), (twin, ref)):
        for _ in range(3):
            o.zero_grad()
            net(x).pow(2).sum().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-7)
    # A dtype change after the state exists: torch.optim fails inside its step; fastopt refuses
    # up front, naming the param and both dtypes, and changes nothing.
    params = list(model.parameters())
    saved = snapshot(opt, params)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)  # swaps the Parameter objects' contents
        twin.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    for net, o in ((model, opt), (twin, ref)):
        o.zero_grad()
        net(x.double()).pow(2).sum().backward()
    with pytest.raises(RuntimeError):
        ref.step()
    with pytest.raises(RuntimeError, match=r"^param 0 of param group 0 \(shape \(4, 3\)\) changed "
                       r"dtype from torch.float32 to torch.float64"):
        opt.step()
    for p in params:  # the state (the params are the user's fp64 now)
        for key, value in saved[1][id(p)].items():
            assert torch.equal(opt.state[p][key], value), key
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_fastopt_memory_and_verify_after_a_plain_import():
    code = ("import fastopt, torch; p = torch.nn.Parameter(torch.ones(3)); "
            "print(fastopt.memory.estimate([p], 'adam').state_bytes, callable(fastopt.verify))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # Adam: two 128-element buffers (3 elements and their padding) and one step row.
    assert out.stdout.split() == [str(2 * 4 * 128 + fastopt.memory.STEP_BYTES), "True"]


def test_group_options_are_checked_when_added_and_when_changed():
    params = [torch.nn.Parameter(torch.ones(5000))]
    opt = fastopt.AdamW(params, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="every param group needs the same value"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "max_grad_norm": 2.0})
    assert len(opt.param_groups) == 1
    int8 = fastopt.AdamW8bit(params)
    int8.param_groups[0]["amsgrad"] = True  # switched on later: refused, nothing written
    params[0].grad = torch.ones(5000)
    with pytest.raises(ValueError, match="amsgrad"):
        int8.step()
    assert torch.equal(params[0].detach(), torch.ones(5000)) and not int8.state


@pytest.mark.parametrize("name, options", [
    ("AdamW", {"stochastic_rounding": True}),
    ("AdamW", {"master_weights": "remainder"}),
    ("Adagrad", {"stochastic_rounding": True}),  # makes state as each bucket is laid out
])
def test_a_group_refused_when_laid_out_leaves_the_optimizer_as_it_was(name, options):
    """Options only a bucket's layout refuses (fp16 params here): the group is not kept, nor
    state made for its fp32 param laid out before the refusal, and the next steps match
    torch.optim's as if it had never been added."""
    init = make_params([(4,), (5,), (3,)])
    ours_params, ref_params = clone_params(init), clone_params(init)
    ours = getattr(fastopt, name)([ours_params[0]], lr=0.1)
    # the reference holds the second group from the start (torch 2.11's Adagrad makes no state
    # for a group added later); its params get no grad before it is added to ours
    ref = getattr(torch.optim, name)([{"params": [ref_params[0]]},
                                      {"params": [ref_params[1], ref_params[2]]}],
                                     lr=0.1, foreach=False)
    step_both(ours, ref, ours_params[:1], ref_params[:1])
    half = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16"):
        ours.add_param_group({"params": [ours_params[1], half], **options})
    assert len(ours.param_groups) == 1 and ours_params[1] not in ours.state
    assert torch.equal(ours_params[1].detach(), init[1])
    ours.add_param_group({"params": [ours_params[1], ours_params[2]]})
    for _ in range(3):
        step_both(ours, ref, ours_params, ref_params)
    assert len(ours.state_dict()["state"]) == 3
