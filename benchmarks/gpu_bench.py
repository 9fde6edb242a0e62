"""GPU microbenchmark: fastopt's Triton kernels against torch.optim's for-loop, foreach and fused
steps, timed with ``triton.testing.do_bench`` (medians) in one run on one GPU.

    python3 benchmarks/gpu_bench.py [--out DIR] [--quick] [--budget SECONDS]

Cases: one tensor of 1e6, 1e7, 1e8 and 4e8 elements; 1000 tensors of 16K; GPT-2 small's 148
parameter shapes (124M); fp32 and bf16; AdamW, Adam and SGD with momentum, grads kept in place.
Then the default loop (``DEFAULT_LOOP_CASES``: fresh grads every step, step and whole
iteration, against torch fused and foreach, odd sizes included). Then the lean
variants (bf16 and 8-bit state, master weights, stochastic rounding, fused clipping) of AdamW
on 1e8 elements against torch's fused fp32 AdamW (``LEAN``). The device copy
bandwidth is measured in the same run (a large ``copy_``, bytes read + written); each case
reports the GB/s its fastopt step reaches, counting the bytes a fused step must move (fp32
AdamW: read param, grad, exp_avg, exp_avg_sq, write param, exp_avg, exp_avg_sq = 28 per
element; bf16 halves it), as a fraction of that bandwidth. Every other registered optimizer
(``benchmarks.bench.OPTIONS``) gets rows too (``EVERY``), against torch's fused and foreach
steps where torch has them, and Muon against torch.optim.Muon on transformers' hidden matrices
(``run_muon``, ``benchmarks/muon_bench.py``).

``DIR/<gpu-name>.json`` is rewritten after every row, the most telling rows first (AdamW's
default loop on GPT-2 small, then every optimizer, then the rest), and no section starts once
``--budget`` seconds have passed: a run cut short keeps what it measured. A table is printed
last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fastopt  # noqa: E402
from benchmarks.bench import OPTIONS as EVERY_OPTIONS  # noqa: E402
from benchmarks.bench import bytes_per_element, fresh_steps  # noqa: E402
from fastopt import registry  # noqa: E402
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


def step_ms(variant: str, optimizer: str, shapes: list, dtype: torch.dtype,
            options: dict | None = None) -> float:
    """Median ms of one step() with grads in place (as after backward), state already made;
    ``options`` go to the optimizer on top of OPTIMIZERS' (fastopt's lean variants)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype, generator=gen))
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", dtype=dtype, generator=gen)
    defaults = OPTIMIZERS.get(optimizer, EVERY_OPTIONS.get(optimizer, {}))
    opt = VARIANTS[variant](optimizer, params, {**defaults, **(options or {})})
    opt.step()
    ms = do_bench(opt.step, warmup=10, rep=60)
    del opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def header() -> dict:
    """The run's device, versions, date and measured copy bandwidth."""
    return {
        "device": torch.cuda.get_device_properties(0).name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": copy_bandwidth(),
        "cases": [],
    }


def run(results: dict, cases: list, dtypes: list, optimizers: list, save) -> None:
    """Kept-grads rows: fastopt against torch fused, foreach and for-loop (``save()`` after
    each)."""
    bandwidth = results["copy_gbps"]
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
                save()


