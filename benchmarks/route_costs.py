"""Measure the CPU costs that ``fastopt.plan.CPU_COSTS`` holds, and print them ready to paste.

    python benchmarks/route_costs.py [--repeats 201] [--budget 120] [--threads T] [--json PATH]

On CPUs, fresh grads take one of two routes (``fastopt.plan.gather_pays`` prices both): one
fused call with an entry per tensor, or ``torch._foreach_copy_`` of every grad into the flat
grad buffer and one fused call over it. This times (fp32, ``time.perf_counter``, medians of
rounds that each run every variant once, shuffled, so a noisy neighbour slows all alike)
``torch._fused_adamw_`` and ``torch._fused_sgd_`` on K tensors of E elements and on one flat
tensor of K*E, ``_foreach_copy_`` of K tensors into views of one flat buffer and ``torch.cat``
of K 1-D tensors into it (the gather of a bucket of gapless vectors); then fits
``seconds = per_tensor * K + per_element * K*E`` (per-tensor calls, copy) and ``seconds =
per_call + flat_per_element * K*E`` (flat calls) by least squares.
"""

import argparse
import json
import math
import os
import random
import statistics
import time

import numpy as np
import torch

# (K tensors, E elements each): K=200, 1000 give the slope per tensor, E=64, 16384 per element.
CASES = [(200, 64), (1000, 64), (100, 64), (100, 16384)]
VARIANTS = ["adam tensors", "adam flat", "sgd tensors", "sgd flat", "copy", "cat"]
MIN_SAMPLE_SECONDS = 2e-4  # each job's calls per sample make a sample last at least this


def fused_call(op: str, tensors: int, elements_each: int, flat: bool):
    """One fp32 ``_fused_adamw_`` (op "adam") or ``_fused_sgd_`` (op "sgd", momentum 0.9) step
    over K tensors of E elements, or over one flat tensor of K*E elements (``flat``)."""
    count, size = (1, tensors * elements_each) if flat else (tensors, elements_each)
    params = [torch.randn(size) for _ in range(count)]
    grads = [torch.rand(size) + 0.5 for _ in range(count)]  # no tiny values: no subnormals
    states = [[torch.zeros(size) for _ in range(count)] for _ in range(2)]
    if op == "sgd":
        return lambda: torch._fused_sgd_(
            params, grads, states[0], weight_decay=0.0, momentum=0.9, lr=1e-3, dampening=0.0,
            nesterov=False, maximize=False, is_first_step=False)
    steps = [torch.tensor(1.0) for _ in range(count)]
    return lambda: torch._fused_adamw_(
        params, grads, states[0], states[1], [], steps, lr=1e-3, beta1=0.9, beta2=0.999,
        weight_decay=1e-2, eps=1e-8, amsgrad=False, maximize=False)


def make_calls(tensors: int, elements_each: int) -> dict:
    """Every variant's call on K tensors of E elements, by name (copy: into one flat buffer)."""
    calls = {f"{op} {route}": fused_call(op, tensors, elements_each, route == "flat")
             for op in ("adam", "sgd") for route in ("tensors", "flat")}
    sources = [torch.randn(elements_each) for _ in range(tensors)]
    views = list(torch.empty(tensors * elements_each).split(elements_each))
    calls["copy"] = lambda: torch._foreach_copy_(views, sources)
    flat = torch.empty(tensors * elements_each)
    calls["cat"] = lambda: torch.cat(sources, out=flat)  # 1-D grads, no gaps between slots
    return calls


