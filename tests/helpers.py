"""Shared test machinery: run fastopt and torch.optim (foreach=False) side by side on the same
inputs and compare params and every state tensor after every step."""

from __future__ import annotations

import torch

import fastopt

# Per-dtype tolerances (rtol, atol). fp32/fp64 are the project's standard; the half types use
# torch's own optimizer-test tolerances (torch/testing/_internal/common_optimizers.py, 5e-3).
TOLERANCES = {
    torch.float32: dict(rtol=2e-6, atol=2e-7),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.complex64: dict(rtol=2e-6, atol=2e-7),
    # Half types, per step: the for-loop reference rounds to the half type after every op,
    # fastopt once per step from fp32 (as torch's fused kernels do, which fastopt's Adam
    # equals exactly: test_half_precision_adam_equals_torch_fused_exactly). Where an op
    # cancels (grad + weight_decay * param near 0) the two differ by more than torch.testing's
    # half defaults (bf16 rtol 1.6e-2, fp16 rtol 1e-3, atol 1e-5) allow even in one step, so
    # the bound is 5e-3 absolute or relative; compare_runs puts the reference's params and
    # state into ours after each step, as test_optim.py's TensorTracker does, so that these
    # differences do not compound over the steps.
    torch.bfloat16: dict(rtol=5e-3, atol=5e-3),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
HALF_TYPES = (torch.bfloat16, torch.float16)

def interpreter_ready() -> bool:
    """Can the Triton kernels run on CPU tensors here (TRITON_INTERPRET=1, triton importable)?"""
    import os

    from fastopt.dispatch import triton_available

    return os.environ.get("TRITON_INTERPRET") == "1" and triton_available()


# The implementations the CPU parity tests run through: the torch path always, the Triton
# kernels when the interpreter is on (CI without a GPU). bf16 is not supported by the
# interpreter: half-precision kernels are tested on a GPU (tests/test_gpu.py).
BACKENDS = ["torch", "triton"] if interpreter_ready() else ["torch"]

from optim_db import BY_NAME  # noqa: E402

# name -> (fastopt class, reference factory), for every optimizer of tests/optim_db.py
PAIRS = {name: (info.cls, info.reference) for name, info in BY_NAME.items()}


class IEEESqrt:
    """A context in which torch's float32 square roots are rounded correctly (computed in
    double, rounded once), as a GPU's are. torch's CPU kernels take a square root that is
    within one ulp (Sleef's u05: ``torch.tensor([0.004567998461425304] * 16).sqrt()`` is one
    ulp below the correctly rounded value on the machines CI runs on), while the Triton
    kernels, on a GPU and under the interpreter alike, round it correctly. Running the
    reference under this mode compares the kernels with what the reference computes in IEEE
    arithmetic, at the same tolerance, instead of with that one ulp, which a state that sums
    quotients of such roots with cancellation (RMSprop's momentum buffer) turns into far more
    than the tolerance. The torch path uses torch's own square root and is compared with the
    reference as it is."""

    def __enter__(self):
        from torch.overrides import TorchFunctionMode

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in (torch.sqrt, torch.Tensor.sqrt, torch.Tensor.sqrt_) \
                        and args[0].dtype == torch.float32 and not kwargs:
                    rounded = args[0].double().sqrt().float()
                    if func is torch.Tensor.sqrt_:
                        return args[0].copy_(rounded)
                    return rounded
                return func(*args, **kwargs)

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def reference_step(ref, backend: str, device="cpu"):
    """``ref.step()``; for the Triton kernels on a CPU, with IEEE square roots (IEEESqrt)."""
    if backend == "triton" and torch.device(device).type == "cpu":
        with IEEESqrt():
            return ref.step()
    return ref.step()


def steppable(name, shapes):
    """``shapes`` with each empty one replaced by (7,) where the reference cannot step empty
    params (``OptimInfo.empty_params``), so that indices stay where the test put them."""
    if BY_NAME[name].empty_params:
        return shapes
    return [(7,) if torch.Size(s).numel() == 0 else s for s in shapes]


def make_params(shapes, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]


def clone_params(tensors):
    return [torch.nn.Parameter(t.detach().clone()) for t in tensors]


def assert_state_close(ours, ref, ours_params, ref_params, tol, widen=False):
    """Every state tensor of every param, in torch's per-param layout (``widen``: compared in
    fp32, ours being in a half type where the reference's is fp32)."""
    for p, q in zip(ours_params, ref_params):
        s, r = ours.state.get(p, {}), ref.state.get(q, {})
        assert set(s) == set(r), (set(s), set(r))
        for key, expected in r.items():
            if expected is None:
                assert s[key] is None
                continue
            actual = s[key]
            assert actual.shape == expected.shape, key
            if widen:
                actual, expected = actual.float(), expected.float()
            torch.testing.assert_close(actual.cpu(), expected.cpu(), **tol, equal_nan=True,
                                       check_dtype=key != "step", msg=lambda m: f"{key}: {m}")


def compare_runs(name, kwargs, shapes, *, steps=10, dtype=torch.float32, skip=None, seed=0,
                 groups=None, backend="torch", device="cpu", grad_dtype=None, tol=None,
                 check_state=True, in_place=False):
    """Step fastopt and torch.optim (foreach=False) ``steps`` times on identical grads.

    ``skip(step, i)`` -> True leaves param i without a grad in that step. ``groups`` optionally
    splits the params: a list of (indices, extra group options).
    Returns the two optimizers and their params.
    """
    ours_cls, ref_cls = PAIRS[name]
    init = make_params(steppable(name, shapes), dtype, seed, device)
    ours_params, ref_params = clone_params(init), clone_params(init)

    def param_groups(params):
        if groups is None:
            return params
        return [dict(params=[params[i] for i in idx], **extra) for idx, extra in groups]

    ours = ours_cls(param_groups(ours_params), backend=backend, **kwargs)
    ref = ref_cls(param_groups(ref_params), **kwargs)
    tol = tol or TOLERANCES[dtype]
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for i, (p, q) in enumerate(zip(ours_params, ref_params)):
            if skip is not None and skip(step, i):
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen, dtype=grad_dtype or dtype).to(device)
            if in_place and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = g.clone()
            q.grad = g.clone()
        ours.step()
        reference_step(ref, backend, device)
        if in_place:
            ours.zero_grad(set_to_none=False)
        for p, q in zip(ours_params, ref_params):  # nan where the reference has nan
            torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), **tol, equal_nan=True,
                                       msg=lambda m: f"step {step}: {m}")
        if check_state:
            assert_state_close(ours, ref, ours_params, ref_params, tol)
        if dtype in HALF_TYPES:
            resync(ours, ref, ours_params, ref_params)
    return ours, ref, ours_params, ref_params