# Lean variants of AdamW on one tensor of 1e8 elements, each against torch's fused fp32 AdamW
# on the same params: (param dtype, fastopt options, bytes a step moves per element).
#   bf16 state:   param r/w 8, grad 4, exp_avg r/w 4, exp_avg_sq r/w 4                = 20
#   int8 state:   param r/w 8, grad 4, codes r/w 2 + 2 (scales: 16 bytes per 256)     ~ 16
#   bf16 + master: param r/w 4 (read: has it changed outside?), master r/w 8, grad 2,
#                  fp32 moments r/w 16                                                = 30
#   bf16 + stochastic rounding: param r/w 4, grad 2, bf16 moments r/w 8               = 14
#   bf16 + remainder, bf16 state: param r/w 4, remainder r/w 4, grad 2, moments r/w 8 = 18
#   bf16 + remainder8, int8 state: param r/w 4, remainder r/w 2, grad 2, codes r/w 4  ~ 12
#   fp32 + max_grad_norm: the norm pass reads the grads once more: 28 + 4             = 32
#   int4 state:   param r/w 8, grad 4, codes r/w 1 + 1 (scales: 16 bytes per 128)     ~ 14
#   bf16 + remainder8, int4 state: param r/w 4, remainder r/w 2, grad 2, codes r/w 2  ~ 10
#   bf16 + stochastic rounding, int4 state: param r/w 4, grad 2, codes r/w 2          ~ 8
LEAN = {
    "bf16 state": (torch.float32, dict(state_dtype=torch.bfloat16), 20),
    "int8 state": (torch.float32, dict(state_dtype="int8"), 16 + 2 * 4 / 256),
    "bf16 + master_weights": (torch.bfloat16, dict(master_weights=True), 30),
    "bf16 + stochastic_rounding": (torch.bfloat16, dict(stochastic_rounding=True), 14),
    "bf16 + remainder, bf16 state": (torch.bfloat16, dict(
        master_weights="remainder", state_dtype=torch.bfloat16), 18),
    "bf16 + remainder8, int8 state": (torch.bfloat16, dict(
        master_weights="remainder8", state_dtype="int8"), 12 + 2 * 4 / 256),
    "fp32 + max_grad_norm": (torch.float32, dict(max_grad_norm=1.0), 32),
    "int4 state": (torch.float32, dict(state_dtype="int4"), 14 + 2 * 4 / 128),
    "bf16 + remainder8, int4 state": (torch.bfloat16, dict(
        master_weights="remainder8", state_dtype="int4"), 10 + 2 * 4 / 128),
    "bf16 + stochastic_rounding, int4 state": (torch.bfloat16, dict(
        stochastic_rounding=True, state_dtype="int4"), 8 + 2 * 4 / 128),
}


def run_lean(results: dict, save, n: int = 10**8) -> None:
    """Rows for the lean variants, ratios against torch fused fp32 AdamW in the same run."""
    fused = step_ms("torch_fused", "AdamW", [(n,)], torch.float32)
    results["lean"] = []
    for name, (dtype, options, bytes_per_element) in LEAN.items():
        ms = step_ms("fastopt", "AdamW", [(n,)], dtype, options)
        gbps = bytes_per_element * n / (ms * 1e-3) / 1e9
        row = {"variant": name, "numel": n, "bytes_per_element": bytes_per_element,
               "fastopt_ms": ms, "torch_fused_fp32_ms": fused, "vs_fused_fp32": fused / ms,
               "fastopt_gbps": gbps, "fraction_of_copy": gbps / results["copy_gbps"]}
        results["lean"].append(row)
        print(f"AdamW {name:<27} {ms:8.3f} ms  torch fused fp32 {fused:8.3f} ms  "
              f"{fused / ms:5.2f}x  {gbps:7.0f} GB/s", flush=True)
        save()


# The default loop (issue 10): zero_grad() between steps, so each step gets fresh grad tensors.
DEFAULT_LOOP_CASES = {
    "gpt2-small": gpt2_small(),
    "1000x16K": [(16 * 1024,)] * 1000,
    "1000x64": [(64,)] * 1000,
    "1x1e8-odd": [(10**8 + 3,)],  # not a multiple of 16: the tail of the last block is masked
}


