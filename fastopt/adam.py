"""Adam (Kingma & Ba, 2014, arXiv 1412.6980) and AdamW (Loshchilov & Hutter, 2017, arXiv 1711.05101).

Same signatures, defaults, per-group options, errors and ``state_dict`` as ``torch.optim.Adam`` and
``torch.optim.AdamW``; the math is in ``torch_path.adam_update`` and ``kernels/adam.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastopt import dispatch, quantization
from fastopt.flat import Bucket, is_dtensor, local
from fastopt.optimizer import MASTER, FlatOptimizer, _same, precision_defaults
from fastopt.validation import check_adam, check_flags, check_precision


INT8 = "int8"


class Adam(FlatOptimizer):
    r"""Adam (Kingma & Ba, 2014), a drop-in for ``torch.optim.Adam``.

    For each param :math:`\theta` with grad :math:`g` (negated if ``maximize``), at step :math:`t`:

    .. math::
        g &\leftarrow g + \lambda\theta \quad\text{(or, with decoupled\_weight\_decay: }
             \theta \leftarrow \theta(1-\gamma\lambda)\text{)} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ with amsgrad, else } v_t \\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,
              \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    Args are those of ``torch.optim.Adam``. ``foreach``, ``fused`` and ``capturable`` are accepted
    (with torch's errors for combinations torch refuses) and change nothing else: every step here
    is one fused pass per flat buffer, and on CUDA it does no host sync (so it can be captured in
    a CUDA graph). ``differentiable=True`` leaves the params where they are and runs
    torch.optim's own differentiable algorithm (autograd through the update). Keyword-only
    ``backend``: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``fastopt.dispatch``);
    ``flatten_params=False``: params stay where they are, only the state is flat;
    ``in_backward=True``: the update runs inside ``backward()``, a step group at a time, and
    grads are released at once (``fastopt.in_backward``).

    What differs from torch.optim: nothing in the numbers (within float rounding). Params move
    into flat buffers at construction (``p.data`` becomes a slot of one, with a storage of its
    own; the ``Parameter`` objects stay the same), and a param listed twice in one group is
    updated once.
    """

    uses_step = True
    update_name = "adam"
    grad_table_ok = True
    error_name = "Adam"
    reference_class = torch.optim.Adam
    required_group_keys = ("lr", "betas", "eps", "weight_decay")
    int8_state_ok = True
    precision_keys = ("master_weights", "state_dtype", "stochastic_rounding", "rounding_seed",
                      "max_grad_norm")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        flatten_params: bool = True,
        in_backward: bool = False,
    ) -> None:
        betas = check_adam(lr, betas, eps, weight_decay, foreach, capturable)
        check_flags(foreach, fused, differentiable)
        check_precision(master_weights, state_dtype, stochastic_rounding, rounding_seed,
                        max_grad_norm, int8_ok=True, amsgrad=amsgrad)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            **precision_defaults(master_weights, state_dtype, stochastic_rounding, rounding_seed,
                                 max_grad_norm),
        }
        super().__init__(params, defaults, backend=backend, flatten_params=flatten_params,
                         in_backward=in_backward)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)

    def state_names(self, group: dict, bucket: Bucket) -> list:
        names = ["exp_avg", "exp_avg_sq"]
        if bucket.variant == INT8:
            names += ["exp_avg_absmax", "exp_avg_sq_absmax"]
        elif group["amsgrad"]:
            names.append("max_exp_avg_sq")
        return names + self.precision_names(group, bucket)

    # 8-bit state (state_dtype="int8"): params of MIN_SIZE elements or more get blockwise codes
    # (uint8, param-shaped) and per-block scales (``*_absmax``); smaller ones keep fp32 state.
    def bucket_variant(self, group: dict, p: Tensor):
        if group.get("state_dtype") == INT8 and local(p).numel() >= quantization.MIN_SIZE:
            return INT8
        return None

    def state_dtype(self, group: dict, bucket: Bucket, name: str) -> torch.dtype:
        if group.get("state_dtype") != INT8 or name == MASTER:
            return super().state_dtype(group, bucket, name)
        if bucket.variant == INT8 and name in ("exp_avg", "exp_avg_sq"):
            return quantization.CODES
        return torch.float32

    def check_bucket(self, group: dict, bucket: Bucket) -> None:
        super().check_bucket(group, bucket)
        if bucket.variant == INT8 and any(is_dtensor(p) for p in bucket.params):
            raise ValueError(
                "state_dtype='int8' on DTensor params (FSDP2, tensor parallel) is not supported: "
                "its per-block scales have no DTensor layout for distributed checkpoints; use "
                "state_dtype=torch.bfloat16 there"
            )

    def saved_state_shape(self, group: dict, p: Tensor, name: str) -> tuple:
        if name.endswith("_absmax"):
            return (quantization.num_blocks(local(p).numel()),)
        return super().saved_state_shape(group, p, name)

    def adopt_value(self, bucket: Bucket, i: int, name: str, value: Tensor) -> None:
        """Saved fp32 moments (torch.optim's, or fastopt's without 8-bit state) are encoded."""
        if bucket.variant == INT8 and name in ("exp_avg", "exp_avg_sq") \
                and value.is_floating_point():
            signed = name == "exp_avg"
            values = value.float() if signed else value.float().clamp(min=0).sqrt()
            codes, scales = quantization.quantize(values.to(bucket.device), signed)
            bucket.local_view(name, i).copy_(codes)
            bucket.local_view(f"{name}_absmax", i).copy_(scales)
            return
        super().adopt_value(bucket, i, name, value)

    def saved_state_names(self, group: dict) -> tuple:
        required = ["exp_avg", "exp_avg_sq"]
        if group.get("amsgrad") and group.get("state_dtype") != INT8:
            required.append("max_exp_avg_sq")
        return required, ["max_exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", MASTER]

    def run_key(self, bucket: Bucket, i: int):
        return bucket.step_ids[i]

    def uniform_key(self, bucket: Bucket):
        return _same(bucket.step_ids)

    def update(self, group, bucket, plan, grad_scale, found_inf) -> None:
        rows = bucket.step_rows
        counted = [rows] if plan.whole else [rows[lo:hi] for lo, hi, _ in plan.step_runs]
        found_inf = _on(found_inf, bucket.device)
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        dispatch.implementation("count_adam_steps", bucket.backend)(
            counted, lr=_on(group["lr"], bucket.device), beta1=float(beta1), beta2=float(beta2))
        if bucket.variant == INT8:
            self._update_int8(group, bucket, plan.chunks, grad_scale, found_inf, plan)
        else:
            dispatch.update_fn("adam", bucket.backend)(
                plan.pieces("param"),
                plan.grads,
                plan.pieces("exp_avg"),
                plan.pieces("exp_avg_sq"),
                plan.pieces("max_exp_avg_sq") if amsgrad else [],
                plan.step_views,
                lr=_on(group["lr"], bucket.device),
                beta1=float(beta1),
                beta2=float(beta2),
                weight_decay=float(group["weight_decay"]),
                eps=float(group["eps"]),
                amsgrad=amsgrad,
                maximize=group["maximize"],
                decoupled=group["decoupled_weight_decay"],
                grad_scale=_on(grad_scale, bucket.device),
                found_inf=found_inf,
                **self.precision_options(group, bucket, plan),
            )
        if found_inf is not None:
            for count in counted:
                count[:, 0].sub_(found_inf)
        if plan.whole:
            bucket.step_ids = [next(self._ids)] * len(bucket.params)
            return
        new_ids: dict = {}
        for lo, hi, key in plan.step_runs:
            new_id = new_ids.setdefault(key, next(self._ids))
            bucket.step_ids[lo:hi] = [new_id] * (hi - lo)

    def _update_int8(self, group, bucket, chunks, grad_scale, found_inf, plan) -> None:
        blocks = [slice(bucket.block_starts[c.lo], bucket.block_starts[c.hi]) for c in chunks]
        beta1, beta2 = group["betas"]
        dispatch.update_fn("adam_int8", bucket.backend)(
            bucket.pieces("param", chunks),
            [c.grad for c in chunks],
            bucket.pieces("exp_avg", chunks),
            [bucket.state["exp_avg_absmax"][b] for b in blocks],
            bucket.pieces("exp_avg_sq", chunks),
            [bucket.state["exp_avg_sq_absmax"][b] for b in blocks],
            [bucket.step_views[c.lo] for c in chunks],
            block_tables=[bucket.block_table[b] for b in blocks],
            bases=[c.start for c in chunks],
            spans=[[(bucket.starts[k] - c.start, bucket.ends[k] - bucket.starts[k])
                    for k in range(c.lo, c.hi)] for c in chunks],
            lr=_on(group["lr"], bucket.device),
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]),
            maximize=group["maximize"],
            decoupled=group["decoupled_weight_decay"],
            grad_scale=_on(grad_scale, bucket.device),
            found_inf=found_inf,
            **self.precision_options(group, bucket, plan),
        )


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2017), a drop-in for ``torch.optim.AdamW``.

    Adam with decoupled weight decay: :math:`\theta \leftarrow \theta(1-\gamma\lambda)` before the
    Adam update, instead of adding :math:`\lambda\theta` to the grad (see :class:`Adam`).
    """

    reference_class = torch.optim.AdamW

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        flatten_params: bool = True,
        in_backward: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            master_weights=master_weights,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            rounding_seed=rounding_seed,
            max_grad_norm=max_grad_norm,
            backend=backend,
            flatten_params=flatten_params,
            in_backward=in_backward,
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


def _on(value, device: torch.device):
    """A tensor hyperparameter moved to ``device`` (other values pass through)."""
    if isinstance(value, Tensor) and value.device != device:
        return value.to(device)
    return value


class AdamW8bit(AdamW):
    """AdamW with blockwise 8-bit moments: ``AdamW(..., state_dtype="int8")`` (the name
    bitsandbytes users know). See ``fastopt.quantization``; tensors under 4096 elements keep
    fp32 moments. The state_dict holds plain tensors: uint8 codes and fp32 block scales."""

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, state_dtype="int8",
                 **kwargs) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, state_dtype=state_dtype, **kwargs)
