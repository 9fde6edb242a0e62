"""state_dict: torch.optim's per-param format, moved both ways, resumed bit-identically."""

import copy
import inspect
import io
import pickle

import pytest
import torch

import fastopt
from helpers import (BACKENDS, PAIRS, assert_state_close, clone_params, lives_in, make_params,
                     owns_storage, steppable)
from optim_db import BY_NAME, NAMES

SHAPES = [(0,), (129,), (), (4, 5), (1,)]
# Each optimizer's richest configuration (its last), with its typical learning rate.
OPTIONS = {name: {**BY_NAME[name].typical, **BY_NAME[name].configs[-1][0]} for name in NAMES}
# torch.optim's variants whose state_dicts fastopt loads: the for-loop, foreach, fused.
VARIANTS = [(name, variant) for name in NAMES if name != "Lion"
            for variant in (dict(foreach=False), dict(foreach=True), dict(fused=True))
            if "fused" not in variant or "fused" in inspect.signature(
                getattr(torch.optim, name)).parameters]


def feed(params_lists, gen, skip_index=None):
    """The same random grad for the i-th param of every list."""
    for i, group in enumerate(zip(*params_lists)):
        if i == skip_index:
            for p in group:
                p.grad = None
            continue
        g = torch.randn(group[0].shape, generator=gen)
        for p in group:
            p.grad = g.clone()


def run(opt, params, steps, gen, skip_index=None):
    for _ in range(steps):
        feed([params], gen, skip_index)
        opt.step()


def roundtrip(sd):
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_format_is_torch_per_param(name):
    ours_cls, reference = PAIRS[name]
    init = make_params(steppable(name, SHAPES))
    ours_params, ref_params = clone_params(init), clone_params(init)
    ours, ref = ours_cls(ours_params, **OPTIONS[name]), reference(ref_params, **OPTIONS[name])
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        feed([ours_params, ref_params], gen, skip_index=4)
        ours.step()
        ref.step()
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(sd["state"]) == set(ref_sd["state"]) >= {0, 1, 2, 3}
    assert sd["param_groups"][0].keys() >= ref_sd["param_groups"][0].keys()
    scalars = BY_NAME[name].declaration.scalar_names
    for key, state in ref_sd["state"].items():
        assert set(sd["state"][key]) == set(state)
        for name_, value in state.items():
            mine = sd["state"][key][name_]
            assert mine.shape == value.shape and mine.dtype == value.dtype, name_
            if name_ in scalars:
                assert mine.dim() == 0 and mine.dtype == torch.float32
                assert mine.item() == value.item()
            if name_ == "step":
                assert mine.item() == (3.0 if key != 4 else 0.0)
    # Scalars are separate per param (torch updates each in place).
    for scalar in scalars:
        values = [sd["state"][k][scalar] for k in sd["state"]]
        before = values[1].item()
        values[0] += 1
        assert values[1].item() == before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,variant", VARIANTS, ids=[f"{n}-{v}" for n, v in VARIANTS])
def test_torch_to_fastopt_mid_run(name, variant, backend):
    """State saved by torch's for-loop, foreach and fused variants continues identically."""
    ours_cls, reference = PAIRS[name]
    init = make_params(steppable(name, SHAPES))
    ref_params, twin_params = clone_params(init), clone_params(init)
    ref = reference(ref_params, **OPTIONS[name], **variant)
    twin = reference(twin_params, **OPTIONS[name])
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        feed([ref_params, twin_params], gen)
        ref.step()
        twin.step()
    ours_params = clone_params(ref_params)
    ours = ours_cls(ours_params, backend=backend, **OPTIONS[name])
    ours.load_state_dict(roundtrip(ref.state_dict()))
    for _ in range(5):
        feed([ours_params, twin_params], gen, skip_index=1)
        ours.step()
        twin.step()
        for p, q in zip(ours_params, twin_params):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
        assert_state_close(ours, twin, ours_params, twin_params, dict(rtol=2e-6, atol=2e-7))


