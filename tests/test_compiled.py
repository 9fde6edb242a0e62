"""The widened Adam step compiled by inductor on the CPU (``fastopt.compiled``) and the merged
entries of small params (``fastopt.plan.merge_widened``): the same contracts as the eager
step (an fp32 torch.optim run for the master, bf16 state as fp32 math rounded once, the
documented rounding hash, remainders equal to masters), no temporaries, and the eager step
when no compiler works."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TOLERANCES, make_params

import fastopt
from benchmarks.cold_memory import phase_peaks
from fastopt import compiled, plan, precision

FP32 = TOLERANCES[torch.float32]
# Odd sizes, an empty and a 0-d param, and params small enough to step as one entry
SHAPES = [(129,), (4, 5), (), (0,), (4097,), (3000,), (7, 11)]


@pytest.fixture
def compile_small(monkeypatch):
    """Every widened Adam bucket on the CPU steps through the compiled loop."""
    if not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1)


def grads(params, gen, dtype):
    return [torch.randn(p.shape, generator=gen).to(dtype) for p in params]


def compiled_kinds(body: str = "_adam") -> set:
    """The kinds of ``body``'s loop compiled so far (none failed)."""
    assert not compiled._FAILED, compiled._FAILED
    return {key[3] for key in compiled._COMPILED if key[0] == body}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, options", [("AdamW", {}), ("Adam", dict(maximize=True))])
def test_compiled_master_weights_follow_an_fp32_torch_run(compile_small, monkeypatch, name,
                                                          options, dtype):
    """Half-precision params with fp32 masters, some params without grads some steps: the
    master equals torch.optim's fp32 run fed the same grads, the param is the master rounded
    (bf16 through the compiled loop, fp16 through the eager step, which is faster there)."""
    init = [t.to(dtype) for t in make_params(SHAPES, seed=3)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    fp32 = [torch.nn.Parameter(t.float()) for t in init]
    options = dict(lr=0.01, weight_decay=0.1, **options)
    ours = getattr(fastopt, name)(params, master_weights=True, backend="torch", **options)
    ref = getattr(torch.optim, name)(fp32, foreach=False, **options)
    loops = []  # the compiled loops this run calls: (body, its static arguments, dtypes)
    run = compiled._run
    monkeypatch.setattr(compiled, "_run", lambda body, static, *tensors: (
        loops.append((body.__name__, *static, tensors[0].dtype)), run(body, static, *tensors)))
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        for i, (p, q, g) in enumerate(zip(params, fp32, grads(params, gen, dtype))):
            p.grad, q.grad = (None, None) if (step + i) % 5 == 2 else (g, g.float())
        ours.step()
        ref.step()
        for p, q in zip(params, fp32):
            if p not in ours.state:  # no grad yet
                assert torch.equal(p.detach(), q.detach().to(dtype))
                continue
            master = ours.state[p]["master_param"]
            torch.testing.assert_close(master, q.detach(), **FP32)
            assert torch.equal(p.detach(), master.to(dtype))
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ours.state[p][key], ref.state[q][key], **FP32)
    # fp16: the eager step (faster than the loop's int16 check of the param)
    assert not compiled._FAILED, compiled._FAILED
    assert bool(loops) == (dtype == torch.bfloat16)
    assert all(loop[0] == "_adam" and loop[3] == "master" for loop in loops)


