"""Master weights as remainders (``master_weights="remainder"`` / ``"remainder8"``): the bits a
bf16 param lacks of its fp32 master, kept in 2 (or 1) bytes a param. The split is exact (int16)
or within 255 units of the master's last bit (int8), the kernel's split is torch's bit for
bit, a remainder run's master is a ``master_weights=True`` run's master, and state_dicts carry
a plain fp32 ``master_param`` both ways."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, make_params, steppable
from optim_db import BY_NAME, NAMES

import fastopt
from fastopt.precision import rebuild_master, split_master

# Every optimizer that takes master weights as remainders, in its richest configuration.
CASES = {name: {**BY_NAME[name].typical, **BY_NAME[name].configs[-1][0]}
         for name in NAMES if BY_NAME[name].takes("master_weights") and name != "Adafactor"}
SHAPES = [(129,), (4, 5), (), (0,), (4097,)]


def special_values() -> torch.Tensor:
    """Random magnitudes over every binade, both signs, ties, subnormals, extremes, infs."""
    gen = torch.Generator().manual_seed(0)
    scales = 2.0 ** torch.randint(-149, 127, (100_000,), generator=gen).double()
    random = (torch.rand(100_000, generator=gen, dtype=torch.float64) + 1) * scales
    random = random.clamp(max=3.4e38).float() * torch.where(
        torch.rand(100_000, generator=gen) < 0.5, -1.0, 1.0)
    ties = (torch.arange(0x3F800000, 0x3F800000 + 64 * 0x10000, 0x10000, dtype=torch.int64)
            + 0x8000).to(torch.int32).view(torch.float32)  # exactly halfway between two bf16s
    edges = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 3.4e38, -3.4e38, float("inf"),
                          -float("inf")])
    return torch.cat([random, ties, -ties, edges])


def test_the_split_is_exact_and_the_param_is_the_nearest_bf16():
    values = special_values()
    param = torch.empty(values.shape, dtype=torch.bfloat16)
    remainder = torch.empty(values.shape, dtype=torch.int16)
    split_master(values, param, remainder)
    assert torch.equal(rebuild_master(param, remainder).view(torch.int32),
                       values.view(torch.int32))
    finite = values.isfinite() & param.isfinite()
    below = torch.nextafter(param.float(), torch.tensor(-float("inf"))).to(torch.bfloat16)
    error = (param.float() - values)[finite].abs()
    # nearest: no bf16 neighbour is closer (round to nearest even would differ on ties only)
    for neighbour in (below, torch.nextafter(param.float(), torch.tensor(float("inf"))).to(
            torch.bfloat16)):
        assert (error <= (neighbour.float() - values)[finite].abs()).all()
    near_even = param != values.to(torch.bfloat16)
    assert (values.view(torch.int32)[near_even] & 0xFFFF == 0x8000).all()  # ties only
    eight = torch.empty(values.shape, dtype=torch.int8)
    param8 = torch.empty_like(param)
    split_master(values, param8, eight)
    assert torch.equal(param8, param)
    rebuilt = rebuild_master(param8, eight)
    units = (rebuilt.view(torch.int32).long() - values.view(torch.int32).long())[finite].abs()
    assert units.max() <= 255


try:
    import triton
    import triton.language as tl

    from fastopt.kernels.rounding import rebuild_master as kernel_rebuild
    from fastopt.kernels.rounding import split_master as kernel_split

    @triton.jit
    def split_then_rebuild(values_ptr, params_ptr, rem16_ptr, rem8_ptr, back16_ptr, back8_ptr,
                           n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        value = tl.load(values_ptr + offsets, mask=mask)
        param, rem16 = kernel_split(value, tl.int16)
        _, rem8 = kernel_split(value, tl.int8)
        tl.store(params_ptr + offsets, param, mask=mask)
        tl.store(rem16_ptr + offsets, rem16, mask=mask)
        tl.store(rem8_ptr + offsets, rem8, mask=mask)
        tl.store(back16_ptr + offsets, kernel_rebuild(param, rem16), mask=mask)
        tl.store(back8_ptr + offsets, kernel_rebuild(param, rem8), mask=mask)
except ImportError:
    split_then_rebuild = None


def test_the_kernel_splits_and_rebuilds_as_torch_does():
    if split_then_rebuild is None:
        pytest.skip("needs the Triton interpreter")
    import triton

    nans = torch.tensor([0x7FC00000, 0x7FFF8000, -0x8000, 0x7FFFFFFF, -1],
                        dtype=torch.int32).view(torch.float32)  # payloads a carry would change
    values = torch.cat([special_values(), nans])
    n = values.numel()
    param, rem16, rem8 = (torch.empty(n, dtype=d) for d in (torch.bfloat16, torch.int16,
                                                           torch.int8))
    back16, back8 = torch.empty(n), torch.empty(n)
    split_then_rebuild[(triton.cdiv(n, 4096),)](values, param, rem16, rem8, back16, back8, n,
                                                BLOCK=4096)
    expected = {d: (torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=d))
                for d in (torch.int16, torch.int8)}
    for p, r in expected.values():
        split_master(values, p, r)
    assert torch.equal(param.view(torch.int16), expected[torch.int16][0].view(torch.int16))
    assert param[-5:].isnan().all()
    assert torch.equal(rem16, expected[torch.int16][1]) and torch.equal(rem8, expected[torch.int8][1])
    assert torch.equal(back16.view(torch.int32), rebuild_master(param, rem16).view(torch.int32))
    assert torch.equal(back8.view(torch.int32), rebuild_master(param, rem8).view(torch.int32))


def run(name, params, backend, steps, seed=0, opt=None, **options):
    opt = opt or getattr(fastopt, name)(params, backend=backend, **{**CASES[name], **options})
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(params):
            drop = (step + i) % 5 == 2
            p.grad = None if drop else torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return opt


def masters(opt, params) -> list:
    saved = opt.state_dict()["state"]
    return [saved[i]["master_param"] if i in saved else None for i in range(len(params))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_a_remainder_run_keeps_the_fp32_master_of_a_master_weights_run(name, backend):
    """bf16 params, 8 steps with params missing grads: the remainder's master equals
    ``master_weights=True``'s bit for bit, the param is always its master split, the state
    holds a 2-byte remainder and the state_dict a plain fp32 master; ``"remainder8"`` stays
    within 2**-15 of the largest master a step."""
    init = [t.bfloat16() for t in make_params(steppable(name, SHAPES), seed=4)]
    runs = {}
    for form in (True, "remainder", "remainder8"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        runs[form] = (params, run(name, params, backend, 8, master_weights=form))
    (full, full_opt), (ours, ours_opt) = runs[True], runs["remainder"]
    for p, q, a, b in zip(full, ours, masters(full_opt, full), masters(ours_opt, ours)):
        if a is None:
            assert b is None and torch.equal(p, q)
            continue
        assert b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))
        split = torch.empty_like(q)
        split_master(b, split, torch.empty(b.shape, dtype=torch.int16))
        assert torch.equal(q.detach(), split)
        remainder = ours_opt.state[q]["master_remainder"]
        assert remainder.dtype == torch.int16 and remainder.shape == q.shape
        assert "master_param" not in ours_opt.state[q]
    for a, b in zip(masters(full_opt, full), masters(*reversed(runs["remainder8"]))):
        if a is not None and a.numel():  # each split moves a master by 255 units of its last
            # bit at most, under 2**-15 of its magnitude; the updates do not amplify that
            error = (a - b).abs().max()
            assert error <= 8 * 2**-15 * a.abs().max(), (error, a.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["remainder", "remainder8"])
def test_state_dicts_go_both_ways_with_master_weights(form, backend):
    """A remainder run saved, loaded into ``master_weights=True``, saved again and loaded into
    a remainder run continues bit for bit as the uninterrupted run; switching the option
    mid-run keeps the master."""
    init = [t.bfloat16() for t in make_params([(4097,), (3, 5), (7,)], seed=5)]
    straight = [torch.nn.Parameter(t.clone()) for t in init]
    opt = run("AdamW", straight, backend, 3, master_weights=form)
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "master_param"}
    copies = [torch.nn.Parameter(p.detach().clone()) for p in straight]
    full = fastopt.AdamW(copies, backend=backend, **{**CASES["AdamW"], "master_weights": True})
    full.load_state_dict(saved)
    again = [torch.nn.Parameter(p.detach().clone()) for p in straight]
    ours = fastopt.AdamW(again, backend=backend, **{**CASES["AdamW"], "master_weights": form})
    ours.load_state_dict(full.state_dict())
    run("AdamW", straight, backend, 2, seed=1, opt=opt)
    run("AdamW", again, backend, 2, seed=1, opt=ours)
    for p, q in zip(straight, again):
        assert torch.equal(p, q)
    switched = [torch.nn.Parameter(t.clone()) for t in init]
    reference = [torch.nn.Parameter(t.clone()) for t in init]
    mixed = run("AdamW", switched, backend, 3, master_weights=True)
    mixed.param_groups[0]["master_weights"] = "remainder"
    run("AdamW", switched, backend, 2, seed=1, opt=mixed)
    whole = run("AdamW", reference, backend, 3, master_weights=True)
    run("AdamW", reference, backend, 2, seed=1, opt=whole)
    assert set(mixed.state[switched[0]]) == {"step", "exp_avg", "exp_avg_sq", "master_remainder"}
    for a, b in zip(masters(mixed, switched), masters(whole, reference)):
        assert torch.equal(a, b)


def test_remainders_are_refused_where_they_mean_nothing():
    fp16 = [torch.nn.Parameter(torch.ones(3, dtype=torch.float16))]
    bf16 = [torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="for float16 params use master_weights=True"):
        fastopt.AdamW(fp16, master_weights="remainder")
    with pytest.raises(ValueError, match="Invalid master_weights"):
        fastopt.AdamW(bf16, master_weights="remainder4")
    with pytest.raises(ValueError, match="use one or the other"):
        fastopt.AdamW(bf16, master_weights="remainder", stochastic_rounding=True)
    with pytest.raises(ValueError, match="use master_weights=True"):
        fastopt.Adafactor(bf16, master_weights="remainder")


@pytest.mark.parametrize("form,size", [("remainder", 2), ("remainder8", 1)])
def test_the_estimate_counts_a_remainder(form, size):
    params = [torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))]
    full = fastopt.memory.estimate(params, "adamw", master_weights=True).state_bytes
    lean = fastopt.memory.estimate(params, "adamw", master_weights=form).state_bytes
    assert full - lean == (4 - size) * 4096
    opt = fastopt.AdamW(params, master_weights=form)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert opt._buckets[0][0].state.tensors["master_remainder"].numel() * size \
        == 4096 * size
