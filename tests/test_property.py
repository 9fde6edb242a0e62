"""Property test: random shapes, hyperparameters, grad patterns and step counts match torch.optim."""

import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import BACKENDS, compare_runs
from optim_db import OPTIM_DB

shapes = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
                  min_size=1, max_size=5)
unit = st.floats(0.0, 0.999)


def _unit():
    return st.floats(0.0, 0.999)


# Each torch.optim option and the values a user may give it (hypothesis draws from these).
OPTION_VALUES = {
    "lr": lambda: st.floats(0.0, 0.5),
    "betas": lambda: st.tuples(_unit(), _unit()),
    "eps": lambda: st.floats(1e-10, 1e-2),
    "weight_decay": lambda: st.sampled_from([0.0, 0.01, 0.3]),
    "amsgrad": st.booleans,
    "maximize": st.booleans,
    "decoupled_weight_decay": st.booleans,
    "centered": st.booleans,
    "momentum": lambda: st.sampled_from([0.0, 0.5, 0.9]),
    "dampening": lambda: st.sampled_from([0.0, 0.3]),
    "momentum_decay": lambda: st.floats(0.0, 0.05),
    "alpha": lambda: st.floats(0.1, 0.999),
    "rho": lambda: st.floats(0.0, 1.0),
    "lambd": lambda: st.floats(0.0, 0.05),
    "t0": lambda: st.sampled_from([0.0, 3.0, 1e6]),
    "lr_decay": lambda: st.floats(0.0, 0.1),
    "initial_accumulator_value": lambda: st.floats(0.0, 1.0),
    "etas": lambda: st.tuples(st.floats(0.1, 0.9), st.floats(1.1, 2.0)),
    "step_sizes": lambda: st.tuples(st.floats(1e-6, 1e-3), st.floats(1.0, 50.0)),
    "beta2_decay": lambda: st.floats(-1.0, 0.0),
    "d": lambda: st.floats(1.0, 3.0),
}


@st.composite
def configurations(draw):
    """Any optimizer of tests/optim_db.py with random values for its options."""
    info = draw(st.sampled_from(OPTIM_DB))
    kwargs = {}
    for option in info.cls._option_defaults():
        if option in OPTION_VALUES and option not in info.constructor_only:
            kwargs[option] = draw(OPTION_VALUES[option]())
    if info.name == "SGD" and draw(st.booleans()):  # Nesterov needs momentum, no dampening
        kwargs.update(nesterov=True, momentum=0.9, dampening=0.0)
    if info.name == "Lion":  # lion-pytorch reads this from its constructor only
        kwargs["decoupled_weight_decay"] = kwargs["lr"] > 0 and draw(st.booleans())
    if info.name == "ASGD":  # t0 and the averaging: every step count is a float
        kwargs["alpha"] = draw(st.floats(0.0, 1.0))
    if info.name == "Adafactor":  # eps is (eps1 or None, eps2)
        kwargs["eps"] = (draw(st.one_of(st.none(), st.floats(0.0, 1e-2))), draw(st.floats(0.0, 1e-2)))
    return info.name, kwargs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configurations(), shapes=shapes, steps=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       skip_mask=st.integers(0, 2**40), seed=st.integers(0, 2**16), in_place=st.booleans(),
       backend=st.sampled_from(BACKENDS))
def test_random_configurations_match_torch(config, shapes, steps, dtype, skip_mask, seed,
                                           in_place, backend):
    name, kwargs = config
    skip = lambda step, i: (skip_mask >> ((step * 5 + i) % 40)) & 1 == 1  # noqa: E731
    compare_runs(name, kwargs, shapes, steps=steps, dtype=dtype, skip=skip, seed=seed,
                 in_place=in_place, backend=backend)


