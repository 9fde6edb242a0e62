"""Know the memory an optimizer needs before allocating it (the seed's SAGA lesson).

``estimate(params_or_model, optimizer, **options)`` counts, per device, the bytes fastopt's
layout will hold for a given set of params, optimizer and options:

- ``param_bytes``: the params (all of them, trainable or not);
- ``grad_bytes``: one grad per trainable param (same dtype as the param); with
  ``in_backward=True`` the grads held at once: each step group's are released as soon as it is
  updated inside the backward (``fastopt.in_backward``), so the largest step group's;
- ``state_bytes``: the optimizer state that exists after the first step, exactly as fastopt
  lays it out: per bucket (param group x device x dtype) one flat buffer per state tensor,
  each slot aligned to 64 elements and the buffer padded to 128 (``flat.aligned_offsets``)
  (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``;
  SAGA's ``gradient_table`` of ``num_samples`` rows and ``gradient_mean``) in its stored dtype
  (``state_dtype``; ``"int8"``: a byte per element and an fp32 scale per block of 256;
  ``"int4"``: half a byte per element and an fp32 scale per block of 128), the fp32
  ``master_param`` of bf16/fp16 params (``master_weights``), plus the scalar table: 4 bytes per
  param for each scalar the declaration keeps (``step``...) and each value derived from them;
- ``scratch_bytes``: what a step of the default loop (``zero_grad()`` between steps) adds:
  the flat grad buffer where fresh grads are gathered into one and it is kept (the Triton path
  of an optimizer whose kernels cannot read grads by address; many small fp32 tensors on a
  CPU, ``fastopt.plan.gather_pays``), quantized state's block table on a GPU (16 bytes per
  block) or, on a CPU, its encoder's tables (``quantization.TABLE_BYTES`` per sign),
  and the largest bucket's temporaries on the CPU torch path (fp16/bf16 SGD, SAGA, widened
  slices for master weights / narrow or 8-bit state, measured per element: ``SLICE_SCRATCH``);
- ``layout_bytes``: what building the optimizer holds twice, the largest bucket's params (they
  move into flat buffers bucket by bucket, ``fastopt.flat.layout_parts``);
- ``step_bytes`` = params + grads + state + scratch, the most an iteration holds, and
  ``peak_bytes``, the cold peak: the larger of that and params + ``layout_bytes``;
- ``free_bytes``: free memory on the device now (CUDA: ``torch.cuda.mem_get_info``; CPU:
  available RAM), and ``fits``: whether what the optimizer still has to allocate (state and
  scratch) fits in it.

Params can be real tensors, ``meta`` tensors (no memory: pass ``device=`` to say where they
would live) or a module. ``python -m fastopt.memory --model gpt2-small --optimizer adamw``
prints the table for a named model shape.
"""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import psutil
import torch

from fastopt import compiled, registry
from fastopt.flat import (aligned_offsets, flat_entries, gapless, is_movable, layout_parts,
                          local, padded_size)
from fastopt.plan import gather_pays, gathered_entries, merge_spans
from fastopt.precision import HALF_DTYPES, REMAINDERS, SLICE, widens
from fastopt.quantization import CODES, FORMATS, TABLE_BYTES
from fastopt.quantization import SLICE as QUANTIZED_SLICE
from fastopt.torch_path import CHUNK
from fastopt.validation import kept_while_frozen

STEP_BYTES = 12  # per param: Adam's float32 step count and the two bias corrections derived from it
ADAFACTOR_RUN_TEMPORARIES = 4  # g*g, the update, its squares, the per-element coefficient
CHUNK_TEMPORARIES = 6  # an optimizer's torch math holds at most this many chunk-sized temporaries
# Temporaries per element of a widened slice on the CPU torch path, in slices of
# fastopt.precision.SLICE elements (measured with torch.profiler by tests/test_cold_memory.py:
# 16 bytes for fp32 copies of params, grads and state, 13 beside fp32 masters or rebuilding
# them from remainders (21 beside narrow state, either way); 20 with stochastic rounding's
# hashed noise;
# 18 for quantized state's decoding and encoding, in slices of quantization.SLICE elements:
# both moments in fp32, the encoder's int32 lookups a piece at a time and the new codes).
SLICE_SCRATCH = {"widened": 16, "master": 13, "master, narrow state": 21, "remainder": 13,
                 "remainder, narrow state": 21,
                 "int8": 18, "int4": 18, "stochastic_rounding": 20}