@pytest.mark.parametrize("name", NAMES)
def test_fastopt_to_torch_mid_run(name):
    ours_cls, reference = PAIRS[name]
    init = make_params(steppable(name, SHAPES))
    ours_params, twin_params = clone_params(init), clone_params(init)
    ours = ours_cls(ours_params, **OPTIONS[name])
    twin = reference(twin_params, **OPTIONS[name])
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        feed([ours_params, twin_params], gen, skip_index=2)
        ours.step()
        twin.step()
    ref_params = clone_params(ours_params)
    ref = reference(ref_params, **OPTIONS[name])
    ref.load_state_dict(roundtrip(ours.state_dict()))
    for _ in range(5):
        feed([ref_params, twin_params], gen)
        ref.step()
        twin.step()
    for p, q in zip(ref_params, twin_params):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_identical(name, backend):
    ours_cls, _ = PAIRS[name]
    init = make_params(steppable(name, SHAPES))
    straight_params, first_params = clone_params(init), clone_params(init)
    straight = ours_cls(straight_params, backend=backend, **OPTIONS[name])
    first = ours_cls(first_params, backend=backend, **OPTIONS[name])
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    run(straight, straight_params, 5, gen_a, skip_index=0)
    run(first, first_params, 5, gen_b, skip_index=0)
    saved = roundtrip({"params": [p.detach() for p in first_params], "opt": first.state_dict()})
    resumed_params = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = ours_cls(resumed_params, backend=backend, **OPTIONS[name])
    resumed.load_state_dict(saved["opt"])
    run(straight, straight_params, 6, gen_a)
    run(resumed, resumed_params, 6, gen_b)
    for p, q in zip(straight_params, resumed_params):
        assert torch.equal(p, q)
    for p, q in zip(straight_params, resumed_params):
        a, b = straight.state.get(p, {}), resumed.state.get(q, {})
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_old_checkpoints_missing_keys_and_python_float_steps():
    params = clone_params(make_params([(6,), (2, 3)]))
    ref = torch.optim.Adam(clone_params(params), lr=1e-2)
    for p in ref.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    ref.step()
    sd = copy.deepcopy(ref.state_dict())
    for state in sd["state"].values():
        state["step"] = float(state["step"])  # very old checkpoints stored a Python number
    for group in sd["param_groups"]:
        for key in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                    "decoupled_weight_decay"):
            group.pop(key)  # options that did not exist yet
    ours = fastopt.Adam(params, lr=1e-2)
    ours.load_state_dict(sd)
    assert ours.param_groups[0]["amsgrad"] is False
    assert ours.state[params[0]]["step"].item() == 1.0
    assert torch.is_tensor(ours.state[params[0]]["step"])
    # amsgrad switched on for a checkpoint without max_exp_avg_sq: starts from zeros.
    ours.param_groups[0]["amsgrad"] = True
    for p in params:
        p.grad = torch.ones_like(p)
    ours.step()
    assert ours.state[params[0]]["max_exp_avg_sq"].shape == params[0].shape


@pytest.mark.parametrize("name", [n for n in NAMES if n != "Lion"])
def test_options_an_older_checkpoint_lacks_take_what_torch_gives_them(name):
    """An option torch's ``__setstate__`` fills in for a group that lacks it (an older
    checkpoint's: SGD's fused is False, RMSprop's momentum 0) is filled in alike, whatever
    the optimizer loading it was built with."""
    ours_cls, ref_cls = PAIRS[name]
    params = make_params([(3,)])
    built = dict(BY_NAME[name].typical)
    for key, default in ref_cls(clone_params(params)).defaults.items():
        if key in ("lr", "differentiable", "fused", "capturable", "foreach") \
                or key not in inspect.signature(ref_cls).parameters:
            kwargs = built
        elif isinstance(default, bool):
            kwargs = {**built, key: not default}  # built otherwise: the filled-in value wins
        elif isinstance(default, (int, float)) and key == "momentum":
            kwargs = {**built, key: 0.5}
        else:
            kwargs = built
        loaded = []
        for cls in (ref_cls, ours_cls):
            saved = cls(clone_params(params), **built).state_dict()
            saved["param_groups"][0].pop(key)
            opt = cls(clone_params(params), **kwargs)
            try:
                opt.load_state_dict(saved)
            except ValueError:  # fastopt requires the options torch leaves missing
                loaded.append("refused")
                continue
            loaded.append(opt.param_groups[0].get(key, "missing"))
        if loaded[0] != "missing":
            assert loaded[1] == loaded[0], (key, loaded)


