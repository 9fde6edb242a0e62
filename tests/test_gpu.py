"""The Triton kernels on a real GPU (skipped without CUDA): parity with torch.optim on CUDA for
fp32, bf16 and fp16, odd and huge sizes, many tensors, CUDA-graph capture, GradScaler."""

import os

import pytest
import torch

import fastopt
from helpers import PAIRS, check_grad_scaler_with_injected_inf, clone_params, compare_runs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="GPU kernels, not the interpreter"),
]

CONFIGS = [
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    ("AdamW", dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-6)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3)),
]
IDS = [f"{n}-{'-'.join(k)}" for n, k in CONFIGS]
SIZES = [(1,), (129,), (2**20 + 3,), (0,), (), (7, 13, 5)]
# bf16/fp16: torch's own optimizer-test tolerances; beta2/eps chosen so that the reference
# (which computes in the half type) does not underflow (see tests/test_parity.py).
HALF_TOL = dict(rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_fp32_parity_on_cuda(name, kwargs):
    compare_runs(name, kwargs, SIZES, device="cuda", backend="triton", steps=10,
                 skip=lambda step, i: (step + i) % 4 == 0)


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_fp32_parity_with_flat_grads_on_cuda(name, kwargs):
    compare_runs(name, kwargs, SIZES, device="cuda", backend="triton", steps=10, in_place=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kwargs", [
    ("AdamW", dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-3)),
    ("Adam", dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-3, amsgrad=True, weight_decay=0.1)),
    ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
])
def test_half_precision_parity_on_cuda(name, kwargs, dtype):
    compare_runs(name, kwargs, [(1,), (129,), (2**20 + 3,)], device="cuda", backend="triton",
                 dtype=dtype, steps=10, tol=HALF_TOL)


@pytest.mark.parametrize("name,kwargs", CONFIGS[:2] + CONFIGS[3:4])
def test_a_thousand_tensors(name, kwargs):
    compare_runs(name, kwargs, [(1000 + i,) for i in range(1000)], device="cuda",
                 backend="triton", steps=3)


def test_one_bf16_tensor_over_2_to_the_31_elements():
    """int64 offsets: elements past 2**31 are updated like the first ones."""
    n = 2**31 + 7
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * 2 * n:  # params, grads, two moments, and the copy made when flattening
        pytest.skip(f"needs ~{6 * 2 * n / 2**30:.0f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    param = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16,
                                           generator=gen))
    grad = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    windows = [slice(0, 4096), slice(2**31 - 2048, 2**31 + 2048), slice(n - 4096, n)]
    refs = [torch.nn.Parameter(param.detach()[w].clone()) for w in windows]
    for ref, w in zip(refs, windows):
        ref.grad = grad[w].clone()
    param.grad = grad
    ours = fastopt.AdamW([param], lr=1e-2, backend="triton")
    torch_ref = torch.optim.AdamW(refs, lr=1e-2, fused=True)
    for _ in range(2):
        ours.step()
        torch_ref.step()
    for ref, w in zip(refs, windows):
        torch.testing.assert_close(param.detach()[w], ref.detach(), **HALF_TOL)
        assert not torch.equal(param.detach()[w], ref.detach() * 0)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_cuda_graph_capture_and_replay_equal_eager(name):
    kwargs = dict(lr=1e-2, momentum=0.9) if name == "SGD" else dict(lr=1e-2, weight_decay=0.1)
    cls = getattr(fastopt, name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=gen) for s in [(4097,), (33, 7), ()]]
    graphed, eager = clone_params(init), clone_params(init)
    graphed_opt, eager_opt = cls(graphed, **kwargs), cls(eager, **kwargs)
    grad_values = [[torch.randn(p.shape, device="cuda", generator=gen) for p in graphed]
                   for _ in range(8)]
    for p, g in zip(graphed, grad_values[0]):
        p.grad = g.clone()
    graphed_opt.step()  # first step: state and the flat grad buffer exist from here on
    graphed_opt.zero_grad(set_to_none=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for p, g in zip(graphed, grad_values[1]):
            p.grad.copy_(g)
        graphed_opt.step()  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_opt.step()
    for p, g in zip(eager, grad_values[0]):
        p.grad = g.clone()
    eager_opt.step()
    for p, g in zip(eager, grad_values[1]):
        p.grad = g.clone()
    eager_opt.step()
    for grads in grad_values[2:]:
        for p, g in zip(graphed, grads):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(eager, grads):
            p.grad = g.clone()
        eager_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(graphed, eager):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_fresh_grads_read_through_the_address_table_equal_eager_and_capture(name):
    """The default loop on CUDA: fresh grads are read where they lie through the bucket's
    address table (one launch, no gather), bit for bit what the flat route computes; a graph
    captured over grads assigned before the capture (static grads at the addresses the table
    already holds) replays equal to eager steps."""
    kwargs = dict(lr=1e-2, momentum=0.9) if name == "SGD" else dict(lr=1e-2, weight_decay=0.1)
    cls = getattr(fastopt, name)
    gen = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(4097,), (33, 7), (), (2048,), (1,)]
    init = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    fresh, kept, graphed = clone_params(init), clone_params(init), clone_params(init)
    fresh_opt, kept_opt, graphed_opt = (cls(p, **kwargs) for p in (fresh, kept, graphed))
    routes = []
    update = fresh_opt.update
    fresh_opt.update = lambda g, b, plan, *a: (routes.append(plan.route), update(g, b, plan, *a))
    grad_values = [[torch.randn(s, device="cuda", generator=gen) for s in shapes]
                   for _ in range(6)]
    static = [g.clone() for g in grad_values[0]]
    for p, g in zip(graphed, static):
        p.grad = g
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphed_opt.step()  # state, tables and the kernels exist before the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_opt.step()
    for step, grads in enumerate(grad_values):
        for p, g in zip(fresh, grads):
            p.grad = g.clone()
        fresh_opt.step()
        fresh_opt.zero_grad()
        if step == 0:
            for p, g in zip(kept, grads):
                p.grad = g.clone()
            kept_opt.zero_grad(set_to_none=False)  # from now on grads live in the flat buffer
        for p, g in zip(kept, grads):
            p.grad.copy_(g)
        kept_opt.step()
        if step > 0:  # the warm-up step above was step 0
            for s, g in zip(static, grads):
                s.copy_(g)
            graph.replay()
    torch.cuda.synchronize()
    assert routes == ["table"] * len(grad_values)
    for p, q, r in zip(fresh, kept, graphed):
        assert torch.equal(p, q) and torch.equal(p, r)


