"""Bad input: torch.optim's exception type and message, and a failed step changes nothing."""

import re

import pytest
import torch

import fastopt
from helpers import PAIRS, assert_unchanged, clone_params, make_params, snapshot, step_both
from optim_db import BY_NAME, NAMES, OPTIM_DB


def one_param():
    return [torch.nn.Parameter(torch.randn(3))]


# (optimizer, kwargs, exception, message regex): every optimizer's bad inputs (tests/optim_db.py)
# and fastopt's own options
BAD_INPUT = [(info.name, kwargs, exc, message) for info in OPTIM_DB
             for kwargs, exc, message in info.errors] + [
    ("AdamW", dict(differentiable=True, master_weights=True), ValueError,
     r"^differentiable=True runs torch.optim's own algorithm"),
    ("Adam", dict(backend="cuda"), ValueError, r"^Invalid backend: 'cuda'"),
    ("Lion", dict(stochastic_rounding=True), TypeError,
     r"got an unexpected keyword argument 'stochastic_rounding'"),
    ("NAdam", dict(state_dtype="int8"), ValueError, r"^state_dtype='int8' .* is available for"),
    ("RMSprop", dict(state_dtype="int4"), ValueError,
     r"^state_dtype='int4' \(blockwise 4-bit moments\) is available for"),
    ("AdamW", dict(state_dtype="int3"), ValueError, r"'int8' or 'int4'\)$"),
    ("Lion", dict(differentiable=True), TypeError, r"unexpected keyword argument"),
]


@pytest.mark.parametrize("name,kwargs,exc,message", BAD_INPUT,
                         ids=[f"{r[0]}-{list(r[1])}" for r in BAD_INPUT])
def test_bad_hyperparameters(name, kwargs, exc, message):
    """torch.optim's exception type and message; the same as torch.optim's own where it has
    the optimizer and the option."""
    ours_cls, reference = PAIRS[name]
    with pytest.raises(exc, match=message):
        ours_cls(one_param(), **kwargs)
    own = {"master_weights", "backend", "stochastic_rounding", "state_dtype"}
    if name != "Lion" and not own.intersection(kwargs) and "differentiable" not in kwargs:
        with pytest.raises(exc) as ref_error:
            reference(one_param(), **kwargs)
        assert re.search(message, str(ref_error.value))


@pytest.mark.parametrize("name", [n for n in PAIRS if n != "Lion"])
def test_a_nan_learning_rate_is_taken_or_refused_as_torch_does(name):
    """SGD checks ``lr < 0.0`` (a nan passes), the others ``not 0.0 <= lr`` (refused)."""
    ours_cls, reference = PAIRS[name]
    for lr in (float("nan"), torch.tensor(float("nan"))):
        outcomes = []
        for cls in (reference, ours_cls):
            try:
                cls(one_param(), lr=lr)
                outcomes.append("taken")
            except ValueError as error:
                outcomes.append(str(error))
        assert outcomes[0] == outcomes[1]


def test_hyperparameters_are_checked_before_params():
    """torch's error inputs pass ``params=None``: the hyperparameter error comes first."""
    for info in OPTIM_DB:
        kwargs, exc, message = info.errors[0]
        with pytest.raises(exc, match=message):
            info.cls(None, **kwargs)


@pytest.mark.parametrize("name", list(PAIRS))
def test_empty_parameter_list_and_bare_tensor(name):
    ours_cls, ref_cls = PAIRS[name]
    for params, exc in (([], ValueError), (torch.randn(3, requires_grad=True), TypeError)):
        with pytest.raises(exc) as ours_error:
            ours_cls(params)
        with pytest.raises(exc) as ref_error:
            ref_cls(params)
        assert str(ours_error.value) == str(ref_error.value)