def test_compiled_bf16_state_is_fp32_math_rounded_once(compile_small):
    """``state_dtype=bf16``: torch.optim's fp32 step with the state rounded to bf16 after every
    step; a state value may land one bf16 step away where the fp32 results differ by an ulp
    across a rounding boundary (torch's fused op takes an FMA in its lerp)."""
    init = make_params(SHAPES, seed=4)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    twins = [torch.nn.Parameter(t.clone()) for t in init]
    ours = fastopt.AdamW(params, lr=0.01, weight_decay=0.1, state_dtype=torch.bfloat16,
                         backend="torch")
    ref = torch.optim.AdamW(twins, lr=0.01, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(1)
    mismatched = total = 0
    for _ in range(6):
        for p, q, g in zip(params, twins, grads(params, gen, torch.float32)):
            p.grad, q.grad = g, g.clone()
        ours.step()
        ref.step()
        for p, q in zip(params, twins):
            for key in ("exp_avg", "exp_avg_sq"):
                value = ref.state[q][key]
                value.copy_(value.to(torch.bfloat16))
                assert ours.state[p][key].dtype == torch.bfloat16
                mismatched += int((ours.state[p][key].float() != value).sum())
                total += value.numel()
                torch.testing.assert_close(ours.state[p][key].float(), value, rtol=2**-7, atol=0)
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert mismatched <= total * 1e-3, (mismatched, total)
    assert "nearest" in compiled_kinds()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_compiled_remainders_keep_the_master_of_a_master_weights_run(compile_small,
                                                                   monkeypatch, name,
                                                                   state_dtype):
    """``"remainder"``: the master rebuilt from param and remainder equals ``master_weights=
    True``'s bit for bit, every step (the same compiled math, split as ``split_master``
    splits: beside fp32 moments two elements a word, an odd last element alone; beside bf16
    ones the 70K-element param's int16 remainders stepped 16K elements a call, the last call
    a partial one), its param that of ``master_weights=True`` but at a tie (rounded away
    from zero, as ``split_master`` rounds); ``"remainder8"`` within 2**-15 of the largest
    master a step."""
    monkeypatch.setattr(compiled, "REMAINDER_SLICE", 1 << 14)
    bodies = set()  # the compiled loops this run calls
    run = compiled._run
    monkeypatch.setattr(compiled, "_run", lambda body, static, *tensors: (
        bodies.add(body.__name__), run(body, static, *tensors)))
    init = [t.bfloat16() for t in make_params(SHAPES + [(70_000,), (70_001,)], seed=5)]
    runs = {}
    gen = torch.Generator().manual_seed(2)
    steps = [grads(init, gen, torch.bfloat16) for _ in range(5)]
    for form in (True, "remainder", "remainder8"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = getattr(fastopt, name)(params, lr=0.01, weight_decay=0.1, master_weights=form,
                                     state_dtype=state_dtype, backend="torch")
        for step in steps:
            for p, g in zip(params, step):
                p.grad = g
            opt.step()
        saved = opt.state_dict()["state"]
        runs[form] = (params, [saved[i]["master_param"] for i in range(len(params))])
    (full, full_masters), (ours, ours_masters) = runs[True], runs["remainder"]
    for p, q, a, b in zip(full, ours, full_masters, ours_masters):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        tie = (a.view(torch.int32) & 0xFFFF) == 0x8000  # rounded away from zero by the split
        assert torch.equal(p[~tie], q[~tie])
        split = torch.empty_like(q)
        precision.split_master(b, split, torch.empty(b.shape, dtype=torch.int16))
        assert torch.equal(q.detach(), split)
    for a, b in zip(full_masters, runs["remainder8"][1]):
        if a.numel():
            assert (a - b).abs().max() <= 8 * 2**-15 * a.abs().max()
    assert {"master", "remainder16", "remainder8"} <= compiled_kinds()
    assert ("_adam_pairs" in bodies) == (state_dtype == torch.float32)


@pytest.mark.parametrize("start", [0, 2**31 - 3, 2**32 - 2])
@pytest.mark.parametrize("step", [1, 2**31 + 256, 2**32 - 256])
def test_the_compiled_noise_is_the_torch_paths_hash(start, step):
    """The compiled loop's rounding noise equals ``precision.rounding_noise`` (the documented
    hash) at offsets and steps past 2**31 and 2**32."""
    if not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    words = torch.tensor([precision.signed32(start),
                          precision.signed32(step * precision.STEP_MIX + 7 * precision.SEED_MIX)],
                         dtype=torch.int32)
    noise = torch.compile(lambda out, w: out.copy_(compiled._hash_noise(out.numel(), w)),
                          dynamic=True, fullgraph=True)(torch.empty(1000, dtype=torch.int32),
                                                        words)
    assert torch.equal(noise, precision.rounding_noise(7, torch.tensor(float(step)), start,
                                                       1000, "cpu"))


def every_kind_of_float(gen) -> torch.Tensor:
    """fp32 values of random bit patterns (nans of both signs and any payload, infinities,
    zeros, subnormals), every bf16 tie (the low 16 bits 0x8000) of some of them and its
    neighbours, and a few chosen ones."""
    bits = torch.randint(-2**31, 2**31, (1 << 14,), generator=gen, dtype=torch.int64)
    ties = (bits[:4096] & ~0xFFFF) | 0x8000
    special = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, -0x00400000, -1, 0x7F800000,
                            -0x00800000, 0, -2**31, 1, 0x007FFFFF, 0x7F7F8000, -0x00808000],
                           dtype=torch.int64)
    words = torch.cat([bits, ties, ties + 1, ties - 1, special])
    return words.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("kind", ["remainder8", "remainder16"])
