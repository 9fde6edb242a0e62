"""The host's share of a Triton-path step, measured without a GPU: the default loop (fresh grads
every step) on GPT-2 small's 148 tensors (each dimension divided by 64) laid out in 7 buckets
as GPT-2 small's are, with the Triton path's Python run in full under ``TRITON_INTERPRET=1`` and
every kernel launch replaced by a no-op. What it measures is fastopt's own Python per step
(plan, grad table, scalar math, launch arguments), which on a GPU must stay under the kernels'
time for a step not to be host-bound; a GPU adds Triton's launcher and CUDA's launch costs.

Usage:  python benchmarks/triton_host_time.py [NAdam SGD ...]   (median of 7 runs of 50 steps)
"""

from __future__ import annotations

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fastopt  # noqa: E402
from benchmarks.bench import fresh_steps  # noqa: E402
from fastopt import flat  # noqa: E402
from fastopt.shapes import gpt2_small  # noqa: E402

DEFAULT = ["NAdam", "RAdam", "ASGD", "Adamax", "Adagrad", "SGD", "AdamW"]


def host_us_per_step(name: str, shapes: list, steps: int = 50, repeats: int = 7) -> tuple:
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = getattr(fastopt, name)(params, backend="triton", lr=1e-3)
    fresh_step = fresh_steps(opt, params, [[torch.randn(s) for s in shapes] for _ in range(2)])

    for _ in range(5):
        fresh_step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fresh_step()
        times.append((time.perf_counter() - start) / steps * 1e6)
    return sorted(times)[repeats // 2], len(opt._buckets[0])


def main(argv=None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or DEFAULT
    InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    flat.LAYOUT_MIN_BYTES = 1 << 10  # small tensors, laid out in as many buckets as GPT-2's
    torch.set_num_threads(1)
    shapes = [tuple(max(1, d // 64) for d in s) for s in gpt2_small()]
    print(f"torch {torch.__version__}, {len(shapes)} tensors, launches stubbed")
    for name in names:
        us, buckets = host_us_per_step(name, shapes)
        print(f"{name:<9} {buckets} buckets  host {us:7.1f} us/step", flush=True)


if __name__ == "__main__":
    main()