@dataclass
class DeviceMemory:
    """Bytes on one device (see the module docstring for what each field counts)."""

    device: str
    param_bytes: int = 0
    grad_bytes: int = 0
    state_bytes: int = 0
    scratch_bytes: int = 0
    layout_bytes: int = 0  # params held twice while the largest bucket is laid out
    free_bytes: int | None = None
    num_elements: int = 0  # trainable elements

    @property
    def step_bytes(self) -> int:
        """The most an iteration holds: params, grads, state and the step's scratch."""
        return self.param_bytes + self.grad_bytes + self.state_bytes + self.scratch_bytes

    @property
    def peak_bytes(self) -> int:
        """The cold peak: the optimizer's construction or an iteration, whichever holds more."""
        return max(self.param_bytes + self.layout_bytes, self.step_bytes)

    @property
    def new_bytes(self) -> int:
        """What the optimizer allocates itself (params and grads exist already)."""
        return self.state_bytes + self.scratch_bytes

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.new_bytes <= self.free_bytes


@dataclass
class MemoryReport:
    optimizer: str
    options: dict
    devices: dict = field(default_factory=dict)  # device name -> DeviceMemory

    def _total(self, name: str) -> int:
        return sum(getattr(d, name) for d in self.devices.values())

    param_bytes = property(lambda self: self._total("param_bytes"))
    grad_bytes = property(lambda self: self._total("grad_bytes"))
    state_bytes = property(lambda self: self._total("state_bytes"))
    scratch_bytes = property(lambda self: self._total("scratch_bytes"))
    peak_bytes = property(lambda self: self._total("peak_bytes"))
    num_elements = property(lambda self: self._total("num_elements"))

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices.values())

    @property
    def free_bytes(self) -> int | None:
        """Free memory summed over the devices that report it (None if none does)."""
        known = [d.free_bytes for d in self.devices.values() if d.free_bytes is not None]
        return sum(known) if known else None

    def __getitem__(self, device) -> DeviceMemory:
        """``report["cuda:0"]`` or ``report[torch.device("cpu")]``: one device's figures."""
        return self.devices[str(torch.device(device))]

    def as_dict(self) -> dict:
        """Plain numbers per device (for logging or JSON)."""
        return {name: dict(param_bytes=d.param_bytes, grad_bytes=d.grad_bytes,
                           state_bytes=d.state_bytes, scratch_bytes=d.scratch_bytes,
                           peak_bytes=d.peak_bytes, free_bytes=d.free_bytes, fits=d.fits)
                for name, d in self.devices.items()}

    def __str__(self) -> str:
        return format_table([self])


