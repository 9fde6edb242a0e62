"""fastopt.memory: the estimate must equal what the optimizers really allocate."""

import gc

import psutil
import pytest
import torch
from helpers import allocated_bytes, allocated_bytes_supported, lives_in, make_params
from optim_db import OPTIM_DB

import fastopt
from benchmarks.cold_memory import phase_peaks
from fastopt import memory

# Every configuration of every optimizer (tests/optim_db.py), also with fp32 masters and bf16
# state where it takes them; and the lean combinations below.
CONFIGS = [(f"{info.name}-{desc}", info.cls, {**info.typical, **kwargs, **lean})
           for info in OPTIM_DB for kwargs, desc in info.configs
           for lean in ({}, dict(master_weights=True, state_dtype=torch.bfloat16))
           if not lean or info.takes("master_weights")] + [
    ("sgd", fastopt.SGD, dict(lr=0.1)),
    ("sgd-momentum", fastopt.SGD, dict(lr=0.1, momentum=0.9)),
    ("adam", fastopt.Adam, dict()),
    ("adam-amsgrad", fastopt.Adam, dict(amsgrad=True)),
    ("adamw", fastopt.AdamW, dict(weight_decay=0.1)),
    ("saga", fastopt.SAGA, dict(lr=0.1, num_samples=3)),
    ("adamw-master", fastopt.AdamW, dict(master_weights=True)),
    ("adam-bf16-state", fastopt.Adam, dict(state_dtype=torch.bfloat16, amsgrad=True)),
    ("adamw-int8", fastopt.AdamW, dict(state_dtype="int8")),
    ("adamw-int8-master", fastopt.AdamW, dict(state_dtype="int8", master_weights=True)),
    ("adamw-int4", fastopt.AdamW, dict(state_dtype="int4")),
    ("adamw-int4-remainder8", fastopt.AdamW, dict(state_dtype="int4",
                                                   master_weights="remainder8")),
    ("adamw8bit", fastopt.AdamW8bit, dict(master_weights=True)),
    ("sgd-master-fp32-state", fastopt.SGD, dict(lr=0.1, momentum=0.9, master_weights=True,
                                                  state_dtype=torch.float32)),
]
SHAPES = [(129,), (), (0,), (4, 5), (65,), (65, 67)]  # the last one takes 8-bit state


def state_storage_bytes(opt) -> int:
    """Bytes of the buffers behind every tensor in ``opt.state``: fastopt's flat state buffers
    (alignment padding included) and step counts, each checked to hold some of the state
    views (which alias slots of them), summed once each."""
    buffers = [t for buckets in opt._buckets for b in buckets
               for t in [*b.state.tensors.values(), *([b.state.scalars] if b.state.scalars is not None else [])]]
    used = {}
    for entry in opt.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor) and value.numel():
                owner = next(t for t in buffers if lives_in(value, t))
                used[owner.data_ptr()] = owner.untyped_storage().nbytes()
    assert len(used) == len({t.data_ptr() for t in buffers if t.numel()})
    return sum(used.values())


def first_step(opt, params):
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    if isinstance(opt, fastopt.SAGA):
        opt.step(index=1)
    else:
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name,cls,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_state_bytes_equal_what_exists_after_the_first_step(name, cls, kwargs, dtype):
    params = [torch.nn.Parameter(t) for t in make_params(SHAPES, dtype=dtype)]
    params[3].requires_grad_(False)  # frozen: no grad, no state (Adagrad: state, as torch)
    params[0].requires_grad_(False)
    params[0].grad = torch.ones_like(params[0])  # not requiring grad, but handed one: state
    report = memory.estimate(params, cls, **kwargs)
    opt = cls(params, **kwargs)
    first_step(opt, params)
    cpu = report.devices["cpu"]
    assert cpu.state_bytes == state_storage_bytes(opt)
    assert cpu.param_bytes == sum(p.numel() * p.element_size() for p in params)
    assert cpu.grad_bytes == sum(p.grad.numel() * p.grad.element_size()
                                 for p in params if p.grad is not None)
    assert cpu.step_bytes == cpu.param_bytes + cpu.grad_bytes + cpu.state_bytes + cpu.scratch_bytes
    largest = max(b.numel * b.dtype.itemsize for b in opt._buckets[0] if not b.external)
    assert cpu.layout_bytes == largest  # laid out bucket by bucket
    assert cpu.peak_bytes == max(cpu.param_bytes + cpu.layout_bytes, cpu.step_bytes)
    assert report.state_bytes == cpu.state_bytes


