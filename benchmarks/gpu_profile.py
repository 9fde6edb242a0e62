"""Where a default-loop step's time goes on a GPU, for the device machine (no install needed).

For each optimizer (fp32, GPT-2 small's shapes, fresh grads every step as after ``zero_grad()``):
the route its plan took (``fastopt.plan``), the host's ms per step (until ``step()`` returns,
no sync), the device's median ms per step (``triton.testing.do_bench``), kernel launches per
step, the ops with the most host time and the kernels with the most device time
(``torch.profiler``).

Then the half-precision tolerance, measured on torch's own fused kernels: torch's ``fused=True``
Adam and SGD on 2**20 + 3 random bf16 params against torch's for-loop in bf16 after two steps
(how many elements fall outside 5e-3 absolute and relative, torch's test tolerance) and against
the fp32 for-loop after the first (how many lie more than half a bf16 ulp away: the contract
that ``tests/test_gpu.py::test_half_precision_on_cuda`` holds fastopt's kernels to).

Usage:  python3 benchmarks/gpu_profile.py [--optimizers NAdam SGD ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fastopt  # noqa: E402
from benchmarks.bench import OPTIONS, fresh_steps  # noqa: E402
from fastopt import step as stepper  # noqa: E402
from fastopt.shapes import gpt2_small  # noqa: E402

DEFAULT = ["NAdam", "RAdam", "ASGD", "Adamax", "Adagrad", "Adafactor", "SGD", "AdamW"]


def routes_taken(opt, call) -> list:
    """The plan routes of one ``call()`` of ``opt``'s step."""
    taken, make_plan = [], stepper.make_plan

    def recording(*args, **kwargs):
        plan = make_plan(*args, **kwargs)
        taken.append(plan.route)
        return plan

    stepper.make_plan = recording
    try:
        call()
    finally:
        stepper.make_plan = make_plan
    return taken


def profile_fresh_step(name: str, shapes: list) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    opt = getattr(fastopt, name)(params, backend="triton", **OPTIONS.get(name, {}))
    fresh_step = fresh_steps(opt, params, [
        [torch.randn(s, device="cuda", generator=gen) for s in shapes] for _ in range(2)])

    for _ in range(3):
        fresh_step()
    routes = routes_taken(opt, fresh_step)
    torch.cuda.synchronize()
    steps = 20
    start = time.perf_counter()
    for _ in range(steps):
        fresh_step()
    host_ms = (time.perf_counter() - start) / steps * 1e3
    torch.cuda.synchronize()
    device_ms = do_bench(fresh_step, warmup=10, rep=60)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fresh_step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sum(e.count for e in kernels) / 3
    host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    device = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:4]
    row = {"optimizer": name, "routes": sorted(set(routes)), "host_ms": host_ms,
           "device_ms": device_ms, "launches_per_step": launches,
           "top_host_ops": [(e.key[:60], e.count // 3, e.self_cpu_time_total / 3e3)
                            for e in host],
           "top_kernels": [(e.key[:60], e.count // 3, e.self_device_time_total / 3e3)
                           for e in device]}
    return row


def half_tolerance(name: str, kwargs: dict, n: int = 2**20 + 3) -> dict:
    """torch's fused step on bf16 params against its bf16 for-loop (after two steps, the
    second with state) and against its fp32 for-loop rounded once (after the first step, from
    the same values)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = torch.randn(n, device="cuda", generator=gen).bfloat16()
    grad = torch.randn(n, device="cuda", generator=gen).bfloat16()
    first, second = {}, {}
    for label, dtype, options in (("fused", torch.bfloat16, dict(fused=True)),
                                  ("loop16", torch.bfloat16, dict(foreach=False)),
                                  ("loop32", torch.float32, dict(foreach=False))):
        p = torch.nn.Parameter(init.to(dtype).clone())
        opt = getattr(torch.optim, name)([p], **kwargs, **options)
        for values in (first, second):
            p.grad = grad.to(dtype).clone()
            opt.step()
            values[label] = p.detach().float().clone()
    fused, loop16 = second["fused"], second["loop16"]
    outside_torch_tol = ((fused - loop16).abs() > 5e-3 + 5e-3 * loop16.abs()).sum().item()
    half_ulp = torch.finfo(torch.bfloat16).eps / 2
    fused1, loop32 = first["fused"], first["loop32"]
    outside_half_ulp = ((fused1 - loop32).abs() > half_ulp * loop32.abs() + 1e-5).sum().item()
    return {"optimizer": name, "elements": n,
            "two_steps_fused_vs_bf16_loop_outside_5e-3": outside_torch_tol,
            "two_steps_fused_equals_bf16_loop": int((fused == loop16).sum().item()),
            "first_step_fused_vs_fp32_loop_outside_half_ulp": outside_half_ulp}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=DEFAULT)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu-profile.json")
    results = {"device": torch.cuda.get_device_properties(0).name, "torch": torch.__version__,
               "fresh_step": [], "half_tolerance": []}
    for options in (dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-3), ):
        results["half_tolerance"].append(half_tolerance("Adam", options))
    results["half_tolerance"].append(half_tolerance("SGD", dict(lr=1e-2, momentum=0.9,
                                                                nesterov=True)))
    for row in results["half_tolerance"]:
        print(json.dumps(row), flush=True)
    shapes = gpt2_small()
    for name in args.optimizers:
        row = profile_fresh_step(name, shapes)
        torch.cuda.empty_cache()
        results["fresh_step"].append(row)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"{name:<9} routes {','.join(row['routes']):<12} host {row['host_ms']:7.3f} ms"
              f"  device {row['device_ms']:7.3f} ms  launches {row['launches_per_step']:6.1f}",
              flush=True)
        for key, count, ms in row["top_host_ops"]:
            print(f"    host   {ms:8.3f} ms  x{count:<4} {key}")
        for key, count, ms in row["top_kernels"]:
            print(f"    device {ms:8.3f} ms  x{count:<4} {key}")


if __name__ == "__main__":
    main()