@pytest.mark.parametrize("name", list(PAIRS))
def test_grad_scaler_with_an_injected_inf_on_cuda(name):
    check_grad_scaler_with_injected_inf(name, "triton", "cuda")


def test_auto_backend_picks_triton_on_cuda_and_torch_for_fp64():
    a = torch.nn.Parameter(torch.randn(3, device="cuda"))
    b = torch.nn.Parameter(torch.randn(3, device="cuda", dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(3))
    opt = fastopt.AdamW([a, b, c])
    assert [bk.backend for bk in opt._buckets[0]] == ["triton", "torch", "torch"]


def test_saga_kernel_matches_the_reference_on_cuda():
    from test_saga import ReferenceSAGA

    shapes = [(1,), (129,), (2**20 + 3,), (0,), (), (7, 13, 5)]
    init = [torch.randn(s, device="cuda") for s in shapes]
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    ours = fastopt.SAGA(ours_params, lr=0.05, num_samples=4, weight_decay=0.1, backend="triton")
    ref = ReferenceSAGA([dict(params=ref_params, lr=0.05, num_samples=4, weight_decay=0.1)])
    for step in range(12):
        for p, q in zip(ours_params, ref_params):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step(index=step % 4)
        ref.step(step % 4)
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("name,kwargs", [("adamw", {}), ("adam", dict(amsgrad=True)),
                                         ("sgd", dict(lr=0.1, momentum=0.9))])
def test_memory_estimate_bounds_what_a_step_allocates_on_cuda(name, kwargs):
    from fastopt import memory

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 513)).cuda()
    report = memory.estimate(model, name, **kwargs).devices["cuda:0"]
    cls = {"adamw": fastopt.AdamW, "adam": fastopt.Adam, "sgd": fastopt.SGD}[name]
    opt = cls(model.parameters(), **kwargs)
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # plain grads, as autograd leaves them
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    allocated_by_step = torch.cuda.max_memory_allocated() - start
    slack = 64 * 1024  # the caching allocator rounds each block up to 512 bytes
    assert report.state_bytes <= allocated_by_step <= report.new_bytes + slack


LEAN_OPTIONS = [
    (torch.float32, dict(state_dtype=torch.bfloat16)),
    (torch.float32, dict(state_dtype="int8")),
    (torch.bfloat16, dict(master_weights=True)),
    (torch.bfloat16, dict(stochastic_rounding=True)),
    (torch.float32, dict(max_grad_norm=1.0)),
    (torch.bfloat16, dict(master_weights=True, state_dtype="int8")),
]


@pytest.mark.parametrize("dtype,options", LEAN_OPTIONS, ids=[str(o) for _, o in LEAN_OPTIONS])
def test_lean_variants_kernel_matches_the_torch_path_on_cuda(dtype, options):
    """Each option's Triton kernel against fastopt's own torch path (fp32 math on widened
    copies) on CUDA: params within fp32 tolerance after rounding to their dtype, except where
    a value sits on a rounding (or 8-bit code) boundary and an ulp tips it (0.1 % at most)."""
    shapes = [(1,), (129,), (2**20 + 3,), (0,), (7, 13, 5), (5000,)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=gen).to(dtype) for s in shapes]
    runs = {}
    for backend in ("triton", "torch"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = fastopt.AdamW(params, lr=1e-3, backend=backend, **options)
        grads = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=grads).to(dtype)
            opt.step()
        runs[backend] = params
    differing = total = 0
    for p, q in zip(runs["triton"], runs["torch"]):
        close = torch.isclose(p.float(), q.float(), rtol=2e-6 if dtype == torch.float32 else 8e-3,
                              atol=1e-6)
        differing, total = differing + int((~close).sum()), total + close.numel()
        torch.testing.assert_close(p.float(), q.float(), rtol=0, atol=2e-2)
    assert differing <= 1e-3 * total, (differing, total)