def test_the_compiled_split_is_the_eager_split_bit_for_bit(kind):
    """The compiled loop splits an updated fp32 master into the bf16 param and its remainder
    as ``precision.split_master`` does, on every kind of float: random bit patterns, nans of
    both signs and any payload, infinities, zeros, subnormals, every tie (the low 16 bits
    0x8000) and their neighbours. (Where the eager param is a nan, the loop's is a nan with the
    payload its fp32-to-bf16 store gives; the remainder is the eager one everywhere.)"""
    if not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    value = every_kind_of_float(torch.Generator().manual_seed(5))
    remainder_dtype = torch.int16 if kind == "remainder16" else torch.int8
    param = torch.empty(value.shape, dtype=torch.bfloat16)
    remainder = torch.empty(value.shape, dtype=remainder_dtype)
    precision.split_master(value.clone(), param, remainder)

    def split(p, param_out, master_out, offsets_out):
        compiled._store(kind, p, param_out, master_out, offsets_out, None)

    param_out = torch.empty_like(param)
    master_out = torch.empty_like(remainder) if kind == "remainder8" else None
    offsets_out = torch.empty(value.shape, dtype=torch.int32) if kind == "remainder16" else None
    torch.compile(split, options=compiled._INDUCTOR, dynamic=False, fullgraph=True)(
        value, param_out, master_out, offsets_out)
    nan = param.isnan()  # (a nan master whose payload is all below the param's bits: inf)
    assert nan.any() and param_out[nan].isnan().all()
    assert torch.equal(param_out.view(torch.int16)[~nan], param.view(torch.int16)[~nan])
    got = master_out if kind == "remainder8" else offsets_out.to(torch.int16)
    assert torch.equal(got, remainder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_compiled_loop_follows_a_changed_param_bit_for_bit(dtype):
    """The compiled loop starts from the fp32 master where the param is its master rounded
    (compared as bits), else from the param, on every kind of float: random bit patterns
    (nans, infinities, zeros, subnormals), every bf16 tie and its neighbours, params changed
    outside. (A nan master is a nan either way: the loop takes the param's nan, where
    comparing its conversion's bits might take the master's, whose bits differ by CPU.)"""
    if not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    gen = torch.Generator().manual_seed(6)
    master = every_kind_of_float(gen)
    param = master.to(dtype)
    param[::5] = torch.randn(param[::5].shape, generator=gen).to(dtype)  # changed outside
    param[::7] = -param[::7]
    want = torch.where(master.to(dtype).view(torch.int16) != param.view(torch.int16),
                       param.float(), master)
    got = torch.empty_like(master)
    torch.compile(lambda m, p, out: out.copy_(compiled._load("master", p, m)),
                  options=compiled._INDUCTOR, dynamic=False, fullgraph=True)(master, param, got)
    both_nan = got.isnan() & want.isnan()
    assert both_nan.any()
    assert ((got.view(torch.int32) == want.view(torch.int32)) | both_nan).all()


LEAN_SR = dict(state_dtype=torch.bfloat16, stochastic_rounding=True, rounding_seed=3)


def stochastic_run(params, steps: int, options=LEAN_SR):
    opt = fastopt.AdamW(params, lr=0.01, weight_decay=0.1, backend="torch", **options)
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for p, g in zip(params, grads(params, gen, params[0].dtype)):
            p.grad = g
        opt.step()
    return opt


def test_compiled_stochastic_rounding_rounds_as_the_eager_step(monkeypatch):
    """The same noise, the same fp32 math up to an ulp: the compiled run's bf16 params and
    state equal the eager run's but where an ulp crossed a rounding boundary (a few in 10**5),
    and there by one bf16 step."""
    if not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    init = [t.bfloat16() for t in make_params(SHAPES + [(100_000,)], seed=6)]
    runs = []
    for smallest in (1 << 62, 1):  # eager, then compiled
        monkeypatch.setattr(compiled, "MIN_ELEMENTS", smallest)
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = stochastic_run(params, 6)
        runs.append([params] + [[opt.state[p][k] for p in params]
                                for k in ("exp_avg", "exp_avg_sq")])
    assert "stochastic" in compiled_kinds()
    differ = total = 0
    for eager, ours in zip(*runs):
        for a, b in zip(eager, ours):
            unequal = a != b
            differ += int(unequal.sum())
            total += a.numel()
            torch.testing.assert_close(b.detach().float(), a.detach().float(), rtol=2**-7,
                                       atol=FP32["atol"])
    assert differ <= total * 1e-4, (differ, total)


# Quantized params (4096 elements and more): whole blocks, a partial last block, a param that
# shares a chunk with the ones before it; and small ones that keep fp32 state.
QUANTIZED_SHAPES = [(4096,), (64, 100), (5000,), (3, 4099), (300,), (8192,), (129,)]
QUANTIZED = [(torch.float32, "AdamW", dict(state_dtype="int8")),
             (torch.float32, "Adam", dict(state_dtype="int4", maximize=True)),
             (torch.bfloat16, "AdamW", dict(state_dtype="int8", stochastic_rounding=True)),
             (torch.bfloat16, "AdamW", dict(state_dtype="int4", master_weights=True)),
             (torch.float16, "Adam", dict(state_dtype="int8", master_weights=True)),
             (torch.bfloat16, "AdamW", dict(state_dtype="int8", master_weights="remainder")),
             (torch.bfloat16, "Adam", dict(state_dtype="int4", master_weights="remainder8"))]


def quantized_run(name: str, dtype, options: dict, steps: int = 6):
    """``steps`` steps of fresh grads (a param without one every few steps) -> params, opt."""
    gen = torch.Generator().manual_seed(8)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
              for s in QUANTIZED_SHAPES]
    opt = getattr(fastopt, name)(params, lr=0.01, weight_decay=0.1, backend="torch", **options)
    for step in range(steps):
        for i, (p, g) in enumerate(zip(params, grads(params, gen, dtype))):
            p.grad = None if (step + i) % 4 == 3 else g
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype, name, options", QUANTIZED,
                         ids=[f"{n}-{d}-{o}" for d, n, o in QUANTIZED])