def estimate(params_or_model, optimizer, *, device=None, **options) -> MemoryReport:
    """The memory ``optimizer`` (a fastopt class or its name: "adamw", "nadam", ..., see
    ``fastopt.registry``) needs for these params with these options (the constructor's keywords; param groups may
    carry their own). ``device`` overrides where the params are counted (for meta tensors)."""
    cls = registry.get(optimizer)
    defaults = _defaults(cls)
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"{cls.__name__} has no option(s) {sorted(unknown)}")
    rules = cls.__new__(cls)  # the class's own layout rules, without building the optimizer
    groups = _param_groups(params_or_model)
    report = MemoryReport(cls.__name__, {**defaults, **options})
    held: dict = {}  # in_backward: per device, the largest step group's grads
    transient: dict = {}  # per device, the most one bucket's step allocates and frees
    for group in groups:
        group_options = {**defaults, **options, **{k: v for k, v in group.items() if k != "params"}}
        buckets: dict = {}
        seen: set = set()
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            where = torch.device(device) if device is not None else p.device
            entry = _device_entry(report, where)
            size = local(p).numel() * p.element_size()
            entry.param_bytes += size
            frozen = not p.requires_grad and p.grad is None
            if frozen and not kept_while_frozen(cls.declaration, p):
                continue  # no grad, no state (fastopt leaves it out of its buffers)
            entry.grad_bytes += 0 if frozen else size  # frozen, Adagrad's: state, no grad
            entry.num_elements += local(p).numel()
            variant = rules.bucket_variant(group_options, p)
            movable = group_options.get("flatten_params", True) and (p.device.type == "meta"
                                                                     or is_movable(p))
            # One key per bucket fastopt makes: complex and external params get their own.
            key = (str(where), p.dtype.to_real() if p.is_complex() else p.dtype, variant,
                   p.is_complex(), movable)
            real_elements = local(p).numel() * (2 if p.is_complex() else 1)
            buckets.setdefault(key, []).append((real_elements, tuple(local(p).shape), size,
                                                0 if frozen else size))
        for (where, dtype, variant, *_, movable), items in buckets.items():
            for bucket in _laid_out(items, movable):
                entry = report.devices[where]
                if movable:  # laid out bucket by bucket: one's originals and its flat buffer
                    entry.layout_bytes = max(entry.layout_bytes,
                                             bucket["elements"] * dtype.itemsize)
                step_scratch = _count_bucket(entry, rules, group_options, bucket, where,
                                             dtype, variant)
                transient[where] = max(transient.get(where, 0), step_scratch)
                if group_options.get("in_backward"):
                    entry.grad_bytes -= bucket["grad_bytes"]
                    held[where] = max(held.get(where, 0),
                                      _largest_step_group(bucket["sizes"], dtype.itemsize))
    for where, nbytes in held.items():
        report.devices[where].grad_bytes += nbytes
    for where, nbytes in transient.items():
        report.devices[where].scratch_bytes += nbytes
    for entry in report.devices.values():
        entry.free_bytes = free_bytes(entry.device)
    return report


def _laid_out(items: list, movable: bool) -> list:
    """The buckets fastopt lays params of one key out in (``flat.layout_parts``; external
    params stay in one), from each param's (real elements, local shape, bytes, grad bytes)."""
    parts = layout_parts([size for *_, size, _ in items]) if movable else [(0, len(items))]
    return [dict(sizes=[n for n, *_ in items[lo:hi]], shapes=[s for _, s, *_ in items[lo:hi]],
                 bytes=sum(b for *_, b, _ in items[lo:hi]), count=hi - lo,
                 grad_bytes=sum(g for *_, g in items[lo:hi]),
                 largest=max(b for *_, b, _ in items[lo:hi]),
                 movable=movable,
                 elements=padded_size([n for n, *_ in items[lo:hi]]))  # slots and padding
            for lo, hi in parts]


def _count_bucket(entry: DeviceMemory, rules, group_options: dict, bucket: dict, where: str,
                  dtype, variant) -> int:
    """Add one bucket's state and kept scratch to ``entry``; return the temporaries its step
    allocates and frees (buckets step one after another: the device holds the largest)."""
    shape = SimpleNamespace(dtype=dtype, variant=variant)
    entry.state_bytes += _state_bytes(rules, group_options, bucket, shape)
    kept, step_scratch = _scratch_bytes(rules, group_options, bucket, where, dtype, variant)
    entry.scratch_bytes += kept
    if variant is not None:
        if torch.device(where).type == "cpu":  # the encoder's tables (built once per process)
            step_scratch += 2 * TABLE_BYTES
        else:  # the kernels' int64 block table
            entry.scratch_bytes += 16 * _blocks(bucket, variant)
    return step_scratch


def _blocks(bucket: dict, variant: str) -> int:
    """Quantization blocks of a bucket of quantized state (``variant``: its format)."""
    return sum(FORMATS[variant].num_blocks(n) for n in bucket["sizes"])


def _largest_step_group(sizes: list, itemsize: int) -> int:
    """Bytes of the largest step group ``fastopt.in_backward`` makes of params of ``sizes``
    elements."""
    from fastopt.in_backward import group_bounds

    nbytes = [n * itemsize for n in sizes]
    return max((sum(nbytes[lo:hi]) for lo, hi in group_bounds(nbytes)), default=0)


