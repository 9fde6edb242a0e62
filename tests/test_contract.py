"""torch.optim's contract where code nobody here wrote leans on it: notes in optimizer.state,
grads a step never touches, differentiable steps, meta params, dtype changes, shared memory,
buffers a user owns, checkpoints that do not fit, NaN in AMSGrad, and what saving, pickling and
``flatten_params=False`` cost. Each behaviour is checked against torch.optim itself."""

from __future__ import annotations

import gc
import inspect
import io
import pickle

import pytest
import torch
from torch.autograd import gradcheck

import fastopt
from fastopt.flat import padded_size
from helpers import BACKENDS, PAIRS, TOLERANCES, assert_unchanged, lives_in, snapshot
from optim_db import BY_NAME, NAMES, OPTIM_DB

FP32 = TOLERANCES[torch.float32]
OPTIONS = {name: BY_NAME[name].typical for name in NAMES}


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def pair(name: str, backend: str = "torch", seed: int = 0, **ours):
    """(model, fastopt optimizer, twin model, torch.optim optimizer) with the same weights
    (``ours``: fastopt's own options)."""
    ours_cls, ref_cls = PAIRS[name]
    model, twin = mlp(seed), mlp(seed)
    return (model, ours_cls(model.parameters(), backend=backend, **OPTIONS[name], **ours), twin,
            ref_cls(twin.parameters(), **OPTIONS[name]))


def assert_models_close(model, twin, **tol) -> None:
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **(tol or FP32))


# ------------------------------------------------------------------ notes in optimizer.state
@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_under_keys_that_are_not_params_are_kept_as_torch_keeps_them(backend):
    """Hooks may write ``optimizer.state["note"] = 1`` (torch's own hook tests do): state_dict,
    step, load_state_dict with a post-hook writing another note, deepcopy and pickle all work,
    and the notes round-trip as with torch.optim."""
    _, opt, _, ref = pair("AdamW", backend)
    for o in (opt, ref):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
        o.state["note"] = 1
        saved = o.state_dict()
        assert saved["state"]["note"] == 1 and set(saved["state"]) == {0, 1, 2, 3, "note"}
        o.step()
        o.register_load_state_dict_post_hook(lambda o: o.state.__setitem__("loaded", True))
        o.load_state_dict(saved)
        o.step()
        assert o.state["loaded"] is True and o.state["note"] == 1
        assert pickle.loads(pickle.dumps(o)).state["note"] == 1


