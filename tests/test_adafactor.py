"""Adafactor beyond the table-driven tests: its factored state, params torch's cannot step
(empty ones), complex params refused at the step as torch refuses them, and the device-tensor
scalars the GPU path keeps (run here on CPU tensors)."""

import io

import pytest
import torch
from helpers import BACKENDS, compare_runs, interpreter_ready, make_params

import fastopt
from fastopt.optimizers import adafactor

SHAPES = [(129,), (), (1,), (4, 5), (2, 3, 7), (65,), (64, 3)]


def test_state_is_factored_for_matrices_and_packed():
    params = [torch.nn.Parameter(t) for t in make_params([(64, 32), (10,), (2, 3, 5), ()])]
    opt = fastopt.Adafactor(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = [opt.state[p] for p in params]
    assert set(state[0]) == {"step", "row_var", "col_var"}
    assert state[0]["row_var"].shape == (64, 1) and state[0]["col_var"].shape == (1, 32)
    assert set(state[1]) == {"step", "variance"} and state[1]["variance"].shape == (10,)
    assert state[2]["row_var"].shape == (2, 3, 1) and state[2]["col_var"].shape == (2, 1, 5)
    assert state[3]["variance"].shape == ()
    tensors = opt._buckets[0][0].state.tensors
    # 64 + 6 rows (two 64-element slots), 32 + 10 columns (two slots), 10 + 1 variances
    assert {k: v.numel() for k, v in tensors.items()} == {"row_var": 128, "col_var": 128,
                                                          "variance": 128}
    estimate = fastopt.memory.estimate(params, "adafactor")
    assert estimate["cpu"].state_bytes == 4 * 3 * 128 + 4 * 4  # buffers and the step column


@pytest.mark.parametrize("shape", [(5, 7, 9), (33, 70), (2, 129, 3)])
def test_the_torch_path_steps_matrices_with_torch_optims_own_ops(shape):
    """A matrix's row and column statistics and its norms as torch.optim computes them: on
    the CPU the same ops give the same bits, so over several steps at a large lr (which
    magnifies any difference in the last bit) params and state equal torch.optim's exactly."""
    kwargs = dict(lr=0.5, beta2_decay=0.0, eps=(None, 0.0), maximize=True)
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(shape, generator=gen)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours = fastopt.Adafactor([a], backend="torch", **kwargs)
    ref = torch.optim.Adafactor([b], foreach=False, **kwargs)
    for _ in range(4):
        grad = torch.randn(shape, generator=gen)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        assert torch.equal(a, b)
        for name in ("row_var", "col_var"):
            assert torch.equal(ours.state[a][name], ref.state[b][name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_vectors_step_does_not_depend_on_the_params_it_is_stepped_with(backend):
    """Which vectors share a run depends on their history (params that got their state at
    different steps are stepped apart; loaded from a state_dict, params of equal step counts
    together), so a vector's norms must be the same alone or in a run: trained, saved,
    loaded and trained on, the run equals the one never stopped, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=gen) for n in (0, 3, 129)]

    def train(opt, params, steps, seed, skip=0):
        grads = torch.Generator().manual_seed(seed)
        for step in range(steps):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=grads)
                p.grad = None if (skip >> ((step * 3 + i) % 12)) & 1 else g
            opt.step()

    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = fastopt.Adafactor(params, lr=1e-3, backend=backend)
    train(opt, params, 3, 1, skip=28)  # the 3- and 129-element params step apart at first
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = fastopt.Adafactor(copies, lr=1e-3, backend=backend)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    train(opt, params, 2, 2)
    train(resumed, copies, 2, 2)
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        for name in opt.state[p]:
            assert torch.equal(opt.state[p][name], resumed.state[q][name])


def test_empty_params_are_left_as_they_are():
    # torch.optim.Adafactor divides by an empty param's size (ZeroDivisionError); fastopt's
    # counts its steps and updates the others exactly as torch updates them without it
    init = make_params([(0,), (4, 5), (0, 3), (7,)], seed=3)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init[1::2]]
    opt = fastopt.Adafactor(ours, lr=0.05, weight_decay=0.1)
    ref_opt = torch.optim.Adafactor(ref, lr=0.05, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        for p in ours:
            p.grad = torch.randn(p.shape, generator=gen)
        for p, q in zip(ours[1::2], ref):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    assert ours[0].shape == (0,) and ours[2].shape == (0, 3)
    assert opt.state[ours[0]]["step"].item() == 3.0
    assert opt.state[ours[2]]["row_var"].shape == (0, 1)
    for p, q in zip(ours[1::2], ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("cls", [fastopt.Adafactor, fastopt.Lion])
def test_complex_params_are_refused_at_the_step_and_nothing_changes(cls):
    real = torch.nn.Parameter(torch.randn(3))
    z = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.complex64))
    opt = cls([real, z])  # constructed, as torch's: the step refuses them
    real.grad, z.grad = torch.randn(3), torch.randn(2, 3, dtype=torch.complex64)
    before = real.detach().clone()
    with pytest.raises(RuntimeError, match=f"^{cls.__name__} does not support complex "
                                           "parameters$"):
        opt.step()
    assert torch.equal(real.detach(), before) and not opt.state


@pytest.fixture
def device_scalars(monkeypatch):
    """The GPU path's scalars (tensors, never read back) on CPU tensors."""
    monkeypatch.setattr(adafactor, "_on_host", lambda bucket: False)


@pytest.mark.parametrize("kwargs", [dict(), dict(lr=0.05, weight_decay=0.1, maximize=True),
                                    dict(lr=torch.tensor(0.02), eps=(1e-30, 1e-3))],
                         ids=["defaults", "decay-maximize", "tensor-lr-tiny-eps"])
def test_device_scalars_equal_torch(device_scalars, kwargs):
    compare_runs("Adafactor", kwargs, SHAPES, steps=8)
    compare_runs("Adafactor", kwargs, SHAPES, steps=6, skip=lambda step, i: (step + i) % 3 == 0)


def test_device_scalars_skip_a_non_finite_step_without_reading_it(device_scalars):
    init = make_params(SHAPES, seed=5)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    twins = [torch.nn.Parameter(t.clone()) for t in init]
    opt = fastopt.Adafactor(ours, lr=0.05, max_grad_norm=1.0)
    ref = torch.optim.Adafactor(twins, lr=0.05, foreach=False)
    gen = torch.Generator().manual_seed(6)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        if step == 2:
            grads[3][0, 0] = float("nan")
        before = [p.detach().clone() for p in ours]
        state = {k: v.clone() for k, v in opt.state[ours[3]].items()} if step else None
        for p, q, g in zip(ours, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        if step == 2:  # nothing changed, the step count included
            assert all(torch.equal(p.detach(), b) for p, b in zip(ours, before))
            assert all(torch.equal(opt.state[ours[3]][k], v) for k, v in state.items())
            continue
        torch.nn.utils.clip_grad_norm_(twins, 1.0)
        ref.step()
        for p, q in zip(ours, twins):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("options", [dict(master_weights=True), dict(state_dtype=torch.bfloat16),
                                     dict(eps=(0.0, 1e-3), weight_decay=0.1)],
                         ids=["bf16-masters", "bf16-state", "eps1-zero"])
def test_device_scalars_equal_the_host_path(options, monkeypatch):
    # the GPU path's tensor scalars (run on CPU tensors) against the CPU path's floats, over
    # lean options and a zero eps1 (whose padding is masked): the same step within rounding
    dtype = torch.bfloat16 if "master_weights" in options else torch.float32
    init = [t.to(dtype) for t in make_params(SHAPES + [(64,)] * 5, seed=7)]
    runs = []
    for on_host in (True, False):
        monkeypatch.setattr(adafactor, "_on_host", lambda bucket, on_host=on_host: on_host)
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = fastopt.Adafactor(params, lr=0.05, **options)
        gen = torch.Generator().manual_seed(8)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        runs.append(params)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-6, atol=2e-7)
    for p, q in zip(*runs):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)


# The Triton kernels (fastopt.kernels.adafactor), run on CPU tensors under the interpreter:
# matrices in whole tiles (64 x 128, a batch of two 64 x 64), in masked ones (70 x 130, a
# conv's 3 x 3 matrices), vectors over several tiles, and a param on its own; a row statistic
# over more tiles than the statistics pass sums at once (2 x 4200: 66 > PARTS), matrices of more
# rows than a chunk (70 x 130, 1100 x 3: their means from 2 and 18 chunks' sums) and of no more
# (the rest: the mean in the statistics pass). (A column over as many tiles is checked against
# float64 below: torch's own fp32 norm over 4200 rows is up to 2.5e-6 off.)
KERNEL_SHAPES = [(64, 128), (70,), (2, 64, 64), (70, 130), (8, 2, 3, 3), (4097,), (), (1, 17),
                 (2, 4200), (1100, 3)]
KERNEL_TILES = 2 + 1 + 2 + 2 * 3 + 8 * 2 + 2 + 1 + 1 + 66 + 18  # KERNEL_SHAPES in 64 x 64 tiles
needs_interpreter = pytest.mark.skipif(not interpreter_ready(),
                                       reason="the kernels need TRITON_INTERPRET=1 and Triton")


@pytest.fixture
def kernel_calls(monkeypatch):
    """The entries the kernels stepped (each a call of ``adafactor_update``)."""
    from fastopt.kernels import adafactor as kernel

    calls = []
    launch = kernel.adafactor_update

    def counted(*args, **kwargs):
        calls.append((args[5].tiles, kwargs.get("grad_table") is not None))
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernel, "adafactor_update", counted)
    return calls


@needs_interpreter
@pytest.mark.parametrize("kwargs", [dict(lr=0.05), dict(lr=0.02, weight_decay=0.1, maximize=True,
                                                          d=1.5, beta2_decay=-0.5),
                                    dict(lr=torch.tensor(0.03), eps=(1e-30, 1e-3))],
                         ids=["plain", "decay-maximize-d", "tensor-lr-tiny-eps1"])
def test_kernels_equal_torch_on_whole_and_masked_tiles(kwargs, kernel_calls):
    compare_runs("Adafactor", kwargs, KERNEL_SHAPES, steps=6, backend="triton")
    # one call a step, every tile, the fresh grads read where they lie
    assert kernel_calls == [(KERNEL_TILES, True)] * 6


@needs_interpreter
def test_kernels_equal_torch_whichever_way_the_grads_come(kernel_calls):
    """The other ways a step's grads come, with decay and maximize (the test above varies the
    per-element math on the default loop's route): params without grads in some steps, their
    grads gathered; grads kept in the flat buffer."""
    kwargs = dict(lr=0.02, weight_decay=0.1, maximize=True)
    # params without grads: entries of the others, their grads gathered into the flat buffer
    compare_runs("Adafactor", kwargs, KERNEL_SHAPES, steps=6, backend="triton",
                 skip=lambda step, i: (step + i) % 3 == 0)
    assert len(kernel_calls) > 6 and not any(table for _, table in kernel_calls)
    kernel_calls.clear()
    compare_runs("Adafactor", kwargs, KERNEL_SHAPES, steps=4, backend="triton", in_place=True)
    assert kernel_calls[1:] == [(KERNEL_TILES, False)] * 3  # grads kept in the flat buffer


@needs_interpreter
def test_a_nan_grad_spreads_as_in_torch():
    """A NaN in a matrix's grad makes its statistics NaN; torch's clamps keep NaN, so the
    whole matrix becomes NaN (the kernels' clamps propagate it: a GPU's max would drop it and
    step with eps1 instead), a vector only where its grad is NaN, the others untouched."""
    init = make_params([(70, 130), (20,), (3, 5)], seed=6)
    runs = []
    for make in (lambda ps: fastopt.Adafactor(ps, lr=0.01, backend="triton"),
                 lambda ps: torch.optim.Adafactor(ps, lr=0.01, foreach=False)):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        gen = torch.Generator().manual_seed(7)
        for step in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if step == 1:
                params[0].grad[5, 7] = params[1].grad[3] = float("nan")
            opt.step()
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-7, equal_nan=True)
    assert runs[0][0].isnan().all() and runs[0][1].isnan().sum() == 1
    assert not runs[0][2].isnan().any()


