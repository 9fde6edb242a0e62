"""The Triton kernels on a real GPU (skipped without CUDA): parity with torch.optim on CUDA for
fp32, bf16 and fp16, odd and huge sizes, many tensors, CUDA-graph capture, GradScaler."""

import os

import pytest
import torch

import fastopt
from helpers import (check_grad_scaler_with_injected_inf, clone_params, compare_rounded_once,
                     compare_runs)
from optim_db import BY_NAME, NAMES, OPTIM_DB, every_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="GPU kernels, not the interpreter"),
]

CONFIGS = [(info.name, kwargs) for info, kwargs, _ in every_config()]
IDS = [f"{info.name}-{desc}" for info, _, desc in every_config()]
SIZES = [(1,), (129,), (2**20 + 3,), (0,), (), (7, 13, 5)]
# The tolerance of the CUDA fp32 parity tests is the one torch holds its own fused CUDA kernels
# to against its for-loop (test_optim.py's test_fused_matches_forloop, common_optimizers.py):
# torch.testing's float32 default, rtol 1.3e-6 and atol 1e-5. On a GPU the reference itself
# rounds otherwise than IEEE op by op: ATen's CUDA kernels divide a tensor by a Python scalar
# as a multiply by its reciprocal and nvcc contracts multiply-adds inside ops, where the
# kernels here divide and round as the CPU reference does; an element near zero then differs
# by more than the CPU tests' atol of 2e-7, by a few ulps of its neighbours, as torch's fused
# kernels differ from its for-loop. The CPU tests (the torch path and the kernels under the
# interpreter) keep 2e-6 / 2e-7. Half-precision params: see test_half_precision_on_cuda.
GPU_FP32 = dict(rtol=1.3e-6, atol=1e-5)
HALF_TOL = dict(rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_fp32_parity_on_cuda(name, kwargs):
    compare_runs(name, kwargs, SIZES, device="cuda", backend="triton", steps=10,
                 skip=lambda step, i: (step + i) % 4 == 0, tol=GPU_FP32)


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_fp32_parity_with_flat_grads_on_cuda(name, kwargs):
    compare_runs(name, kwargs, SIZES, device="cuda", backend="triton", steps=10, in_place=True,
                 tol=GPU_FP32)


HALF = [(info.name, kwargs) for info in OPTIM_DB for kwargs in info.half]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kwargs", HALF, ids=[f"{n}-{k}" for n, k in HALF])
def test_half_precision_on_cuda(name, kwargs, dtype):
    """bf16/fp16 params without masters, on sizes where every rounding case occurs (2**20 + 3
    elements). The kernels that compute in fp32 and round once per step, as torch's fused
    kernels do, are held to exactly that: torch.optim's fp32 for-loop from the same values,
    within half an ulp of the half type plus the fp32 tolerance (helpers.compare_rounded_once).
    torch's own test tolerance against its half-precision for-loop (5e-3 absolute and
    relative, common_optimizers.py) is less than one bf16 ulp for values just above 2, 4, ...:
    torch's small test model never has them, a million random values do, and a correctly
    rounded result there is an ulp from the for-loop's (which rounds after every op; on fp16
    states among the subnormals, by many ulps). Kernels that round every op as the for-loop
    does (Adafactor's) are compared with it at torch's tolerance."""
    shapes = [(1,), (129,), (2**20 + 3,)]
    if BY_NAME[name].half_kernel_rounding == "per_op":
        compare_runs(name, kwargs, shapes, device="cuda", backend="triton", dtype=dtype,
                     steps=10, tol=HALF_TOL)
    else:
        compare_rounded_once(name, kwargs, shapes, dtype=dtype, fp32_tol=GPU_FP32)


@pytest.mark.parametrize("name", NAMES)
def test_a_thousand_tensors(name):
    compare_runs(name, BY_NAME[name].typical, [(1000 + i,) for i in range(1000)],
                 device="cuda", backend="triton", steps=3, tol=GPU_FP32)


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


@pytest.mark.parametrize("name", NAMES)
def test_cuda_graph_capture_and_replay_equal_eager(name):
    kwargs = BY_NAME[name].typical
    cls = getattr(fastopt, name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=gen) for s in [(4097,), (33, 7), ()]]
    graphed, eager = clone_params(init), clone_params(init)
    graphed_opt, eager_opt = cls(graphed, **kwargs), cls(eager, **kwargs)
    grad_values = [[torch.randn(p.shape, device="cuda", generator=gen) for p in graphed]
                   for _ in range(8)]
    assert_graph_replays_equal_eager(graphed, graphed_opt, eager, eager_opt, grad_values)


