"""Blockwise quantized moments (``state_dtype="int8"`` and ``"int4"``, fastopt.quantization):
layout and state_dict, tracking fp32 AdamW, the kernel against the torch path, the encoders on
every boundary, resume and interchange, inf steps, the error bound per block."""

import io

import pytest
import torch
from helpers import BACKENDS, TOLERANCES, make_params, reference_step

import fastopt
from fastopt import quantization
from fastopt.quantization import FORMATS

FP32 = TOLERANCES[torch.float32]
QUANTIZED_SHAPES = [(5000,), (64, 100), (10,), (4097,), (4096,), (4095,), (0,), (300, 257),
                    (4099,)]
# How far a param may end from fp32 AdamW's after 20 steps of noise, as a fraction of how far
# fp32 AdamW moved it: 8-bit, every element (the largest difference against the largest
# move); 4-bit, the whole param (the norms): its exp_avg rounds to within 11 % of its block's
# largest (the widest gap, 0.225, halved), and pure-noise grads keep exp_avg near zero where
# that is largest relative to it (measured: 0.21 of the norm, 0.35-0.65 of the largest move).
TRACKING = {"int8": (float("inf"), 0.05), "int4": (2, 0.3)}


def quantized_shapes(backend):
    """The interpreter runs a program at a time: smaller tensors there (still quantized ones,
    an odd count among them)."""
    if backend == "torch":
        return QUANTIZED_SHAPES
    return [(5000,), (10,), (4097,), (0,), (4096,)]


