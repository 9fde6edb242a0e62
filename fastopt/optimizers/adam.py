"""Adam (Kingma & Ba, 2014, arXiv 1412.6980) and AdamW (Loshchilov & Hutter, 2017, arXiv 1711.05101).

Same signatures, defaults, per-group options, errors and ``state_dict`` as ``torch.optim.Adam`` and
``torch.optim.AdamW``; the math is in ``torch_path.adam_update`` and ``kernels/adam.py``.
"""

from __future__ import annotations

__all__ = ["Adam", "AdamW", "AdamW8bit"]

from dataclasses import replace

import torch
from torch import Tensor

from fastopt import compiled, dispatch, quantization
from fastopt.declaration import ELEMENTWISE, Buffer, Declaration, Scalar
from fastopt.elementwise import _on
from fastopt.flat import Bucket, is_dtensor, local
from fastopt.optimizer import FlatOptimizer
from fastopt.plan import Chunk, StepPlan, merge_widened
from fastopt.precision import widens
from fastopt.state import MASTER, MASTERS
from fastopt.validation import check_adam, check_flags

QUANTIZED = quantization.FORMATS  # state_dtype names of blockwise quantized moments


def _update(opt, group, bucket, plan, grad_scale, found_inf) -> None:
    """Adam's step: the step counts and bias corrections (``count_adam_steps``), then torch's
    fused Adam over the flat buffers or ``kernels/adam.py`` (8-bit state: its own update)."""
    rows = bucket.state.scalars
    found_inf = _on(found_inf, bucket.device)
    amsgrad = group["amsgrad"]
    beta1, beta2 = group["betas"]
    runs = None if plan.whole else plan.step_runs
    lr = _on(group["lr"], bucket.device)
    host = bucket.backend == "torch" and bucket.device.type == "cpu"
    dispatch.implementation("count_adam_steps", bucket.backend)(
        bucket.state.host_scalars() if host else rows, runs, lr=lr, beta1=float(beta1),
        beta2=float(beta2))
    if bucket.variant in QUANTIZED:
        _update_int8(opt, group, bucket, plan, grad_scale, found_inf)
    else:
        options = {}  # params, moments and masters all in the params' dtype: none
        if widens(group, bucket.dtype):  # fp32 math on widened copies (fastopt.precision)
            plan = merge_widened(plan, group)  # small params' widened copies in one entry
            options = opt.precision_options(group, bucket, plan)
            if bucket.backend == "torch":
                options["compile"] = compiled.takes(group, bucket.dtype, bucket.numel,
                                                    bucket.device)
        dispatch.update_fn("adam", bucket.backend)(
            plan.pieces("param"),
            plan.grads,
            plan.pieces("exp_avg"),
            plan.pieces("exp_avg_sq"),
            plan.pieces("max_exp_avg_sq") if amsgrad else [],
            plan.scalar_views("step"),
            lr=lr,
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]),
            amsgrad=amsgrad,
            maximize=group["maximize"],
            decoupled=group["decoupled_weight_decay"],
            grad_scale=_on(grad_scale, bucket.device),
            found_inf=found_inf,
            **options,
        )
    if found_inf is not None:
        for count in [rows] if runs is None else [rows[lo:hi] for lo, hi, _ in runs]:
            count[:, 0].sub_(found_inf)
    opt.renumber(bucket, plan)


# Elements of small back-to-back chunks whose grads the torch path copies together (bounds the
# copy: 1 MiB of fp32), so that many small params share one slice's ops, or one call of the
# compiled loops (400 x 4096 bf16 params with int8 state: 13 ms a step at 64K, 8.6 at 256K).
MERGE_LIMIT = 1 << 18


def _merge_small(bucket: Bucket, chunks: list, block: int) -> list:
    """Runs of back-to-back chunks with equal run keys (so equal steps), each param a whole
    number of blocks but a run's last, together at most ``MERGE_LIMIT`` elements, as one chunk
    each (their grads concatenated by one C++ call, ``flatten_dense_tensors``: a Python
    ``reshape`` a grad cost as much as the copy): its params are one grid of blocks."""
    out, run = [], []
    partial = _partial_blocks(bucket, block)

    def close() -> None:
        if len(run) > 1:
            grad = torch._C._nn.flatten_dense_tensors([c.grad for c in run])
            out.append(Chunk(run[0].lo, run[-1].hi, run[0].start, run[-1].end, grad, run[0].key))
        else:
            out.extend(run)
        run.clear()

    run_first = run_end = run_key = None  # the open run's first element, end and run key
    for c in chunks:
        lo, hi, start, end, grad, key = c
        exact = grad.numel() == end - start
        if run and not (exact and run_end == start and run_key == key
                        and end - run_first <= MERGE_LIMIT):
            close()
        if exact and end - start <= MERGE_LIMIT:
            if not run:
                run_first, run_key = start, key
            run.append(c)
            run_end = end
        else:
            out.append(c)
        if True in partial[lo:hi]:
            close()  # a short last block ends the grid
    close()
    return out


