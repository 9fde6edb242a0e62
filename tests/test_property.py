"""Property test: random shapes, hyperparameters, grad patterns and step counts match torch.optim."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import BACKENDS, compare_runs

shapes = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
                  min_size=1, max_size=5)
unit = st.floats(0.0, 0.999)


@st.composite
def configurations(draw):
    name = draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    lr = draw(st.floats(0.0, 0.5))
    decay = draw(st.sampled_from([0.0, draw(st.floats(0.0, 0.5))]))
    maximize = draw(st.booleans())
    if name == "SGD":
        momentum = draw(st.sampled_from([0.0, draw(unit)]))
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = 0.0 if nesterov else draw(st.sampled_from([0.0, draw(unit)]))
        kwargs = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=decay,
                      nesterov=nesterov, maximize=maximize)
    else:
        kwargs = dict(lr=lr, betas=(draw(unit), draw(unit)), eps=draw(st.floats(1e-10, 1e-2)),
                      weight_decay=decay, amsgrad=draw(st.booleans()), maximize=maximize)
    return name, kwargs


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