def default_loop_ms(variant: str, optimizer: str, shapes: list, mode: str) -> float:
    """Median ms of the default loop, fp32: ``fresh-step`` hands each step() grads that are
    new tensors (two sets, swapped in before each call, as autograd's after zero_grad());
    ``iteration`` is zero_grad() + a backward that gives every param a grad + step()."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    weights = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    opt = VARIANTS[variant](optimizer, params,
                            dict(OPTIMIZERS.get(optimizer, EVERY_OPTIONS.get(optimizer, {}))))
    fresh_step = fresh_steps(opt, params, [[w.clone() for w in weights] for _ in range(2)])

    def iteration():
        opt.zero_grad()
        torch.stack([(p * w).sum() for p, w in zip(params, weights)]).sum().backward()
        opt.step()

    call = fresh_step if mode == "fresh-step" else iteration
    call()
    ms = do_bench(call, warmup=10, rep=60)
    del opt, params, weights, fresh_step
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def run_default_loop(results: dict, optimizers: list, save, cases=tuple(DEFAULT_LOOP_CASES),
                     modes=("fresh-step", "iteration")) -> None:
    """Default-loop rows: fastopt against torch fused and foreach, same run; GB/s counts the
    bytes a fused step must move (fp32 AdamW 28 per element, SGD 20), fresh-step only. Rows
    already measured are not measured again."""
    rows = results.setdefault("default_loop", [])
    for optimizer in optimizers:
        for mode in modes:
            for case in cases:
                if any((r["optimizer"], r["mode"], r["shape"]) == (optimizer, mode, case)
                       for r in rows):
                    continue
                shapes = DEFAULT_LOOP_CASES[case]
                n = numel(shapes)
                times = {v: default_loop_ms(v, optimizer, shapes, mode)
                         for v in ("fastopt", "torch_fused", "torch_foreach")}
                bytes_per_element = ACCESSES[optimizer] * 4
                gbps = bytes_per_element * n / (times["fastopt"] * 1e-3) / 1e9
                row = {"optimizer": optimizer, "mode": mode, "shape": case, "numel": n,
                       "tensors": len(shapes), "bytes_per_element": bytes_per_element,
                       **{f"{v}_ms": t for v, t in times.items()},
                       "vs_fused": times["torch_fused"] / times["fastopt"],
                       "vs_foreach": times["torch_foreach"] / times["fastopt"]}
                if mode == "fresh-step":
                    row.update(fastopt_gbps=gbps, fraction_of_copy=gbps / results["copy_gbps"])
                rows.append(row)
                print(f"{optimizer:<6} {mode:<10} {case:<11} fastopt {times['fastopt']:8.3f} ms"
                      f"  fused {times['torch_fused']:8.3f}  foreach {times['torch_foreach']:8.3f}"
                      f"  {row['vs_fused']:5.2f}x fused", flush=True)
                save()


# Every registered optimizer, fp32: one tensor of 1e8 elements with grads kept (the kernel's
# bandwidth) and GPT-2 small's shapes with fresh grads (the default loop), against torch's
# fused step where torch has one on CUDA and its foreach step.
EVERY = {"1x1e8": ("step", [(10**8,)]), "gpt2-small": ("fresh-step", gpt2_small())}


def _timed(measure):
    """``measure()``, or None where the variant refuses (torch's fused Adagrad on CUDA before
    torch 2.12, an optimizer torch.optim does not have)."""
    try:
        return measure()
    except (RuntimeError, TypeError, AttributeError, ValueError) as error:
        print(f"  ({type(error).__name__}: {str(error)[:80]})", flush=True)
        return None


def run_every_optimizer(results: dict, save, deadline: float) -> None:
    rows = results.setdefault("every_optimizer", [])
    for case, (mode, shapes) in EVERY.items():
        n = numel(shapes)
        for optimizer in EVERY_OPTIONS:
            if time.monotonic() > deadline:
                return
            times = {}
            for variant in ("fastopt", "torch_fused", "torch_foreach"):
                if variant != "fastopt" and not hasattr(torch.optim, optimizer):
                    times[variant] = None
                elif mode == "step":
                    times[variant] = _timed(lambda: step_ms(variant, optimizer, shapes,
                                                            torch.float32))
                else:
                    times[variant] = _timed(lambda: default_loop_ms(variant, optimizer, shapes,
                                                                    mode))
            if times["fastopt"] is None:
                continue
            moved = bytes_per_element(optimizer)
            gbps = moved * n / (times["fastopt"] * 1e-3) / 1e9
            peers = [t for v, t in times.items() if v != "fastopt" and t is not None]
            row = {"optimizer": optimizer, "mode": mode, "shape": case, "numel": n,
                   "bytes_per_element": moved, **{f"{v}_ms": t for v, t in times.items()},
                   "vs_fastest_torch": min(peers) / times["fastopt"] if peers else None,
                   "fastopt_gbps": gbps, "fraction_of_copy": gbps / results["copy_gbps"]}
            rows.append(row)
            versus = f"{row['vs_fastest_torch']:5.2f}x fastest torch" if peers else ""
            print(f"{optimizer:<9} {mode:<10} {case:<11} fastopt {times['fastopt']:8.3f} ms "
                  f"{gbps:7.0f} GB/s {gbps / results['copy_gbps']:5.0%}  {versus}", flush=True)
            save()


def run_muon(results: dict, save) -> None:
    """Muon against torch.optim.Muon on transformers' hidden matrices (benchmarks/muon_bench.py):
    the default loop, same run, with each step's FLOP rate and kernel-launching ops."""
    from benchmarks import muon_bench

    rows = results.setdefault("muon", [])
    for case in muon_bench.CASES:
        row = muon_bench.measure(case, torch.device("cuda"), repeats=7)
        rows.append(row)
        print(f"Muon      fresh-step {case:<18} fastopt {row['fastopt_ms']:8.3f} ms  torch "
              f"{row['torch_ms']:8.3f} ms  {row['ratio']:5.2f}x  "
              f"{row['fastopt_tflops']:6.1f} TFLOPS (model predicted {row['predicted_gpu_ratio']:.2f}x)",
              flush=True)
        save()