def _partial_blocks(bucket: Bucket, block: int) -> list:
    """Per param of ``bucket``: does it end in a short block of ``block`` elements? (Made
    once: the layout is fixed.)"""
    key = ("partial blocks", block)
    partial = bucket.decided.get(key)
    if partial is None:
        partial = bucket.decided[key] = [(e - s) % block != 0
                                         for s, e in zip(bucket.starts, bucket.ends)]
    return partial


def _update_int8(opt, group, bucket, plan, grad_scale, found_inf) -> None:
    """Blockwise quantized moments (``fastopt.quantization``): the chunks' codes, block scales
    and block tables, in their format (on the torch path, small chunks merged)."""
    fmt = quantization.FORMATS[bucket.variant]
    if bucket.backend == "torch" and len(plan.chunks) > 1 and not bucket.external:
        plan = StepPlan(bucket, plan.route, plan.step_runs, plan.key,
                        _merge_small(bucket, plan.chunks, fmt.block))
    chunks = plan.chunks
    state = bucket.state
    blocks = [slice(state.block_starts[c.lo], state.block_starts[c.hi]) for c in chunks]
    codes = {name: [state.tensors[name][c.start // fmt.per_byte:
                                        fmt.code_bytes(bucket.chunk_end(c.hi))] for c in chunks]
             for name in ("exp_avg", "exp_avg_sq")}
    beta1, beta2 = group["betas"]
    dispatch.update_fn("adam_int8", bucket.backend)(
        bucket.pieces("param", chunks),
        [c.grad for c in chunks],
        codes["exp_avg"],
        [state.tensors["exp_avg_absmax"][b] for b in blocks],
        codes["exp_avg_sq"],
        [state.tensors["exp_avg_sq_absmax"][b] for b in blocks],
        [state.views["step"][c.lo] for c in chunks],
        block_tables=([state.block_table[b] for b in blocks] if bucket.backend == "triton"
                      else None),
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
        code_bits=fmt.bits,
        **opt.precision_options(group, bucket, plan),
        **({"compile": compiled.takes(group, bucket.dtype, bucket.numel, bucket.device,
                                      quantized=True)}
           if bucket.backend == "torch" else {}),
    )