# torch's Adagrad makes state for every param at construction: a frozen sparse tensor fails
# there, a frozen integer one gets integer state
@pytest.mark.parametrize("name", [n for n in PAIRS if n != "Adagrad"])
def test_frozen_integer_and_sparse_params_are_taken_as_torch_takes_them(name):
    """A quantized model's frozen integer weights (and a frozen sparse tensor) in the params:
    taken as torch.optim takes them, never laid out, and the float params step as torch's."""
    ours_cls, ref_cls = PAIRS[name]
    init = make_params([(4,), (5,)])
    ours_params, ref_params = clone_params(init), clone_params(init)
    frozen = [torch.nn.Parameter(torch.arange(3, dtype=torch.int8), requires_grad=False),
              torch.zeros(3).to_sparse()]
    kwargs = BY_NAME[name].typical
    ours = ours_cls([ours_params[0], *frozen, ours_params[1]], **kwargs)
    ref = ref_cls([ref_params[0], *frozen, ref_params[1]], **kwargs)
    for _ in range(3):
        step_both(ours, ref, ours_params, ref_params)
    assert torch.equal(frozen[0], torch.arange(3, dtype=torch.int8))
    assert sorted(ours.state_dict()["state"]) == sorted(ref.state_dict()["state"]) == [0, 3]


def test_params_nothing_can_step_are_refused_once_they_could_be():
    with pytest.raises(ValueError, match="only strided"):
        fastopt.SGD([torch.zeros(3).to_sparse().requires_grad_()])
    weights = [torch.nn.Parameter(torch.ones(2)), torch.zeros(3, dtype=torch.int64)]
    opt = fastopt.SGD(weights, lr=0.1)
    weights[0].grad = torch.ones(2)
    weights[1].grad = torch.ones(3, dtype=torch.int64)  # given a grad after construction
    with pytest.raises(ValueError, match="floating-point or complex"):
        opt.step()
    assert torch.equal(weights[0].detach(), torch.ones(2))


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastopt.AdamW(one_param(), backend="triton")


def test_environment_variable_overrides_and_is_checked(monkeypatch):
    monkeypatch.setenv("FASTOPT_BACKEND", "torch")
    opt = fastopt.AdamW(one_param(), backend="auto")
    assert opt._buckets[0][0].backend == "torch"
    monkeypatch.setenv("FASTOPT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="Invalid FASTOPT_BACKEND: 'gpu'"):
        fastopt.AdamW(one_param())


def stepped_two_groups(name):
    """``name``'s optimizer over two params in two groups, stepped once (state exists), and
    its params."""
    params = clone_params(make_params([(4,), (5,)]))
    opt = PAIRS[name][0]([{"params": [params[0]]}, {"params": [params[1]]}],
                         **BY_NAME[name].typical)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt, params


REFUSE_SPARSE = [n for n in NAMES if BY_NAME[n].declaration.sparse_error is not None]


@pytest.mark.parametrize("name", REFUSE_SPARSE)
def test_sparse_grads_refused_like_torch_and_nothing_changes(name):
    reference = PAIRS[name][1]
    opt, params = stepped_two_groups(name)
    before = snapshot(opt, params)
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = torch.ones(5).to_sparse()
    with pytest.raises(RuntimeError) as ours_error:
        opt.step()
    ref_param = torch.nn.Parameter(torch.zeros(5))
    ref_param.grad = torch.ones(5).to_sparse()
    if name != "Lion":  # lion-pytorch has no check: its sign() fails on a sparse tensor
        with pytest.raises(RuntimeError) as ref_error:
            reference([ref_param]).step()
        assert str(ours_error.value) == str(ref_error.value)
    assert "does not support sparse gradients" in str(ours_error.value)
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in REFUSE_SPARSE])
def test_sparse_grads_taken_where_torch_takes_them(name):
    init = make_params([(6,)])
    a, b = clone_params(init), clone_params(init)
    ours, ref = PAIRS[name][0](a, lr=0.1), PAIRS[name][1](b, lr=0.1)
    for g in (torch.tensor([0.0, 1.0, 0.0, -2.0, 0.0, 0.5]), torch.tensor([0.5, 0, 0, 1, 0, 0])):
        a[0].grad, b[0].grad = g.to_sparse(), g.to_sparse()
        ours.step()
        ref.step()
        torch.testing.assert_close(a[0], b[0])


def refused_alike(name: str, make_params, kwargs: dict, grads) -> tuple:
    """Build fastopt's and torch's ``name`` over ``make_params()``, hand them ``grads(params)``
    and step: both raise RuntimeError with the same message, and fastopt's step writes
    nothing. Returns fastopt's optimizer and params."""
    errors = []
    for cls in PAIRS[name]:
        params = make_params()
        opt = cls(params, **kwargs)
        for p, g in zip(params, grads(params)):
            p.grad = g
        before = snapshot(opt, params) if cls is PAIRS[name][0] else None
        with pytest.raises(RuntimeError) as error:
            opt.step()
        errors.append(str(error.value))
        if before is not None:
            assert_unchanged(opt, params, before)
            ours = opt, params
    assert errors[0] == errors[1]
    return ours