def test_compiled_quantized_state_steps_as_the_eager_step(monkeypatch, dtype, name, options):
    """Quantized moments through the compiled loops (whole blocks; a last partial block
    eagerly) against the eager step: the same decoding, fp32 math and encoding, up to the
    FMAs a compiler forms. Codes and scales equal but where an fp32 ulp moved a value across a
    code boundary (at most 1 in 500), params equal to fp32 (or their dtype's) tolerance but
    where such a code moved a step (by less than lr, plus a last bit of a half param)."""
    if not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    runs = []
    bodies = set()  # the compiled loops the compiled run calls
    run = compiled._run
    monkeypatch.setattr(compiled, "_run", lambda body, static, *tensors: (
        bodies.add(body.__name__), run(body, static, *tensors)))
    for smallest in (1 << 62, 1):  # eager, then compiled
        monkeypatch.setattr(compiled, "MIN_ELEMENTS", smallest)
        runs.append(quantized_run(name, dtype, options))
    quads = options.get("master_weights") == "remainder" and options["state_dtype"] == "int8"
    quantized = {"_new_scales", "_quantized_quads"} if quads else {"_quantized_adam"} | (
        {"_requantize"} if options.get("master_weights") else set())  # the param stored twice
    assert bodies - {"_adam", "_adam_pairs"} == quantized, bodies  # (small params: fp32 state)
    (eager, eager_opt), (ours, ours_opt) = runs
    tolerance = FP32 if dtype == torch.float32 else TOLERANCES[dtype]
    differ = total = 0
    for p, q in zip(eager, ours):
        state, mine = eager_opt.state[p], ours_opt.state[q]
        assert state.keys() == mine.keys()
        for key, value in state.items():
            if value.dtype == torch.uint8:  # codes
                differ += int((value != mine[key]).sum())
                total += value.numel()
            elif key.endswith("absmax"):
                torch.testing.assert_close(mine[key], value, rtol=2**-6, atol=0)
        far = ~torch.isclose(q.detach().float(), p.detach().float(), **tolerance)
        assert int(far.sum()) <= max(2, p.numel() // 500), (p.shape, int(far.sum()))
        ulp = torch.finfo(dtype).eps if dtype != torch.float32 else 0  # a half param's last bit
        torch.testing.assert_close(q.detach().float(), p.detach().float(), rtol=ulp, atol=0.01)
    assert differ <= total // 500, (differ, total)


@pytest.mark.parametrize("options", [dict(), dict(state_dtype="int8")], ids=["fp32", "int8"])
def test_compiled_masters_follow_a_param_changed_outside(monkeypatch, options):
    """A bf16 param that something outside the optimizer changed (a clamp, a loaded value):
    the compiled step starts from the param's value there, as the eager step does
    (``precision.follow_param``), and from the fp32 master everywhere else."""
    if not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    init = torch.randn(8192).bfloat16()
    runs = []
    for smallest in (1 << 62, 1):  # eager, then compiled
        monkeypatch.setattr(compiled, "MIN_ELEMENTS", smallest)
        param = torch.nn.Parameter(init.clone())
        opt = fastopt.AdamW([param], lr=0.01, master_weights=True, backend="torch", **options)
        gen = torch.Generator().manual_seed(9)
        for step in range(3):
            param.grad = torch.randn(param.shape, generator=gen).bfloat16()
            opt.step()
            if step == 0:
                with torch.no_grad():
                    param[:100] = 3.0
        runs.append((param.detach().clone(), opt.state[param]["master_param"].clone()))
    (eager, eager_master), (ours, ours_master) = runs
    assert (ours_master[:100] - 3.0).abs().max() < 0.1  # stepped from 3, not the old master
    torch.testing.assert_close(ours_master, eager_master, **FP32)
    torch.testing.assert_close(ours, eager, **TOLERANCES[torch.bfloat16])


def test_a_compiled_step_allocates_no_temporaries(compile_small):
    """A compiled step of a 4M-element bf16 param with bf16 state and stochastic rounding
    allocates under 1 % of the param's bytes (torch.profiler; the eager step: 20 bytes per
    element of a 256K-element slice), and so does its int16 remainders' version beside fp32
    moments (two elements a word); beside bf16 moments a 1M-element int32 copy of them;
    quantized state's, the fp32 moments of a 256K-element slice (inside its one compiled
    call, or between its two where the param is stored twice), but beside int16 remainders
    and 8-bit moments only the slice's new scales (``compiled.scratch_bytes``)."""
    for options in (dict(state_dtype=torch.bfloat16, stochastic_rounding=True),
                    dict(master_weights="remainder"),
                    dict(master_weights="remainder", state_dtype=torch.bfloat16),
                    dict(state_dtype="int8", stochastic_rounding=True),
                    dict(state_dtype="int8", master_weights="remainder"),
                    dict(state_dtype="int4", master_weights="remainder")):
        param = torch.nn.Parameter(torch.randn(1 << 22).bfloat16())
        opt = fastopt.AdamW([param], backend="torch", **options)
        param.grad = torch.randn(param.shape).bfloat16()
        opt.step()  # state and compile
        peak = phase_peaks(lambda phase: opt.step())["peak"]
        allowed = compiled.scratch_bytes(options, param.numel())
        assert allowed <= peak < allowed + 0.01 * param.numel() * 2, (options, peak)


@pytest.mark.parametrize("options", [LEAN_SR, dict(state_dtype="int8", stochastic_rounding=True,
                                                    rounding_seed=3)], ids=["bf16", "int8"])
def test_a_failed_compile_leaves_the_eager_step(monkeypatch, options):
    """A compiler that fails: one warning, the eager step's result, and the eager step from
    then on (nothing half written)."""
    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(compiled, "_FAILED", [])
    compiled.available.cache_clear()
    monkeypatch.setattr(compiled, "available", lambda: True)

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    init = [t.bfloat16() for t in make_params(SHAPES, seed=7)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    with pytest.warns(RuntimeWarning, match="compiling the CPU step failed"):
        stochastic_run(params, 1, options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stochastic_run(params, 2, options)
    assert not compiled.takes(options, torch.bfloat16, 1 << 30, "cpu")
    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1 << 62)
    eager = [torch.nn.Parameter(t.clone()) for t in init]
    stochastic_run(eager, 1, options)
    stochastic_run(eager, 2, options)
    for a, b in zip(params, eager):
        assert torch.equal(a, b)


def int8_step(master_weights) -> tuple:
    """One AdamW step of a bf16 param of 2 x 4096 elements (one slice of 32 whole blocks)
    with int8 state -> (param, its state)."""
    init = torch.randn(2, 4096, generator=torch.Generator().manual_seed(3)).bfloat16()
    param = torch.nn.Parameter(init)
    opt = fastopt.AdamW([param], lr=0.01, weight_decay=0.1, backend="torch",
                        state_dtype="int8", master_weights=master_weights)
    param.grad = torch.randn(init.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    opt.step()
    return param, opt.state[param]


def fail_to_compile(monkeypatch, failing_body) -> None:
    """From now on, compiling ``failing_body`` fails (as without a working compiler)."""
    monkeypatch.setattr(compiled, "_FAILED", [])
    run = compiled._run

    def failing(body, static, *tensors):
        if body is failing_body:
            raise RuntimeError("no compiler")
        return run(body, static, *tensors)

    monkeypatch.setattr(compiled, "_run", failing)


def test_a_failed_second_call_finishes_its_slice_eagerly(monkeypatch):
    """Where the param is stored twice (here with its fp32 master), a quantized slice takes
    two compiled calls: when the second one (the codes) fails to compile after the first
    wrote the param, the slice's codes are made eagerly from the same moments (one warning),
    so the step is the compiled one bit for bit; later slices step eagerly."""
    if not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1)
    whole, whole_state = int8_step(True)
    assert not compiled._FAILED
    fail_to_compile(monkeypatch, compiled._requantize)
    with pytest.warns(RuntimeWarning, match="compiling the CPU step failed"):
        param, state = int8_step(True)
    assert len(compiled._FAILED) == 1
    assert torch.equal(param, whole)
    assert state.keys() == whole_state.keys()
    for key, value in state.items():
        assert torch.equal(value, whole_state[key]), key
    assert not compiled.takes(dict(state_dtype="int8"), torch.bfloat16, 1 << 30, "cpu")


def test_a_failed_quads_call_leaves_its_slice_to_the_eager_step(monkeypatch):
    """Int16 remainders with 8-bit moments take two compiled calls, the first writing only
    the new scales (``_new_scales``): when the second (``_quantized_quads``) fails to
    compile, nothing of the slice is written and the eager step takes it: the step is the
    eager one bit for bit (one warning)."""
    if not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    eager, eager_state = int8_step("remainder")  # MIN_ELEMENTS: this small a bucket is eager
    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1)
    fail_to_compile(monkeypatch, compiled._quantized_quads)
    with pytest.warns(RuntimeWarning, match="compiling the CPU step failed"):
        param, state = int8_step("remainder")
    assert len(compiled._FAILED) == 1
    assert torch.equal(param, eager)
    assert state.keys() == eager_state.keys()
    for key, value in state.items():
        assert torch.equal(value, eager_state[key]), key


def test_fp16_masters_with_fp32_state_take_the_eager_step():
    """The loop's check of an fp16 param against its master is int16 code (scalar, slower
    than the eager step with fp32 state); with quantized state the loops are still the
    faster, but not for a quantized group's params too small to be quantized."""
    if not compiled.available():
        pytest.skip("no C++ compiler for inductor")
    big, int8 = 1 << 30, dict(master_weights=True, state_dtype="int8")
    assert not compiled.takes(dict(master_weights=True), torch.float16, big, "cpu")
    assert compiled.takes(int8, torch.float16, big, "cpu", quantized=True)
    assert not compiled.takes(int8, torch.float16, big, "cpu", quantized=False)
    assert compiled.takes(dict(master_weights=True, state_dtype=torch.bfloat16), torch.float16,
                          big, "cpu")
    assert compiled.takes(dict(master_weights=True), torch.bfloat16, big, "cpu")


def test_fastopt_compile_0_turns_the_compiled_step_off(monkeypatch):
    monkeypatch.setenv("FASTOPT_COMPILE", "0")
    compiled.available.cache_clear()
    try:
        assert not compiled.available()
        assert not compiled.takes(dict(master_weights=True), torch.bfloat16, 1 << 30, "cpu")
    finally:
        compiled.available.cache_clear()


def test_small_params_merge_into_entries_of_bounded_size():
    """``merge_spans``: runs of small params up to ``WIDENED_MERGE`` elements, a large param
    alone, every param in exactly one entry."""
    sizes = [10, 5000, 1 << 17, 7, 7, (1 << 16), (1 << 16), (1 << 16), (1 << 16), 3, 0]
    from fastopt.flat import aligned_offsets
    starts, ends, _ = aligned_offsets(sizes)
    spans = plan.merge_spans(starts, ends)
    assert spans == [(0, 2), (2, 3), (3, 8), (8, 11)]
    for lo, hi in spans:
        assert hi - lo == 1 or ends[hi - 1] - starts[lo] <= plan.WIDENED_MERGE


def test_merged_entries_carry_their_grads_with_zeros_between():
    """A widened step's plan for fresh grads: back-to-back small params in one entry whose grad
    is theirs in their slots and zeros in the padding between them; the step keeps the
    flat buffers' padding zero."""
    params = [torch.nn.Parameter(t.bfloat16()) for t in make_params([(5,), (3, 3), (70,)])]
    opt = fastopt.AdamW(params, master_weights=True, backend="torch")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    bucket = opt._buckets[0][0]
    chunks = [plan.Chunk(i, i + 1, s, e, p.grad, None)
              for i, (s, e, p) in enumerate(zip(bucket.starts, bucket.ends, params))]
    merged = plan.merge_widened(plan.StepPlan(bucket, "chunks", [[0, 3, None]], None, chunks),
                                opt.param_groups[0])
    (entry,) = merged.chunks
    assert (entry.start, entry.end) == (bucket.starts[0], bucket.ends[2])
    expected = torch.zeros(entry.end - entry.start, dtype=torch.bfloat16)
    for s, e in zip(bucket.starts, bucket.ends):
        expected[s - entry.start : e - entry.start] = 1
    assert torch.equal(entry.grad, expected)
