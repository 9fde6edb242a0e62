"""How far fastopt's AdamW step is from the least a checked fused step can cost, on one model.

    python -m benchmarks.step_floor [--case demo-cnn] [--samples 21] [--steps 500]

Times, in one process and in the default loop (fresh grad tensors every step), fastopt's
``step()`` and a hand-written step on the same bucket that does only what no step may skip:
check every grad against its param (``fastopt.plan.check_grads``), count the step, and call the
same ``torch._fused_adamw_`` with the same entries. The difference is the engine's own cost per
step (options, layout, plan, state bookkeeping, hooks). Each figure is the fastest of
``--samples`` samples of ``--steps`` steps (the fixed costs, not the machine's noise).
"""

from __future__ import annotations

import argparse
import timeit

import torch

from benchmarks.bench import Setup, fresh_steps
from fastopt.plan import check_grads
from fastopt.shapes import CASES


class _CheckedFusedStep:
    """The floor: check the grads, count the step, one fused call (a whole fp32 bucket)."""

    def __init__(self, opt) -> None:
        (self.bucket,) = opt._buckets[0]
        self.group = opt.param_groups[0]
        b = self.bucket
        self.pieces = [b.param_pieces(name) for name in ("param", "exp_avg", "exp_avg_sq")]
        self.steps = b.state.views["step"]
        self.counts = b.state.host_scalars()[:, 0]

    def step(self) -> None:
        g = self.group
        with torch.no_grad():
            checked = check_grads(self.bucket, 0, "Adam", None, None, False)
            self.counts += 1
            params, exp_avgs, exp_avg_sqs = self.pieces
            beta1, beta2 = g["betas"]
            torch._fused_adamw_(params, checked.grads, exp_avgs, exp_avg_sqs, [], self.steps,
                                lr=g["lr"], beta1=beta1, beta2=beta2,
                                weight_decay=g["weight_decay"], eps=g["eps"], amsgrad=False,
                                maximize=False)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="demo-cnn", choices=list(CASES))
    parser.add_argument("--samples", type=int, default=21)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)
    setup = Setup("fastopt", "AdamW", CASES[args.case](), torch.device("cpu"))
    grads = [[w.clone() for w in setup.weights] for _ in range(2)]
    calls = {"fastopt": setup.fresh_step,
             "floor": fresh_steps(_CheckedFusedStep(setup.opt), setup.params, grads)}
    for call in calls.values():
        for _ in range(100):
            call()
    us = {name: min(timeit.repeat(call, number=args.steps, repeat=args.samples))
          / args.steps * 1e6 for name, call in calls.items()}
    print(f"{args.case}: fastopt {us['fastopt']:.1f} us, floor {us['floor']:.1f} us, "
          f"engine {us['fastopt'] - us['floor']:.1f} us a step")
    return us


if __name__ == "__main__":
    main()
