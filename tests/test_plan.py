"""The per-step plan (fastopt.plan): which route each kind of step takes, and that every route
gives torch.optim's numbers, state included, over many steps."""

from __future__ import annotations

import pytest
import torch

import fastopt
from fastopt.plan import gather_pays
from helpers import BACKENDS, TOLERANCES, compare_runs
from optim_db import BY_NAME, NAMES
from test_parity import CONFIGS, IDS

# Many small tensors (a fused call's cost per tensor dominates: gathered first on a CPU), and a
# few large ones of odd sizes (read where they lie).
MANY_SMALL = [(3,), (5, 7), (64,), (1,), (), (2, 3, 4), (0,), (17,)] * 25
FEW_LARGE = [(70001,), (257, 129), (4097,)]


def record_routes(opt) -> list:
    """Wrap ``opt.update`` to note the route of every plan it is given."""
    routes = []
    update = opt.update

    def spy(group, bucket, plan, *args):
        routes.append(plan.route)
        return update(group, bucket, plan, *args)

    opt.update = spy
    return routes


def test_the_cost_model_sends_many_small_tensors_through_a_gather_on_cpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gather_pays("adam", cpu, 1000, 1000 * 64)
    assert gather_pays("sgd", cpu, 1000, 1000 * 64)
    assert not gather_pays("adam", cpu, 8, 38_282 + 8 * 64)  # the demo's CNN
    assert not gather_pays("adam", cpu, 148, 124_000_000)  # GPT-2 small
    assert not gather_pays("adam", cuda, 1000, 1000 * 64)  # one multi-tensor launch on GPUs
    assert not gather_pays("saga", cpu, 1000, 1000 * 64)  # no measured costs: as it was
    # CPU half-precision math rounds differently in torch's vectorized loop and scalar tail
    assert not gather_pays("sgd", cpu, 1000, 1000 * 64, torch.bfloat16)
    # one tensor is one entry either way: the copy would only add its own cost
    for op in ("adam", "sgd", "elementwise"):
        assert not gather_pays(op, cpu, 1, 1)
        assert not gather_pays(op, cpu, 1, 64)
    assert gather_pays("elementwise", cpu, 2, 2 * 64)  # two entries of a chain of torch ops


def test_adafactor_gathers_only_where_its_vectors_would_then_step_together():
    """Adafactor steps a matrix alone whether its grad was gathered or not; only runs of
    consecutive vectors become one call: the demo's CNN (each bias between two weights) reads
    its fresh grads where they lie, a run of vectors gathers them."""
    from fastopt.flat import flat_entries

    cnn = [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (64, 512), (64,), (10, 64), (10,)]
    assert flat_entries(cnn) == 8
    assert flat_entries([(4096,)] * 400) == 1
    assert flat_entries([(3,), (0,), (4,), (2, 2), (), (5,)]) == 4  # runs 3 | 4 | () 5
    for shapes, route in ((cnn, "tensors"), ([(64,)] * 50, "gather")):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = fastopt.Adafactor(params, backend="torch")
        routes = record_routes(opt)
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        assert routes == [route]


@pytest.mark.parametrize("name", ["SGD", "AdamW", "Adagrad", "RMSprop"])
def test_a_bucket_of_one_param_steps_on_its_fresh_grad_where_it_lies(name):
    params = [torch.nn.Parameter(torch.randn(5))]
    opt = getattr(fastopt, name)(params, lr=0.1, backend="torch")
    routes = record_routes(opt)
    for _ in range(2):
        params[0].grad = torch.randn(5)
        opt.step()
    assert routes == ["tensors", "tensors"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes,route", [(MANY_SMALL, "gather"), (FEW_LARGE, "tensors")],
                         ids=["many-small", "few-large"])