def test_sgd_momentum_buffer_none_loads_as_no_buffer():
    init = make_params([(5,)])
    ours_params, ref_params = clone_params(init), clone_params(init)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, foreach=False)
    sd = ref.state_dict()
    sd["state"] = {0: {"momentum_buffer": None}}
    ours = fastopt.SGD(ours_params, lr=0.1, momentum=0.9)
    ours.load_state_dict(sd)
    ref.load_state_dict(sd)
    g = torch.randn(5)
    ours_params[0].grad, ref_params[0].grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    torch.testing.assert_close(ours_params[0], ref_params[0], rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(ours.state[ours_params[0]]["momentum_buffer"], g)


def test_mismatched_dict_raises_and_changes_nothing():
    params = clone_params(make_params([(4,), (3,)]))
    ours = fastopt.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    ours.step()
    before = copy.deepcopy(ours.state_dict())
    other = fastopt.AdamW(clone_params(make_params([(4,)])), lr=1e-2)
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        ours.load_state_dict(other.state_dict())
    two_groups = fastopt.AdamW([{"params": clone_params(make_params([(4,)]))},
                                {"params": clone_params(make_params([(3,)]))}])
    with pytest.raises(ValueError, match="different number of parameter groups"):
        ours.load_state_dict(two_groups.state_dict())
    wrong_shapes = fastopt.AdamW(clone_params(make_params([(5,), (3,)])), lr=1e-2)
    for p in wrong_shapes.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    wrong_shapes.step()
    with pytest.raises(ValueError, match="shape"):
        ours.load_state_dict(wrong_shapes.state_dict())
    after = ours.state_dict()
    for key, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][key][name], value)
    assert after["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("saved_with,loaded_by,message", [
    (dict(master_weights="remainder"), dict(), "for float16 params use"),
    (dict(stochastic_rounding=True), dict(), "supports bfloat16 params"),
    (dict(max_grad_norm=1.0), dict(in_backward=True), "in_backward=True does not wait"),
    (dict(master_weights="remainder"), dict(stochastic_rounding=True), "one or the other"),
])
def test_a_checkpoint_whose_options_do_not_fit_is_refused_changing_nothing(saved_with, loaded_by,
                                                                            message):
    """Options a checkpoint brings that this optimizer's params or options refuse (as its
    constructor would): ValueError at load_state_dict, the optimizer as it was, and the next
    step runs."""
    from helpers import assert_unchanged, snapshot

    dtype = torch.bfloat16 if loaded_by else torch.float16  # fp16: refused by its layout
    saved_params = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in make_params([(6,)])]
    source = fastopt.AdamW(saved_params, lr=1e-2, **saved_with)
    saved_params[0].grad = torch.ones_like(saved_params[0])
    source.step()
    params = [torch.nn.Parameter(t.to(dtype)) for t in make_params([(6,)])]
    opt = fastopt.AdamW(params, lr=1e-2, **loaded_by)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                            for g in opt.param_groups])
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(source.state_dict())
    assert_unchanged(opt, params, before)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert opt.state[params[0]]["step"].item() == 2.0


