"""pytest-benchmark throughput of ``step()`` and of the whole training iteration, fastopt against
torch.optim's for-loop, foreach and fused variants (``make bench``; not part of ``make test``).

Each benchmark group holds one (optimizer, mode, case) so pytest-benchmark's comparison table
puts the four implementations side by side; ``extra_info`` carries params/s and, for ``step``,
the GB/s of the bytes a fused step must move. The torch baselines are built directly
(benchmarks/bench.py's Setup), never imported from the tests.
"""

import pytest
import torch

from benchmarks.bench import BYTES_PER_ELEMENT, OPTIONS, VARIANTS, Setup, variants_of
from fastopt.shapes import CASES, numel

OPTIMIZERS = ["AdamW", "Adam", "SGD"]
# The default loop of every optimizer, against torch's fastest variant of it (fused where torch
# has one, else foreach): many small tensors, many mid-sized ones, the demo's CNN.
DEFAULT_LOOP_CASES = ["1000x64", "400x4K", "demo-cnn"]


def _run(benchmark, optimizer, mode, case, variant):
    shapes = CASES[case]()
    setup = Setup(variant, optimizer, shapes, torch.device("cpu"))
    benchmark.group = f"{optimizer} {mode} {case}"
    call = {"step": setup.step, "fresh-step": setup.fresh_step,
            "iteration": setup.iteration}[mode]
    benchmark.pedantic(call, rounds=5, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    n = numel(shapes)
    benchmark.extra_info["params_per_s"] = n / seconds
    benchmark.extra_info["tensors"] = len(shapes)
    if mode != "iteration":
        benchmark.extra_info["gb_per_s"] = BYTES_PER_ELEMENT[optimizer] * n / seconds / 1e9


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_step(benchmark, optimizer, case, variant):
    _run(benchmark, optimizer, "step", case, variant)


@pytest.mark.parametrize("variant", ["fastopt", "torch-foreach", "torch-fused", "torch-loop"])
@pytest.mark.parametrize("case", DEFAULT_LOOP_CASES)
@pytest.mark.parametrize("optimizer", list(OPTIONS))
def test_default_loop_of_every_optimizer(benchmark, optimizer, case, variant):
    """step() on fresh grads, every optimizer: fastopt against torch's variants of it."""
    if variant not in variants_of(optimizer, [variant]):
        pytest.skip(f"torch has no {variant} {optimizer}")
    _run(benchmark, optimizer, "fresh-step", case, variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_fresh_step(benchmark, optimizer, case, variant):
    """step() on fresh grads, as every step of the default loop (zero_grad() sets them to
    None, backward allocates new ones)."""
    _run(benchmark, optimizer, "fresh-step", case, variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_iteration(benchmark, optimizer, case, variant):
    """zero_grad() + a backward that touches every param + step()."""
    _run(benchmark, optimizer, "iteration", case, variant)