def assert_graph_replays_equal_eager(graphed, graphed_opt, eager, eager_opt, grad_values):
    """Two steps of ``graphed_opt`` (the second a warm-up on a side stream), one captured in a
    CUDA graph over its flat grads, then replays with ``grad_values[2:]`` copied in: the params
    equal ``eager_opt``'s stepped on each set of grads in turn, bit for bit."""
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
    for grads in grad_values[:2]:
        for p, g in zip(eager, grads):
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


@pytest.mark.parametrize("name", NAMES)
def test_fresh_grads_read_through_the_address_table_equal_eager_and_capture(name):
    """The default loop on CUDA: fresh grads are read where they lie through the bucket's
    address table (one launch, no gather), bit for bit what the flat route computes; a graph
    captured over grads assigned before the capture (static grads at the addresses the table
    already holds) replays equal to eager steps."""
    kwargs = BY_NAME[name].typical
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


@pytest.mark.parametrize("name", [n for n in NAMES if BY_NAME[n].declaration.grad_scaling])
def test_grad_scaler_with_an_injected_inf_on_cuda(name):
    check_grad_scaler_with_injected_inf(name, "triton", "cuda", tol=GPU_FP32)


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


MEMORY = [("AdamW", {}), ("Adam", dict(amsgrad=True))] + \
    [(info.name, {**info.typical, **info.configs[-1][0]}) for info in OPTIM_DB
     if info.name not in ("Adam", "AdamW")]


@pytest.mark.parametrize("name,kwargs", MEMORY, ids=[f"{n}-{k}" for n, k in MEMORY])
def test_memory_estimate_bounds_what_a_step_allocates_on_cuda(name, kwargs):
    from fastopt import memory

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 513)).cuda()
    report = memory.estimate(model, name, **kwargs).devices["cuda:0"]
    cls = getattr(fastopt, name)
    opt = cls(model.parameters(), **kwargs)
    made = sum(t.numel() * t.element_size() for b in opt._buckets[0]
               for t in b.state.tensors.values())  # Adagrad's, made at construction
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # plain grads, as autograd leaves them
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    allocated_by_step = torch.cuda.max_memory_allocated() - start
    slack = 64 * 1024  # the caching allocator rounds each block up to 512 bytes
    assert report.state_bytes - made <= allocated_by_step <= report.new_bytes + slack


LEAN_OPTIONS = [
    (torch.float32, dict(state_dtype=torch.bfloat16)),
    (torch.float32, dict(state_dtype="int8")),
    (torch.bfloat16, dict(master_weights=True)),
    (torch.bfloat16, dict(stochastic_rounding=True)),
    (torch.float32, dict(max_grad_norm=1.0)),
    (torch.bfloat16, dict(master_weights=True, state_dtype="int8")),
    (torch.bfloat16, dict(master_weights="remainder", state_dtype=torch.bfloat16)),
    (torch.bfloat16, dict(master_weights="remainder8", state_dtype="int8")),
    (torch.float32, dict(state_dtype="int4")),
    (torch.bfloat16, dict(stochastic_rounding=True, state_dtype="int4")),
    (torch.bfloat16, dict(master_weights="remainder8", state_dtype="int4")),
]