@pytest.mark.parametrize("name,options", [
    ("AdamW", dict(state_dtype="int8")), ("AdamW", dict(state_dtype="int4")), ("AdamW", {}),
    ("NAdam", {}), ("Adagrad", {}), ("RMSprop", dict(momentum=0.9)),
], ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())) or "plain")
def test_resume_with_params_missing_grads_is_bit_identical(name, options):
    """Params that miss grads on different steps reach equal step counts by different
    histories; a resumed run (whose run keys follow the loaded values) steps and rounds them
    exactly as the run that never stopped (torch's fused CPU ops round the elements of their
    vector loop and of their scalar tail differently, so how params share calls shows)."""
    shapes = [(64, 80), (80,), (3, 5)]
    cls = PAIRS[name][0]

    def step(opt, params, k):
        gen = torch.Generator().manual_seed(100 + k)
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=gen)
            p.grad = None if (k + i) % 4 == 3 else grad

    def steps(opt, params, ks):
        for k in ks:
            step(opt, params, k)
            opt.step()

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.5 for s in shapes]
    never_stopped = clone_params(init)
    ours = cls(never_stopped, lr=0.01, **options)
    first = clone_params(init)
    stopped = cls(first, lr=0.01, **options)
    steps(ours, never_stopped, range(3))
    steps(stopped, first, range(3))
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = cls(resumed_params, lr=0.01, **options)
    resumed.load_state_dict(copy.deepcopy(stopped.state_dict()))
    copied = copy.deepcopy(stopped)
    steps(ours, never_stopped, range(3, 40))
    steps(resumed, resumed_params, range(3, 40))
    steps(copied, copied.param_groups[0]["params"], range(3, 40))
    for other in (resumed_params, copied.param_groups[0]["params"]):
        for p, q in zip(never_stopped, other):
            assert torch.equal(p, q)


def test_loading_copies_into_flat_buffers():
    params = clone_params(make_params([(4,), (3,)]))
    ours = fastopt.Adam(params, lr=1e-2)
    ref = torch.optim.Adam(clone_params(params), lr=1e-2)
    for p in ref.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    ref.step()
    sd = ref.state_dict()
    ours.load_state_dict(sd)
    exp_avg = ours.state[params[0]]["exp_avg"]
    assert exp_avg.data_ptr() != sd["state"][0]["exp_avg"].data_ptr()  # copied, not aliased
    flat = ours._buckets[0][0].state.tensors["exp_avg"]
    assert lives_in(exp_avg, flat) and owns_storage(exp_avg)


