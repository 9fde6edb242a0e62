"""Peak memory and time of a training iteration: the default loop (``backward(); step();
zero_grad()``) against ``in_backward=True``, measured in one run.

    python benchmarks/in_backward_memory.py [--models gpt2-small demo-cnn] [--repeats 5]

Peak: ``torch.profiler`` with ``profile_memory=True`` around one iteration (after warm-up
iterations, so the optimizer state exists); the allocations and frees it records, in time
order, give the most memory the iteration held on top of what it started with (params and
state). Time: median of interleaved repeats of the whole iteration (forward, backward, step,
zero_grad). Also printed: ``fastopt.memory.estimate``'s grads term, default and in_backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastopt  # noqa: E402
from fastopt import memory  # noqa: E402


def gpt2_small(tied: bool = True):
    """GPT-2 small (124M params, tied embeddings) from its config, on 16 tokens. A tied
    embedding's grad is held by autograd from the output layer's backward to the input's:
    ``tied=False`` (an output layer of its own, 163M params) shows the option without that."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                        tie_word_embeddings=tied)
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    return model, lambda: model(tokens, labels=tokens).loss


def demo_cnn():
    """The demo's CNN (``examples/demo.py``'s ``DigitsCNN``) on a batch of 64 8x8 digits."""
    from examples.demo import DigitsCNN

    model = DigitsCNN()
    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    return model, lambda: torch.nn.functional.cross_entropy(model(images), labels)


MODELS = {"gpt2-small": gpt2_small, "gpt2-small-untied": lambda: gpt2_small(tied=False),
          "demo-cnn": demo_cnn}


def iteration(loss_fn, opt) -> None:
    loss_fn().backward()
    opt.step()
    opt.zero_grad()


def peak_bytes(fn) -> int:
    """The most memory ``fn()`` holds at once beyond what was allocated when it started
    (``benchmarks.cold_memory.phase_peaks``)."""
    from benchmarks.cold_memory import phase_peaks

    return phase_peaks(lambda phase: fn())["peak"]


def measure(name: str, repeats: int) -> dict:
    runs = {}
    for in_backward in (False, True):
        torch.manual_seed(0)
        model, loss_fn = MODELS[name]()
        opt = fastopt.AdamW(model.parameters(), lr=1e-4, in_backward=in_backward)
        for _ in range(2):  # state, layout and step groups exist
            iteration(loss_fn, opt)
        runs[in_backward] = (model, loss_fn, opt)
    grad_bytes = sum(p.numel() * p.element_size() for p in runs[False][0].parameters())
    out = {"model": name, "grad_bytes": grad_bytes}
    for in_backward, (model, loss_fn, opt) in runs.items():
        key = "in_backward" if in_backward else "default"
        out[f"{key}_peak_bytes"] = peak_bytes(lambda: iteration(loss_fn, opt))
        out[f"{key}_estimated_grad_bytes"] = memory.estimate(
            model, "adamw", in_backward=in_backward).grad_bytes
    times = {False: [], True: []}
    for _ in range(repeats):
        for in_backward, (model, loss_fn, opt) in runs.items():
            start = time.perf_counter()
            iteration(loss_fn, opt)
            times[in_backward].append(time.perf_counter() - start)
    out["default_ms"] = 1e3 * statistics.median(times[False])
    out["in_backward_ms"] = 1e3 * statistics.median(times[True])
    out["saved_bytes"] = out["default_peak_bytes"] - out["in_backward_peak_bytes"]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure(name, args.repeats) for name in args.models]
    mib = 2**20
    print("| model | grads MiB | peak MiB, default loop | peak MiB, in_backward | saved MiB "
          "(of grads) | estimated grads MiB (default / in_backward) | iteration ms, default "
          "| in_backward | time ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['grad_bytes'] / mib:.1f} | {r['default_peak_bytes'] / mib:.1f} "
              f"| {r['in_backward_peak_bytes'] / mib:.1f} | {r['saved_bytes'] / mib:.1f} "
              f"({r['saved_bytes'] / r['grad_bytes']:.0%}) | "
              f"{r['default_estimated_grad_bytes'] / mib:.1f} / "
              f"{r['in_backward_estimated_grad_bytes'] / mib:.1f} | {r['default_ms']:.1f} | "
              f"{r['in_backward_ms']:.1f} | {r['default_ms'] / r['in_backward_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
