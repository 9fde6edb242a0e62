"""Bytes per param from a cold start: the peak of params, grads, state and temporaries from
building the model and the optimizer through the first iterations, on the CPU.

    python benchmarks/cold_memory.py [--model mlp|deep|gpt2-small] [--iterations 3] [--json out.json]

Measured with ``torch.profiler`` (``profile_memory=True``) around everything, the model's
construction included: every allocation and free of the CPU allocator is recorded (a tensor
allocated before the profiler started would be freed unseen), and the running sum's maximum is
the cold peak. Each phase (the model, the optimizer's construction, each iteration) gets its own
peak. Printed beside it: ``fastopt.memory.estimate``'s peak.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastopt  # noqa: E402
from fastopt import quantization  # noqa: E402

PREFIX = "cold_memory:"


def phase_peaks(job) -> dict:
    """Run ``job(phase)`` under the profiler; ``phase(name)`` is a context manager naming a
    part of it. Returns {name: the most bytes held at once during it, beyond what was held
    when ``job`` started}, plus "peak" (the whole run) and "end" (held when it returned)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def phase(name: str):
        return record_function(PREFIX + name)

    gc.collect()  # no earlier garbage freed inside the run
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        job(phase)
    events = list(prof.profiler.kineto_results.events())
    ranges = [(e.name()[len(PREFIX):], e.start_ns(), e.start_ns() + e.duration_ns())
              for e in events if e.name().startswith(PREFIX)]
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current, peaks = 0, {"peak": 0}
    for event in memory:
        current += event.nbytes()
        peaks["peak"] = max(peaks["peak"], current)
        for name, start, end in ranges:
            if start <= event.start_ns() <= end:
                peaks[name] = max(peaks.get(name, 0), current)
    peaks["end"] = current
    return peaks


def cold_run(make_model, make_optimizer, loss_fn, iterations: int = 3) -> dict:
    """Build the model (``make_model()``) and its optimizer (``make_optimizer(model)``), then
    run ``iterations`` default loops (``loss_fn(model).backward(); step(); zero_grad()``), all
    under the profiler. Returns ``phase_peaks``' dict (phases "the model", "construction",
    "iteration 1", ...), "cold" (the most held from the optimizer's construction on) and
    "params": the number of param elements."""
    count = {}

    def job(phase):
        with phase("the model"):
            model = make_model()
        with phase("construction"):
            opt = make_optimizer(model)
        for i in range(iterations):
            with phase(f"iteration {i + 1}"):
                loss_fn(model).backward()
                opt.step()
                opt.zero_grad()
        count["params"] = sum(p.numel() for p in model.parameters())

    quantization.clear_tables()  # made inside the profile, as in a fresh process
    peaks = phase_peaks(job)
    peaks["cold"] = max(v for k, v in peaks.items() if k not in ("the model", "peak", "end"))
    return {**peaks, **count}


def mlp(dtype=torch.bfloat16, width: int = 1024, depth: int = 6):
    """``depth`` Linear(width, width) layers and a loss on a batch of 4."""
    def make_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(width, width, dtype=dtype)
                                     for _ in range(depth)])

    x = torch.randn(4, width, generator=torch.Generator().manual_seed(1)).to(dtype)
    return make_model, lambda model: model(x).float().square().mean()


def gpt2_small(dtype=torch.bfloat16):
    """GPT-2 small (124M params, tied embeddings) in ``dtype``, on 16 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    tokens = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))

    def make_model():  # built in ``dtype`` (no fp32 copy first)
        torch.manual_seed(0)
        return GPT2LMHeadModel._from_config(config, torch_dtype=dtype)

    return make_model, lambda model: model(tokens, labels=tokens).loss


def deep(dtype=torch.bfloat16):
    """14 Linear(2048, 2048) layers (58.7M params): a model whose largest grad is a small part
    of it, as in a model of many layers."""
    return mlp(dtype, width=2048, depth=14)


MODELS = {"mlp": mlp, "deep": deep, "gpt2-small": gpt2_small}

# The options measured: AdamW's default, and each of fastopt's memory options.
CONFIGS = {
    "default": {},
    "in_backward": dict(in_backward=True),
    "master_weights": dict(master_weights=True),
    "remainder": dict(master_weights="remainder"),
    "remainder8 + bf16 state": dict(master_weights="remainder8", state_dtype=torch.bfloat16),
    "remainder + int8 + in_backward": dict(master_weights="remainder", state_dtype="int8",
                                           in_backward=True),
    "bf16 state + stochastic rounding": dict(state_dtype=torch.bfloat16,
                                             stochastic_rounding=True),
    "int8 + stochastic rounding": dict(state_dtype="int8", stochastic_rounding=True),
    "int8 + stochastic rounding + in_backward": dict(state_dtype="int8",
                                                     stochastic_rounding=True, in_backward=True),
    "int4 + stochastic rounding + in_backward": dict(state_dtype="int4",
                                                     stochastic_rounding=True, in_backward=True),
    "remainder8 + int4 + in_backward": dict(master_weights="remainder8", state_dtype="int4",
                                            in_backward=True),
    "remainder + int4": dict(master_weights="remainder", state_dtype="int4"),
}


def measure(model_name: str, iterations: int, only: str | None = None) -> list:
    make_model, loss_fn = MODELS[model_name]()
    rows = []
    for name, options in CONFIGS.items():
        if only is not None and only not in name:
            continue
        run = cold_run(make_model, lambda m: fastopt.AdamW(m.parameters(), lr=1e-3, **options),
                       loss_fn, iterations)
        estimate = fastopt.memory.estimate(make_model(), "adamw", **options)
        rows.append(dict(model=model_name, config=name, **run,
                         estimated_peak=estimate.peak_bytes))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", choices=list(MODELS))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--only", help="the options whose name contains this (e.g. int4)")
    args = parser.parse_args(argv)
    rows = measure(args.model, args.iterations, args.only)
    print("| model | AdamW options | cold peak B/param | build | iteration 1 | later | "
          "estimated B/param |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        n = r["params"]
        later = max((v for k, v in r.items() if k.startswith("iteration ")
                     and k != "iteration 1"), default=0)
        print(f"| {r['model']} | {r['config']} | {r['cold'] / n:.2f} | {r['construction'] / n:.2f} | "
              f"{r['iteration 1'] / n:.2f} | {later / n:.2f} | {r['estimated_peak'] / n:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