LEAN = [("AdamW", dtype, options) for dtype, options in LEAN_OPTIONS] + \
    [(info.name, dtype, options) for info in OPTIM_DB if info.name not in ("Adam", "AdamW")
     for dtype, options in LEAN_OPTIONS
     if all(info.takes(k) for k in options) and not isinstance(options.get("state_dtype"), str)
     and not (info.name == "Adafactor" and isinstance(options.get("master_weights"), str))]


@pytest.mark.parametrize("name,dtype,options", LEAN, ids=[f"{n}-{o}" for n, _, o in LEAN])
def test_lean_variants_kernel_matches_the_torch_path_on_cuda(name, dtype, options):
    """Each option's Triton kernel against fastopt's own torch path (fp32 math on widened
    copies) on CUDA: params within fp32 tolerance after rounding to their dtype, except where
    a value sits on a rounding (or 8-bit code) boundary and an ulp tips it (0.1 % at most)."""
    shapes = [(1,), (129,), (2**20 + 3,), (0,), (7, 13, 5), (5000,)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=gen).to(dtype) for s in shapes]
    runs = {}
    for backend in ("triton", "torch"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = getattr(fastopt, name)(params, backend=backend,
                                     **{**BY_NAME[name].typical, "lr": 1e-3, **options})
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


MUON_SHAPES = [(64, 48), (48, 64), (64, 48), (96, 96), (1, 40), (0, 8), (32, 4, 3, 3)]


def _muon_params(seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in MUON_SHAPES]


@pytest.mark.parametrize("kwargs", [dict(lr=0.02), dict(lr=torch.tensor(0.01), nesterov=False,
                                                        adjust_lr_fn="match_rms_adamw")])
def test_muon_equals_torch_muon_on_cuda(kwargs):
    """Batched Newton–Schulz (bf16 bmm) against torch.optim.Muon's per-matrix addmm, on the
    same CUDA inputs (the conv weight against torch's Muon on its (out, rest) matrix): each
    step within 2 % of its largest element plus the GPU fp32 tolerance (tests/test_muon.py)."""
    ours = _muon_params()
    ref = [torch.nn.Parameter(p.detach().reshape(p.shape[0], -1).clone()) if p.ndim > 2
           else torch.nn.Parameter(p.detach().clone()) for p in ours]
    ours_opt = fastopt.Muon(ours, **kwargs)
    ref_opt = torch.optim.Muon(ref, **{k: v.clone() if isinstance(v, torch.Tensor) else v
                                       for k, v in kwargs.items()})
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(4):
        before = [q.detach().clone() for q in ref]
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            q.grad = p.grad.reshape(q.shape).clone()
        ours_opt.step()
        ref_opt.step()
        for p, q, b in zip(ours, ref, before):
            if q.numel():
                delta = (q.detach() - b).abs().max().item()
                torch.testing.assert_close(p.detach().reshape(q.shape), q.detach(),
                                           rtol=GPU_FP32["rtol"],
                                           atol=GPU_FP32["atol"] + 0.02 * delta)


def test_muon_step_captured_in_a_cuda_graph_equals_eager():
    """No host sync in Muon's step (a device lr, the AdamW group's kernels): it captures, and
    replays equal eager steps."""
    def build():
        params = _muon_params()
        vectors = [torch.nn.Parameter(torch.randn(33, device="cuda", generator=torch.Generator(
            device="cuda").manual_seed(1)))]
        opt = fastopt.Muon([{"params": params}, {"params": vectors, "use_muon": False}],
                           lr=torch.tensor(0.02, device="cuda"))
        return params + vectors, opt

    (graphed, graphed_opt), (eager, eager_opt) = build(), build()
    gen = torch.Generator(device="cuda").manual_seed(2)
    grads = [[torch.randn(p.shape, device="cuda", generator=gen) for p in graphed]
             for _ in range(6)]
    assert_graph_replays_equal_eager(graphed, graphed_opt, eager, eager_opt, grads)