# ------------------------------------------------------------------ grads
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("keep_grads", [False, True], ids=["set_to_none", "keep_grads"])
def test_step_never_writes_into_or_replaces_a_grad(name, backend, keep_grads):
    """After every step ``p.grad`` is the same tensor with the same version (torch guarantees
    that a step does not write into grads), fresh grads or kept ones, first step or later."""
    model, opt, twin, ref = pair(name, backend)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad(set_to_none=not keep_grads)
        model(x).pow(2).sum().backward()
        held = [(p.grad, p.grad._version, p.grad.clone()) for p in model.parameters()]
        opt.step()
        for p, (grad, version, value) in zip(model.parameters(), held):
            assert p.grad is grad and grad._version == version and torch.equal(grad, value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_grads_a_user_holds_stay_the_grads(name, backend):
    """Code that keeps the grad tensors it saw and edits them before ``step()`` (a hand-written
    all-reduce, a compression hook) edits the grads the step reads: three steps of a loop that
    keeps its grads (``zero_grad(set_to_none=False)``, which lays them out flat) equal torch's,
    and ``zero_grad`` leaves the held tensors the grads."""
    model, opt, twin, ref = pair(name, backend)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for net, o in ((model, opt), (twin, ref)):
            net(x).pow(2).sum().backward()
            held = [p.grad for p in net.parameters()]
            for g in held:
                g.mul_(0.5)  # the user's all-reduce over one rank
            o.step()
            o.zero_grad(set_to_none=False)
            assert all(p.grad is g for p, g in zip(net.parameters(), held))
        assert_models_close(model, twin)
    assert all(lives_in(p.grad, opt._buckets[0][0].grads.buffer) for p in model.parameters())


# ------------------------------------------------------------------ torch's own errors
FUSED = [name for name in NAMES if "fused" in inspect.signature(
    getattr(torch.optim, name, object)).parameters]


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("kind", ["meta", "complex"])
def test_fused_true_refuses_what_torch_fused_refuses_and_creates_nothing(name, kind):
    """``fused=True`` on meta or non-floating (complex) params: torch's RuntimeError and
    message at the step, and no state is made by it (Adagrad made its own at construction,
    as torch's does)."""
    ours_cls, ref_cls = PAIRS[name]
    errors, made = [], []
    for cls in (ours_cls, ref_cls):
        p = (torch.zeros(3, device="meta", requires_grad=True) if kind == "meta"
             else torch.zeros(3, dtype=torch.complex64, requires_grad=True))
        p.grad = torch.zeros_like(p)
        opt = cls([p], lr=0.1, fused=True)
        with pytest.raises(RuntimeError) as error:
            opt.step()
        errors.append(str(error.value))
        made.append({k: float(v.sum().abs()) for k, v in opt.state.get(p, {}).items()}
                    if kind != "meta" else bool(opt.state.get(p)))
    assert made[0] == made[1]
    assert errors[0] == errors[1]
    assert errors[0].startswith("`fused=True` requires all the params to be floating point")


@pytest.mark.parametrize("name", list(PAIRS))
def test_meta_params_step_as_with_torch(name):
    """Meta params (shape-only models) step without error, as torch.optim's for-loop does."""
    ours_cls, _ = PAIRS[name]
    p = torch.zeros(3, 4, device="meta", requires_grad=True)
    p.grad = torch.zeros_like(p)
    opt = ours_cls([p], **OPTIONS[name])
    opt.step()
    opt.step()
    assert p.device.type == "meta" and p.shape == (3, 4)


# ------------------------------------------------------------------ differentiable=True
def _differentiable_case(info):
    """(options, state names, scalars) of one optimizer's richest config, for gradcheck."""
    options = dict(info.configs[-1][0])
    options.pop("lr", None)
    group = {**info.cls._option_defaults(), **options}
    names = info.declaration.buffer_names(group)
    scalars = {"step": 5.0, "mu_product": 0.5, "eta": 0.01, "mu": 1.0}
    return options, names, {s.name: scalars[s.name] for s in info.declaration.scalars}


DIFFERENTIABLE = [(info.name, *_differentiable_case(info)) for info in OPTIM_DB
                  if info.differentiable]


def differentiable_step(cls, options: dict, names: list, scalars: dict):
    """One step as a function of (param, grad, lr, *state), for gradcheck: the param is a
    non-leaf clone and the state tensors require grad, as in torch's own differentiable tests."""
    def step(param, grad, lr, *state):
        p = param.clone()
        p.grad = grad
        opt = cls([p], lr=lr if lr is not None else 0.01, differentiable=True, **options)
        opt.state[p].update({name: s.clone() for name, s in zip(names, state)},
                            **{k: torch.tensor(v, dtype=torch.float64) for k, v in scalars.items()})
        opt.step()
        return (p, *[opt.state[p][name] for name in names])
    return step


@pytest.mark.parametrize("name,options,names,scalars", DIFFERENTIABLE,
                         ids=[d[0] for d in DIFFERENTIABLE])
def test_differentiable_step_passes_gradcheck_and_matches_torch(name, options, names, scalars):
    """``differentiable=True``: autograd through the update (gradcheck on fp64) and the same
    outputs and hypergradients (w.r.t. param, grad, lr and every state tensor) as torch.optim."""
    ours_cls = PAIRS[name][0]
    ref_cls = getattr(torch.optim, name)
    gen = torch.Generator().manual_seed(0)
    param, grad = (torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_()
                   for _ in range(2))
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    # second moments above the squared means (RMSprop's centered variance stays positive)
    state = [(torch.rand(5, dtype=torch.float64, generator=gen)
              + (1.0 if "sq" in n or "square" in n else 0.0)).requires_grad_() for n in names]
    ours, ref = (differentiable_step(c, options, names, scalars) for c in (ours_cls, ref_cls))
    try:  # a tensor lr where torch's own algorithm takes one (Adamax's, Adagrad's do not)
        ref(param, grad, lr, *state)
    except TypeError:
        lr = None
    inputs = [param, grad, *state]

    def call(fn):
        return lambda param, grad, *state: fn(param, grad, lr, *state)

    if lr is not None:
        inputs.insert(2, lr)
        call = lambda fn: fn  # noqa: E731
    assert gradcheck(call(ours), tuple(inputs))
    ours_out, ref_out = call(ours)(*inputs), call(ref)(*inputs)
    for a, b in zip(ours_out, ref_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ours_grads = torch.autograd.grad(sum(o.sum() for o in ours_out), inputs, allow_unused=True)
    ref_grads = torch.autograd.grad(sum(o.sum() for o in ref_out), inputs, allow_unused=True)
    for a, b in zip(ours_grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_differentiable_optimizer_leaves_params_in_place_and_saves_like_torch():
    """differentiable=True lays nothing out (a non-leaf param keeps its storage) and its
    state_dict loads into torch.optim's differentiable Adam and back."""
    weights = torch.randn(6, requires_grad=True)
    p = weights.clone()
    ptr = p.data_ptr()
    opt = fastopt.Adam([p], lr=0.1, differentiable=True)
    p.grad = torch.ones(6)
    opt.step()
    assert p.data_ptr() == ptr and p.grad_fn is not None  # the update is in the graph
    q = weights.clone()
    ref = torch.optim.Adam([q], lr=0.1, differentiable=True)
    ref.load_state_dict(opt.state_dict())
    opt.load_state_dict(ref.state_dict())
    assert opt.state[p]["step"] == 1


# ------------------------------------------------------------------ dtype changes
def test_model_half_after_steps_is_refused_and_changes_nothing():
    """``model.half()`` after the optimizer has state: torch.optim fails in its step; fastopt
    refuses up front, naming the param and both dtypes, and keeps the fp32 moments; back in
    fp32 the run goes on."""
    model, opt, _, _ = pair("AdamW")
    model(torch.ones(2, 5)).sum().backward()
    opt.step()
    params = list(model.parameters())
    before = snapshot(opt, params)
    model.half()
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"^param 0 of param group 0 \(shape \(7, 5\)\) "
                       r"changed dtype from torch.float32 to torch.float16"):
        opt.step()
    for p in params:
        for key, value in before[1][id(p)].items():
            assert torch.equal(opt.state[p][key], value) and opt.state[p][key].dtype == value.dtype
    model.float()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[params[0]]["step"] == 2


def test_a_param_resized_after_steps_is_refused_and_changes_nothing():
    """Model surgery that resizes ``p.data`` after the optimizer has state: torch.optim fails
    in its step with a size mismatch; fastopt names the param and both shapes, keeps the
    state, and steps again once the param has its shape back."""
    model, opt, twin, ref = pair("AdamW")
    for net, o in ((model, opt), (twin, ref)):
        net(torch.ones(2, 5)).sum().backward()
        o.step()
    params = list(model.parameters())
    before = snapshot(opt, params)
    old = params[0].data
    for net, o in ((twin, ref), (model, opt)):
        net[0].weight.data = torch.randn(9, 5)
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError) as error:
            o.step()
    assert str(error.value).startswith("param 0 of param group 0 (shape (9, 5)) changed shape "
                                       "from (7, 5) to (9, 5)")
    params[0].data = old
    params[0].grad = torch.ones_like(old)
    assert_unchanged(opt, params, before)
    opt.step()


# ------------------------------------------------------------------ memory others own
def hogwild_worker(model, cls_name: str) -> None:
    torch.set_num_threads(1)
    cls = fastopt.SGD if cls_name == "fastopt" else torch.optim.SGD
    opt = cls(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.ones(2, 5)).sum().backward()
        opt.step()


def test_hogwild_workers_train_the_shared_model_as_with_torch():
    """``model.share_memory()`` then an optimizer in each worker process (PyTorch's
    mnist_hogwild recipe): the workers' steps reach the parent's model, as torch.optim's do.
    Shared-memory params are never moved into a private buffer."""
    import torch.multiprocessing as mp

    moves = {}
    for kind in ("torch", "fastopt"):
        model = mlp()
        model.share_memory()
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):  # one after the other, so that the result is deterministic
            worker = mp.get_context("fork").Process(target=hogwild_worker, args=(model, kind))
            worker.start()
            worker.join(timeout=120)
            assert worker.exitcode == 0
        moves[kind] = [(p.detach() - b).abs().max().item()
                       for p, b in zip(model.parameters(), before)]
    assert min(moves["torch"]) > 0
    assert moves["fastopt"] == pytest.approx(moves["torch"], rel=1e-5)