@pytest.mark.parametrize("name,kwargs,desc", CONFIGS, ids=IDS)
def test_fresh_grads_take_the_planned_route_and_match_torch(name, kwargs, desc, shapes, route,
                                                            backend):
    """Fresh grads every step (the default loop): params and state equal torch.optim's after
    every one of 6 steps, on the route the plan picks (the Triton path reads them through an
    address table, one launch per bucket, or gathers them for an optimizer whose update does
    not read grads by address)."""
    if backend == "triton":
        shapes = shapes[:12]  # the interpreter runs one program per param block: keep it short
        route = "table" if getattr(fastopt, name).declaration.by_address else "gather"
    cls = getattr(fastopt, name)
    probe = cls([torch.nn.Parameter(torch.zeros(s)) for s in shapes], backend=backend, **kwargs)
    routes = record_routes(probe)
    for p in (p for g in probe.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    probe.step()
    assert routes == [route]
    compare_runs(name, kwargs, shapes, steps=6, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_route_of_one_run(backend):
    """One AdamW run through every route in turn (fresh grads, kept grads, a param without a
    grad, fresh again once step counts differ), each step equal to torch.optim's."""
    shapes = MANY_SMALL[:40] if backend == "torch" else MANY_SMALL[:12]
    ours_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = fastopt.AdamW(ours_params, lr=0.1, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=0.1, weight_decay=0.1, foreach=False)
    routes = record_routes(ours)
    gen = torch.Generator().manual_seed(3)
    for step, (keep, skip) in enumerate([(False, None), (True, None), (True, 5), (False, 7),
                                         (False, None)]):
        if keep:
            ours.zero_grad(set_to_none=False)
        else:
            ours.zero_grad()
        ref.zero_grad()
        for i, (p, q) in enumerate(zip(ours_params, ref_params)):
            if i == skip:
                if p.grad is not None and not keep:
                    p.grad = None
                continue
            g = torch.randn(p.shape, generator=gen)
            if keep and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = g.clone()
            q.grad = g.clone()
        if skip is not None:
            ours_params[skip].grad = None
        ours.step()
        ref.step()
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7, msg=f"step {step}")
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if q in ref.state:
                    torch.testing.assert_close(ours.state[p][key], ref.state[q][key],
                                               rtol=2e-6, atol=2e-7, check_dtype=False)
    fresh = "gather" if backend == "torch" else "table"
    # after a step that skipped some params their step counts differ: runs of equal counts
    assert routes == [fresh, "flat", "chunks", "chunks", "chunks"]


def test_a_gathering_bucket_keeps_its_grad_buffer_and_never_touches_the_grads():
    """The gather reads each fresh grad once and copies it into the bucket's own buffer: the
    grad tensors (and their versions) are untouched, and zero_grad() keeps the buffer for the
    next step instead of allocating it again."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in MANY_SMALL]
    opt = fastopt.SGD(params, lr=0.1, momentum=0.9)
    routes = record_routes(opt)
    for _ in range(2):
        opt.zero_grad()
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        versions = [g._version for g in grads]
        copies = [g.clone() for g in grads]
        opt.step()
        assert all(p.grad is g for p, g in zip(params, grads))
        assert [g._version for g in grads] == versions
        assert all(torch.equal(g, c) for g, c in zip(grads, copies))
    buffer = opt._buckets[0][0].grads.buffer
    opt.zero_grad()
    assert opt._buckets[0][0].grads.buffer is buffer and routes == ["gather", "gather"]


def test_a_bucket_reading_grads_where_they_lie_frees_its_grad_buffer():
    params = [torch.nn.Parameter(torch.randn(s)) for s in FEW_LARGE]
    opt = fastopt.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.zero_grad(set_to_none=False)  # grads moved into the flat grad buffer
    assert opt._buckets[0][0].grads.buffer is not None
    opt.zero_grad()
    assert opt._buckets[0][0].grads.buffer is None


@pytest.mark.parametrize("late", [False, True], ids=["together", "one-param-later"])
@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad"])
@pytest.mark.parametrize("shapes", [MANY_SMALL, FEW_LARGE, [(3, 4), (6, 5)]],
                         ids=["many-small", "few-large", "two-small"])
def test_fresh_grads_that_are_not_contiguous_are_read_correctly(shapes, name, late):
    """torch's CPU fused kernels read a non-contiguous grad as if it were contiguous (wrong
    numbers). Many small params gather their grads into the flat grad buffer, a copy that takes
    any strides; few large ones, whose grads the fused kernels would read where they lie, take
    the checked path, which makes them contiguous first. ``late``: one param gets its first
    grad a step after the others, so its step count differs and the bucket steps in runs,
    each param's grad an entry of its own (made contiguous there too)."""
    shapes = [s for s in shapes if len(s) == 2]
    ours_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    kwargs = BY_NAME[name].typical
    ours = getattr(fastopt, name)(ours_params, **kwargs)
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **kwargs)
    for step in range(3):
        for i, (p, q) in enumerate(zip(ours_params, ref_params)):
            if late and step == 0 and i == 0:
                p.grad = q.grad = None
                continue
            g = torch.randn(tuple(reversed(p.shape))).t()
            assert not g.is_contiguous()
            p.grad, q.grad = g, g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("shapes", [MANY_SMALL, FEW_LARGE], ids=["many-small", "few-large"])