def compare_rounded_once(name, kwargs, shapes, *, dtype, fp32_tol, steps=10, seed=0,
                         device="cuda"):
    """The Triton kernels on bf16/fp16 params (without masters) against their contract: each
    step is torch.optim's for-loop computed in fp32 from the same half-precision params and
    state, rounded once to the half type when stored (as torch's fused kernels compute).

    Each step the reference runs on fp32 copies of our params and state (so the steps do not
    drift apart), and our params and every state tensor must lie within half an ulp of the
    half type (``finfo(dtype).eps / 2`` relative: the one rounding) plus ``fp32_tol`` (the
    fp32 kernels' own distance from the fp32 for-loop) of its result. torch.optim's for-loop
    in the half type itself rounds after every op: it differs from a correctly rounded fp32
    result by an ulp or more (many where a state falls among fp16's subnormals), which is why
    it is not the reference here (docs/precision.md). The first step is run and not compared:
    it creates the state in the half type (a constant such as Rprop's step size or Adagrad's
    initial accumulator rounded to it, as the for-loop rounds it), which the fp32 reference
    keeps in fp32; the ``steps`` compared steps start from the values synchronized after it."""
    ours_cls, ref_cls = PAIRS[name]
    init = make_params(steppable(name, shapes), dtype, seed, device)
    ours_params = clone_params(init)
    ref_params = clone_params([t.float() for t in init])
    ours = ours_cls(ours_params, backend="triton", **kwargs)
    ref = ref_cls(ref_params, **kwargs)
    tol = dict(rtol=torch.finfo(dtype).eps / 2 + fp32_tol["rtol"], atol=fp32_tol["atol"])
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps + 1):
        for p, q in zip(ours_params, ref_params):
            g = torch.randn(p.shape, generator=gen, dtype=dtype).to(device)
            p.grad, q.grad = g.clone(), g.float()
        ours.step()
        ref.step()
        if step:
            for p, q in zip(ours_params, ref_params):
                assert p.dtype == dtype
                torch.testing.assert_close(p.detach().float().cpu(), q.detach().cpu(), **tol,
                                           equal_nan=True, msg=lambda m: f"step {step}: {m}")
            assert_state_close(ours, ref, ours_params, ref_params, tol, widen=True)
        resync(ref, ours, ref_params, ours_params)  # the next step starts from our values