def _state_bytes(rules, options: dict, bucket: dict, shape) -> int:
    """The state buffers the optimizer's rules give this bucket (``buffer_names``), each in its
    stored dtype (``buffer_dtype``: ``state_dtype``, fp32 beside fp32 masters, 8-bit codes),
    ``buffer_rows`` rows of the flat layout (SAGA's table), one fp32 scale per block
    (8-bit state's ``*_absmax``) or packed pieces of the declared shapes (Adafactor's), plus
    the scalar table: 4 bytes per kept scalar and derived value per param."""
    elements = bucket["elements"]  # of each flat buffer, alignment padding included
    total = 0
    for name in rules.buffer_names(options, shape):
        dtype = rules.buffer_dtype(options, shape, name)
        itemsize = dtype.itemsize
        if name.endswith("_absmax") and shape.variant is not None:
            total += 4 * _blocks(bucket, shape.variant)
            continue
        if shape.variant is not None and dtype == CODES:  # 4-bit codes: two to a byte
            total += elements // FORMATS[shape.variant].per_byte
            continue
        declared = rules.declaration.buffer(name)
        if declared is not None and declared.shape is not None:
            pieces = [declared.shape_for(s) for s in bucket["shapes"]]
            total += padded_size([math.prod(p) for p in pieces if p is not None]) * itemsize
            continue
        rows = rules.buffer_rows(options, name) or 1
        total += rows * elements * itemsize
    return total + 4 * rules.declaration.table_width(options) * bucket["count"]


def _scratch_bytes(rules, options: dict, bucket: dict, device: str, dtype,
                   variant=None) -> tuple:
    """(kept, temporaries) of one bucket's step: the flat grad buffer (kept grads are laid
    out into it while autograd's are still live), and what the update allocates and frees."""
    kept = bucket["elements"] * dtype.itemsize if _keeps_grad_buffer(rules, options, bucket,
                                                                      device, dtype) else 0
    scratch = 0
    on_cpu = torch.device(device).type == "cpu"
    cost = rules.declaration.cost
    if rules.declaration.scratch is not None:  # an optimizer's own rule (Muon's groups)
        own = rules.declaration.scratch(options, bucket, dtype, torch.device(device).type)
        if own is not None:
            return kept, own
    if on_cpu and cost == "sgd" and dtype in (torch.float16, torch.bfloat16):
        scratch += 2 * bucket["largest"]  # the for-loop path's per-param temporaries
    if on_cpu and cost == "saga":
        scratch += 2 * bucket["bytes"]  # g - table_i and the update, on the torch path
    if cost == "adafactor":  # torch ops on either device: a run of vectors' few temporaries,
        # a matrix's second-moment estimate, and the grads divided by a clip
        vectors = sum(math.prod(s) for s in bucket["shapes"] if len(s) <= 1)
        matrices = [math.prod(s) for s in bucket["shapes"] if len(s) > 1]
        scratch += ADAFACTOR_RUN_TEMPORARIES * padded_size([vectors]) * max(dtype.itemsize, 4)
        scratch += max(matrices, default=0) * dtype.itemsize
        if options.get("max_grad_norm") is not None:
            scratch += bucket["elements"] * dtype.itemsize
        if options.get("master_weights") and dtype in HALF_DTYPES:  # the grads in fp32
            scratch += bucket["elements"] * 4
    if on_cpu and cost == "elementwise":
        # the torch twin's temporaries, a chunk at a time
        largest = bucket["largest"] // dtype.itemsize
        scratch += CHUNK_TEMPORARIES * min(CHUNK, largest) * max(dtype.itemsize, 4)
    if on_cpu and widens(options, dtype) and cost != "adafactor":
        # fp32 copies of a slice of params, grads and state (8-bit: plus codes being encoded)
        largest = bucket["largest"] // dtype.itemsize
        if cost in ("adam", "elementwise") and variant is None and not kept:
            merged, largest = _merged_entries(bucket["sizes"])  # fresh grads: small params
            scratch += merged * dtype.itemsize  # stepped together, their grads copied
        if variant is not None and not kept and bucket["count"] > 1:
            copied, merged = _merged_quantized(bucket["sizes"])  # likewise, grids of blocks
            scratch += copied * dtype.itemsize
            largest = max(largest, merged)
        if cost == "adam" and compiled.takes(options, dtype, bucket["elements"], device,
                                             quantized=variant is not None):
            return kept, scratch + compiled.scratch_bytes(options, largest)
        if cost == "elementwise":  # widened a chunk at a time (fastopt.torch_path)
            largest = min(CHUNK, largest)
        scratch += SLICE_SCRATCH[_slice_kind(options, dtype)] * min(
            QUANTIZED_SLICE if variant is not None else SLICE, largest)
    return kept, scratch


