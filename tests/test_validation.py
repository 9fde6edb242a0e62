"""Bad input: torch.optim's exception type and message, and a failed step changes nothing."""

import re

import pytest
import torch

import fastopt
from helpers import PAIRS, assert_unchanged, clone_params, make_params, snapshot


def one_param():
    return [torch.nn.Parameter(torch.randn(3))]


# (optimizer, args, kwargs, exception, message regex, does torch.optim raise the same?)
BAD_INPUT = [
    ("Adam", (), dict(lr=-0.1), ValueError, r"^Invalid learning rate: -0\.1$", True),
    ("AdamW", (), dict(lr=-1e-3), ValueError, r"^Invalid learning rate: -0\.001$", True),
    ("SGD", (), dict(lr=-0.1), ValueError, r"^Invalid learning rate: -0\.1$", True),
    ("Adam", (), dict(eps=-1e-8), ValueError, r"^Invalid epsilon value: -1e-08$", True),
    ("Adam", (), dict(betas=(1.0, 0.999)), ValueError,
     r"^Invalid beta parameter at index 0: 1\.0$", True),
    ("AdamW", (), dict(betas=(-0.1, 0.999)), ValueError,
     r"^Invalid beta parameter at index 0: -0\.1$", True),
    ("Adam", (), dict(betas=(0.9, 1.5)), ValueError,
     r"^Invalid beta parameter at index 1: 1\.5$", True),
    ("Adam", (), dict(weight_decay=-0.1), ValueError, r"^Invalid weight_decay value: -0\.1$",
     True),
    ("SGD", (), dict(weight_decay=-0.1), ValueError, r"^Invalid weight_decay value: -0\.1$",
     True),
    ("SGD", (), dict(momentum=-0.5), ValueError, r"^Invalid momentum value: -0\.5$", True),
    ("SGD", (), dict(nesterov=True), ValueError,
     r"^Nesterov momentum requires a momentum and zero dampening$", True),
    ("SGD", (), dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
     r"^Nesterov momentum requires a momentum and zero dampening$", True),
    ("Adam", (), dict(lr=torch.tensor([0.1, 0.2])), ValueError, r"^Tensor lr must be 1-element$",
     True),
    ("Adam", (), dict(betas=(0.9, torch.tensor(0.99))), ValueError,
     r"^betas must be either both floats or both Tensors$", True),
    ("AdamW", (), dict(fused=True, foreach=True), RuntimeError,
     r"^`fused` and `foreach` cannot be `True` together\.$", True),
    ("Adam", (), dict(lr=torch.tensor(1e-3), foreach=True), ValueError,
     r"^lr as a Tensor is not supported for capturable=False and foreach=True$", True),
    ("AdamW", (), dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True), ValueError,
     r"^betas\[0\] as a Tensor is not supported for capturable=False and foreach=True$", True),
    ("Adam", (), dict(differentiable=True, fused=True), RuntimeError,
     r"^`fused` does not support `differentiable`$", True),
    ("AdamW", (), dict(differentiable=True, master_weights=True), ValueError,
     r"^differentiable=True runs torch.optim's own algorithm", False),
    ("Adam", (), dict(backend="cuda"), ValueError, r"^Invalid backend: 'cuda'", False),
]


@pytest.mark.parametrize("name,args,kwargs,exc,message,torch_agrees", BAD_INPUT,
                         ids=[f"{r[0]}-{list(r[2])}" for r in BAD_INPUT])
def test_bad_hyperparameters(name, args, kwargs, exc, message, torch_agrees):
    ours_cls, ref_cls = PAIRS[name]
    with pytest.raises(exc, match=message):
        ours_cls(one_param(), *args, **kwargs)
    if torch_agrees:
        with pytest.raises(exc) as ref_error:
            ref_cls(one_param(), *args, **kwargs)
        assert re.search(message, str(ref_error.value))


@pytest.mark.parametrize("name", list(PAIRS))
def test_empty_parameter_list_and_bare_tensor(name):
    ours_cls, ref_cls = PAIRS[name]
    for params, exc in (([], ValueError), (torch.randn(3, requires_grad=True), TypeError)):
        with pytest.raises(exc) as ours_error:
            ours_cls(params)
        with pytest.raises(exc) as ref_error:
            ref_cls(params)
        assert str(ours_error.value) == str(ref_error.value)


def test_non_floating_params_are_refused():
    with pytest.raises(ValueError, match="floating-point or complex"):
        fastopt.SGD([torch.zeros(3, dtype=torch.int64)])


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


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_sparse_grads_refused_like_torch_and_nothing_changes(name):
    ours_cls, ref_cls = PAIRS[name]
    params = clone_params(make_params([(4,), (5,)]))
    opt = ours_cls([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = snapshot(opt, params)
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = torch.ones(5).to_sparse()
    with pytest.raises(RuntimeError) as ours_error:
        opt.step()
    ref_param = torch.nn.Parameter(torch.zeros(5))
    ref_param.grad = torch.ones(5).to_sparse()
    with pytest.raises(RuntimeError) as ref_error:
        ref_cls([ref_param], foreach=False).step()
    assert str(ours_error.value) == str(ref_error.value)
    assert "SparseAdam" in str(ours_error.value)
    assert_unchanged(opt, params, before)


def test_sgd_accepts_sparse_grads_as_torch_does():
    init = make_params([(6,)])
    a, b = clone_params(init), clone_params(init)
    ours = fastopt.SGD(a, lr=0.1)
    ref = torch.optim.SGD(b, lr=0.1, foreach=False)
    g = torch.tensor([0.0, 1.0, 0.0, -2.0, 0.0, 0.5])
    a[0].grad, b[0].grad = g.to_sparse(), g.to_sparse()
    ours.step()
    ref.step()
    torch.testing.assert_close(a[0], b[0])


@pytest.mark.parametrize("name", list(PAIRS))
def test_grad_of_the_wrong_shape_or_dtype_fails_and_changes_nothing(name):
    ours_cls, _ = PAIRS[name]
    params = clone_params(make_params([(4,), (5,)]))
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    opt = ours_cls([{"params": [params[0]]}, {"params": [params[1]]}], **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
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
