"""Check fastopt against torch.optim on your own model.

    report = fastopt.verify(model, loss_fn, batches, fastopt.AdamW, lr=1e-3, steps=10)
    print(report)          # one row per parameter: max abs / rel error, within tolerance?
    assert report.ok

``loss_fn(model, batch)`` returns the scalar loss of ``model`` on one batch; ``batches`` is a
list (or any iterable, cycled) of batches. Two deep copies of ``model`` start from the same
state; one is trained ``steps`` steps with the fastopt optimizer, the other with its reference
(the ``torch.optim`` class of its declaration, ``foreach=False``), on the same batches and
with the same RNG seed before every step (so dropout draws the same masks). After every step
each parameter of the two copies is compared; the report keeps the worst error per parameter.

Tolerance per dtype (``TOLERANCES``): ``|ours - ref| <= atol + rtol * |ref|`` elementwise.
Rounding differences can grow through training: they are checked after every step, and a
model whose training amplifies them strongly may need fewer ``steps``.

Command line (a model of your own through a factory ``module:function`` that returns
``(model, loss_fn, batches)``; from the repository root, ``examples.demo:digits_spec`` is the
main job's CNN on scikit-learn's digits)::

    python -m fastopt.verify --model pkg.mod:make [--optimizer AdamW] [--lr 1e-3] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import sys
import types
from dataclasses import dataclass, field

import torch

from fastopt import registry

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-7),
    torch.bfloat16: dict(rtol=5e-3, atol=5e-3),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


@dataclass
class ParamError:
    name: str
    shape: tuple
    dtype: torch.dtype
    max_abs: float = 0.0
    max_rel: float = 0.0
    ok: bool = True


@dataclass
class VerifyReport:
    optimizer: str
    steps: int
    params: list = field(default_factory=list)
    losses: list = field(default_factory=list)  # (ours, reference) per step

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.params)

    @property
    def max_loss_diff(self) -> float:
        return max((abs(a - b) for a, b in self.losses), default=0.0)

    def __str__(self) -> str:
        lines = [f"fastopt.{self.optimizer} vs its reference (torch.optim's for-loop), "
                 f"{self.steps} steps: {'OK' if self.ok else 'MISMATCH'}; "
                 f"max |loss difference| {self.max_loss_diff:.3g}",
                 f"{'parameter':<32} {'shape':<16} {'dtype':<9} {'max abs':>10} {'max rel':>10}"
                 f"  within tolerance"]
        for p in self.params:
            lines.append(f"{p.name:<32} {str(p.shape):<16} {str(p.dtype)[6:]:<9} "
                         f"{p.max_abs:10.3g} {p.max_rel:10.3g}  {'yes' if p.ok else 'NO'}")
        return "\n".join(lines)


def verify(model, loss_fn, batches, optimizer_cls, *, steps: int = 10, seed: int = 0,
           reference=None, **optimizer_kwargs) -> VerifyReport:
    """Train copies of ``model`` with ``optimizer_cls`` and its reference (its torch.optim
    twin, from its declaration; ``reference``: another class taking the same arguments, e.g.
    ``lion_pytorch.Lion``); compare."""
    name = optimizer_cls.__name__
    reference_cls = reference or optimizer_cls.declaration.reference
    if reference_cls is None:
        raise ValueError(f"{name} has no torch.optim twin: pass reference=, a class taking "
                         "the same arguments")
    ours_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    ours = optimizer_cls(ours_model.parameters(), **optimizer_kwargs)
    extra = {"foreach": False} if reference is None else {}
    ref = reference_cls(ref_model.parameters(), **extra, **optimizer_kwargs)
    names = [n for n, _ in ours_model.named_parameters()]
    report = VerifyReport(name, steps, [
        ParamError(n, tuple(p.shape), p.dtype) for n, p in ours_model.named_parameters()])
    batch_cycle = itertools.cycle(batches)
    for step in range(steps):
        batch = next(batch_cycle)
        losses = []
        for net, opt in ((ours_model, ours), (ref_model, ref)):
            torch.manual_seed(seed + step)
            opt.zero_grad()
            loss = loss_fn(net, batch)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        report.losses.append(tuple(losses))
        ref_params = dict(ref_model.named_parameters())
        for entry, n, p in zip(report.params, names, ours_model.parameters()):
            q = ref_params[n].detach()
            diff = (p.detach() - q).abs().double()
            scale = q.abs().double()
            tol = TOLERANCES.get(p.dtype, TOLERANCES[torch.float32])
            if diff.numel():
                entry.max_abs = max(entry.max_abs, diff.max().item())
                entry.max_rel = max(entry.max_rel, (diff / scale.clamp_min(1e-30)).max().item())
                entry.ok &= bool((diff <= tol["atol"] + tol["rtol"] * scale).all())
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a model k steps with fastopt and torch.optim from the same state and "
                    "report per-parameter errors.")
    parser.add_argument("--model", required=True,
                        help="module:function returning (model, loss_fn, batches), e.g. "
                             "examples.demo:digits_spec (run from the repository root)")
    parser.add_argument("--optimizer", default="AdamW",
                        choices=[n for n, c in registry.classes().items()
                                 if c.declaration.reference is not None])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    module, _, function = args.model.partition(":")
    model, loss_fn, batches = getattr(importlib.import_module(module), function)()
    report = verify(model, loss_fn, batches, registry.get(args.optimizer), lr=args.lr,
                    steps=args.steps)
    print(report)
    return 0 if report.ok else 1


class _CallableModule(types.ModuleType):
    """``fastopt.verify(...)`` calls :func:`verify`; the module stays importable and runnable
    (``python -m fastopt.verify``)."""

    def __call__(self, *args, **kwargs):
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    raise SystemExit(main())