def _merged_entries(sizes: list) -> tuple:
    """(largest run of merged params, largest entry), in elements, of a widened torch-path
    step over params of ``sizes`` elements (``fastopt.plan.merge_spans``)."""
    starts, ends, _ = aligned_offsets(sizes)
    spans = [(hi - lo, ends[hi - 1] - starts[lo]) for lo, hi in merge_spans(starts, ends)]
    return (max((n for count, n in spans if count > 1), default=0),
            max((n for _, n in spans), default=0))


def _merged_quantized(sizes: list) -> tuple:
    """(elements copied, largest run) of the runs of back-to-back params (no padding between
    their slots) whose quantized state steps as one chunk each, their fresh grads copied
    together: runs of at most ``fastopt.optimizers.adam.MERGE_LIMIT`` elements, all copied
    before the first steps (``adam._merge_small``)."""
    from fastopt.optimizers.adam import MERGE_LIMIT

    starts, ends, _ = aligned_offsets(sizes)
    runs, first = [], None
    for k in range(len(sizes)):
        if first is None or starts[k] != ends[k - 1] or ends[k] - starts[first] > MERGE_LIMIT:
            first = k
            runs.append(0)
        runs[-1] = ends[k] - starts[first] if k > first else 0
    return sum(runs), max(runs, default=0)


def _slice_kind(options: dict, dtype) -> str:
    """Which row of ``SLICE_SCRATCH`` a widened slice's temporaries take."""
    master, state_dtype = options.get("master_weights"), options.get("state_dtype")
    if isinstance(state_dtype, str):  # quantized state (its slices' noise included)
        return state_dtype
    if options.get("stochastic_rounding") and dtype == torch.bfloat16 and not master:
        return "stochastic_rounding"
    narrow = state_dtype is not None and state_dtype.itemsize < 4
    if master in REMAINDERS:
        return "remainder, narrow state" if narrow else "remainder"
    if master:
        return "master, narrow state" if narrow else "master"
    return "widened"


def _keeps_grad_buffer(rules, options: dict, bucket: dict, device: str, dtype) -> bool:
    """Does a step after ``zero_grad()`` gather the fresh grads into the bucket's flat grad
    buffer, and keep it (``fastopt.plan``)? On a GPU where the kernels cannot read them by
    address; on a CPU where the cost model finds gathering cheaper (many small fp32 tensors)."""
    if not bucket["movable"]:
        return False
    device = torch.device(device)
    if device.type != "cpu":
        return not rules.reads_by_address(options)
    fused_serves = dtype in (torch.float32, torch.float64) and not widens(options, dtype)
    op = rules.declaration.cpu_cost(fused_serves)
    return gather_pays(op, device, bucket["count"], bucket["elements"], dtype,
                       gapless(bucket["shapes"]),
                       gathered_entries(op, flat_entries(bucket["shapes"])))



def free_bytes(device) -> int | None:
    """Free memory on ``device`` now: CUDA's free bytes, available RAM for CPU, else None."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return None


def _device_entry(report: MemoryReport, device: torch.device) -> DeviceMemory:
    name = str(device)
    if name not in report.devices:
        report.devices[name] = DeviceMemory(name)
    return report.devices[name]


def _param_groups(params_or_model) -> list:
    if isinstance(params_or_model, torch.nn.Module):
        params_or_model = params_or_model.parameters()
    if isinstance(params_or_model, torch.Tensor):
        raise TypeError("params should be an iterable of Tensors or dicts, or a module, "
                        "but got " + torch.typename(params_or_model))
    items = list(params_or_model)
    if items and isinstance(items[0], dict):
        return [dict(g, params=_unnamed(g["params"])) for g in items]
    return [{"params": _unnamed(items)}]


def _unnamed(params) -> list:
    """Params, from tensors or ``named_parameters()``'s (name, param) pairs."""
    if isinstance(params, torch.Tensor):
        return [params]
    return [p[1] if isinstance(p, tuple) else p for p in params]


