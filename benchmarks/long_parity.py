"""fastopt against its reference (torch.optim with ``foreach=False``; lion-pytorch for Lion) over
many steps on random configurations and shapes none of the tests use, params and every state
tensor compared after every step and never resynchronised, so that rounding differences can
build up: the table gives, per optimizer, the worst ratio ``|ours - ref| / (atol + rtol |ref|)``
seen (fp32 rtol 2e-6, atol 2e-7; fp64 rtol 1e-12, atol 1e-14; at most 1 is within tolerance)
and how many (configuration, step) pairs went over.

    python -m benchmarks.long_parity torch|triton [--k 30] [--steps32 100] [--out table.md]
    python -m benchmarks.long_parity torch --ours torchfused --only SGD,Adam,AdamW,Adagrad

Each configuration starts from one of the optimizer's configurations in ``tests/optim_db.py``
and draws new values for its options; 4-8 params (a 0-d one, an empty one, odd 1-D, 2-D and
3-D shapes), fresh random grads, and each param without a grad in a step with probability
``--p-skip``. ``triton`` runs the kernels under Triton's interpreter on CPU tensors (set here
before anything imports Triton; keep it small: ``--k 3 --steps32 20``). ``--ours torchfused``
puts torch's own ``fused=True`` class in fastopt's place: how far torch's fused CPU kernels
are from its for-loop in the same harness. Results: ``docs/precision.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import zlib

ap = argparse.ArgumentParser()
ap.add_argument("route", choices=["torch", "triton"])
ap.add_argument("--k", type=int, default=None, help="configs per optimizer")
ap.add_argument("--steps32", type=int, default=None)
ap.add_argument("--steps64", type=int, default=None)
ap.add_argument("--only", default=None, help="comma-separated optimizer names")
ap.add_argument("--seed", type=int, default=20261206)
ap.add_argument("--out", default=None)
ap.add_argument("--p-skip", type=float, default=0.10, help="chance a param has no grad in a step")
ap.add_argument("--ours", default="fastopt", choices=["fastopt", "torchfused"],
                help="torchfused: put torch.optim's own fused=True class in fastopt's place "
                     "(context: how far torch's fused CPU kernels are from its for-loop; "
                     "with --p-skip 0: torch 2.13's fused SGD refuses a param without a grad)")
args = ap.parse_args()

ROUTE = args.route
if ROUTE == "triton":
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FASTOPT_BACKEND"] = "triton"
else:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["FASTOPT_BACKEND"] = "torch"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]

import torch  # noqa: E402

import fastopt  # noqa: E402,F401
from helpers import TOLERANCES, reference_step, steppable  # noqa: E402
from optim_db import BY_NAME, NAMES, TESTED_APART  # noqa: E402

if ROUTE == "triton":
    # the test suite's own interpreter speed-ups (tests/conftest.py): no change to the math
    import conftest  # noqa: E402

    conftest._patch_language_once_per_launch()
    conftest._cache_numpy_dtypes()
    from fastopt.dispatch import resolve

    assert resolve("triton", torch.device("cpu"), torch.float32) == "triton"
    assert resolve("triton", torch.device("cpu"), torch.float64) == "torch"
    from triton.runtime import interpreter as _interp

    LAUNCHES = {"n": 0}
    _run = _interp.GridExecutor.__call__

    def _counted(self, *a, **k):
        LAUNCHES["n"] += 1
        return _run(self, *a, **k)

    _interp.GridExecutor.__call__ = _counted

K = args.k or (6 if ROUTE == "torch" else 3)
STEPS = {torch.float32: args.steps32 or (100 if ROUTE == "torch" else 20),
         torch.float64: args.steps64 or (30 if ROUTE == "torch" else 10)}
P_NO_GRAD = args.p_skip
STATS = {'keys': {}}


# ------------------------------------------------------------------ random configurations
def loguniform(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def sample_option(rng, name, option):
    """A random valid value for ``option`` of optimizer ``name`` (None: leave as is)."""
    if option == "lr":
        if name == "Adadelta":  # its lr scales an already normalised step (default 1.0)
            return loguniform(rng, 1e-2, 1.0)
        return loguniform(rng, 1e-4, 1e-1)
    if option == "weight_decay":
        return rng.choice([0.0, 1e-2, 0.1])
    if option == "betas":
        b1 = rng.choice([0.0, 0.5, 0.8, 0.9, round(rng.uniform(0.5, 0.99), 4)])
        b2 = rng.choice([0.9, 0.99, 0.999, round(rng.uniform(0.9, 0.9999), 5)])
        if name == "Lion":
            b2 = rng.choice([0.9, 0.99, round(rng.uniform(0.8, 0.999), 4)])
        return (b1, b2)
    if option == "eps":
        if name == "Adafactor":
            eps1 = rng.choice([None, loguniform(rng, 1e-30, 1e-3)])
            return (eps1, loguniform(rng, 1e-4, 1e-2))
        return loguniform(rng, 1e-10, 1e-3)
    if option == "momentum":
        return rng.choice([0.0, 0.5, 0.9, round(rng.uniform(0.1, 0.99), 3)])
    if option == "dampening":
        return rng.choice([0.0, 0.1, 0.5])
    if option in ("maximize", "amsgrad", "centered", "decoupled_weight_decay"):
        return rng.random() < 0.5
    if option == "momentum_decay":
        return rng.uniform(0.0, 0.05)
    if option == "alpha":
        return rng.uniform(0.5, 1.0) if name == "ASGD" else rng.uniform(0.8, 0.999)
    if option == "rho":
        return rng.uniform(0.5, 0.99)
    if option == "lambd":
        return rng.uniform(0.0, 0.05)
    if option == "t0":
        return rng.choice([0.0, 3.0, 10.0, 1e6])
    if option == "lr_decay":
        return rng.uniform(0.0, 0.05)
    if option == "initial_accumulator_value":
        return rng.uniform(0.0, 1.0)
    if option == "etas":
        return (rng.uniform(0.3, 0.7), rng.uniform(1.1, 1.5))
    if option == "step_sizes":
        return (loguniform(rng, 1e-6, 1e-3), rng.uniform(1.0, 50.0))
    if option == "beta2_decay":
        return rng.uniform(-1.0, -0.5)
    if option == "d":
        return rng.uniform(1.0, 2.0)
    if option == "nesterov":
        return None  # handled below (needs momentum > 0 and dampening == 0)
    return None


SKIP_OPTIONS = {"foreach", "fused", "capturable", "differentiable", "use_triton"}


def draw_config(rng, name):
    info = BY_NAME[name]
    base_kwargs, _ = rng.choice(info.configs)
    kwargs = {**info.typical, **base_kwargs}
    for option in info.cls._option_defaults():
        if option in SKIP_OPTIONS or (option != "lr" and rng.random() > 0.7):
            continue
        value = sample_option(rng, name, option)
        if value is not None:
            kwargs[option] = value
    if name == "SGD":
        if kwargs.get("nesterov") or rng.random() < 0.3:
            if rng.random() < 0.5 or kwargs.get("nesterov"):
                kwargs.update(nesterov=True, dampening=0.0,
                              momentum=kwargs.get("momentum") or 0.9)
        if kwargs.get("nesterov") and (not kwargs.get("momentum") or kwargs.get("dampening")):
            kwargs["nesterov"] = False
    if name == "Lion" and kwargs.get("decoupled_weight_decay") and not kwargs.get("lr", 1e-4) > 0:
        kwargs["decoupled_weight_decay"] = False
    return kwargs


def draw_shapes(rng, name):
    small = ROUTE == "triton"
    n = rng.randint(4, 8)
    shapes = [(), (0,)]
    for _ in range(n - 2):
        kind = rng.random()
        if kind < 0.55:
            shapes.append((rng.randint(1, 400 if small else 3000),))
        elif kind < 0.9:
            hi = 10 if small else 30
            shapes.append((2 * rng.randint(0, hi) + 1, 2 * rng.randint(0, hi) + 1))
        else:
            hi = 4 if small else 7
            shapes.append((2 * rng.randint(0, hi) + 1, 2 * rng.randint(0, hi) + 1,
                           rng.randint(1, 5)))
    rng.shuffle(shapes)
    return steppable(name, shapes)


# ------------------------------------------------------------------ comparison
def ratio(actual, expected, tol):
    """max |a - r| / (atol + rtol |r|); nan where both are nan counts as equal."""
    if actual.shape != expected.shape:
        return math.inf
    if expected.numel() == 0:
        return 0.0
    a = actual.detach().double()
    r = expected.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(r)
    err = (a - r).abs() / (tol["atol"] + tol["rtol"] * r.abs())
    err = torch.where(both_nan, torch.zeros_like(err), err)
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)  # one nan, not both
    # equal infinities
    err = torch.where((a == r) & torch.isinf(r), torch.zeros_like(err), err)
    return float(err.max())


def worst_element(actual, expected, tol):
    a, r = actual.detach().double().flatten(), expected.detach().double().flatten()
    err = (a - r).abs() / (tol["atol"] + tol["rtol"] * r.abs())
    i = int(torch.nan_to_num(err, nan=math.inf).argmax())
    return dict(index=i, ours=float(a[i]), ref=float(r[i]), abs_diff=float((a[i] - r[i]).abs()))


def run_one(name, kwargs, shapes, dtype, steps, seed, record):
    info = BY_NAME[name]
    tol = TOLERANCES[dtype]
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    if args.ours == "torchfused":
        ours = getattr(torch.optim, name)(ours_params, fused=True, **kwargs)
    else:
        ours = info.cls(ours_params, backend=ROUTE, **kwargs)
    ref = info.reference(ref_params, **kwargs)
    grad_rng = random.Random(seed + 1)
    worst_p, worst_s, worst_key = 0.0, 0.0, None
    bad_steps = 0
    compared = set()
    for step in range(steps):
        for p, q in zip(ours_params, ref_params):
            if grad_rng.random() < P_NO_GRAD:
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        reference_step(ref, ROUTE)
        step_bad = []
        for i, (p, q) in enumerate(zip(ours_params, ref_params)):
            r = ratio(p, q, tol)
            if r > worst_p:
                worst_p = r
            if r > 1.0:
                step_bad.append(("param", i, r, worst_element(p, q, tol)))
            s, rs = ours.state.get(p, {}), ref.state.get(q, {})
            if set(s) != set(rs):
                step_bad.append(("keys", i, math.inf, (sorted(s), sorted(rs))))
                worst_s, worst_key = math.inf, f"key mismatch {sorted(s)} vs {sorted(rs)}"
                continue
            for key, expected in rs.items():
                actual = s[key]
                if expected is None or not isinstance(expected, torch.Tensor):
                    if actual != expected and not (isinstance(actual, torch.Tensor)
                                                   and float(actual) == float(expected)):
                        step_bad.append(("state", i, math.inf, (key, actual, expected)))
                    continue
                r = ratio(actual, expected, tol)
                if expected.numel():
                    compared.add(key)
                if worst_key is None:
                    worst_key = key
                if r > worst_s:
                    worst_s, worst_key = r, key
                if r > 1.0:
                    step_bad.append((key, i, r, worst_element(actual, expected, tol)))
        if step_bad:
            bad_steps += 1
            if len(record) < 40:
                record.append(dict(name=name, dtype=str(dtype)[6:], seed=seed, step=step + 1,
                                   kwargs=kwargs, shapes=shapes, bad=step_bad[:4]))
    moved = any(not torch.equal(p.detach(), t) for p, t in zip(ours_params, init))
    assert moved, (name, kwargs, "params never moved")
    if info.name != "SGD" or kwargs.get("momentum"):
        assert compared, (name, kwargs, "no state compared")
    STATS["keys"].setdefault(name, set()).update(compared)
    return worst_p, worst_s, worst_key, bad_steps


def keyname(acc):
    return acc[2] if acc[1] > 0 else "every key bit-exact"


def fmt(x):
    if x == math.inf:
        return "inf"
    return f"{x:.3g}"


def main():
    t0 = time.time()
    names = [n for n in NAMES if n not in TESTED_APART]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    rows, record = [], []
    for name in names:
        rng = random.Random(args.seed * 1000003 + zlib.crc32(f"{ROUTE}:{name}".encode()))
        res = {torch.float32: [0.0, 0.0, None, 0], torch.float64: [0.0, 0.0, None, 0]}
        tn = time.time()
        configs = []
        for k in range(K):
            kwargs = draw_config(rng, name)
            shapes = draw_shapes(rng, name)
            seed = rng.randrange(2**31)
            configs.append((kwargs, shapes, seed))
            for dtype in (torch.float32, torch.float64):
                wp, ws, key, bad = run_one(name, kwargs, shapes, dtype, STEPS[dtype], seed, record)
                acc = res[dtype]
                acc[0] = max(acc[0], wp)
                if ws > acc[1] or acc[2] is None:
                    acc[1], acc[2] = ws, key
                acc[3] += bad
        rows.append((name, K, res))
        print(f"    state keys compared: {sorted(STATS['keys'].get(name, ()))}")
        r32, r64 = res[torch.float32], res[torch.float64]
        print(f"{name}: fp32 param {fmt(r32[0])} state {fmt(r32[1])} ({r32[2]}) bad {r32[3]} | "
              f"fp64 param {fmt(r64[0])} state {fmt(r64[1])} ({r64[2]}) bad {r64[3]} "
              f"[{time.time() - tn:.1f}s]", flush=True)
        for kwargs, shapes, seed in configs:
            print(f"    seed={seed} shapes={shapes} kwargs={kwargs}", flush=True)
    elapsed = time.time() - t0

    cmd = "python -m benchmarks.long_parity " + " ".join(sys.argv[1:])
    lines = []
    lines.append(f"### Parity, {ROUTE} route ({'Triton kernels under TRITON_INTERPRET=1' if ROUTE == 'triton' else 'CPU torch path'})")
    lines.append("")
    lines.append(f"Command: `{cmd}`  ")
    lines.append(f"torch {torch.__version__}; {K} random configs per optimizer (seed {args.seed}), "
                 f"4-8 params each (a 0-d, an empty one, odd 1-D / odd x odd 2-D / 3-D), "
                 f"fresh randn grads, each param without a grad with p={P_NO_GRAD} per step; "
                 f"fp32 {STEPS[torch.float32]} steps, fp64 {STEPS[torch.float64]} steps; "
                 f"params and every state tensor compared after every step, never resynced. "
                 f"Ratio = max |ours - ref| / (atol + rtol*|ref|) (fp32 rtol 2e-6 atol 2e-7, "
                 f"fp64 rtol 1e-12 atol 1e-14); <= 1 is within tolerance. Runtime {elapsed:.0f} s.")
    if ROUTE == "triton":
        lines.append(f"Triton kernel launches (interpreter) over the run: {LAUNCHES['n']}.")
        lines.append("fp64 params take the torch path by design (fastopt/dispatch.py: the kernels "
                     "compute in fp32), so the fp64 column there checks that fallback; the fp32 "
                     "reference runs under IEEESqrt (tests/helpers.py).")
    lines.append("")
    lines.append("| optimizer | configs | steps fp32/fp64 | worst param ratio fp32 | worst state ratio fp32 (key) | worst ratio fp64 (param / state, key) | (config, step) pairs > 1 (fp32 / fp64) |")
    lines.append("| --- | ---: | ---: | ---: | --- | --- | ---: |")
    for name, k, res in rows:
        r32, r64 = res[torch.float32], res[torch.float64]
        lines.append(f"| {name} | {k} | {STEPS[torch.float32]}/{STEPS[torch.float64]} | "
                     f"{fmt(r32[0])} | {fmt(r32[1])} ({keyname(r32)}) | "
                     f"{fmt(r64[0])} / {fmt(r64[1])} ({keyname(r64)}) | {r32[3]} / {r64[3]} |")
    if record:
        lines.append("")
        lines.append("Steps over tolerance (first few):")
        lines.append("")
        for rec in record[:20]:
            lines.append(f"- {rec['name']} {rec['dtype']} seed={rec['seed']} step={rec['step']} "
                         f"kwargs={rec['kwargs']} shapes={rec['shapes']}: {rec['bad']}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