def quantized_run(backend, fmt, steps=12, init=None, opt=None, params=None, gen=None, first=0,
                  **kwargs):
    init = init if init is not None else make_params(quantized_shapes(backend), seed=9)
    params = params if params is not None else [torch.nn.Parameter(t.clone()) for t in init]
    opt = opt or fastopt.AdamW(params, lr=1e-3, state_dtype=fmt, backend=backend, **kwargs)
    gen = gen or torch.Generator().manual_seed(5)
    for step in range(first, first + steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad = None if (step + i) % 6 == 4 else g  # now and then a param without a grad
        opt.step()
    return opt, params


def worst_error(signed, fmt):
    """The largest decoding error over the block's scale: half the table's widest gap, or the
    distance from -1 to the lowest entry (4-bit's signed table ends at -0.8875)."""
    table = torch.tensor(quantization.code_table(signed, fmt), dtype=torch.float64)
    edge = float(table[0] + 1) if signed else 0.0
    return max(float((table[1:] - table[:-1]).max()) / 2, edge) * (1 + 1e-6)


def decoded(state, fmt, shape):
    """(exp_avg, exp_avg_sq) of a param's quantized state, as fp32."""
    m = quantization.dequantize(state["exp_avg"], state["exp_avg_absmax"], True, fmt, shape)
    root = quantization.dequantize(state["exp_avg_sq"], state["exp_avg_sq_absmax"], False, fmt,
                                   shape)
    return m, root * root


@pytest.mark.parametrize("name", FORMATS)
def test_state_layout_and_plain_tensor_state_dict(name):
    fmt = FORMATS[name]
    opt, params = quantized_run("torch", name, steps=2)
    for p in params:
        state = opt.state[p]
        if p.numel() >= 4096:
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.uint8
            expected = p.shape if name == "int8" else ((p.numel() + 1) // 2,)
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == expected
            assert state["exp_avg_absmax"].shape == (-(-p.numel() // fmt.block),)
        elif p in opt.state:  # small tensors keep fp32 moments
            assert state["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in state
    bucket = next(b for b in opt._buckets[0] if b.variant == name)
    assert bucket.state.tensors["exp_avg"].numel() == bucket.numel // fmt.per_byte
    saved = opt.state_dict()
    for entry in saved["state"].values():
        assert all(type(v) is torch.Tensor for v in entry.values())  # no tensor subclasses
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FORMATS)
def test_quantized_state_tracks_fp32_adamw(name, backend):
    init = make_params(quantized_shapes(backend), seed=9)
    opt, params = quantized_run(backend, name, steps=20, init=init)
    twins = [torch.nn.Parameter(t.clone()) for t in init]
    ref = torch.optim.AdamW(twins, lr=1e-3)
    gen = torch.Generator().manual_seed(5)
    for step in range(20):
        for i, q in enumerate(twins):
            g = torch.randn(q.shape, generator=gen)
            q.grad = None if (step + i) % 6 == 4 else g
        reference_step(ref, backend)
    for p, q, start in zip(params, twins, init):
        if p.numel() == 0:
            continue
        order, bound = TRACKING[name]
        moved = torch.linalg.vector_norm(q.detach() - start, order)
        error = torch.linalg.vector_norm(p.detach() - q.detach(), order)
        if p.numel() < 4096:
            torch.testing.assert_close(p.detach(), q.detach(), **FP32)
        else:
            assert error <= bound * moved, (tuple(p.shape), float(error), float(moved))


@pytest.mark.parametrize("name", FORMATS)
def test_kernel_matches_the_torch_path(name):
    """The kernel and the torch path compute the same fp32 math up to an ulp; a value that
    lands on a code boundary may then take the neighbouring code: the params agree to 1e-4,
    and for all but 0.1 % of the elements within fp32 tolerance. Codes of both are equal but
    for such boundary cases (and the odd last element's nibble is zero in both)."""
    if "triton" not in BACKENDS:
        pytest.skip("needs the Triton interpreter")
    init = make_params(quantized_shapes("triton"), seed=9)
    by_torch_opt, by_torch = quantized_run("torch", name, init=init)
    opt, by_triton = quantized_run("triton", name, init=init)
    assert any(b.variant == name and b.backend == "triton" for b in opt._buckets[0])
    differing = total = codes_differing = codes = 0
    for p, q in zip(by_torch, by_triton):
        close = torch.isclose(p.detach(), q.detach(), **FP32)
        differing, total = differing + int((~close).sum()), total + close.numel()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-4)
        if p.numel() >= 4096:
            for key in ("exp_avg", "exp_avg_sq"):
                mine, theirs = opt.state[q][key], by_torch_opt.state[p][key]
                codes_differing += int((mine != theirs).sum())
                codes += mine.numel()
            if p.numel() % 2 and name == "int4":
                assert int(opt.state[q]["exp_avg"][-1]) >> 4 == 0
    assert differing <= 1e-3 * total, (differing, total)
    assert codes_differing <= 1e-3 * codes, (codes_differing, codes)


try:  # the kernel's encoders on their own (the interpreter reads this module's globals)
    import triton
    import triton.language as tl

    from fastopt.kernels.adam_int8 import _nearest, _nearest16

    @triton.jit
    def _encode(x_ptr, midpoints_ptr, guesses_ptr, out_ptr, n, SIGNED: tl.constexpr,
                BITS: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
        if BITS == 8:
            midpoints = tl.load(midpoints_ptr + tl.arange(0, 256))
            guesses = tl.load(guesses_ptr + tl.arange(0, 4096))
            code = _nearest(x, midpoints, guesses, SIGNED)
        else:
            code = _nearest16(x, tl.load(midpoints_ptr + tl.arange(0, 16)),
                              tl.load(guesses_ptr + tl.arange(0, 4096)))
        tl.store(out_ptr + offsets, code, mask=offsets < n)
except ImportError:
    _encode = None


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("signed", [True, False])
def test_kernel_encoder_equals_bucketize_on_every_boundary(signed, name):
    """The kernel's encoder (8-bit: a guess from the table's formula, settled by two midpoints;
    4-bit: a count from the value's range, settled by one) gives torch.bucketize's code for every midpoint, the floats
    either side of it, every table value and a sweep over nine decades, both signs."""
    if "triton" not in BACKENDS:
        pytest.skip("needs the Triton interpreter")
    import triton

    from fastopt.kernels import adam_int8

    fmt = FORMATS[name]
    values, midpoints = quantization.tables(signed, torch.device("cpu"), fmt)
    sweep = torch.logspace(-9, 0, 20000, dtype=torch.float64).float()
    x = torch.cat([midpoints, torch.nextafter(midpoints, torch.tensor(2.0)),
                   torch.nextafter(midpoints, torch.tensor(-2.0)), values, sweep,
                   torch.tensor([0.0, 1.0, 1e-30, 5e-8])])
    x = torch.cat([x, -x]) if signed else x.clamp(0, 1)
    out = torch.empty(x.numel(), dtype=torch.int32)
    _, padded, guesses = adam_int8.kernel_tables(signed, torch.device("cpu"), fmt)
    block = 4096
    _encode[(triton.cdiv(x.numel(), block),)](x, padded, guesses, out, x.numel(),
                                              SIGNED=signed, BITS=fmt.bits, BLOCK=block)
    expected = torch.bucketize(x, midpoints).to(torch.int32)
    wrong = (out != expected).nonzero().flatten()
    assert wrong.numel() == 0, [(x[i].item(), out[i].item(), expected[i].item())
                                for i in wrong[:5]]


@pytest.mark.parametrize("name", FORMATS)
def test_torch_encoder_on_every_boundary(name):
    """quantize -> dequantize on values placed on, and a float either side of, every midpoint
    (times the block's scale): each decodes to the nearest table entry, a midpoint itself to
    the lower one; 4-bit codes pack two to a byte, low nibble first."""
    fmt = FORMATS[name]
    for signed in (True, False):
        values, midpoints = quantization.tables(signed, torch.device("cpu"), fmt)
        x = torch.cat([midpoints, torch.nextafter(midpoints, torch.tensor(2.0)),
                       torch.nextafter(midpoints, torch.tensor(-2.0)), values])
        x = x.clamp(-1, 1) if signed else x.clamp(0, 1)
        # each block led by its largest, 1: every scale is 1 exactly
        x = torch.cat([torch.cat([torch.ones(1), part]) for part in x.split(fmt.block - 1)])
        codes, scales = quantization.quantize(x, signed, fmt)
        assert torch.equal(scales, torch.ones_like(scales))
        expected = torch.bucketize(x, midpoints)
        unpacked = quantization.unpack(codes, x.numel(), fmt)
        assert torch.equal(unpacked, expected)
        assert torch.equal(quantization.dequantize(codes, scales, signed, fmt, x.shape),
                           values[expected])
        if name == "int4":
            assert codes.numel() == (x.numel() + 1) // 2
            assert torch.equal(codes[:4].long(), expected[0:8:2] | (expected[1:8:2] << 4))


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("piece", [1 << 16, 512], ids=["one-piece", "many-pieces"])
def test_both_moments_encoder_and_decoder_on_every_boundary(name, piece, monkeypatch):
    """The CPU slice's encoder of both moments at once (``encode_moments``, its int32 lookups
    a piece at a time) gives torch.bucketize's codes for every midpoint, a float either side
    of it, every table value, a sweep over nine decades, zeros of both signs, for exp_avg's
    signed table and sqrt(exp_avg_sq)'s unsigned one side by side; 4-bit codes two to a byte
    as ``pack`` makes them. ``decode_moments`` gives ``dequantize``'s values, zero past the
    elements it was given (an odd count of 4-bit ones included)."""
    monkeypatch.setattr(quantization, "ENCODE_PIECE", piece)
    fmt = FORMATS[name]
    rows, expected = [], []
    for signed in (True, False):
        values, midpoints = quantization.tables(signed, torch.device("cpu"), fmt)
        sweep = torch.logspace(-9, 0, 3000, dtype=torch.float64).float()
        x = torch.cat([midpoints, torch.nextafter(midpoints, torch.tensor(2.0)),
                       torch.nextafter(midpoints, torch.tensor(-2.0)), values, sweep,
                       torch.tensor([0.0, -0.0, 1.0, 1e-30])])
        x = torch.cat([x, -x]).clamp(-1, 1) if signed else x.clamp(0, 1)
        rows.append(x)
        expected.append(torch.bucketize(x, midpoints))
    n = max(r.numel() for r in rows)
    n += -n % fmt.block
    normalized = torch.stack([torch.nn.functional.pad(r, (0, n - r.numel())) for r in rows])
    codes = quantization.encode_moments(normalized.clone(), fmt)
    assert codes.shape == (2, fmt.code_bytes(n)) and codes.dtype == quantization.CODES
    for row, (x, want) in enumerate(zip(rows, expected)):
        got = quantization.unpack(codes[row], n, fmt)[: x.numel()]
        assert torch.equal(got, want.int()), (row, (got != want).nonzero()[:5].flatten())
        assert torch.equal(codes[row], quantization.pack(quantization.encode(
            normalized[row], row == 0, fmt), fmt))
    scales = torch.rand(2, fmt.num_blocks(n)) + 0.5
    for count in (n, n - fmt.block + 3):
        count -= count % 2 if fmt.bits == 8 else 0
        decoded = quantization.decode_moments(codes[0, : fmt.code_bytes(count)],
                                              codes[1, : fmt.code_bytes(count)],
                                              scales[:, : fmt.num_blocks(count)], fmt, count)
        assert decoded.shape == (2, fmt.num_blocks(count) * fmt.block)
        for row in range(2):
            want = quantization.dequantize(codes[row, : fmt.code_bytes(count)],
                                           scales[row, : fmt.num_blocks(count)], row == 0, fmt,
                                           (count,))
            assert torch.equal(decoded[row, :count], want)
            assert not decoded[row, count:].any()


@pytest.mark.parametrize("name", FORMATS)
def test_kernel_leaves_slot_padding_alone_after_a_resume(name):
    """A param's short last block followed by its slot's padding is not a whole block: the
    kernel must not update the padding (whose codes a resumed state leaves at 0, which decodes
    to the table's lowest entry x the block scale) nor count it in the block's scale."""
    if "triton" not in BACKENDS:
        pytest.skip("needs the Triton interpreter")

    def run(backend):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (4297, 8192)]
        make = lambda: fastopt.AdamW(params, lr=0.01, weight_decay=0.0,  # noqa: E731
                                     state_dtype=name, backend=backend)
        opt = make()
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
        opt.step()
        saved = io.BytesIO()
        torch.save(opt.state_dict(), saved)
        saved.seek(0)
        opt = make()
        opt.load_state_dict(torch.load(saved))
        for step in range(3):
            generator = torch.Generator().manual_seed(2 + step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator) * 1e-3
            opt.step()
        bucket = opt._buckets[0][0]
        padding = bucket.flat[bucket.ends[0]:bucket.starts[1]]
        return params, opt, padding

    by_torch, torch_opt, torch_padding = run("torch")
    by_triton, triton_opt, triton_padding = run("triton")
    assert torch.count_nonzero(triton_padding) == 0 == torch.count_nonzero(torch_padding)
    for p, q in zip(by_torch, by_triton):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-4)
        torch.testing.assert_close(triton_opt.state[q]["exp_avg_absmax"],
                                   torch_opt.state[p]["exp_avg_absmax"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FORMATS)
def test_resume_is_bit_identical_and_loads_fp32_checkpoints(name, backend):
    fmt = FORMATS[name]
    init = make_params(quantized_shapes(backend), seed=9)
    straight, _ = quantized_run(backend, name, steps=6, init=init)
    first, params = quantized_run(backend, name, steps=3, init=init)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    second = fastopt.AdamW(copies, lr=1e-3, state_dtype=name, backend=backend)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    gen = torch.Generator().manual_seed(5)
    quantized_run(backend, name, steps=3,  # advance the generator past the first 3 steps
                  params=[torch.nn.Parameter(p.detach().clone()) for p in init], gen=gen)
    quantized_run(backend, name, steps=3, opt=second, params=copies, gen=gen, first=3)
    for p, q in zip(straight.param_groups[0]["params"], copies):
        assert torch.equal(p, q)
        if p in straight.state:
            for key, value in straight.state[p].items():
                assert torch.equal(second.state[q][key], value), key
    # An fp32 checkpoint (torch.optim's) is encoded on load: decoding gives it back within
    # the format's worst error times the block's scale.
    twins = [torch.nn.Parameter(t.clone()) for t in init]
    ref = torch.optim.AdamW(twins, lr=1e-3)
    for q in twins:
        q.grad = torch.randn_like(q)
    reference_step(ref, backend)
    ours = fastopt.AdamW([torch.nn.Parameter(q.detach().clone()) for q in twins], lr=1e-3,
                         state_dtype=name, backend=backend)
    ours.load_state_dict(ref.state_dict())
    ours.step()  # (no grads: the loaded state is taken into the layout, nothing updated)
    for p, q in zip(ours.param_groups[0]["params"], twins):
        if p.numel() >= 4096:
            m, v = decoded(ours.state[p], fmt, p.shape)
            for signed, mine, theirs in ((True, m, ref.state[q]["exp_avg"]),
                                         (False, v.sqrt(), ref.state[q]["exp_avg_sq"].sqrt())):
                assert (mine - theirs).abs().max() <= worst_error(signed, fmt) \
                    * theirs.abs().max()


@pytest.mark.parametrize("pair", [("int8", "int4"), ("int4", "int8"), ("int4", None),
                                  ("int8", None)])
def test_state_dict_loads_across_formats(pair):
    """Codes saved in one format load into a group with another (state_dtype left out of the
    saved groups, as when a user changes it): decoded with their saved scales and encoded in
    the group's; into fp32 state they are decoded, and no scales are kept. The next step then
    equals the saving optimizer's for fp32 state, and is within the new format's rounding."""
    saved_name, loaded_name = pair
    init = make_params([(5001,), (64, 65), (10,)], seed=4)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt, _ = quantized_run("torch", saved_name, steps=4, params=params)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["state_dtype"]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = fastopt.AdamW(copies, lr=1e-3, state_dtype=loaded_name, backend="torch")
    loaded.load_state_dict(saved)
    before = [p.detach().clone() for p in params]
    for p, q in zip(params, copies):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(8))
        q.grad = p.grad.clone()
    opt.step()
    loaded.step()
    for p, q, b in zip(params, copies, before):
        state = loaded.state[q]
        if p.numel() < 4096:
            assert torch.equal(p, q)
            continue
        if loaded_name is None:
            assert state["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in state
            assert torch.equal(p, q)
        else:
            fmt = FORMATS[loaded_name]
            assert state["exp_avg_absmax"].numel() == fmt.num_blocks(p.numel())
            bound = 0.05 if loaded_name == "int8" else 0.8
            assert (p - q).abs().max() <= bound * (p - b).abs().max()


def test_saved_codes_without_their_scales_are_refused():
    params = [torch.nn.Parameter(torch.randn(5000))]
    opt, _ = quantized_run("torch", "int4", steps=1, params=params)
    saved = opt.state_dict()
    for entry in saved["state"].values():
        entry.pop("exp_avg_absmax", None)
    fresh = fastopt.AdamW([torch.nn.Parameter(params[0].detach().clone())], state_dtype="int4")
    with pytest.raises(ValueError, match="has no 'exp_avg_absmax'"):
        fresh.load_state_dict(saved)
    assert not fresh.state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FORMATS)
def test_inf_step_writes_nothing(name, backend):
    opt, params = quantized_run(backend, name, steps=2)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params
              if p in opt.state}
    values = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())  # as GradScaler sets them
    opt.step()
    del opt.grad_scale, opt.found_inf
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
        for key, value in before.get(id(p), {}).items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("name", FORMATS)
