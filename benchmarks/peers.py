"""fastopt's AdamW against the CPU optimizers of other libraries, in one run: fp32 against
torch's fused AdamW and DeepSpeed's C++ ``DeepSpeedCPUAdam``; 8-bit state against
bitsandbytes' ``AdamW8bit``; 4-bit state against the same (the leanest CPU peer) and torch's
fused fp32.

    python -m benchmarks.peers [--cases 1000x64 400x4K demo-cnn 1x16M gpt2-small]
                               [--modes fresh-step iteration] [--repeats 7] [--json out.json]
                               [--groups fp32 "8-bit state" "4-bit state"]

Each row times every variant on the same shapes in interleaved rounds (``benchmarks.bench``'s
``measure``): ``fresh-step`` is the default loop's step (grads handed over as autograd leaves
them after ``zero_grad()``), ``iteration`` adds ``zero_grad`` and a backward. Ratios are the
peer's median time over fastopt's (above 1: fastopt is faster). The peers are in the ``bench``
extra (``pip install -e .[bench]``); one that is not installed is left out of its rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import torch

from benchmarks.bench import against_peer, measure
from fastopt.shapes import CASES

# (what is compared, fastopt's variant, its peers); the peers' modules
GROUPS = {
    "fp32": ("fastopt", ["torch-fused", "deepspeed-cpu-adam"]),
    "8-bit state": ("fastopt-8bit", ["bitsandbytes-8bit", "torch-fused"]),
    "4-bit state": ("fastopt-4bit", ["bitsandbytes-8bit", "torch-fused"]),
}
NEEDS = {"deepspeed-cpu-adam": "deepspeed", "bitsandbytes-8bit": "bitsandbytes"}
# Quantized state on the CPU is slower than fp32 (see docs/performance.md): its rows skip the
# largest model so that the run stays minutes long.
QUANTIZED_CASES = ("1000x64", "400x4K", "demo-cnn", "1x16M")


def available(variant: str) -> bool:
    module = NEEDS.get(variant)
    return module is None or importlib.util.find_spec(module) is not None


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES),
                        default=["1000x64", "400x4K", "demo-cnn", "1x16M", "gpt2-small"])
    parser.add_argument("--modes", nargs="+", default=["fresh-step", "iteration"],
                        choices=["fresh-step", "iteration"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| state | mode | case | fastopt ms | peer | peer ms | peer / fastopt |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: |")
    for group in args.groups:
        ours, peers = GROUPS[group]
        peers = [p for p in peers if available(p)]
        for mode in args.modes:
            for case in args.cases:
                if group != "fp32" and case not in QUANTIZED_CASES:
                    continue
                seconds, n, tensors = measure(case, "AdamW", mode, device, args.repeats,
                                              (ours, *peers))
                for peer in peers:
                    rows.append(against_peer(dict(state=group, mode=mode, case=case), seconds,
                                             ours, peer, numel=n, tensors=tensors))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