@needs_interpreter
def test_long_statistics_are_the_float64_means_of_squares():
    """A column over 66 tiles and a row over 66 (more than the statistics pass loads at once),
    in matrices of 66 chunks of rows and of one: after a first step from zeros (beta2_t = 0 at
    step 1, so the statistics are the means themselves), each is the float64 mean of the grad's
    squares within a few fp32 roundings."""
    params = [torch.nn.Parameter(t) for t in make_params([(4200, 3), (3, 4200)], seed=4)]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) for p in params]
    opt = fastopt.Adafactor(params, lr=0.01, backend="triton")
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, grads):
        squares = g.double().square()
        for name, dim in (("row_var", -1), ("col_var", -2)):
            expected = squares.mean(dim=dim, keepdim=True)
            torch.testing.assert_close(opt.state[p][name].double(), expected, rtol=5e-7, atol=0)


@needs_interpreter
@pytest.mark.parametrize("options", [dict(master_weights=True), dict(state_dtype=torch.bfloat16),
                                     dict(max_grad_norm=1.0, weight_decay=0.1)],
                         ids=["bf16-masters", "bf16-state", "clipped"])
def test_kernels_equal_the_torch_path_on_lean_options(options, kernel_calls):
    dtype = torch.bfloat16 if "master_weights" in options else torch.float32
    init = [t.to(dtype) for t in make_params(KERNEL_SHAPES, seed=9)]
    runs = []
    for backend in ("torch", "triton"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = fastopt.Adafactor(params, lr=0.05, backend=backend, **options)
        gen = torch.Generator().manual_seed(10)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        runs.append((params, opt))
    assert [table for _, table in kernel_calls] == [True] * 4
    # bf16 params: one bf16 rounding of the same fp32 master apart at most
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-6, atol=2e-7)
    (ours, ours_opt), (theirs, theirs_opt) = runs
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(q.detach(), p.detach(), **tol)
        for name, value in ours_opt.state[p].items():
            torch.testing.assert_close(theirs_opt.state[q][name].float(), value.float(),
                                       rtol=1e-2 if value.dtype == torch.bfloat16 else 2e-6,
                                       atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_on_half_params_round_each_op_as_torch(dtype):
    # bf16/fp16 params without masters: torch.optim's math is op by op in the half type, and
    # so is the kernels'. Bit for bit against torch.optim on the CPU, where the sizes leave its
    # vectorized loops no scalar tail (whose rounding differs from theirs) and the update's
    # coefficient is exact in the half type (the CPU rounds it there, CUDA does not), and the
    # rows and columns are short enough that torch's fp32 sums and the tiles' add up alike (over
    # 1152 elements, fp16 norms come out an ulp apart somewhere: the order of an fp32 sum)
    shapes = [(64, 128), (64,), (2, 64, 64), (70, 128), (96, 96), (8, 2, 4, 8), (4096,), (1, 64)]
    init = [(0.5 * t).to(dtype) for t in make_params(shapes, seed=3)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    twins = [torch.nn.Parameter(t.clone()) for t in init]
    # rms(param) < eps2 and d large: the coefficient is -lr, a power of two
    kwargs = dict(lr=2**-6, eps=(1e-3, 1.0), d=1e6, weight_decay=0.25)
    opt = fastopt.Adafactor(ours, backend="triton", **kwargs)
    ref = torch.optim.Adafactor(twins, foreach=False, **kwargs)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        for p, q in zip(ours, twins):
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, twins):
            assert torch.equal(p, q)
            for name, value in ref.state[q].items():
                assert torch.equal(opt.state[p][name], value), name


@needs_interpreter
def test_kernels_follow_a_param_changed_outside_the_optimizer():
    # bf16 params with fp32 masters: a param clamped between steps is taken as it is (its
    # master is not the clamped value rounded any more), as the elementwise kernels take it
    params = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in make_params([(64, 64)], seed=2)]
    opt = fastopt.Adafactor(params, lr=0.05, master_weights=True, backend="triton")
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    with torch.no_grad():
        params[0].clamp_(-0.5, 0.5)
    clamped = params[0].detach().float().clone()
    opt.step()
    master = opt.state[params[0]]["master_param"]
    change = (master - clamped).abs().max()
    assert change < 0.05 * 4  # one step of at most ~lr * RMS from the clamped values
    assert params[0].detach().abs().max() < 0.5 + change + 1e-2


