"""fastopt's lean options on the CPU against torch's fused fp32 AdamW, in one run: each lean
AdamW (bf16 params with bf16 state and stochastic rounding, remainder masters, 8-bit or 4-bit
moments; fp32 params with 8-bit or 4-bit moments; and, for reference, bf16 params with fp32
masters) and ``torch.optim.AdamW(fused=True)`` on fp32 params of the same shapes, the default
loop's step (fresh grads), in interleaved rounds.

    python -m benchmarks.lean_cpu [--cases 400x4K 1x4M-odd] [--repeats 7] [--json out.json]

The ratio is torch's time over fastopt's: at or above 0.5, a lean step costs at most twice
what torch's fp32 step does (issue 19's target).
"""

from __future__ import annotations

import argparse
import json

import torch

import fastopt
from benchmarks.bench import against_peer, fresh_steps, time_interleaved
from fastopt.shapes import CASES

# name -> (param dtype, AdamW options)
LEAN = {
    "bf16 state + stochastic rounding": (torch.bfloat16, dict(state_dtype=torch.bfloat16,
                                                               stochastic_rounding=True)),
    "remainder": (torch.bfloat16, dict(master_weights="remainder")),
    "remainder8 + bf16 state": (torch.bfloat16, dict(master_weights="remainder8",
                                                     state_dtype=torch.bfloat16)),
    "int8 + stochastic rounding": (torch.bfloat16, dict(state_dtype="int8",
                                                        stochastic_rounding=True)),
    "remainder + int8": (torch.bfloat16, dict(master_weights="remainder", state_dtype="int8")),
    "int4 + stochastic rounding": (torch.bfloat16, dict(state_dtype="int4",
                                                        stochastic_rounding=True)),
    "fp32 params, int8": (torch.float32, dict(state_dtype="int8")),
    "fp32 params, int4": (torch.float32, dict(state_dtype="int4")),
    # not lean (an fp32 master beside each bf16 param): the mixed-precision step they replace
    "bf16 params, fp32 masters": (torch.bfloat16, dict(master_weights=True)),
}
OPTIONS = dict(lr=1e-3, weight_decay=1e-2)


def stepper(make, shapes: list, dtype: torch.dtype):
    """A fresh-grad step of ``make(params)`` on params of ``shapes`` in ``dtype``, its lazy
    state made first."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(2)]
    opt = make(params)
    step = fresh_steps(opt, params, grads)
    step()
    return step


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["400x4K", "1x4M-odd"], choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    rows = []
    print("| case | AdamW options | fastopt ms | peer | peer ms | peer / fastopt |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for case in args.cases:
        shapes = CASES[case]()
        calls = {"torch-fused fp32": stepper(
            lambda ps: torch.optim.AdamW(ps, fused=True, **OPTIONS), shapes, torch.float32)}
        for name, (dtype, options) in LEAN.items():
            calls[name] = stepper(lambda ps, o=options: fastopt.AdamW(ps, **OPTIONS, **o),
                                  shapes, dtype)
        seconds = time_interleaved(calls, device, args.repeats)
        rows += [against_peer(dict(case=case, options=name), seconds, name, "torch-fused fp32")
                 for name in LEAN]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