def resync(ours, ref, ours_params, ref_params):
    """Put the reference's params and state tensors into ours, in place (torch's TensorTracker
    does so after each compared step)."""
    with torch.no_grad():
        for p, q in zip(ours_params, ref_params):
            p.copy_(q)
            for key, expected in ref.state.get(q, {}).items():
                actual = ours.state.get(p, {}).get(key)
                if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor) \
                        and key != "step":
                    actual.copy_(expected)


def step_both(ours, ref, ours_params, ref_params, check=True):
    """One step of each optimizer on the same fresh random grads; compare params (fp32)."""
    for p, q in zip(ours_params, ref_params):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    if check:
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


def check_grad_scaler_with_injected_inf(name, backend, device, tol=TOLERANCES[torch.float32]):
    """A GradScaler loop where step 2 has an inf grad: that step changes neither params nor
    state, the scale halves, and every other step matches torch.optim + GradScaler (within
    ``tol`` per step: on CUDA, tests/test_gpu.py's GPU_FP32)."""
    ours_cls, ref_cls = PAIRS[name]
    kwargs = BY_NAME[name].typical
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32).to(device)
    twin = torch.nn.Linear(64, 32).to(device)
    twin.load_state_dict(model.state_dict())
    ours = ours_cls(model.parameters(), backend=backend, **kwargs)
    ref = ref_cls(twin.parameters(), **kwargs)
    # an optimizer without grad scaling in its step (Adafactor, as torch's) has GradScaler
    # unscale and check the grads itself
    assert ours._step_supports_amp_scaling == BY_NAME[name].declaration.grad_scaling
    scalers = [torch.amp.GradScaler(device, init_scale=1024.0) for _ in range(2)]
    for step in range(5):
        x = torch.randn(16, 64, device=device)
        snapshot = [p.detach().clone() for p in model.parameters()]
        state = {id(p): {k: v.clone() for k, v in ours.state[p].items()}
                 for p in model.parameters() if p in ours.state}
        for net, opt, scaler in ((model, ours, scalers[0]), (twin, ref, scalers[1])):
            opt.zero_grad()
            scaler.scale(net(x).pow(2).sum()).backward()
            if step == 2:
                next(net.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        if step == 2:
            assert state, "the inf step must come after state exists"
            for p, v in zip(model.parameters(), snapshot):
                assert torch.equal(p, v)
            for p in model.parameters():
                for key, value in state.get(id(p), {}).items():
                    assert torch.equal(ours.state[p][key], value), key
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, **tol)
        # as torch's TensorTracker: the next step starts from the reference's values, so that
        # rounding differences (GPU_FP32's) do not grow through the model's grads
        resync(ours, ref, list(model.parameters()), list(twin.parameters()))
    assert scalers[0].get_scale() == scalers[1].get_scale() == 512.0


def snapshot(opt, params):
    """Params and every state tensor, cloned (see ``assert_unchanged``)."""
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params
             if p in opt.state})


def assert_unchanged(opt, params, before):
    """Params and state are bit for bit what ``snapshot`` saw (a refused step changed nothing)."""
    values, state = before
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    for p in params:
        if id(p) in state:
            for key, value in state[id(p)].items():
                assert torch.equal(opt.state[p][key], value), key


def lives_in(t, buffer) -> bool:
    """Do ``t``'s elements lie in ``buffer``'s memory (a slot of a fastopt flat buffer)?"""
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.untyped_storage().nbytes()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= end


def owns_storage(t) -> bool:
    """Is ``t``'s storage exactly its own bytes (so saving or pickling ``t`` writes ``t`` alone)?"""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()



def _mallinfo():
    """glibc's mallinfo2 (None where there is none)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = MallInfo2
    return function


def allocated_bytes_supported() -> bool:
    return _mallinfo() is not None


def allocated_bytes() -> int:
    """The bytes malloc holds now: glibc's own count of the bytes it has handed out
    (``uordblks``, plus ``hblkhd`` for blocks it mapped), which unlike the resident set does
    not depend on what earlier code freed and glibc kept."""
    m = _mallinfo()()
    return m.uordblks + m.hblkhd