def _defaults(cls) -> dict:
    skip = {"self", "params", "foreach", "capturable", "differentiable", "fused", "backend",
            "use_triton"}
    signature = inspect.signature(cls.__init__)
    return {name: (None if p.default is inspect.Parameter.empty else p.default)
            for name, p in signature.parameters.items() if name not in skip}


# ---------------------------------------------------------------------- table and command line
def human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_table(reports: list) -> str:
    header = ("optimizer", "device", "params", "grads", "state", "scratch", "peak", "state B/elem",
              "free", "fits")
    rows = []
    for report in reports:
        label = report.optimizer + _describe(report.options)
        for d in report.devices.values():
            per = d.state_bytes / d.num_elements if d.num_elements else 0.0
            rows.append((label, d.device, human(d.param_bytes), human(d.grad_bytes),
                         human(d.state_bytes), human(d.scratch_bytes), human(d.peak_bytes),
                         f"{per:.2f}", human(d.free_bytes), "yes" if d.fits else "NO"))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _describe(options: dict) -> str:
    shown = []
    if options.get("amsgrad"):
        shown.append("amsgrad")
    if options.get("momentum"):
        shown.append(f"momentum={options['momentum']}")
    if options.get("num_samples"):
        shown.append(f"num_samples={options['num_samples']}")
    if options.get("master_weights"):
        shown.append("master_weights")
    if options.get("state_dtype") is not None:
        shown.append(f"state {str(options['state_dtype']).replace('torch.', '')}")
    if options.get("stochastic_rounding"):
        shown.append("stochastic_rounding")
    return f" ({', '.join(shown)})" if shown else ""


def variants() -> dict:
    """The command line's optimizers: every registered one with its defaults (SGD also with
    momentum, Adam with amsgrad), and AdamW's lean variants."""
    out = {}
    for name in registry.classes():
        out[name.lower()] = (name, {})
        if name == "SGD":
            out["sgd-momentum"] = (name, {"momentum": 0.9})
        if name == "Adam":
            out["adam-amsgrad"] = (name, {"amsgrad": True})
    out.update({
        "adamw-master": ("AdamW", {"master_weights": True}),
        "adamw-bf16-state": ("AdamW", {"state_dtype": torch.bfloat16}),
        "adamw-8bit-master": ("AdamW", {"state_dtype": "int8", "master_weights": True}),
    })
    return out


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def main(argv=None) -> None:
    from fastopt.shapes import MODELS, numel

    parser = argparse.ArgumentParser(
        prog="python -m fastopt.memory",
        description="The memory fastopt's optimizers need for a named model, before allocating.")
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2-small")
    known = variants()
    parser.add_argument("--optimizer", default="adamw",
                        help=f"comma-separated, from {', '.join(known)} (or 'all')")
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"],
                        default="float32")
    parser.add_argument("--device", default="cpu", help="where the params would live (cpu, cuda)")
    parser.add_argument("--num-samples", type=_positive_int, default=1000,
                        help="SAGA's gradient-table rows (training samples)")
    args = parser.parse_args(argv)
    shapes = MODELS[args.model]()
    dtype = getattr(torch, args.dtype)
    params = [torch.empty(s, dtype=dtype, device="meta", requires_grad=True) for s in shapes]
    names = list(known) if args.optimizer == "all" else args.optimizer.split(",")
    reports = []
    for name in names:
        if name not in known:
            parser.error(f"unknown optimizer {name!r}: choose from {', '.join(known)}")
        optimizer, options = known[name]
        if optimizer == "SAGA":
            options = dict(options, num_samples=args.num_samples)
        reports.append(estimate(params, optimizer, device=args.device, **options))
    print(f"{args.model}: {len(shapes)} tensors, {numel(shapes):,} elements, {args.dtype}")
    print(format_table(reports))


if __name__ == "__main__":
    main()