def test_an_optimizer_built_before_share_memory_keeps_the_params_shared():
    model, opt, _, _ = pair("SGD")
    model.share_memory()
    ptrs = [p.data_ptr() for p in model.parameters()]
    for _ in range(2):
        model(torch.ones(2, 5)).sum().backward()
        opt.step()
    assert all(p.is_shared() for p in model.parameters())
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_a_users_buffer_on_a_freed_fastopt_address_is_never_taken():
    """The README promises that params which are views of someone else's buffer stay put. A
    buffer the user allocates after a fastopt buffer was freed may land on the same address;
    fastopt knows its own buffers by a weak reference to their storage, not by address, so
    the user's buffer keeps its params for every size tried."""
    moved = []
    gc.freeze()  # the suite's objects: each collection below then scans only this test's
    try:
        for n in range(3, 33):
            moved.append(_moved_out_of_the_users_buffer(n))
    finally:
        gc.unfreeze()
    assert not any(moved)


def _moved_out_of_the_users_buffer(n: int) -> bool:
    """One size of the test above: after a fastopt buffer of this size was freed, does a new
    optimizer move params that are views of the user's new buffer?"""
    model = torch.nn.Linear(n, n)
    opt = fastopt.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, n)).sum().backward()
    opt.step()
    del opt
    gc.collect()
    for p in model.parameters():
        p.data = p.data.clone()  # the fastopt buffer is freed here
    buffer = torch.empty(n * n + n)  # the user's own flat buffer
    buffer[: n * n].copy_(model.weight.detach().flatten())
    buffer[n * n:].copy_(model.bias.detach())
    model.weight.data = buffer[: n * n].view(n, n)
    model.bias.data = buffer[n * n:]
    opt = fastopt.SGD(model.parameters(), lr=0.1)
    model.zero_grad()
    model(torch.ones(1, n)).sum().backward()
    opt.step()
    return model.weight.data_ptr() != buffer.data_ptr()