# ---------------------------------------------------------------------- lean options
@st.composite
def lean_configurations(draw):
    """Any mix of the mixed-precision options, on any param dtype, for any optimizer: it must
    either be refused at construction with a ValueError/TypeError, or train, save, load and
    resume exactly."""
    info = draw(st.sampled_from(OPTIM_DB))
    name = info.name
    kwargs = {**draw(st.sampled_from([kwargs for kwargs, _ in info.configs])),
              "lr": draw(st.sampled_from([1e-3, 0.1]))}
    if draw(st.booleans()):
        kwargs["stochastic_rounding"] = True
        kwargs["rounding_seed"] = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        kwargs["master_weights"] = draw(st.sampled_from([True, "remainder", "remainder8"]))
    state_dtype = draw(st.sampled_from([None, torch.float32, torch.bfloat16, "int8", "int4"]))
    if state_dtype is not None:
        kwargs["state_dtype"] = state_dtype
    if draw(st.booleans()):
        kwargs["max_grad_norm"] = draw(st.sampled_from([0.5, 10.0]))
    return name, kwargs


@settings(max_examples=int(os.environ.get("FASTOPT_LEAN_EXAMPLES", 80)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(config=lean_configurations(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16,
                              torch.complex64]),
       sizes=st.lists(st.sampled_from([0, 1, 3, 129, 4100]), min_size=1, max_size=3),
       skip_mask=st.integers(0, 2**12), seed=st.integers(0, 2**16),
       backend=st.sampled_from(BACKENDS))
def test_lean_options_refuse_clearly_or_train_and_resume_exactly(config, dtype, sizes, skip_mask,
                                                                 seed, backend):
    import io

    import fastopt

    name, kwargs = config
    cls = getattr(fastopt, name)
    def randn(shape, gen):  # complex values with both parts random: an imaginary part of zero
        if dtype.is_complex:  # would make eps=0 configs divide 0 by 0, as torch.optim does too
            return torch.randn(shape, generator=gen, dtype=dtype)
        return torch.randn(shape, generator=gen).to(dtype)

    gen = torch.Generator().manual_seed(seed)
    init = [randn(n, gen) for n in sizes]

    def build(params):
        return cls(params, backend=backend, **kwargs)

    params = [torch.nn.Parameter(t.clone()) for t in init]
    try:
        opt = build(params)
    except (ValueError, TypeError) as error:
        event(f"refused: {type(error).__name__}: {str(error)[:60]}")
        return  # a documented refusal (e.g. stochastic rounding on SGD or fp16)

    def run(opt, params, first, steps, gen):
        for step in range(first, first + steps):
            for i, p in enumerate(params):
                g = randn(p.shape, gen)
                p.grad = None if (skip_mask >> ((step * 3 + i) % 12)) & 1 else g
            opt.step()

    if dtype.is_complex and not cls.declaration.complex:  # refused at the step, as torch does
        for p in params:
            p.grad = randn(p.shape, gen)
        with pytest.raises(RuntimeError, match=f"^{name} does not support complex parameters$"):
            opt.step()
        event("refused at the step: complex")
        return
    event("trained")
    run(opt, params, 0, 3, torch.Generator().manual_seed(1))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = build(copies)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    run(opt, params, 3, 2, gen_a)
    run(resumed, copies, 3, 2, gen_b)
    # fp16 params without masters compute in fp16, as torch.optim does: eps=1e-8 rounds to
    # zero there and 0/0 makes a nan (torch.optim.NAdam's own fp16 run does the same), which
    # the resumed run must then repeat bit for bit. Adafactor computes in its params' dtype
    # whatever state_dtype (a narrower one only stores the state; a wider one is refused).
    own_math = dtype == torch.float16 and not kwargs.get("master_weights") \
        and (kwargs.get("state_dtype") in (None, torch.float16)
             or cls.declaration.math_in_param_dtype)
    for p, q in zip(params, copies):
        if not own_math:
            assert torch.isfinite(torch.view_as_real(p) if p.is_complex() else p.float()).all()
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[p.element_size()]
        assert torch.equal(p.detach().view(bits), q.detach().view(bits)) \
            if not p.is_complex() else torch.equal(p, q)