# The static cost model (python -m benchmarks.kernel_report --model ...): bytes and SASS
# instructions per element of each kernel variant, from which each row's fraction of the copy
# bandwidth measured here is predicted, so a GPU run tests the model too.
MODEL = os.path.join(os.path.dirname(__file__), "results", "kernel-model.json")
LEAN_KEYS = {"bf16 state": "adam fp32/bf16 flat", "int8 state": "adam_int8 fp32/u8 flat",
             "bf16 + master_weights": "adam bf16/fp32+master flat",
             "bf16 + stochastic_rounding": "adam bf16/bf16+sr flat",
             "bf16 + remainder, bf16 state": "adam bf16/bf16+remainder flat",
             "bf16 + remainder8, int8 state": "adam_int8 bf16/u8+remainder8 flat",
             "fp32 + max_grad_norm": None, "int4 state": "adam_int8 fp32/u4 flat",
             "bf16 + remainder8, int4 state": "adam_int8 bf16/u4+remainder8 flat",
             "bf16 + stochastic_rounding, int4 state": "adam_int8 bf16/u4+sr flat"}


def row_key(row: dict) -> str | None:
    """The cost model's key for a results row (see benchmarks/kernel_report.model_key)."""
    if "variant" in row:
        return LEAN_KEYS.get(row["variant"])
    if row["optimizer"] == "Adafactor":  # five launches a step: no one kernel's model
        return None
    kernel = {"SGD": "sgd"}.get(row["optimizer"]) \
        or registry.get(row["optimizer"]).declaration.kernel or "adam"
    dtype = "bf16" if row.get("dtype") == "bfloat16" else "fp32"
    route = "grad-table" if row.get("mode", "step") != "step" else "flat"
    return f"{kernel} {dtype}/{dtype} {route}"


def add_predictions(results: dict, path: str = MODEL, quiet: bool = False) -> None:
    """``predicted_fraction`` on every row the model covers, at the copy bandwidth measured."""
    try:
        from benchmarks.kernel_report import predicted_fraction
        with open(path) as f:
            entries = json.load(f)
    except (ImportError, OSError) as error:
        if not quiet:
            print(f"no cost model ({error}): predictions left out")
        return
    for row in results["cases"] + results.get("default_loop", []) + results.get("lean", []) \
            + results.get("every_optimizer", []):
        entry = entries.get(row_key(row) or "")
        if entry is not None and "fraction_of_copy" in row:
            row["predicted_fraction"] = predicted_fraction(entry, results["copy_gbps"])


def _predicted(row: dict) -> str:
    return f"{row['predicted_fraction']:7.0%}" if "predicted_fraction" in row else f"{'':>7}"