# ------------------------------------------------------------------ checkpoints that do not fit
def trained(name: str):
    model, opt, _, _ = pair(name)
    model(torch.ones(2, 5)).sum().backward()
    opt.step()
    return model, opt


def corrupt(state_dict: dict, **changes) -> dict:
    state = {k: dict(v) for k, v in state_dict["state"].items()}
    for key, value in changes.items():
        if value is None:
            del state[0][key]
        else:
            state[0][key] = value
    return {**state_dict, "state": state}


BAD_CHECKPOINTS = [
    ("Adam", lambda: trained("SGD")[1].state_dict(), r"param group 0 has no 'betas', 'eps': it "
     r"is not a state_dict of Adam"),
    ("SGD", lambda: trained("AdamW")[1].state_dict(), r"param group 0 has no 'momentum', "
     r"'dampening': it is not a state_dict of SGD"),
    ("Adam", lambda: corrupt(trained("Adam")[1].state_dict(), step=None),
     r"has no 'step' in the state of parameter 0"),
    ("AdamW", lambda: corrupt(trained("AdamW")[1].state_dict(), exp_avg="garbage"),
     r"has 'exp_avg' of type str for parameter 0"),
    ("AdamW", lambda: corrupt(trained("AdamW")[1].state_dict(), exp_avg_sq=None),
     r"has no 'exp_avg_sq' in the state of parameter 0"),
    ("SGD", lambda: corrupt(trained("SGD")[1].state_dict(), momentum_buffer=torch.zeros(3)),
     r"has 'momentum_buffer' of shape \(3,\) for a parameter of shape \(7, 5\)"),
]