def test_groups_with_their_own_options_complex_params_and_a_module():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    complex_param = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64))
    groups = [{"params": list(model[0].parameters()), "amsgrad": True},
              {"params": list(model[1].parameters()) + [complex_param]}]
    report = memory.estimate(groups, "adam")
    opt = fastopt.Adam(groups)
    first_step(opt, list(model.parameters()) + [complex_param])
    assert report.state_bytes == state_storage_bytes(opt)
    # amsgrad's third buffer on the first group only, plus one float32 step per param
    # and the aligned layout: slots start at multiples of 64 elements, buffers hold a multiple
    # of 128. Group 0: 35 + 5 elements -> slots at 0 and 64 -> 128. Group 1: a real bucket
    # (15 + 3 -> 128) and a complex one (6 complex = 12 real -> 128).
    first, second = 128, 128 + 128
    assert report.state_bytes == 4 * (3 * first + 2 * second) + memory.STEP_BYTES * 5
    # One group: four slots of 64 (35, 5, 15 and 3 elements) -> 256.
    assert memory.estimate(model, fastopt.SGD, momentum=0.9).state_bytes == 4 * 256


def test_meta_params_free_memory_and_fit():
    params = [torch.empty(1000, 1000, device="meta", requires_grad=True)]
    report = memory.estimate(params, "adamw", device="cpu")
    cpu = report.devices["cpu"]
    assert cpu.param_bytes == cpu.grad_bytes == 4_000_000
    padded = 1_000_064  # 10**6 elements in a buffer padded to a multiple of 128
    assert cpu.state_bytes == 8 * padded + memory.STEP_BYTES
    assert 0 < cpu.free_bytes <= psutil.virtual_memory().total
    assert report.fits
    assert report["cpu"] is cpu and report[torch.device("cpu")] is cpu
    assert report.free_bytes == cpu.free_bytes
    assert report.as_dict()["cpu"]["peak_bytes"] == cpu.peak_bytes
    assert "AdamW" in str(report) and "cpu" in str(report)
    huge = memory.estimate(params, "saga", num_samples=10**8, device="cpu")
    assert not huge.fits and huge.state_bytes == (10**8 + 1) * 4 * padded


def test_bad_arguments():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="Unknown optimizer 'lbfgs'"):
        memory.estimate(params, "lbfgs")
    with pytest.raises(TypeError, match="fastopt optimizer class"):
        memory.estimate(params, torch.optim.Adam)
    with pytest.raises(TypeError, match=r"no option\(s\) \['momentum'\]"):
        memory.estimate(params, "adam", momentum=0.9)
    with pytest.raises(TypeError, match="num_samples"):
        memory.estimate(params, "saga")


def test_command_line_table(capsys):
    memory.main(["--model", "gpt2-small", "--optimizer", "adamw,sgd-momentum"])
    out = capsys.readouterr().out
    assert "148 tensors, 124,439,808 elements" in out
    assert "949.40 MiB" in out  # AdamW: 2 x 4 bytes x 124.4M elements (+ 148 steps)
    assert "474.70 MiB" in out
    memory.main(["--model", "resnet18-head", "--optimizer", "saga", "--num-samples", "1000"])
    out = capsys.readouterr().out
    assert "2,103,811 elements" in out and "7.85 GiB" in out  # 1001 x 2,103,811 x 4 bytes


ALLOCATING = [("AdamW", {}), ("AdamW", dict(state_dtype=torch.bfloat16)),
              ("AdamW", dict(state_dtype="int8")), ("AdamW", dict(state_dtype="int4"))] + \
    [(info.name, {**info.typical, **info.configs[-1][0], **lean}) for info in OPTIM_DB
     if info.name not in ("Adam", "AdamW")
     for lean in ({}, dict(state_dtype=torch.bfloat16)) if not lean or info.takes("state_dtype")]


@pytest.mark.skipif(not allocated_bytes_supported(), reason="needs glibc's mallinfo2")
@pytest.mark.parametrize("name,options", ALLOCATING, ids=[f"{n}-{o}" for n, o in ALLOCATING])
def test_a_cpu_step_allocates_no_more_than_estimated(name, options):
    """Peak of the tensor bytes held during the first step (state, flat grads, the torch path's
    temporaries: torch.profiler, which leaves the step as it runs, where a dispatch mode would
    turn the compiled loop off) stays within the estimate's state + scratch (plus 64 KiB); and
    malloc holds at least the state afterwards (it really was allocated)."""
    n = 4 * 1024 * 1024
    p = torch.nn.Parameter(torch.randn(n))
    cls = getattr(fastopt, name)
    report = memory.estimate([p], cls, **options).devices["cpu"]
    opt = cls([p], **options)
    p.grad = torch.randn(n)
    gc.collect()
    before = allocated_bytes()
    peak = phase_peaks(lambda phase: opt.step())["peak"]
    after = allocated_bytes()
    assert peak <= report.new_bytes + 64 * 1024, (peak, report.new_bytes)
    assert after - before >= (report.state_bytes - state_at_construction(opt)) * 0.9


MASTERS = [(dtype, dict(master_weights=True, **state), n)
           for dtype in (torch.float16, torch.bfloat16)
           for state in ({}, dict(state_dtype=torch.bfloat16))
           for n in (1 << 19, 1 << 22)]