def test_quantization_error_is_bounded_per_block(name):
    fmt = FORMATS[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10_001, generator=gen) * torch.logspace(-5, 0, 10_001)
    for signed, values in ((True, x), (False, x.abs())):
        codes, scales = quantization.quantize(values, signed, fmt)
        restored = quantization.dequantize(codes, scales, signed, fmt, values.shape)
        n = values.numel()
        padded = torch.nn.functional.pad((restored - values).abs(),
                                         (0, fmt.num_blocks(n) * fmt.block - n))
        errors = padded.view(-1, fmt.block).amax(dim=1)
        assert (errors <= worst_error(signed, fmt) * scales + 1e-12).all()


def test_int4_roots_never_decode_to_zero_in_a_live_block():
    """4-bit's smallest unsigned entry is not zero: a root of exp_avg_sq far below its block's
    largest decodes to 1e-4 of it, so its element's update is not exp_avg / eps."""
    fmt = FORMATS["int4"]
    values = torch.tensor([1.0] + [1e-9] * 127)
    codes, scales = quantization.quantize(values, False, fmt)
    restored = quantization.dequantize(codes, scales, False, fmt, values.shape)
    assert restored[1:].min() == pytest.approx(1e-4)
    assert torch.equal(quantization.dequantize(*quantization.quantize(torch.zeros(128), False,
                                                                       fmt), False, fmt,
                                               (128,)), torch.zeros(128))