def busy_seconds() -> float:
    """CPU seconds every process on this machine has run, stolen ones too (0 without /proc)."""
    try:
        with open("/proc/stat") as stat:  # cpu user nice system idle iowait irq softirq steal
            ticks = [int(t) for t in stat.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def time_calls(call, calls: int) -> float:
    """Seconds per call, over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def measure(repeats: int, budget_seconds: float) -> tuple:
    """Median seconds per call of every (case, variant) over interleaved rounds, and how many
    ran (``repeats``, fewer past ``budget_seconds`` from the start, at least 3)."""
    deadline = time.perf_counter() + budget_seconds
    calls = {(case, name): call for case in CASES for name, call in make_calls(*case).items()}
    calls_per_sample = {}
    for job, call in calls.items():  # two calls (the first a warm-up) size each job's samples
        calls_per_sample[job] = max(1, math.ceil(MIN_SAMPLE_SECONDS / time_calls(call, 2)))
    jobs, samples = list(calls), {job: [] for job in calls}
    order, rounds = random.Random(0), 0
    while rounds < repeats and (rounds < 3 or time.perf_counter() < deadline):
        rounds += 1
        order.shuffle(jobs)
        for job in jobs:
            samples[job].append(time_calls(calls[job], calls_per_sample[job]))
    return {job: statistics.median(seconds) for job, seconds in samples.items()}, rounds


def fit_costs(medians: dict) -> tuple:
    """The least-squares costs, and the worst misfit of a per-tensor or copy timing (relative)."""
    tensors = np.array([k for k, _ in CASES], dtype=float)
    elements = np.array([k * e for k, e in CASES], dtype=float)

    def fit(variant: str, first_column) -> tuple:
        seconds = np.array([medians[case, variant] for case in CASES])
        design = np.stack([first_column, elements], axis=1)
        fitted = np.linalg.lstsq(design, seconds, rcond=None)[0]
        return fitted.tolist(), float(np.max(np.abs(design @ fitted / seconds - 1)))

    costs, misfits = {}, []
    for op in ("adam", "sgd"):
        (per_tensor, per_element), misfit = fit(f"{op} tensors", tensors)
        (_, flat_per_element), _ = fit(f"{op} flat", np.ones_like(elements))  # small: noisy
        costs[op] = {"per_tensor": per_tensor, "per_element": per_element,
                     "flat_per_element": flat_per_element}
        misfits.append(misfit)
    for variant in ("copy", "cat"):
        (per_tensor, per_element), misfit = fit(variant, tensors)
        costs[variant] = {"per_tensor": per_tensor, "per_element": per_element}
        misfits.append(misfit)
    return costs, max(misfits)


def literal(name: str, seconds: float) -> str:
    """``2.6e-6`` for a cost per tensor, ``0.85e-9`` for one per element (as plan.py writes)."""
    scale, unit = (1e6, "e-6") if name == "per_tensor" else (1e9, "e-9")
    return f"{seconds * scale:.2g}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=201, help="interleaved rounds")
    parser.add_argument("--budget", type=float, default=120, help="stop rounds after (s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start, busy, own = time.perf_counter(), busy_seconds(), time.process_time()
    medians, rounds = measure(args.repeats, args.budget)
    others = (busy_seconds() - busy - (time.process_time() - own)) / (time.perf_counter() - start)
    costs, misfit = fit_costs(medians)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, medians of "
          f"{rounds} rounds, microseconds per call; other processes used {others:.2f} cores")
    print(f"{'K':>5} {'E':>6} {'K*E':>8}" + "".join(f"{name:>13}" for name in VARIANTS))
    for k, e in CASES:
        print(f"{k:>5} {e:>6} {k * e:>8}"
              + "".join(f"{medians[(k, e), v] * 1e6:>13.1f}" for v in VARIANTS))
    print(f"\nworst misfit of a timing to its fitted line: {misfit:.0%}")
    if others > 0.2 or misfit > 0.25 or min(min(c.values()) for c in costs.values()) <= 0:
        print("warning: busy CPU or poor fit (torch's threads wait for each other at every "
              "parallel call when other processes hold cores): rerun on an idle machine")
    print("\nfitted costs, seconds (as fastopt.plan.CPU_COSTS):\nCPU_COSTS = {")
    for op, fitted in costs.items():
        entries = ", ".join(f'"{name}": {literal(name, value)}' for name, value in fitted.items())
        print(f'    "{op}": {{{entries}}},')
    print("}")
    if args.json:
        timings = [{"tensors": k, "elements_each": e,
                    "seconds": {v: medians[(k, e), v] for v in VARIANTS}} for k, e in CASES]
        with open(args.json, "w") as out:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "rounds": rounds, "other_processes_cores": others, "worst_misfit": misfit,
                       "costs": costs, "timings": timings}, out, indent=2)


if __name__ == "__main__":
    main()