ADAM = Declaration(
    buffers=(Buffer("exp_avg"), Buffer("exp_avg_sq"),
             Buffer("max_exp_avg_sq", when=lambda g: g.get("amsgrad", False))),
    # The step count, then what the Triton path derives from it each step: the step size and
    # the square root of the second bias correction (kernels/adam.py).
    scalars=(Scalar("step"),),
    derived=("step_size", "bias_correction2_sqrt"),
    update=_update,
    options=ELEMENTWISE | set(quantization.FORMATS),
    error_name="Adam",
    sparse_error="{name} does not support sparse gradients, please consider SparseAdam instead",
    reference=torch.optim.Adam,
    group_keys=("lr", "betas", "eps", "weight_decay"),
    cost="adam",
)


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

    declaration = ADAM

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
        **options,
    ) -> None:
        betas = check_adam(lr, betas, eps, weight_decay, foreach, capturable)
        check_flags(foreach, fused, differentiable)
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
        }
        super().__init__(params, defaults, **options)

    # Quantized state (state_dtype="int8" or "int4"): params of MIN_SIZE elements or more get
    # blockwise codes (uint8: param-shaped; 4-bit: two to a byte, flat) and per-block scales
    # (``*_absmax``); smaller ones keep fp32 state.
    def bucket_variant(self, group: dict, p: Tensor):
        if group.get("state_dtype") in QUANTIZED and local(p).numel() >= quantization.MIN_SIZE:
            return group["state_dtype"]
        return None

    def buffer_names(self, group: dict, bucket: Bucket) -> list:
        if bucket.variant not in QUANTIZED:
            return super().buffer_names(group, bucket)
        return ["exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax",
                *self.precision_names(group, bucket)]

    def buffer_dtype(self, group: dict, bucket: Bucket, name: str) -> torch.dtype:
        if group.get("state_dtype") not in QUANTIZED or name in MASTERS:
            return super().buffer_dtype(group, bucket, name)
        if bucket.variant in QUANTIZED and name in ("exp_avg", "exp_avg_sq"):
            return quantization.CODES
        return torch.float32

    def prepare_bucket(self, group: dict, bucket: Bucket) -> None:
        super().prepare_bucket(group, bucket)
        if bucket.variant not in QUANTIZED:
            return
        if any(is_dtensor(p) for p in bucket.params):
            raise ValueError(
                f"state_dtype={bucket.variant!r} on DTensor params (FSDP2, tensor parallel) is "
                "not supported: its per-block scales have no DTensor layout for distributed "
                "checkpoints; use state_dtype=torch.bfloat16 there"
            )
        fmt = QUANTIZED[bucket.variant]
        if bucket.device.type == "cpu":
            quantization.build_tables(fmt, bucket.device)
        bucket.state.add_blocks(fmt.block)
        if fmt.per_byte == 2:
            bucket.state.nibbles.update(("exp_avg", "exp_avg_sq"))

    def saved_state_shape(self, group: dict, p: Tensor, name: str, entry=None) -> tuple:
        """Moments and their scales in the form the saved ``entry`` holds them (any is loaded:
        ``adopt_value``): fp32 ones param-shaped, codes of either format as they are stored."""
        n = local(p).numel()
        fmt = QUANTIZED.get(group.get("state_dtype")) if n >= quantization.MIN_SIZE else None
        moment = name.removesuffix("_absmax")
        saved = entry.get(moment) if entry is not None else None
        if moment in ("exp_avg", "exp_avg_sq") and isinstance(saved, Tensor):
            codes = saved.dtype == quantization.CODES
            fmt = (quantization.saved_format(saved, n) or fmt) if codes else None
        if fmt is not None and name.endswith("_absmax"):
            return (fmt.num_blocks(n),)
        if fmt is not None and fmt.per_byte == 2 and name in ("exp_avg", "exp_avg_sq"):
            return (fmt.code_bytes(n),)
        if name.endswith("_absmax"):
            return None
        return super().saved_state_shape(group, p, name)

    def adopt_value(self, bucket: Bucket, i: int, name: str, value: Tensor) -> None:
        """Saved moments in any form are taken in the bucket's: fp32 ones (torch.optim's, or
        fastopt's without quantized state) are encoded, codes of the other format decoded
        (with their saved scales) and encoded again, codes into fp32 state decoded."""
        if name not in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
            return super().adopt_value(bucket, i, name, value)
        p = bucket.params[i]
        signed = name == "exp_avg"
        fmt = QUANTIZED.get(bucket.variant)
        if value.dtype == quantization.CODES:
            saved = quantization.saved_format(value, local(p).numel())
            scales = self.state[p].get(f"{name}_absmax") if saved is not None else None
            if not isinstance(scales, Tensor):
                raise ValueError(f"saved {name} of a param of shape {tuple(p.shape)} holds "
                                 f"{value.numel()} codes and no {name}_absmax to decode them")
            if saved == fmt:
                return super().adopt_value(bucket, i, name, value)
            root = quantization.dequantize(value, scales.to(value.device).float(), signed,
                                           saved, shape=local(p).shape)
            value = root if signed else root * root
            if fmt is None:  # fp32 state keeps no scales
                dict.pop(self.state[p], f"{name}_absmax")
        elif name.endswith("_absmax"):  # kept as saved beside codes kept as saved
            codes = self.state[p].get(name[: -len("_absmax")])
            if fmt is not None and isinstance(codes, Tensor) \
                    and quantization.saved_format(codes, local(p).numel()) == fmt:
                super().adopt_value(bucket, i, name, value)
            return
        if fmt is None:
            return super().adopt_value(bucket, i, name, value)
        values = value.float() if signed else value.float().clamp(min=0).sqrt()
        codes, scales = quantization.quantize(values.to(bucket.device), signed, fmt)
        bucket.state.local_view(name, i).copy_(codes)
        bucket.state.local_view(f"{name}_absmax", i).copy_(scales)

    def saved_state_names(self, group: dict, p: Tensor, entry=None) -> tuple:
        """The moments; saved codes need their scales to be decoded."""
        required = ["exp_avg", "exp_avg_sq"]
        if group.get("amsgrad") and group.get("state_dtype") not in QUANTIZED:
            required.append("max_exp_avg_sq")
        for name in ("exp_avg", "exp_avg_sq"):
            saved = entry.get(name) if entry is not None else None
            if isinstance(saved, Tensor) and saved.dtype == quantization.CODES:
                required.append(f"{name}_absmax")
        return required, ["max_exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", MASTER]


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2017), a drop-in for ``torch.optim.AdamW``.

    Adam with decoupled weight decay: :math:`\theta \leftarrow \theta(1-\gamma\lambda)` before the
    Adam update, instead of adding :math:`\lambda\theta` to the grad (see :class:`Adam`).
    """

    declaration = replace(ADAM, reference=torch.optim.AdamW)

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
        **options,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, **options)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class AdamW8bit(AdamW):
    """AdamW with blockwise 8-bit moments: ``AdamW(..., state_dtype="int8")`` (the name
    bitsandbytes users know). See ``fastopt.quantization``; tensors under 4096 elements keep
    fp32 moments. The state_dict holds plain tensors: uint8 codes and fp32 block scales."""

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        fused: bool | None = None,
        state_dtype="int8",
        **options,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, maximize=maximize,
                         foreach=foreach, capturable=capturable, fused=fused,
                         state_dtype=state_dtype, **options)