def test_adamw8bit_is_adamw_with_int8_state():
    params = [torch.nn.Parameter(torch.randn(5000))]
    opt = fastopt.AdamW8bit(params, lr=1e-3)
    params[0].grad = torch.ones(5000)
    opt.step()
    assert opt.param_groups[0]["state_dtype"] == "int8"
    assert opt.state[params[0]]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("name", FORMATS)
def test_quantized_state_refuses_what_it_cannot_hold(name):
    params = [torch.nn.Parameter(torch.ones(5000))]
    with pytest.raises(ValueError, match="amsgrad"):
        fastopt.Adam(params, amsgrad=True, state_dtype=name)
    with pytest.raises(ValueError, match="available for Adam and AdamW"):
        fastopt.SGD(params, lr=0.1, momentum=0.9, state_dtype=name)
    with pytest.raises(ValueError, match="'int8' or 'int4'"):
        fastopt.AdamW(params, state_dtype="int2")


LEAN = {"fp32": (torch.float32, {}),
        "bf16 + remainder": (torch.bfloat16, dict(master_weights="remainder")),
        "bf16 + master": (torch.bfloat16, dict(master_weights=True)),
        "bf16 + stochastic rounding": (torch.bfloat16, dict(stochastic_rounding=True))}


@pytest.mark.parametrize("lean", LEAN)
@pytest.mark.parametrize("name", FORMATS)
def test_small_params_share_slices_bit_for_bit(name, lean, monkeypatch):
    """The torch path merges back-to-back params of whole blocks (their grads copied together)
    into one slice: the same params and state, bit for bit, as a slice per param, with masters
    and stochastic rounding too. Params without grads now and then split the runs."""
    from fastopt.optimizers import adam

    dtype, lean_options = LEAN[lean]
    shapes = [(4096,)] * 6 + [(16, 256), (4352,), (5000,), (4096,), (8192,)]
    init = [t.to(dtype) for t in make_params(shapes, seed=3)]

    def run(**options):
        opt, params = quantized_run("torch", name, steps=6, init=init, **lean_options,
                                    **options)
        return params, [dict(opt.state[p]) for p in params]

    merged_params, merged_state = run()
    external_params, external_state = run(flatten_params=False)  # params in their storage
    monkeypatch.setattr(adam, "MERGE_LIMIT", 0)
    apart_params, apart_state = run()
    for p, q, r, a, b, c in zip(merged_params, apart_params, external_params, merged_state,
                                apart_state, external_state):
        assert torch.equal(p, q) and torch.equal(r, q)
        for key in a:
            assert torch.equal(a[key], b[key]) and torch.equal(c[key], b[key]), key
