"""One entry per optimizer, as torch's own ``optim_db`` (common_optimizers.py): its fastopt
class, the reference it must equal, configurations that exercise every option, the bad inputs
it must refuse, and what it supports (read from its declaration). The parity, state_dict,
validation, precision, memory, in_backward and GPU tests loop over this table;
``test_registry.py`` holds it to ``fastopt.registry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fastopt

try:  # Lion's reference: lucidrains' lion-pytorch (the dev extra pins it)
    import lion_pytorch
except ImportError:  # pragma: no cover - the dev extra installs it
    lion_pytorch = None


def lion_reference(params, maximize: bool = False, **kwargs):
    """lion-pytorch's Lion; ``maximize`` (fastopt's, as torch.optim's: the grad negated) by
    negating the grads around its step; ``lr=0``, which lion-pytorch asserts against, set on
    its groups after construction. Without lion-pytorch (the GPU machine has none) the test
    calling it is skipped."""
    if lion_pytorch is None:
        import pytest

        pytest.skip("Lion's reference, lion-pytorch, is not installed")
    lr = kwargs.get("lr", 1e-4)
    opt = lion_pytorch.Lion(params, **{**kwargs, "lr": lr if lr > 0 else 1e-4})
    if not lr > 0:
        for group in opt.param_groups:
            group["lr"] = lr
    if maximize:
        step = opt.step

        def maximizing_step(closure=None):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            for grad in grads:
                grad.neg_()
            try:
                return step(closure)
            finally:
                for grad in grads:
                    grad.neg_()

        opt.step = maximizing_step
    return opt


@dataclass
class OptimInfo:
    name: str
    configs: list  # (kwargs, what the row checks)
    errors: list = field(default_factory=list)  # (kwargs, exception, message regex)
    typical: dict = field(default_factory=dict)  # options that move params noticeably
    half: list = field(default_factory=list)  # configs whose reference is meaningful in bf16
    reference_name: str | None = None  # the reference class's name (default: ``name``)
    # options the reference reads from its constructor only (never from a param group)
    constructor_only: tuple = ()
    # does the reference step empty params? (torch's Adafactor divides by their size: a
    # ZeroDivisionError; fastopt's leaves them as they are, tests/test_behaviour.py)
    empty_params: bool = True
    # how the Triton kernels round half-precision params without masters: "once" (fp32 math,
    # one rounding per step, as torch's fused kernels) or "per_op" (every op rounded to the
    # half type, as torch.optim's for-loop: Adafactor's, tests/test_adafactor.py)
    half_kernel_rounding: str = "once"

    @property
    def cls(self) -> type:
        return getattr(fastopt, self.name)

    def reference(self, params, **kwargs):
        """The reference optimizer on ``params``: torch.optim's for-loop (``foreach=False``),
        or lion-pytorch's Lion."""
        if self.name == "Lion":
            return lion_reference(params, **kwargs)
        kwargs.setdefault("foreach", False)
        return getattr(torch.optim, self.reference_name or self.name)(params, **kwargs)

    def takes(self, option: str) -> bool:
        """Does the class take fastopt's keyword ``option`` (its declaration says)?"""
        return self.cls._takes(option)

    @property
    def declaration(self):
        return self.cls.declaration

    @property
    def counts_steps(self) -> bool:
        return self.declaration.counts_steps

    @property
    def differentiable(self) -> bool:
        return self.declaration.differentiable and self.declaration.reference is not None


LR = r"^Invalid learning rate: -0\.1$"
WD = r"^Invalid weight_decay value: -0\.1$"
EPS = r"^Invalid epsilon value: -1e-08$"
BETA0 = r"^Invalid beta parameter at index 0: 1\.5$"
BETA1 = r"^Invalid beta parameter at index 1: -0\.1$"
TENSOR_LR = r"^Tensor lr must be 1-element$"

