"""Step and whole-iteration throughput of fastopt against torch.optim, as ratios from one run.

    python -m benchmarks.bench [--cases 1x16M 1000x16K gpt2-small] [--optimizers AdamW SGD]
                            [--repeats 7] [--device cpu|cuda] [--json out.json]

Every variant is built on the same shapes and timed in interleaved rounds (fastopt, for-loop,
foreach, fused, fastopt, ...) so that a noisy neighbour slows them all alike, each sample a
run of calls at least 20 ms long (``MIN_SAMPLE_SECONDS``: a small model's step alone is within
the timer's noise, and a sample's first call runs on caches another variant left); the
table shows medians. ``step`` times ``optimizer.step()`` with grads kept in place (a loop calling
``zero_grad(set_to_none=False)``, which lays fastopt's grads out in its flat grad buffer);
``fresh-step`` hands every step grads that are tensors of their own, as autograd does after
``zero_grad()``; ``iteration`` times
``zero_grad()`` + a backward that touches every parameter + ``step()``, so that no cost can hide
outside ``step()``. Bytes per element are those a fused step must move (fp32 AdamW: read param,
grad, exp_avg, exp_avg_sq, write param, exp_avg, exp_avg_sq = 28), reported as GB/s and as a
fraction of this device's measured streaming bandwidth (see ``bandwidth``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import time

import torch

import fastopt
from fastopt import registry
from fastopt.shapes import CASES, numel


def _reference(name: str):
    """The class a fastopt optimizer is timed against: torch.optim's, or lion-pytorch's."""
    if name == "Lion":
        import lion_pytorch

        return lion_pytorch.Lion
    return getattr(torch.optim, name)


VARIANTS = {
    "fastopt": lambda cls, params, kw: getattr(fastopt, cls)(params, **kw),
    "fastopt-apart": lambda cls, params, kw: getattr(fastopt, cls)(params, flatten_params=False,
                                                                   **kw),
    "torch-loop": lambda cls, params, kw: _reference(cls)(
        params, **({} if cls == "Lion" else {"foreach": False}), **kw),
    "torch-foreach": lambda cls, params, kw: getattr(torch.optim, cls)(params, foreach=True, **kw),
    "torch-fused": lambda cls, params, kw: getattr(torch.optim, cls)(params, fused=True, **kw),
}


def _deepspeed_cpu_adam(cls, params, kw):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, adamw_mode=cls == "AdamW", **kw)


def _bitsandbytes_8bit(cls, params, kw):
    import bitsandbytes

    return getattr(bitsandbytes.optim, f"{cls}8bit")(params, **kw)


# Other libraries' optimizers (the bench extra installs them: pip install -e .[bench]), timed
# only when asked for (``--variants``, benchmarks/peers.py).
PEERS = {
    "deepspeed-cpu-adam": _deepspeed_cpu_adam,  # DeepSpeed's C++ CPU Adam (AVX, OpenMP)
    "bitsandbytes-8bit": _bitsandbytes_8bit,  # bitsandbytes' blockwise 8-bit Adam/AdamW
    "fastopt-8bit": lambda cls, params, kw: getattr(fastopt, cls)(params, state_dtype="int8",
                                                                  **kw),
    "fastopt-4bit": lambda cls, params, kw: getattr(fastopt, cls)(params, state_dtype="int4",
                                                                  **kw),
}
# Every registered optimizer with a reference to time it against, with its usual options
# (Muon takes matrices only, and these cases are mostly vectors: benchmarks/muon_bench.py).
OPTIONS = {name: dict(lr=1e-3) for name, cls in registry.classes().items()
           if (hasattr(torch.optim, name) or name == "Lion") and name != "Muon"} | {
    "AdamW": dict(lr=1e-3, weight_decay=1e-2),
    "SGD": dict(lr=1e-3, momentum=0.9),
    "RMSprop": dict(lr=1e-3, momentum=0.9),
    "Lion": dict(lr=1e-4, weight_decay=1e-2),
}


def variants_of(name: str, wanted) -> tuple:
    """Of ``wanted``, the variants ``name`` has (torch's fused only where torch has one,
    foreach only where the reference is torch.optim's)."""
    out = []
    for variant in wanted:
        if variant == "torch-fused" and (name == "Lion" or "fused" not in inspect.signature(
                _reference(name)).parameters):
            continue
        if variant == "torch-foreach" and name == "Lion":
            continue
        out.append(variant)
    return tuple(out)


def bytes_per_element(name: str, element_size: int = 4) -> int:
    """Bytes a fused step must move per element: read param and grad, write the param, read
    and write each state buffer shaped like the params (fp32 AdamW: 28; Adafactor's factored
    state is a few numbers per row and column of a matrix, not counted: 12)."""
    cls = registry.get(name)
    group = {**cls._option_defaults(), **OPTIONS[name]}
    declared = cls.declaration
    shaped = [n for n in declared.buffer_names(group) if declared.buffer(n).shape is None]
    return element_size * (3 + 2 * len(shaped))


BYTES_PER_ELEMENT = {name: bytes_per_element(name) for name in OPTIONS}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: torch.device, numel_: int = 64 * 1024 * 1024, repeats: int = 7) -> dict:
    """Measured GB/s of two streaming ops on ``numel_`` fp32 elements (bytes read + written):

    - ``copy``: ``dst.copy_(src)``, 8 bytes per element;
    - ``inplace``: ``dst.add_(src)``, 12 bytes per element. An optimizer step, like this op,
      reads every buffer it writes; on CPUs a plain copy also pays for reading its destination
      (write-allocate) without counting it, so ``inplace`` is the fair ceiling there.
    """
    src = torch.randn(numel_, device=device)
    dst = torch.randn(numel_, device=device)
    result = {}
    for name, op, nbytes in (("copy", lambda: dst.copy_(src), 8),
                             ("inplace", lambda: dst.add_(src, alpha=1e-9), 12)):
        op()
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            op()
            synchronize(device)
            times.append(time.perf_counter() - start)
        result[name] = nbytes * numel_ / statistics.median(times) / 1e9
    return result