@pytest.mark.parametrize("dtype,options,n", MASTERS,
                         ids=[f"{d}-{o}-{n}" for d, o, n in MASTERS])
def test_half_params_with_fp32_masters_step_within_the_estimate(dtype, options, n):
    """Half-precision params with fp32 masters, fp32 or bf16 state, in a bucket that steps
    eagerly (512K elements; 4M fp16 ones with fp32 state) or through the compiled loop: a
    step's temporaries are the estimate's scratch (plus 64 KiB), and at least 90 % of it."""
    p = torch.nn.Parameter(torch.randn(n).to(dtype))
    report = memory.estimate([p], fastopt.AdamW, **options).devices["cpu"]
    opt = fastopt.AdamW([p], **options)
    p.grad = torch.randn(n).to(dtype)
    opt.step()  # the state (and a compile)
    p.grad = torch.randn(n).to(dtype)
    gc.collect()
    peak = phase_peaks(lambda phase: opt.step())["peak"]
    assert 0.9 * report.scratch_bytes <= peak <= report.scratch_bytes + 64 * 1024, (
        peak, report.scratch_bytes)


@pytest.mark.parametrize("compiled_step", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_small_quantized_params_stepped_together_stay_within_the_estimate(
        monkeypatch, state_dtype, compiled_step):
    """80 bf16 params of 4096 elements with quantized state and fresh grads: the torch path
    copies runs of their grads together (up to ``MERGE_LIMIT`` elements) and steps each run as
    one chunk, eagerly or through the compiled loops; the step's peak stays within the
    estimate's state + scratch, which counts that copy."""
    from fastopt import compiled

    if compiled_step and not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1 if compiled_step else 1 << 62)
    params = [torch.nn.Parameter(t.bfloat16()) for t in make_params([(4096,)] * 80, seed=1)]
    options = dict(state_dtype=state_dtype, stochastic_rounding=True)
    report = memory.estimate(params, fastopt.AdamW, **options).devices["cpu"]
    opt = fastopt.AdamW(params, **options)
    for p in params:
        p.grad = torch.randn(p.shape).bfloat16()
    opt.step()  # state (and compiles)
    for p in params:
        p.grad = torch.randn(p.shape).bfloat16()
    peak = phase_peaks(lambda phase: opt.step())["peak"]
    assert peak <= report.scratch_bytes + 64 * 1024, (peak, report.scratch_bytes)
    assert peak >= 4096 * 2 * 2, peak  # the grads of more than one param were copied


@pytest.mark.skipif(not allocated_bytes_supported(), reason="needs glibc's mallinfo2")
@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_quantized_state_on_a_cpu_holds_its_codes_scales_and_scalars_only(state_dtype):
    """After construction and a step, a CPU optimizer with quantized state holds its state as
    estimated (codes, a scale a block, the scalar table) and nothing more: no block table,
    the kernels' map of blocks (16 bytes a block: a sixteenth of the 8-bit codes' bytes),
    which the torch path does not use."""
    from fastopt import quantization

    n = 4 * 1024 * 1024
    fmt = quantization.FORMATS[state_dtype]
    # what a process makes once (the encoder's tables, the compiled loops) is not counted
    warm = torch.nn.Parameter(torch.randn(n))
    warm.grad = torch.randn(n)
    fastopt.AdamW([warm], state_dtype=state_dtype).step()
    del warm
    p = torch.nn.Parameter(torch.randn(n))
    gc.collect()
    before = allocated_bytes()
    opt = fastopt.AdamW([p], state_dtype=state_dtype)
    p.grad = torch.randn(n)
    opt.step()
    p.grad = None
    gc.collect()
    held = allocated_bytes() - before
    state = memory.estimate([p], fastopt.AdamW, state_dtype=state_dtype).state_bytes
    # (a few KiB that earlier tests' objects free meanwhile may show below the state)
    assert 0.99 * state <= held <= state + 16 * fmt.num_blocks(n) // 4, (held, state)


def state_at_construction(opt) -> int:
    """State an optimizer made before its first step (Adagrad's, as torch's)."""
    return sum(t.numel() * t.element_size() for b in opt._buckets[0]
               for t in b.state.tensors.values()) if opt.declaration.eager_state else 0


def test_named_params_bad_num_samples_and_a_missing_cuda():
    model = torch.nn.Linear(3, 2)
    # weight (6) and bias (2) in slots at 0 and 64 of a 128-element buffer
    assert memory.estimate(model.named_parameters(), "adam").state_bytes == 4 * 2 * 128 + memory.STEP_BYTES * 2
    for bad in (0, -3):
        with pytest.raises(ValueError, match="Invalid num_samples"):
            memory.estimate(model, "saga", num_samples=bad)
    if not torch.cuda.is_available():
        report = memory.estimate([torch.empty(10, device="meta", requires_grad=True)], "adamw",
                                 device="cuda")
        assert report.devices["cuda"].free_bytes is None and report.fits