@pytest.mark.parametrize("name,make,message", BAD_CHECKPOINTS,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_CHECKPOINTS)])
def test_a_checkpoint_that_does_not_fit_is_refused_and_nothing_changes(name, make, message):
    """Another optimizer's state_dict, a param state without ``step`` or a moment, a moment
    that is not a tensor or has another shape: ValueError at ``load_state_dict`` (torch.optim
    fails later, or silently starts from zeros), params, state and groups unchanged."""
    model, opt = trained(name)
    params = list(model.parameters())
    before, groups = snapshot(opt, params), [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(make())
    assert_unchanged(opt, params, before)
    assert [dict(g) for g in opt.param_groups] == groups


@pytest.mark.parametrize("name", list(PAIRS))
def test_extra_entries_torch_keeps_are_kept(name):
    """An extra per-param entry (a 0-d counter written by other code) loads, survives steps and
    is saved again, as with torch.optim."""
    model, opt = trained(name)
    saved = opt.state_dict()
    saved["state"][0]["counter"] = torch.tensor(7)
    opt.load_state_dict(saved)
    model(torch.ones(2, 5)).sum().backward()
    opt.step()
    assert opt.state_dict()["state"][0]["counter"] == 7
    ref = PAIRS[name][1](mlp().parameters(), **OPTIONS[name])
    ref.load_state_dict(saved)
    assert ref.state_dict()["state"][0]["counter"] == 7


# ------------------------------------------------------------------ params and state swapped in
def swapped_in_step(cls, trace: bool):
    """torch's ``swap_in_optimizer_params_and_state`` around one step on stand-in params and a
    copy of the state_dict (eagerly, or recorded by make_fx), then a plain step on the live
    model. Returns the stand-ins, whether they kept their storage, the copied state, the live
    params and the ops the trace recorded."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.nn.utils import stateless
    swap_in_optimizer_params_and_state = pytest.importorskip(
        "torch.optim._stateless",
        reason="torch.optim._stateless came after torch 2.11").swap_in_optimizer_params_and_state

    model = mlp()
    opt = cls(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    stand_ins = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(2))
                 for n, p in model.named_parameters()}
    ptrs = [t.data_ptr() for t in stand_ins.values()]
    copied = {"state": {k: dict(v) for k, v in opt.state_dict()["state"].items()},
              "param_groups": opt.state_dict()["param_groups"]}
    copied["state"] = {k: {n: t.clone() for n, t in v.items()} for k, v in copied["state"].items()}

    def step(params, state):
        with stateless._reparametrize_module(model, params):
            with swap_in_optimizer_params_and_state(opt, params, state):
                for p in model.parameters():
                    p.grad = torch.ones_like(p)
                opt.step()

    ops = set()
    if trace:
        graph = make_fx(step)(stand_ins, copied)
        ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    else:
        step(stand_ins, copied)
    model(x).sum().backward()
    opt.step()
    kept = [t.data_ptr() for t in stand_ins.values()] == ptrs
    return stand_ins, kept, copied, [p.detach().clone() for p in model.parameters()], ops


@pytest.mark.parametrize("trace", [False, True], ids=["eager", "make_fx"])
def test_params_and_state_swapped_in_step_as_with_torch(trace):
    """``torch.optim._stateless.swap_in_optimizer_params_and_state`` (used to trace a step with
    make_fx on stand-in tensors): the stand-ins and the swapped-in state are updated in place as
    torch.optim updates them, nothing is moved into a buffer of fastopt's, the trace records
    torch's per-param ops (no fused call on a copy), and the live optimizer goes on as torch's."""
    ours = swapped_in_step(fastopt.SGD, trace)
    ref = swapped_in_step(torch.optim.SGD, trace)
    assert ours[1] and ref[1]
    for name in ref[0]:
        torch.testing.assert_close(ours[0][name], ref[0][name], **FP32)
    for key, entry in ref[2]["state"].items():
        torch.testing.assert_close(ours[2]["state"][key]["momentum_buffer"],
                                   entry["momentum_buffer"], **FP32)
    for a, b in zip(ours[3], ref[3]):
        torch.testing.assert_close(a, b, **FP32)
    assert not any("fused" in op for op in ours[4])


# ------------------------------------------------------------------ AMSGrad and NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reaches_amsgrads_running_max_as_with_torch(backend):
    p, q = (torch.nn.Parameter(torch.ones(20)) for _ in range(2))
    opt = fastopt.Adam([p], amsgrad=True, backend=backend)
    ref = torch.optim.Adam([q], amsgrad=True, foreach=False)
    for step in range(3):
        grad = torch.ones(20)
        if step == 1:
            grad[3] = float("nan")
        for param, o in ((p, opt), (q, ref)):
            param.grad = grad.clone()
            o.step()
    ours, theirs = opt.state[p]["max_exp_avg_sq"], ref.state[q]["max_exp_avg_sq"]
    assert torch.isnan(ours[3]) and torch.equal(ours.isnan(), theirs.isnan())
    torch.testing.assert_close(ours, theirs, equal_nan=True, **FP32)


# ------------------------------------------------------------------ saving, pickling, layout
def saved_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def wide_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(100, 100) for _ in range(10)])


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "flatten_params=False"])
def test_pickles_and_partial_saves_cost_what_torch_optims_do(flatten):
    """Ten 100x100 layers after two AdamW steps: ``pickle.dumps`` of the optimizer and of the
    model, ``torch.save`` of one layer's state_dict and of one state tensor are within 2 % of
    torch.optim's sizes (each param and state view has a storage of its own, so none of them
    carries the whole flat buffer), and the unpickled optimizer continues like the original."""
    model, twin = wide_model(), wide_model()
    opt = fastopt.AdamW(model.parameters(), lr=0.1, flatten_params=flatten)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.1, foreach=False)
    for _ in range(2):
        for net, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            net(torch.ones(3, 100)).sum().backward()
            o.step()
    weight, ref_weight = model[4].weight, twin[4].weight
    sizes = [
        (len(pickle.dumps(opt)), len(pickle.dumps(ref))),
        (len(pickle.dumps(model)), len(pickle.dumps(twin))),
        (saved_bytes(model[4].state_dict()), saved_bytes(twin[4].state_dict())),
        (saved_bytes(opt.state[weight]["exp_avg"]), saved_bytes(ref.state[ref_weight]["exp_avg"])),
    ]
    for ours, theirs in sizes:
        assert ours == pytest.approx(theirs, rel=0.02), sizes
    clone = pickle.loads(pickle.dumps((model, opt)))
    for net, o in ((model, opt), clone):
        o.zero_grad()
        net(torch.ones(3, 100)).sum().backward()
        o.step()
    assert_models_close(model, clone[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_flatten_params_false_keeps_params_in_place_and_matches_torch(name, backend):
    """``flatten_params=False``: every param keeps its storage (data pointers unchanged), the
    state is still flat, and five steps of the default loop and of a loop keeping grads equal
    torch.optim's; the memory estimate counts no flat grad buffer."""
    model, opt, twin, ref = pair(name, backend, flatten_params=False)
    ptrs = [p.data_ptr() for p in model.parameters()]
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for step in range(5):
        for net, o in ((model, opt), (twin, ref)):
            o.zero_grad(set_to_none=step < 3)
            net(x).pow(2).sum().backward()
            o.step()
        assert_models_close(model, twin)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    bucket = opt._buckets[0][0]
    assert bucket.external and bucket.flat is None
    kept = [(p, name_of_state) for p in model.parameters()
            for name_of_state in bucket.state.tensors if name_of_state in opt.state[p]]
    assert kept and all(lives_in(opt.state[p][name_of_state], bucket.state.tensors[name_of_state])
                        for p, name_of_state in kept)
    flat = fastopt.memory.estimate(mlp(), name.lower(), lr=0.1)
    apart = fastopt.memory.estimate(mlp(), name.lower(), lr=0.1, flatten_params=False)
    # the flat layout's default loop keeps a grad buffer where it gathers its fresh grads
    # (not Adafactor here: its matrices step alone, and no vector joins another)
    flat_model = mlp()
    flat_opt = PAIRS[name][0](flat_model.parameters(), backend="torch", **OPTIONS[name])
    flat_model(x).pow(2).sum().backward()
    flat_opt.step()
    gathers = flat_opt._buckets[0][0].grads.buffer is not None
    grad_buffer = 4 * padded_size([p.numel() for p in mlp().parameters()])  # padded slots
    assert gathers == (name != "Adafactor")
    assert apart["cpu"].scratch_bytes == flat["cpu"].scratch_bytes - gathers * grad_buffer
    assert apart["cpu"].state_bytes == flat["cpu"].state_bytes


def test_flatten_params_must_be_a_bool():
    with pytest.raises(TypeError, match="flatten_params must be a bool"):
        fastopt.SGD(mlp().parameters(), lr=0.1, flatten_params="no")