def fresh_steps(opt, params: list, grad_sets: list):
    """A call that steps ``opt`` on grads that are tensors of their own, as autograd leaves
    them after ``zero_grad()``: ``grad_sets`` (two lists of tensors shaped as ``params``)
    swapped in turn, which costs nothing."""
    def fresh_step():
        grad_sets.reverse()
        for p, g in zip(params, grad_sets[0]):
            p.grad = g
        opt.step()

    return fresh_step


class Setup:
    """One optimizer over its own params, with grads and the loss weights for a backward."""

    def __init__(self, variant, optimizer, shapes, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        self.weights = [torch.randn(s, generator=gen).to(device) for s in shapes]
        make = VARIANTS.get(variant) or PEERS[variant]
        self.opt = make(optimizer, self.params, dict(OPTIONS[optimizer]))
        for p, w in zip(self.params, self.weights):
            p.grad = w.clone()
        # A loop that keeps its grads: zero_grad(set_to_none=False) lays fastopt's out flat.
        self.opt.zero_grad(set_to_none=False)
        with torch.no_grad():
            for p, w in zip(self.params, self.weights):
                p.grad.copy_(w)
        self.opt.step()  # lazy state exists before timing

    def step(self):
        self.opt.step()

    def fresh_step(self):
        """step() on grads that are tensors of their own (as autograd leaves them after
        zero_grad(set_to_none=True)), not views of a flat buffer; swapping them in is free."""
        if not hasattr(self, "_fresh_step"):
            self._fresh_step = fresh_steps(self.opt, self.params, [
                [w.clone() for w in self.weights] for _ in range(2)])
        self._fresh_step()

    def iteration(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)
        loss = sum((p * w).sum() for p, w in zip(self.params, self.weights))
        loss.backward()
        self.opt.step()


# A sample times calls back to back for at least this long: a single call of a small model's
# step (tens of microseconds) is within the timer's and the scheduler's noise, and a sample's
# first call runs on the caches the variant timed before it left (the others' params, state and
# Python objects). With 2 ms samples a 1-2 ms step was one or two calls, a 5 ms one always
# one: mostly first calls, the share set by one timed call, so that the same code read 1.2 to
# 3 ms between runs (fastopt AdamW, 1000 params of 64); 20 ms makes the first call a small
# share of every sample but the slowest variants'.
MIN_SAMPLE_SECONDS = 2e-2
WARMUP_CALLS = 3


def calls_per_sample(call, device) -> int:
    """How many calls of ``call`` (warmed up) make a sample of ``MIN_SAMPLE_SECONDS``."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return max(1, math.ceil(MIN_SAMPLE_SECONDS / max(time.perf_counter() - start, 1e-7)))


def measure(case, optimizer, mode, device, repeats, variants=tuple(VARIANTS)):
    """Median seconds per call for each variant (``time_interleaved``)."""
    shapes = CASES[case]()
    setups = {v: Setup(v, optimizer, shapes, device) for v in variants}
    calls = {v: getattr(s, mode.replace("-", "_")) for v, s in setups.items()}
    if mode == "iteration" and "fastopt" in setups:  # its own params: no shared allocator state
        keep = setups["fastopt-keepgrads"] = Setup("fastopt", optimizer, shapes, device)
        calls["fastopt-keepgrads"] = lambda: keep.iteration(set_to_none=False)
    seconds = time_interleaved(calls, device, repeats)
    del setups
    return seconds, numel(shapes), len(shapes)


def time_interleaved(calls: dict, device, repeats: int) -> dict:
    """Median seconds per call of each of ``calls`` (name -> call), timed in interleaved
    rounds: each round times every call once, in a rotating order, each sample
    ``calls_per_sample`` calls after ``WARMUP_CALLS`` warm-up calls."""
    times = {v: [] for v in calls}
    for call in calls.values():
        for _ in range(WARMUP_CALLS):
            call()
    counts = {v: calls_per_sample(call, device) for v, call in calls.items()}
    order = list(calls)
    for r in range(repeats):
        for v in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            call, count = calls[v], counts[v]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(count):
                call()
            synchronize(device)
            times[v].append((time.perf_counter() - start) / count)
    return {v: statistics.median(t) for v, t in times.items()}


def against_peer(labels: dict, seconds: dict, ours: str, peer: str, **extra) -> dict:
    """One row of ``ours`` against ``peer`` from ``time_interleaved``'s seconds: ``labels``,
    ``extra``, both times in ms and the peer's time over ours; printed as a markdown row
    (the labels, the times, the ratio)."""
    row = dict(labels, **extra, fastopt_ms=seconds[ours] * 1e3, peer=peer,
               peer_ms=seconds[peer] * 1e3, ratio=seconds[peer] / seconds[ours])
    cells = [*map(str, labels.values()), f"{row['fastopt_ms']:.2f}", peer,
             f"{row['peer_ms']:.2f}", f"{row['ratio']:.2f}x"]
    print("| " + " | ".join(cells) + " |", flush=True)
    return row


def _ratio(seconds: dict, variant: str, t: float):
    return seconds[variant] / t if variant in seconds else None


def _fmt(ratio) -> str:
    return f"{ratio:.2f}x" if ratio is not None else "-"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--optimizers", nargs="+", default=["AdamW", "SGD"],
                        choices=[*OPTIONS, "all"],
                        help="default: AdamW and SGD; 'all' for every optimizer")
    parser.add_argument("--modes", nargs="+", default=["step", "iteration"],
                        choices=["step", "fresh-step", "iteration"],
                        help="step: grads in the flat buffer; fresh-step: grads as separate "
                             "tensors; iteration: zero_grad + backward + step")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=[*VARIANTS, *PEERS],
                        help="which implementations to time (torch-fused is always included)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    measured = bandwidth(device)
    ceiling = max(measured.values())
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"bandwidth: copy {measured['copy']:.1f} GB/s, in-place {measured['inplace']:.1f} GB/s "
          f"('of peak' below is against the larger)")
    rows = []
    header = (f"{'optimizer':<9} {'mode':<10} {'case':<10} {'variant':<17} {'ms':>9} "
              f"{'GB/s':>7} {'of peak':>7} {'vs fastest':>10} {'vs fused':>8} {'vs foreach':>10} "
              f"{'vs loop':>8}")
    print(header)
    for optimizer in (list(OPTIONS) if "all" in args.optimizers else args.optimizers):
        for mode in args.modes:
            for case in args.cases:
                variants = variants_of(optimizer, dict.fromkeys(
                    args.variants + ["torch-fused", "torch-foreach", "torch-loop"]))
                seconds, n, tensors = measure(case, optimizer, mode, device, args.repeats,
                                              variants)
                moved = BYTES_PER_ELEMENT[optimizer] * n
                torch_times = [seconds[v] for v in ("torch-fused", "torch-foreach", "torch-loop")
                               if v in seconds]
                fastest = min(torch_times[:2] or torch_times)  # fused or foreach where they exist
                for variant, t in seconds.items():
                    row = dict(optimizer=optimizer, mode=mode, case=case, variant=variant,
                               numel=n, tensors=tensors, ms=t * 1e3,
                               gbps=moved / t / 1e9 if mode != "iteration" else None,
                               vs_fastest=fastest / t,
                               vs_fused=_ratio(seconds, "torch-fused", t),
                               vs_foreach=_ratio(seconds, "torch-foreach", t),
                               vs_loop=_ratio(seconds, "torch-loop", t))
                    row["of_peak"] = row["gbps"] / ceiling if row["gbps"] else None
                    rows.append(row)
                    gbps = f"{row['gbps']:7.1f}" if row["gbps"] else f"{'-':>7}"
                    frac = f"{row['of_peak']:7.0%}" if row["of_peak"] else f"{'-':>7}"
                    print(f"{optimizer:<9} {mode:<10} {case:<10} {variant:<17} {t * 1e3:9.2f} "
                          f"{gbps} {frac} {row['vs_fastest']:9.2f}x "
                          f"{_fmt(row['vs_fused']):>8} {_fmt(row['vs_foreach']):>10} "
                          f"{_fmt(row['vs_loop']):>8}", flush=True)
    result = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                  copy_gbps=measured["copy"], inplace_gbps=measured["inplace"],
                  repeats=args.repeats, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
