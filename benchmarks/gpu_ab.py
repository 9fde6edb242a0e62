"""This checkout against a baseline checkout on one GPU: before/after of a kernel change, for the
device machine (no install needed).

Each sample is a fresh process of one checkout, the two alternating (A B A B ...), so that both
meet the same machine. A process times, for each optimizer, fastopt's step on GPT-2 small's
shapes with fresh grads (the default loop, ``gpu_bench.default_loop_ms``) and on one tensor of
1e8 elements with grads kept (``gpu_bench.step_ms``), fp32, medians of ``do_bench``. Prints
each sample as it comes and a table of the medians over samples and their ratio (baseline /
this checkout: above 1 is faster), and writes ``OUT/gpu-ab.json``.

Usage:  python3 benchmarks/gpu_ab.py --baseline DIR [--optimizers Adafactor ...] [--samples 2]
(DIR: the baseline's source tree, e.g. ``git archive HEAD | tar -x -C DIR``, in a folder that
``.git/info/exclude`` ignores: the device tool's ``run`` must then name it in ``carry``).
``OUT/gpu-ab.json`` is rewritten after every sample, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("gpt2-small", "1x1e8")

# What a sample runs, in the checkout it measures (its own gpu_bench).
SAMPLE = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
import gpu_bench
from fastopt.shapes import gpt2_small
out = {}
for name in sys.argv[1:]:
    out[name + " gpt2-small"] = gpu_bench.default_loop_ms("fastopt", name, gpt2_small(),
                                                          "fresh-step")
    out[name + " 1x1e8"] = gpu_bench.step_ms("fastopt", name, [(10**8,)], torch.float32)
print("RESULT " + json.dumps(out))
"""


def sample(tree: str, optimizers: list) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", SAMPLE, *optimizers], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{tree}: {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summary(samples: dict) -> list:
    """Per case: the medians over each checkout's samples so far and their ratio."""
    rows = []
    done = [name for name in samples if samples[name]]
    if len(done) < 2:
        return rows
    for key in samples["this"][0]:
        before = statistics.median(s[key] for s in samples["baseline"])
        after = statistics.median(s[key] for s in samples["this"])
        rows.append({"case": key, "baseline_ms": before, "this_ms": after,
                     "speedup": before / after})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--optimizers", nargs="+", default=["Adafactor"])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    trees = {"baseline": os.path.abspath(args.baseline), "this": ROOT}
    for tree in trees.values():
        if not all(os.path.isdir(os.path.join(tree, part)) for part in ("fastopt", "kernels")):
            raise SystemExit(f"{tree}: no fastopt/ and kernels/ there (was the baseline "
                             f"carried to this machine?)")
    import torch

    os.makedirs(args.out, exist_ok=True)
    header = {"device": torch.cuda.get_device_properties(0).name, "torch": torch.__version__}
    samples = {name: [] for name in trees}
    for k in range(args.samples):
        for name, tree in trees.items():
            samples[name].append(sample(tree, args.optimizers))
            print(f"sample {k} {name}: " + ", ".join(
                f"{key} {ms:.3f} ms" for key, ms in samples[name][-1].items()), flush=True)
            with open(os.path.join(args.out, "gpu-ab.json"), "w") as f:
                json.dump({**header, "samples": samples, "rows": summary(samples)}, f, indent=1)
    print(f"{'case':<24} {'baseline ms':>12} {'this ms':>10} {'speedup':>8}")
    for row in summary(samples):
        print(f"{row['case']:<24} {row['baseline_ms']:12.3f} {row['this_ms']:10.3f} "
              f"{row['speedup']:7.2f}x")


if __name__ == "__main__":
    main()