def test_the_tiles_cover_every_element_once():
    pytest.importorskip("triton")
    from fastopt.kernels import adafactor as kernel

    params = [(0, 0, 70 * 130, (70, 130), 0, 0, None),
              (1, 70 * 130 + 60, 4097, (4097,), None, None, 0),
              (3, 20000, 8 * 18, (8, 2, 3, 3), 128, 128, None)]
    tiles = kernel.make_tiles(params, torch.device("cpu"))
    info, table = tiles.info, tiles.tile
    assert tiles.tiles == 2 * 3 + 2 + 8 * 2 and tiles.params == 3
    assert info[:, kernel.INDEX.value].tolist() == [0, 1, 3]  # their rows of a grad table
    assert (tiles.wide_rows, tiles.wide_cols, tiles.means) == (70 + 16 * 3, 130 + 16 * 3, 1 + 16)
    covered = set()
    for param, batch, row_tile, col_tile in table.tolist():
        row = info[param].tolist()
        numel, rows, cols = row[kernel.NUMEL], row[kernel.ROWS], row[kernel.COLS]
        for r in range(row_tile * 64, min(rows, row_tile * 64 + 64)):
            for c in range(col_tile * 64, min(cols, col_tile * 64 + 64)):
                offset = batch * rows * cols + r * cols + c
                if offset < numel:
                    assert (param, offset) not in covered
                    covered.add((param, offset))
    assert len(covered) == 70 * 130 + 4097 + 8 * 18
    # the statistics pass: every row and column statistic of every matrix in one chunk, the
    # matrices of more rows than a chunk (70 x 130) in the means pass, each row chunk a sum
    statistics = []
    for param, batch, kind, first in tiles.chunk.tolist():
        count = info[param].tolist()[kernel.ROWS if kind == 0 else kernel.COLS]
        statistics += [(param, batch, kind, i) for i in range(first, min(first + 64, count))]
    assert sorted(statistics) == sorted(set(statistics))
    assert len(statistics) == 70 + 130 + 8 * 2 * (3 + 3)
    assert tiles.matrix.tolist() == [[0, 0]] and tiles.row_sums == 2 + 8 * 2
    assert [kernel.chunk_counts(numel, shape) for _, _, numel, shape, *_ in params] == \
        [(2, 3, 1), (0, 0, 0), (16, 16, 0)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_state_wider_than_the_math_is_refused(dtype):
    """Adafactor computes in its params' dtype (or fp32 masters'): fp32 state beside half
    params without masters would only hold values rounded to them, so it is refused at
    construction with what to use instead; masters, or state no wider, are taken."""
    param = torch.nn.Parameter(torch.randn(4, 3).to(dtype))
    with pytest.raises(ValueError, match=r"^Adafactor computes in its params' dtype "
                                         r".*use master_weights=True for fp32 math"):
        fastopt.Adafactor([param], state_dtype=torch.float32)
    fastopt.Adafactor([param], state_dtype=torch.float32, master_weights=True)
    fastopt.Adafactor([param], state_dtype=torch.bfloat16)
    fastopt.Adafactor([torch.nn.Parameter(torch.randn(4, 3))], state_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_changed_from_a_tensor_to_a_number_keeps_counting(backend):
    """A group's lr set from a tensor to a float mid-run (a scheduler, user code): the step
    count goes on from where it was (the kernels' host mirror of the counts must not come
    back stale), as torch's does."""
    init = torch.randn(16)
    ours_p, ref_p = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours = fastopt.Adafactor([ours_p], lr=torch.tensor(0.05), backend=backend)
    ref = torch.optim.Adafactor([ref_p], lr=torch.tensor(0.05), foreach=False)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        if step == 3:
            ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.05
        g = torch.randn(16, generator=gen)
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert float(ours.state[ours_p]["step"]) == float(ref.state[ref_p]["step"]) == 5
    torch.testing.assert_close(ours.state[ours_p]["variance"], ref.state[ref_p]["variance"],
                               rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(ours_p.detach(), ref_p.detach(), rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps1_none_takes_the_first_stepped_params_dtype_for_the_group(backend):
    """``eps=(None, ...)``: torch's for-loop sets eps1 from the first param with a grad (here
    bf16's 2**-7) and keeps it for the group's fp32 vector too; so does fastopt. A step where
    that param has no grad takes the next one's (fp32's)."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(3, 4, generator=gen).bfloat16(), torch.randn(7, generator=gen)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    ours_opt = fastopt.Adafactor(ours, lr=0.01, eps=(None, 1e-3), backend=backend)
    ref_opt = torch.optim.Adafactor(ref, lr=0.01, eps=(None, 1e-3), foreach=False)
    for step in range(3):
        gm = torch.randn(3, 4, generator=gen).bfloat16()
        gv = torch.randn(7, generator=gen)
        gv[0] = 1e-4  # where eps1 decides the step
        ours[0].grad, ref[0].grad = (None, None) if step == 1 else (gm.clone(), gm.clone())
        ours[1].grad, ref[1].grad = gv.clone(), gv.clone()
        ours_opt.step()
        ref_opt.step()
        torch.testing.assert_close(ours[1].detach(), ref[1].detach(), rtol=2e-6, atol=2e-7)