@pytest.mark.parametrize("how", ["load_state_dict", "state replaced", "entry deleted"])
def test_new_state_leaves_the_params_where_they_are(how):
    """Loading a state_dict or replacing state through ``optimizer.state`` lays the state out
    again but leaves the params in their slots, as torch.optim never moves a param: a tensor
    aliasing one (``p.detach()``, a model state_dict's values) keeps following it."""
    params = clone_params(make_params([(4,), (3, 2), (5,)]))
    opt = fastopt.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    aliases = [p.detach() for p in params]
    pointers = [p.data_ptr() for p in params]
    if how == "load_state_dict":
        opt.load_state_dict(saved)
    elif how == "state replaced":
        opt.state[params[1]] = {k: v.clone() for k, v in opt.state[params[1]].items()}
    else:
        del opt.state[params[1]]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert [p.data_ptr() for p in params] == pointers
    for p, alias in zip(params, aliases):
        assert torch.equal(alias, p)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle_continue_identically(name):
    ours_cls, _ = PAIRS[name]
    params = clone_params(make_params(SHAPES))
    opt = ours_cls(params, **OPTIONS[name])
    gen = torch.Generator().manual_seed(5)
    run(opt, params, 3, gen)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        clone_params_ = clone.param_groups[0]["params"]
        assert all(c is not p for c, p in zip(clone_params_, params))
        gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        original = copy.deepcopy(opt)
        run(original, original.param_groups[0]["params"], 3, gen_a)
        run(clone, clone_params_, 3, gen_b)
        for p, q in zip(original.param_groups[0]["params"], clone_params_):
            assert torch.equal(p, q)
    assert isinstance(repr(opt), str) and ours_cls.__name__ in repr(opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_without_momentum_keeps_no_state_like_torch(backend):
    init = make_params([(4,), (3,)])
    ours_params, ref_params = clone_params(init), clone_params(init)
    ours = fastopt.SGD(ours_params, lr=0.1, backend=backend)
    ref = torch.optim.SGD(ref_params, lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        feed([ours_params, ref_params], gen)
        ours.step()
        ref.step()
    assert len(ours.state) == len(ref.state) == 0
    assert ours.state_dict()["state"] == ref.state_dict()["state"] == {}
    ours.param_groups[0]["momentum"] = ref.param_groups[0]["momentum"] = 0.9  # switched on later
    for _ in range(2):
        feed([ours_params, ref_params], gen)
        ours.step()
        ref.step()
    for p, q in zip(ours_params, ref_params):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                   rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_momentum_switched_on_beside_masters_starts_as_the_grad(backend, dtype):
    """Half params with fp32 masters have state before any momentum buffer: a buffer that
    joins it mid-run (momentum switched on) still starts as the grad itself, as torch's,
    not as ``(1 - dampening) * grad``; a param without a grad that step starts it later."""
    init = make_params([(40,), (3,)])
    ours_params = [torch.nn.Parameter(t.detach().to(dtype)) for t in init]
    ref_params = [torch.nn.Parameter(t.detach().to(dtype).float()) for t in init]
    ours = fastopt.SGD(ours_params, lr=0.1, dampening=0.3, master_weights=True, backend=backend)
    ref = torch.optim.SGD(ref_params, lr=0.1, dampening=0.3, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        if step == 2:
            ours.param_groups[0]["momentum"] = ref.param_groups[0]["momentum"] = 0.9
        for j, (p, q) in enumerate(zip(ours_params, ref_params)):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = (None, None) if (step == 2 and j == 1) else (g, g.float())
        ours.step()
        ref.step()
    for p, q in zip(ours_params, ref_params):
        torch.testing.assert_close(ours.state[p]["master_param"], q.detach(), rtol=2e-6,
                                   atol=2e-7)
        torch.testing.assert_close(ours.state[p]["momentum_buffer"].float(),
                                   ref.state[q]["momentum_buffer"], rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_sgds_sparse_momentum_buffer_loads(backend):
    """After sparse grads torch's SGD keeps a sparse momentum buffer; fastopt loads it
    (densified, as it keeps it) and both go on equal."""
    init = torch.randn(6, 3)
    ours_p, ref_p = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ref = torch.optim.SGD([ref_p], lr=0.1, momentum=0.9, foreach=False)
    gen = torch.Generator().manual_seed(0)

    def sparse_grad():
        g = torch.zeros(6, 3)
        g[torch.randint(0, 6, (2,), generator=gen)] = torch.randn(2, 3, generator=gen)
        return g.to_sparse()

    ref_p.grad = sparse_grad()
    ref.step()
    assert ref.state[ref_p]["momentum_buffer"].layout == torch.sparse_coo
    with torch.no_grad():
        ours_p.copy_(ref_p)
    ours = fastopt.SGD([ours_p], lr=0.1, momentum=0.9, backend=backend)
    ours.load_state_dict(ref.state_dict())
    for _ in range(2):
        g = sparse_grad()
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(ours_p.detach(), ref_p.detach(), rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(ours.state[ours_p]["momentum_buffer"],
                               ref.state[ref_p]["momentum_buffer"].to_dense(), rtol=2e-6,
                               atol=2e-7)


@pytest.mark.parametrize("name", NAMES)
def test_default_training_loop_resumes_bit_identically(name):
    """zero_grad() (set_to_none=True) + backward + step, saved and loaded into a fresh model
    and optimizer mid-run: the continuation equals the uninterrupted run bit for bit."""
    ours_cls, _ = PAIRS[name]
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))

    def train(net, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()

    net = model()
    opt = ours_cls(net.parameters(), **OPTIONS[name])
    train(net, opt, 3)
    saved = roundtrip({"model": net.state_dict(), "opt": opt.state_dict()})
    train(net, opt, 3)
    resumed = model()
    resumed.load_state_dict(saved["model"])
    resumed_opt = ours_cls(resumed.parameters(), **OPTIONS[name])
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, 3)
    for p, q in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
