"""The default loop when some params get no grad: fastopt against torch's fused step, same run.

    python -m benchmarks.partial_grads [--optimizers SGD Adam AdamW Adagrad] [--repeats 21]
                                       [--json out.json]

1000 tensors of 64 elements (CPU, fp32), fresh grads every step, two patterns:

- ``rotating``: a tenth of the params get no grad, a different tenth each step (params unused
  now and then: every param's step count drifts apart from its neighbours');
- ``behind``: a block of 100 params missed the first step only (an unused layer once: from
  then on their step counts trail the others' by one).

Each step is timed in interleaved rounds, each sample at least
``benchmarks.bench.MIN_SAMPLE_SECONDS`` of back-to-back steps
(``benchmarks.bench.time_interleaved``); the table shows medians and torch's time over
fastopt's. The peer is torch's fused step, or its foreach step where the fused one raises
(torch 2.13's fused SGD with momentum, when a param without a grad so far has no momentum
buffer: ``expected Tensor as element ... but got NoneType``).
"""

from __future__ import annotations

import argparse
import json

import torch

import fastopt
from benchmarks.bench import OPTIONS, against_peer, time_interleaved

PATTERNS = {
    "rotating": lambda step, i: (7 * i + step) % 10 == 3,
    "behind": lambda step, i: step == 0 and 300 <= i < 400,
}


def stepper(cls, pattern, options: dict):
    """One optimizer over its own 1000 params and a call that runs its next step."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, generator=gen)) for _ in range(1000)]
    grads = [[torch.randn(64, generator=gen) for _ in params] for _ in range(2)]
    opt = cls(params, **options)
    count = [0]

    def step():
        k = count[0]
        count[0] += 1
        for i, (p, g) in enumerate(zip(params, grads[k % 2])):
            p.grad = None if pattern(k, i) else g
        opt.step()

    return step


def measure(name: str, pattern: str, repeats: int) -> tuple:
    """(seconds per step of each variant, the peer's name)."""
    options = dict(OPTIONS[name])
    calls = {"fastopt": stepper(getattr(fastopt, name), PATTERNS[pattern], options)}
    peer = "torch-fused"
    try:
        calls[peer] = stepper(getattr(torch.optim, name), PATTERNS[pattern],
                              {**options, "fused": True})
        for _ in range(3):  # the second step is where torch's fused SGD raises
            calls[peer]()
    except (RuntimeError, TypeError):
        del calls[peer]
        peer = "torch-foreach"
        calls[peer] = stepper(getattr(torch.optim, name), PATTERNS[pattern],
                              {**options, "foreach": True})
    return time_interleaved(calls, torch.device("cpu"), repeats), peer


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=["SGD", "Adam", "AdamW", "Adagrad"])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, 1000 tensors of 64")
    print("| optimizer | pattern | fastopt ms | peer | peer ms | peer / fastopt |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    rows = []
    for name in args.optimizers:
        for pattern in PATTERNS:
            seconds, peer = measure(name, pattern, args.repeats)
            rows.append(against_peer(dict(optimizer=name, pattern=pattern), seconds,
                                     "fastopt", peer))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