def test_a_bad_fresh_grad_is_refused_with_nothing_changed(shapes):
    """A grad of the wrong dtype among many fresh ones: the quick checks send the step to the
    grad-by-grad check, which raises torch-worded errors before anything is written."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = fastopt.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    index = len(params) // 2
    for p in params:
        p.grad = torch.randn_like(p)
    params[index].data = params[index].data.double()
    params[index].grad = torch.randn_like(params[index])
    params[index].data = params[index].data.float()
    with pytest.raises(RuntimeError, match="gradient has dtype torch.float64"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(params, moments))


class _CountingKernel:
    """Stands in for a ``@triton.jit`` kernel: counts launches, then launches it."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton's interpreter")
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_the_default_loop_on_triton_is_one_launch_that_reads_grads_where_they_lie(name,
                                                                                 monkeypatch):
    """Fresh grads (zero_grad() between steps) on the Triton path: each step is one launch for
    the bucket, and no torch op the step dispatches reads a grad (no gather, no copy): the
    kernel reads them through the address table. Two groups make two buckets, two launches."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import fastopt.kernels.adam as adam_kernels
    import fastopt.kernels.sgd as sgd_kernels

    module, attr = (adam_kernels, "_adam_kernel") if name == "AdamW" else (sgd_kernels,
                                                                          "_sgd_kernel")
    counter = _CountingKernel(getattr(module, attr))
    monkeypatch.setattr(module, attr, counter)
    shapes = [(3,), (5, 7), (1100,), (2, 3, 4)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    opt = getattr(fastopt, name)([{"params": params[:2]}, {"params": params[2:]}],
                                 backend="triton", **kwargs)

    class GradReads(TorchDispatchMode):
        def __init__(self, grads):
            super().__init__()
            self.grad_ptrs = {g.data_ptr() for g in grads if g.numel()}
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() \
                        and t.data_ptr() in self.grad_ptrs:
                    self.reads.append(str(func))
            return func(*args, **(kwargs or {}))

    for step in range(3):
        opt.zero_grad()
        for p in params:
            p.grad = torch.randn_like(p)
        counter.launches = 0
        with GradReads([p.grad for p in params]) as mode:
            opt.step()
        assert counter.launches == 2, step
        assert mode.reads == [], mode.reads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_a_default_loop_saved_and_loaded_mid_run_continues_bit_identically(name, backend):
    """Fresh grads every step (gather route on CPU, address table on Triton): a run saved with
    ``torch.save`` after 3 steps and loaded into a new optimizer over copied params continues
    exactly as the uninterrupted run, params and state bit for bit."""
    import io

    shapes = MANY_SMALL[:12]
    kwargs = dict(lr=0.1, momentum=0.9, nesterov=True) if name == "SGD" else dict(lr=0.1)
    cls = getattr(fastopt, name)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in
            enumerate(shapes)]
    straight = [torch.nn.Parameter(t.clone()) for t in init]
    first = [torch.nn.Parameter(t.clone()) for t in init]
    straight_opt = cls(straight, backend=backend, **kwargs)
    first_opt = cls(first, backend=backend, **kwargs)
    routes = record_routes(straight_opt)
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]

    def step(opt, params, values):
        opt.zero_grad()
        for p, g in zip(params, values):
            p.grad = g.clone()
        opt.step()

    for values in grads[:3]:
        step(straight_opt, straight, values)
        step(first_opt, first, values)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed_opt = cls(resumed, backend=backend, **kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    for values in grads[3:]:
        step(straight_opt, straight, values)
        step(resumed_opt, resumed, values)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
        for key, value in straight_opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), key
    assert set(routes) == {"gather" if backend == "torch" else "table"}


def test_a_table_a_cuda_graph_reads_is_never_written_again(monkeypatch):
    """The address table's rules under CUDA-graph capture (capture simulated on CPU): a capture
    finding its grads' addresses already uploaded uses the table, which then belongs to the
    graph; a later eager step with other grads writes a new table and leaves the graph's as it
    was; a capture meeting new addresses, or a bucket without tables yet, gathers instead."""
    from fastopt import grad_table

    params = [torch.nn.Parameter(torch.randn(s)) for s in [(40,), (3, 5)]]
    opt = fastopt.SGD(params, lr=0.1)
    bucket = opt._buckets[0][0]
    capturing = [False]
    monkeypatch.setattr(grad_table, "_capturing", lambda device: capturing[0])

    def grads():
        return [torch.randn_like(p) for p in params]

    capturing[0] = True
    assert grad_table.attach(bucket, grads()) is None  # no tables yet: gather
    capturing[0] = False
    static = grads()
    eager = grad_table.attach(bucket, static)
    assert eager.addresses.tolist() == [g.data_ptr() for g in static]
    capturing[0] = True
    captured = grad_table.attach(bucket, static)  # same addresses: the table, now the graph's
    assert captured is not None and captured.addresses is eager.addresses
    assert grad_table.attach(bucket, grads()) is None  # new addresses in a capture: gather
    capturing[0] = False
    other = grads()
    later = grad_table.attach(bucket, other)
    assert later.addresses is not captured.addresses
    assert later.addresses.tolist() == [g.data_ptr() for g in other]
    assert captured.addresses.tolist() == [g.data_ptr() for g in static]  # the graph's, intact


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
@pytest.mark.parametrize("offset, route", [(1, "gather"), (2, "gather"), (3, "gather"),
                                           (4, "table")])
def test_a_fresh_grad_off_a_16_byte_boundary_is_gathered_and_matches_torch(offset, route):
    """The kernels read a grad where it lies only on 16-byte boundaries (whole vectors): a
    grad that is a view ``offset`` fp32 elements into a larger tensor (4, 8, 12 bytes past
    an aligned address) sends the bucket through the gather; 16 bytes past one, through the
    address table. Either way the numbers are torch.optim's."""
    from fastopt import grad_table

    shapes = [(40,), (3, 5), (33,)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in
            enumerate(shapes)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    opt = fastopt.SGD(ours, backend="triton", **kwargs)
    ref_opt = torch.optim.SGD(ref, foreach=False, **kwargs)
    routes = record_routes(opt)
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        values = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(ours, ref, values):
            p.grad, q.grad = g.clone(), g.clone()
        held = torch.empty(values[1].numel() + offset)
        ours[1].grad = held[offset:].view(shapes[1]).copy_(values[1])
        assert ours[1].grad.data_ptr() % 16 == 4 * offset % 16
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])
    assert routes == [route] * 4
    table = grad_table.attach(opt._buckets[0][0], [p.grad for p in ours])
    assert (table is None) == (route == "gather")


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "Adafactor"])
def test_gapless_vectors_gather_with_one_cat_and_match_torch(name, monkeypatch):
    """1-D params whose sizes are multiples of the slot alignment sit back to back: their fresh
    grads gather with one torch.cat (no gaps to skip), and the steps equal torch.optim's."""
    shapes = [(64,)] * 30 + [(128,), (192,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = getattr(fastopt, name)(params, lr=0.1)
    bucket = opt._buckets[0][0]
    assert bucket.gapless_vectors
    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: cats.append(1) or real_cat(*a, **k))
    routes = record_routes(opt)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert routes == ["gather"] and len(cats) == 1
    monkeypatch.undo()
    compare_runs(name, dict(lr=0.1), shapes, steps=4)
    # one size off the alignment, or a matrix: a gap, or a shape a cat cannot take
    assert not fastopt.SGD([torch.nn.Parameter(torch.zeros(s)) for s in [(64,), (65,), (64,)]],
                           lr=0.1)._buckets[0][0].gapless_vectors
    assert not fastopt.SGD([torch.nn.Parameter(torch.zeros(s)) for s in [(64,), (2, 64)]],
                           lr=0.1)._buckets[0][0].gapless_vectors


def _plans(call) -> list:
    """The step plans ``call()`` makes."""
    from fastopt import step

    plans, make_plan = [], step.make_plan

    def recording(*args, **kwargs):
        plans.append(make_plan(*args, **kwargs))
        return plans[-1]

    step.make_plan = recording
    try:
        call()
    finally:
        step.make_plan = make_plan
    return plans


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32-state", "bf16-state"])
def test_a_step_torchs_fused_op_serves_is_priced_as_one(state_dtype):
    """Adagrad's fp32 step on the CPU is torch's fused kernel: on a few large tensors an entry
    per tensor costs less than gathering them (the demo's CNN), on many small ones gathering
    pays. Where the kernel cannot serve (bf16 state: the torch twin's chain of ops per entry),
    gathering pays on both; only a step that gathers keeps a flat grad buffer."""
    from fastopt.shapes import demo_cnn

    options = {} if state_dtype is None else {"state_dtype": state_dtype}
    expected = {"few": "tensors" if state_dtype is None else "gather", "many": "gather"}
    for shapes, which in ((demo_cnn(), "few"), ([(64,)] * 1000, "many")):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = fastopt.Adagrad(params, lr=0.1, backend="torch", **options)
        for p in params:
            p.grad = torch.randn_like(p)
        assert [plan.route for plan in _plans(opt.step)] == [expected[which]], which
        opt.zero_grad()
        buffer = opt._buckets[0][0].grads.buffer
        assert (buffer is not None) == (expected[which] == "gather"), which


@pytest.mark.parametrize("keep_grads", [False, True], ids=["fresh-grads", "kept-grads"])
@pytest.mark.parametrize("name", NAMES)
def test_a_step_on_many_params_starts_no_garbage_collection(name, keep_grads):
    """A step over 1000 params makes no burst of Python container objects: a thousand at once
    (a list of each grad's ``torch.Size``, say) would start one of CPython's collections on
    nearly every step, a cost torch's own steps do not pay."""
    import gc

    info = BY_NAME[name]
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(1000)]
    opt = info.cls(params, **info.typical)
    grads = [[torch.randn(64) for _ in params] for _ in range(2)]
    for i in range(3):
        for p, g in zip(params, grads[i % 2]):
            p.grad = g
        opt.step()
    if keep_grads:
        opt.zero_grad(set_to_none=False)
    gc.collect()
    before = [s["collections"] for s in gc.get_stats()]
    for i in range(20):
        if keep_grads:
            opt.step()
            continue
        for p, g in zip(params, grads[i % 2]):
            p.grad = g
        opt.step()
    assert [s["collections"] for s in gc.get_stats()] == before


def test_many_params_some_without_grads_are_updated_in_runs():
    """Many small params, some without a grad this step: the torch path copies the others'
    grads into the flat grad buffer and updates each run of them with one entry (not one
    entry per param, as torch's fused kernels do), with torch.optim's numbers."""
    ours = [torch.nn.Parameter(torch.randn(64)) for _ in range(1000)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fastopt.SGD(ours, lr=0.1, momentum=0.9, backend="torch")
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, foreach=False)

    def steps():
        for k in range(4):
            for i, (p, q) in enumerate(zip(ours, theirs)):
                g = None if (7 * i + k) % 10 == 3 else torch.randn(64)
                p.grad, q.grad = g, None if g is None else g.clone()
            opt.step()
            ref.step()

    entries = [len(plan.pieces("param")) for plan in _plans(steps)]
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
    # 900 params with a grad a step, in about 100 runs between the gaps (more on the second
    # step, where the params that missed the first start their momentum buffers)
    assert entries[1] < 450 and max(entries[2:]) <= 150, entries