@pytest.mark.parametrize("name,momentum", [("Adagrad", None), ("SGD", 0.0), ("SGD", 0.9)])
def test_sparse_grads_with_weight_decay_are_refused_as_torch_refuses_them(name, momentum):
    """Adagrad's own error; SGD's from adding the decay to a sparse grad. Nothing written."""
    refused_alike(name, lambda: [torch.nn.Parameter(torch.ones(4)),
                                 torch.nn.Parameter(torch.ones(3))],
                  dict(lr=0.1, weight_decay=0.1, **({} if momentum is None else
                                                    dict(momentum=momentum))),
                  lambda params: [torch.ones(4), torch.ones(3).to_sparse()])


@pytest.mark.parametrize("name", list(PAIRS))
def test_a_group_hyperparameter_spoiled_after_construction_fails_the_step_whole(name):
    """The last group's lr set to None, to a tensor of two elements, or deleted (as a user or
    a broken scheduler might): the step fails before the first group is updated."""
    opt, params = stepped_two_groups(name)
    before = snapshot(opt, params)
    group = opt.param_groups[1]
    lr = group["lr"]
    for bad, error in ((None, TypeError), (torch.tensor([lr, lr]), RuntimeError)):
        group["lr"] = bad
        with pytest.raises(error):
            opt.step()
        assert_unchanged(opt, params, before)
    del group["lr"]
    with pytest.raises(KeyError, match="lr"):
        opt.step()
    assert_unchanged(opt, params, before)
    group["lr"] = lr
    opt.step()
    assert not torch.equal(params[0].detach(), before[0][0])


@pytest.mark.parametrize("name", list(PAIRS))
def test_grad_of_the_wrong_shape_or_dtype_fails_and_changes_nothing(name):
    opt, params = stepped_two_groups(name)
    before = snapshot(opt, params)
    params[0].grad = torch.full_like(params[0], 3.0)
    params[1].grad.data = torch.ones(6)  # .data sidesteps autograd's own size check
    with pytest.raises(RuntimeError, match=r"shape \(6,\) but the parameter has shape \(5,\)"):
        opt.step()
    assert_unchanged(opt, params, before)
    params[1].grad.data = torch.ones(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype torch.float64 but the parameter has dtype"):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("name", list(PAIRS))
def test_hyperparameters_that_are_numpy_numbers_step_as_torchs_for_loop_reads_them(name):
    """An lr (and a beta) set to a numpy 0-d array, as a schedule computed with numpy sets it:
    torch's for-loop reads it as a number; fastopt's fused step takes it too, in every group
    (the second group's is the one that would fail after the first was written)."""
    import numpy

    results = []
    ours_cls, ref_cls = PAIRS[name]
    for cls in (ref_cls, ours_cls):
        params = clone_params(make_params([(4,), (2, 3)]))
        opt = cls([{"params": params[:1]}, {"params": params[1:]}], **BY_NAME[name].typical)
        group = opt.param_groups[1]
        group["lr"] = numpy.array(group["lr"])
        for key in ("betas", "etas"):
            if key in group:
                group[key] = (numpy.array(group[key][0]), group[key][1])
        try:
            for _ in range(2):
                for p in params:
                    p.grad = torch.ones_like(p)
                opt.step()
        except TypeError:
            if cls is ours_cls:
                raise
            pytest.skip(f"torch's {name} does not take it")
        assert isinstance(group["lr"], numpy.ndarray)  # left as set, as torch leaves it
        results.append([p.detach().clone() for p in params])
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Rprop", "ASGD"])
def test_a_param_whose_elements_share_memory_fails_its_step_with_nothing_written(name):
    """An expanded param (``torch.ones(1, 4).expand(3, 4)``) cannot be written: torch's error,
    raised before any state is made."""
    opt, params = refused_alike(
        name, lambda: [torch.nn.Parameter(torch.ones(3)),
                       torch.nn.Parameter(torch.ones(1, 4).expand(3, 4))],
        BY_NAME[name].typical, lambda params: [torch.full(p.shape, 0.5) for p in params])
    assert not opt.state.get(params[1])