OPTIM_DB = [
    OptimInfo(
        "SGD",
        [
            (dict(lr=0.1), "plain SGD"),
            (dict(lr=0.1, momentum=0.9), "momentum"),
            (dict(lr=0.1, momentum=0.9, dampening=0.5), "momentum with dampening"),
            (dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2), "nesterov and decay"),
            (dict(lr=0.05, momentum=0.5, dampening=0.1, weight_decay=0.1, maximize=True),
             "maximize with dampened momentum and decay"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(weight_decay=-0.1), ValueError, WD),
            (dict(momentum=-0.5), ValueError, r"^Invalid momentum value: -0\.5$"),
            (dict(nesterov=True), ValueError,
             r"^Nesterov momentum requires a momentum and zero dampening$"),
            (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
             r"^Nesterov momentum requires a momentum and zero dampening$"),
            (dict(lr=torch.tensor([0.1, 0.2])), ValueError, TENSOR_LR),
        ],
        typical=dict(lr=0.1, momentum=0.9),
        half=[dict(lr=1e-2, momentum=0.9, nesterov=True),
              dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1)],
    ),
    OptimInfo(
        "Adam",
        [
            ({}, "defaults"),
            (dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6), "custom lr, betas, eps"),
            (dict(weight_decay=0.1), "L2 weight decay added to the grad"),
            (dict(amsgrad=True, weight_decay=0.1), "amsgrad with L2 decay"),
            (dict(maximize=True, amsgrad=True, lr=1e-2), "maximize with amsgrad"),
            (dict(decoupled_weight_decay=True, weight_decay=0.1), "Adam with decoupled decay"),
            (dict(betas=(0.0, 0.0)), "betas of zero: no averaging"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(eps=-1e-8), ValueError, EPS),
            (dict(betas=(1.5, 0.999)), ValueError, BETA0),
            (dict(betas=(0.9, -0.1)), ValueError, BETA1),
            (dict(weight_decay=-0.1), ValueError, WD),
            (dict(lr=torch.tensor([0.1, 0.2])), ValueError, TENSOR_LR),
            (dict(betas=(0.9, torch.tensor(0.99))), ValueError,
             r"^betas must be either both floats or both Tensors$"),
            (dict(lr=torch.tensor(1e-3), foreach=True), ValueError,
             r"^lr as a Tensor is not supported for capturable=False and foreach=True$"),
            (dict(fused=True, foreach=True), RuntimeError,
             r"^`fused` and `foreach` cannot be `True` together\.$"),
            (dict(differentiable=True, fused=True), RuntimeError,
             r"^`fused` does not support `differentiable`$"),
        ],
        typical=dict(lr=0.1),
        half=[dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1, amsgrad=True)],
    ),
    OptimInfo(
        "AdamW",
        [
            ({}, "defaults (weight_decay=1e-2)"),
            (dict(lr=1e-2, weight_decay=0.3, amsgrad=True, maximize=True), "all flags on"),
            (dict(lr=0.0, weight_decay=0.5), "lr of zero changes nothing but state"),
            (dict(weight_decay=0.0, eps=0.0, lr=1e-3), "no decay, eps of zero"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(betas=(1.5, 0.999)), ValueError, BETA0),
            (dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True), ValueError,
             r"^betas\[0\] as a Tensor is not supported for capturable=False and foreach=True$"),
        ],
        typical=dict(lr=0.1),
        half=[dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-3)],
    ),
    OptimInfo(
        "NAdam",
        [
            ({}, "defaults"),
            (dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, momentum_decay=1e-2),
             "custom lr, betas, eps, momentum decay"),
            (dict(weight_decay=0.1), "L2 weight decay added to the grad"),
            (dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
             "decoupled decay and maximize"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(eps=-1e-8), ValueError, EPS),
            (dict(betas=(1.5, 0.999)), ValueError, BETA0),
            (dict(weight_decay=-0.1), ValueError, WD),
            (dict(momentum_decay=-0.2), ValueError, r"^Invalid momentum_decay value: -0\.2$"),
            (dict(lr=torch.tensor([0.1, 0.2])), ValueError, TENSOR_LR),
        ],
        typical=dict(lr=0.05),
        half=[dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1)],
    ),
    OptimInfo(
        "RAdam",
        [
            ({}, "defaults: unrectified until step 6"),
            (dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6), "rectified from step 3"),
            (dict(weight_decay=0.1, maximize=True), "L2 weight decay and maximize"),
            (dict(weight_decay=0.1, decoupled_weight_decay=True, betas=(0.9, 0.8)),
             "decoupled decay"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(eps=-1e-8), ValueError, EPS),
            (dict(betas=(0.9, -0.1)), ValueError, BETA1),
            (dict(weight_decay=-0.1), ValueError, WD),
        ],
        typical=dict(lr=0.05, betas=(0.8, 0.9)),
        half=[dict(lr=1e-3, betas=(0.8, 0.9), eps=1e-3)],
    ),
    OptimInfo(
        "Adamax",
        [
            ({}, "defaults"),
            (dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-4), "custom lr, betas, eps"),
            (dict(weight_decay=0.1, maximize=True), "weight decay and maximize"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(eps=-1e-8), ValueError, EPS),
            (dict(betas=(1.5, 0.999)), ValueError, BETA0),
            (dict(weight_decay=-0.1), ValueError, WD),
        ],
        typical=dict(lr=0.05),
        half=[dict(lr=1e-3, eps=1e-3, weight_decay=0.1)],
    ),
    OptimInfo(
        "Adagrad",
        [
            ({}, "defaults"),
            (dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.3), "lr decay, accumulator"),
            (dict(weight_decay=0.1, eps=1e-3, maximize=True), "weight decay and maximize"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(lr_decay=-0.5), ValueError, r"^Invalid lr_decay value: -0\.5$"),
            (dict(weight_decay=-0.1), ValueError, WD),
            (dict(initial_accumulator_value=-1.0), ValueError,
             r"^Invalid initial_accumulator_value value: -1\.0$"),
            (dict(eps=-1e-8), ValueError, EPS),
        ],
        typical=dict(lr=0.1),
        half=[dict(lr=1e-2, eps=1e-3, initial_accumulator_value=0.1)],
        constructor_only=("initial_accumulator_value",),
    ),
    OptimInfo(
        "RMSprop",
        [
            ({}, "defaults"),
            (dict(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=0.1), "alpha, eps, decay"),
            (dict(lr=1e-3, momentum=0.9), "momentum"),
            (dict(lr=1e-3, centered=True, maximize=True), "centered, maximize"),
            (dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=0.1),
             "momentum, centered, decay"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(eps=-1e-8), ValueError, EPS),
            (dict(momentum=-0.5), ValueError, r"^Invalid momentum value: -0\.5$"),
            (dict(weight_decay=-0.1), ValueError, WD),
            (dict(alpha=-0.5), ValueError, r"^Invalid alpha value: -0\.5$"),
        ],
        typical=dict(lr=0.01),
        half=[dict(lr=1e-3, eps=1e-3, momentum=0.5)],
    ),
    OptimInfo(
        "Adadelta",
        [
            ({}, "defaults"),
            (dict(lr=0.5, rho=0.8, eps=1e-4), "lr, rho, eps"),
            (dict(weight_decay=0.1, maximize=True), "weight decay and maximize"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(rho=1.5), ValueError, r"^Invalid rho value: 1\.5$"),
            (dict(eps=-1e-8), ValueError, EPS),
            (dict(weight_decay=-0.1), ValueError, WD),
        ],
        typical=dict(lr=1.0),
        half=[dict(lr=1.0, eps=1e-3)],
    ),
    OptimInfo(
        "ASGD",
        [
            ({}, "defaults"),
            (dict(lr=0.05, lambd=1e-2, alpha=0.5, t0=3), "averaging from step 4"),
            (dict(lr=0.05, t0=0, weight_decay=0.1, maximize=True), "decay and maximize"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(weight_decay=-0.1), ValueError, WD),
        ],
        typical=dict(lr=0.05),
        half=[dict(lr=1e-2, t0=2)],
    ),
    OptimInfo(
        "Rprop",
        [
            ({}, "defaults"),
            (dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 1.0)), "etas, step sizes"),
            (dict(maximize=True), "maximize"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(etas=(1.5, 2.0)), ValueError, r"^Invalid eta values: 1\.5, 2\.0$"),
        ],
        typical=dict(lr=0.01),
        half=[dict(lr=1e-2)],
    ),
    OptimInfo(
        "Lion",
        [
            ({}, "defaults"),
            (dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1), "betas and weight decay"),
            (dict(lr=3e-3, weight_decay=0.5, decoupled_weight_decay=True),
             "decoupled weight decay (divided by the initial lr)"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, LR),
            (dict(betas=(1.5, 0.99)), ValueError, BETA0),
            (dict(weight_decay=-0.1), ValueError, WD),
        ],
        typical=dict(lr=1e-2),
        half=[dict(lr=1e-3, weight_decay=0.1)],
        constructor_only=("decoupled_weight_decay",),
    ),
    OptimInfo(
        "Adafactor",
        [
            ({}, "defaults"),
            (dict(lr=0.05, beta2_decay=-0.5, eps=(1e-3, 1e-2), d=1.5), "custom decay, eps, d"),
            (dict(lr=0.05, weight_decay=0.1, maximize=True), "weight decay and maximize"),
            (dict(lr=0.02, eps=(1e-30, 1e-3), d=1.0, weight_decay=0.05),
             "tiny eps1, every update clipped"),
        ],
        errors=[
            (dict(lr=-0.1), ValueError, r"^Learning rate should be >= 0 but is: -0\.1$"),
            (dict(beta2_decay=0.5), ValueError, r"^beta2_decay should be <= 0 but is: 0\.5$"),
            (dict(eps=(-1.0, 1e-3)), ValueError, r"^epsilon1 should be >= 0 but is: -1\.0$"),
            (dict(eps=(None, -1.0)), ValueError, r"^epsilon2 should be >= 0 but is: -1\.0$"),
            (dict(d=0.5), ValueError, r"^Clipping threshold d should be >= 1 but is: 0\.5$"),
            (dict(weight_decay=-0.1), ValueError,
             r"^weight_decay should be >= 0 but is: -0\.1$"),
            (dict(lr=torch.tensor([0.1, 0.2])), ValueError, TENSOR_LR),
        ],
        typical=dict(lr=0.05),
        half=[dict(lr=1e-2, eps=(1e-3, 1e-3))],
        empty_params=False,
        half_kernel_rounding="per_op",
    ),
]

BY_NAME = {info.name: info for info in OPTIM_DB}
NAMES = list(BY_NAME)
# Registered optimizers whose reference is not a torch.optim class run step for step: their
# own tests hold them to one (tests/test_saga.py: a SAGA written out; tests/test_precision.py:
# 8-bit AdamW against fp32 AdamW and bitsandbytes' code tables).
TESTED_APART = {"SAGA": "test_saga.py", "AdamW8bit": "test_quantized_state.py", "Muon": "test_muon.py"}


def config_ids(entries) -> list:
    return [f"{info.name}-{desc}" for info, _, desc in entries]


def every_config() -> list:
    """(info, kwargs, desc) for every configuration of every optimizer."""
    return [(info, kwargs, desc) for info in OPTIM_DB for kwargs, desc in info.configs]
