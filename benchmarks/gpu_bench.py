"""GPU microbenchmark: fastopt's Triton kernels against torch.optim's for-loop, foreach and fused
steps, timed with ``triton.testing.do_bench`` (medians) in one run on one GPU.

    python benchmarks/gpu_bench.py [--out DIR] [--quick]

Cases: one tensor of 1e6, 1e7, 1e8 and 4e8 elements; 1000 tensors of 16K; GPT-2 small's 148
parameter shapes (124M); fp32 and bf16; AdamW, Adam and SGD with momentum. The device copy
bandwidth is measured in the same run (a large ``copy_``, bytes read + written); each case
reports the GB/s its fastopt step reaches, counting the bytes a fused step must move (fp32
AdamW: read param, grad, exp_avg, exp_avg_sq, write param, exp_avg, exp_avg_sq = 28 per
element; bf16 halves it), as a fraction of that bandwidth. Writes
``DIR/<gpu-name>.json`` (schema in the issue and below) and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fastopt  # noqa: E402
from fastopt.shapes import gpt2_small, numel  # noqa: E402

CASES = {
    "1x1e6": [(10**6,)],
    "1x1e7": [(10**7,)],
    "1x1e8": [(10**8,)],
    "1x4e8": [(4 * 10**8,)],
    "1000x16K": [(16 * 1024,)] * 1000,
    "gpt2-small": gpt2_small(),
}
OPTIMIZERS = {
    "AdamW": dict(lr=1e-3, weight_decay=1e-2),
    "Adam": dict(lr=1e-3),
    "SGD": dict(lr=1e-3, momentum=0.9),
}
# Bytes a fused step reads + writes per element, per byte of element size.
ACCESSES = {"AdamW": 7, "Adam": 7, "SGD": 5}
VARIANTS = {
    "fastopt": lambda name, params, kw: getattr(fastopt, name)(params, backend="triton", **kw),
    "torch_fused": lambda name, params, kw: getattr(torch.optim, name)(params, fused=True, **kw),
    "torch_foreach": lambda name, params, kw: getattr(torch.optim, name)(params, foreach=True,
                                                                         **kw),
    "torch_loop": lambda name, params, kw: getattr(torch.optim, name)(params, foreach=False,
                                                                      **kw),
}


def copy_bandwidth() -> float:
    src = torch.empty(2**28, device="cuda")  # 1 GiB of fp32
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    bytes_moved = 2 * src.numel() * src.element_size()
    del src, dst
    return bytes_moved / (ms * 1e-3) / 1e9


def step_ms(variant: str, optimizer: str, shapes: list, dtype: torch.dtype) -> float:
    """Median ms of one step() with grads in place (as after backward), state already made."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype, generator=gen))
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", dtype=dtype, generator=gen)
    opt = VARIANTS[variant](optimizer, params, dict(OPTIMIZERS[optimizer]))
    opt.step()
    ms = do_bench(opt.step, warmup=10, rep=60)
    del opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def run(cases: list, dtypes: list, optimizers: list) -> dict:
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    results = {
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": bandwidth,
        "cases": [],
    }
    for optimizer in optimizers:
        for dtype in dtypes:
            for case in cases:
                shapes = CASES[case]
                n = numel(shapes)
                bytes_per_element = ACCESSES[optimizer] * torch.tensor([], dtype=dtype).element_size()
                times = {v: step_ms(v, optimizer, shapes, dtype) for v in VARIANTS}
                gbps = bytes_per_element * n / (times["fastopt"] * 1e-3) / 1e9
                row = {
                    "optimizer": optimizer,
                    "dtype": str(dtype).replace("torch.", ""),
                    "shape": case,
                    "numel": n,
                    "tensors": len(shapes),
                    "bytes_per_element": bytes_per_element,
                    "fastopt_ms": times["fastopt"],
                    "torch_fused_ms": times["torch_fused"],
                    "torch_foreach_ms": times["torch_foreach"],
                    "torch_loop_ms": times["torch_loop"],
                    "fastopt_gbps": gbps,
                    "fraction_of_copy": gbps / bandwidth,
                }
                results["cases"].append(row)
                print(f"{optimizer:<6} {row['dtype']:<9} {case:<11} fastopt {times['fastopt']:8.3f} ms"
                      f"  fused {times['torch_fused']:8.3f}  foreach {times['torch_foreach']:8.3f}"
                      f"  loop {times['torch_loop']:8.3f}  {gbps:7.0f} GB/s", flush=True)
    return results


def table(results: dict) -> str:
    lines = [f"{results['device']}  torch {results['torch']}  triton {results['triton']}  "
             f"copy {results['copy_gbps']:.0f} GB/s",
             f"{'optimizer':<9} {'dtype':<9} {'case':<11} {'fastopt ms':>10} {'GB/s':>7} "
             f"{'of copy':>7} {'vs fused':>8} {'vs foreach':>10} {'vs loop':>8}"]
    for r in results["cases"]:
        lines.append(
            f"{r['optimizer']:<9} {r['dtype']:<9} {r['shape']:<11} {r['fastopt_ms']:10.3f} "
            f"{r['fastopt_gbps']:7.0f} {r['fraction_of_copy']:7.0%} "
            f"{r['torch_fused_ms'] / r['fastopt_ms']:7.2f}x "
            f"{r['torch_foreach_ms'] / r['fastopt_ms']:9.2f}x "
            f"{r['torch_loop_ms'] / r['fastopt_ms']:7.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--quick", action="store_true", help="AdamW fp32 only")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    optimizers = ["AdamW"] if args.quick else list(OPTIMIZERS)
    results = run(args.cases, dtypes, optimizers)
    os.makedirs(args.out, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", results["device"]).strip("-")
    path = os.path.join(args.out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    print(table(results))


if __name__ == "__main__":
    main()
