"""Muon's step against torch.optim.Muon's, same run: the default loop (fresh grads every step),
medians of interleaved rounds, on the hidden matrices of transformers.

    python -m benchmarks.muon_bench [--cases ...] [--device cpu|cuda] [--repeats N] [--json F]

Each row gives both steps' times, their ratio (torch's time over fastopt's), the Newton–Schulz
FLOPs a step must do (the same for both: ``ns_steps`` x (4 m^2 n + 2 m^3) per m x n matrix,
m <= n) and the rate each reaches, and the ops each step dispatches (counted with
torch.profiler): on a GPU an op is a kernel launch, and a step of small matrices is bound by
launches, not FLOPs. ``predicted_gpu_ratio`` is that model, for rows timed without a GPU:
each step's time on a GPU taken as the larger of its ops at ``LAUNCH_US`` each and its FLOPs
at ``GPU_TFLOPS`` (an H200's bf16 matmul rate on these sizes), until a GPU measures it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastopt
from benchmarks.bench import synchronize
from fastopt.shapes import gpt2_small

LAUNCH_US = 6.0  # a torch op's eager dispatch and launch, host side, per op
GPU_TFLOPS = 400.0  # bf16 matmuls of 768..3072 on an H200 (dense peak ~990)


def transformer_hidden(d: int, layers: int, fused_qkv: bool = False) -> list:
    """The matrices Muon takes in a transformer block (nn.Linear's (out, in)): attention's
    query, key, value (or one fused qkv) and output, the MLP's two."""
    attention = [(3 * d, d)] if fused_qkv else [(d, d)] * 3
    return (attention + [(d, d), (4 * d, d), (d, 4 * d)]) * layers


CASES = {
    "transformer-d256": lambda: transformer_hidden(256, 6),
    "gpt2-small-hidden": lambda: [s[::-1] for s in gpt2_small()[2:] if len(s) == 2],
}


def newton_schulz_flops(shapes: list, steps: int = 5) -> int:
    total = 0
    for shape in shapes:
        m, n = sorted(shape)
        total += steps * (4 * m * m * n + 2 * m ** 3)
    return total


class Setup:
    def __init__(self, cls, shapes, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device))
                       for s in shapes]
        self.grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
        self.opt = cls(self.params, lr=0.02)

    def fresh_step(self):
        for p, g in zip(self.params, self.grads):
            p.grad = g.clone()
        self.opt.step()


# Ops that only make views or metadata (no kernel on a GPU), left out of the launch count.
NO_KERNEL = {"aten::view", "aten::select", "aten::transpose", "aten::t", "aten::unbind",
             "aten::slice", "aten::as_strided", "aten::alias", "aten::reshape", "aten::empty",
             "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::detach",
             "aten::numpy_T", "aten::permute", "aten::_reshape_alias", "aten::lift_fresh",
             "aten::empty_like", "aten::empty_strided", "aten::resolve_conj",
             "aten::resolve_neg", "aten::item", "aten::_local_scalar_dense", "aten::to",
             "aten::_to_copy", "aten::contiguous", "aten::matrix_H", "aten::mT", "aten::result_type"}


def ops_per_step(setup: Setup) -> int:
    """The ops a step dispatches that run a kernel (top-level aten ops; views and the grads'
    clones excluded; a copy inside ``to``/``contiguous`` counts as its ``copy_``)."""
    setup.fresh_step()
    for p, g in zip(setup.params, setup.grads):
        p.grad = g.clone()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        setup.opt.step()
    def launches(event) -> int:
        if event.name not in NO_KERNEL:
            return 1
        return sum(launches(child) for child in event.cpu_children)

    return sum(launches(e) for e in prof.events() if e.name.startswith("aten::")
               and e.cpu_parent is not None and not e.cpu_parent.name.startswith("aten::"))


def measure(case: str, device: torch.device, repeats: int) -> dict:
    shapes = CASES[case]()
    setups = {"torch": Setup(torch.optim.Muon, shapes, device),
              "fastopt": Setup(fastopt.Muon, shapes, device)}
    ops = {name: ops_per_step(s) for name, s in setups.items()}
    times = {name: [] for name in setups}
    order = list(setups)
    for r in range(repeats):
        for name in order[r % 2:] + order[: r % 2]:
            synchronize(device)
            start = time.perf_counter()
            setups[name].fresh_step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    flops = newton_schulz_flops(shapes)
    gpu = {name: max(ops[name] * LAUNCH_US * 1e-3, flops / (GPU_TFLOPS * 1e12) * 1e3)
           for name in setups}
    return {"case": case, "device": str(device), "matrices": len(shapes),
            "torch_ms": ms["torch"], "fastopt_ms": ms["fastopt"],
            "ratio": ms["torch"] / ms["fastopt"], "flops": flops,
            "torch_tflops": flops / ms["torch"] / 1e9, "fastopt_tflops": flops / ms["fastopt"] / 1e9,
            "torch_ops": ops["torch"], "fastopt_ops": ops["fastopt"],
            "predicted_gpu_ratio": gpu["torch"] / gpu["fastopt"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"{'case':<18} {'device':<6} {'torch ms':>9} {'fastopt ms':>10} {'ratio':>6} "
          f"{'GFLOP':>6} {'TFLOPS torch/ours':>18} {'ops torch/ours':>15} {'GPU model':>9}")
    for case in args.cases:
        row = measure(case, device, args.repeats)
        rows.append(row)
        print(f"{case:<18} {device.type:<6} {row['torch_ms']:9.1f} {row['fastopt_ms']:10.1f} "
              f"{row['ratio']:5.2f}x {row['flops'] / 1e9:6.1f} "
              f"{row['torch_tflops']:8.2f}/{row['fastopt_tflops']:<8.2f} "
              f"{row['torch_ops']:7d}/{row['fastopt_ops']:<7d} {row['predicted_gpu_ratio']:8.2f}x",
              flush=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