def table(results: dict) -> str:
    lines = [f"{results['device']}  torch {results['torch']}  triton {results['triton']}  "
             f"copy {results['copy_gbps']:.0f} GB/s",
             f"{'optimizer':<9} {'dtype':<9} {'case':<11} {'fastopt ms':>10} {'GB/s':>7} "
             f"{'of copy':>7} {'model':>7} {'vs fused':>8} {'vs foreach':>10} {'vs loop':>8}"]
    for r in results["cases"]:
        lines.append(
            f"{r['optimizer']:<9} {r['dtype']:<9} {r['shape']:<11} {r['fastopt_ms']:10.3f} "
            f"{r['fastopt_gbps']:7.0f} {r['fraction_of_copy']:7.0%} {_predicted(r)} "
            f"{r['torch_fused_ms'] / r['fastopt_ms']:7.2f}x "
            f"{r['torch_foreach_ms'] / r['fastopt_ms']:9.2f}x "
            f"{r['torch_loop_ms'] / r['fastopt_ms']:7.2f}x")
    for r in results.get("default_loop", []):
        share = (f"{r['fastopt_gbps']:7.0f} GB/s {r['fraction_of_copy']:7.0%} "
                 f"(model {_predicted(r)})" if "fastopt_gbps" in r else f"{'':>33}")
        lines.append(f"{r['optimizer']:<6} default loop {r['mode']:<10} {r['shape']:<11} "
                     f"{r['fastopt_ms']:10.3f} ms {share} {r['vs_fused']:7.2f}x fused "
                     f"{r['vs_foreach']:7.2f}x foreach")
    for r in results.get("every_optimizer", []):
        versus = (f"{r['vs_fastest_torch']:7.2f}x fastest torch"
                  if r["vs_fastest_torch"] is not None else "")
        lines.append(f"{r['optimizer']:<9} {r['mode']:<10} {r['shape']:<11} "
                     f"{r['fastopt_ms']:10.3f} ms {r['fastopt_gbps']:7.0f} GB/s "
                     f"{r['fraction_of_copy']:7.0%} {versus}")
    for r in results.get("lean", []):
        lines.append(f"AdamW {r['variant']:<27} 1e8 {r['fastopt_ms']:10.3f} ms "
                     f"{r['fastopt_gbps']:7.0f} GB/s {r['fraction_of_copy']:7.0%} "
                     f"(model {_predicted(r)}) {r['vs_fused_fp32']:7.2f}x torch fused fp32")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--quick", action="store_true", help="AdamW fp32 only")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds after which no further section starts")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    optimizers = ["AdamW"] if args.quick else list(OPTIMIZERS)
    results = header()
    os.makedirs(args.out, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", results["device"]).strip("-")
    path = os.path.join(args.out, f"{name}.json")

    def save():  # after every row: a run cut short keeps what it measured
        add_predictions(results, quiet=True)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)

    sections = [  # the most telling first
        lambda: run_default_loop(results, ["AdamW"], save, cases=["gpt2-small"],
                                 modes=["fresh-step"]),
        lambda: run(results, ["1x1e8"], [torch.float32], ["AdamW"], save),
        lambda: run_every_optimizer(results, save, deadline),
        lambda: run_muon(results, save),
        lambda: run_default_loop(results, ["AdamW"] if args.quick else ["AdamW", "SGD"], save),
        lambda: run(results, [c for c in args.cases if c != "1x1e8"], dtypes, optimizers, save),
        lambda: run(results, ["1x1e8"], [d for d in dtypes if d != torch.float32],
                    optimizers, save),
        lambda: run(results, ["1x1e8"], [torch.float32], [o for o in optimizers if o != "AdamW"],
                    save),
        lambda: None if args.quick else run_lean(results, save),
    ]
    for section in sections:
        if time.monotonic() > deadline:
            print(f"budget of {args.budget:.0f} s spent: the remaining sections are left out")
            break
        section()
    save()
    print(f"wrote {path}")
    print(table(results))


if __name__ == "__main__":
    main()
