"""Every Triton kernel specialization fastopt launches, compiled for a GPU without one, and what
each costs by a static model.

    python -m benchmarks.kernel_report --report            # table for the variants a GPU launches
    python -m benchmarks.kernel_report --report --specs F  # ... and the specializations in F

**Specializations.** A launch is compiled for its constexpr values and for what Triton's CUDA
launcher reads off each argument (``triton._C.libtriton.native_specialize_impl``): a pointer's
element type and whether its address is 16-byte aligned, whether an int is 1 (then a constant),
divisible by 16, or needs 64 bits. ``recording()`` wraps the interpreter's launches (the test
suite runs under ``TRITON_INTERPRET=1``, see tests/conftest.py) and derives each launch's
specialization with those rules, with the interpreter's larger blocks (kernels/launch.py)
replaced by the GPU's. ``gpu_variants()`` adds the variants a GPU launches that a CPU test run
does not reach (bf16/fp16 params, masters, stochastic rounding, lower-precision state).

**Compile.** ``compile_spec`` runs Triton's real compiler (``triton.compile`` of an
``ASTSource``) for ``sm_90``/``sm_80``; Triton's own ptxas (``get_ptxas``), with the flags
Triton's ``make_cubin`` passes, reports registers, spills and stack; nvdisasm gives the SASS. Per kernel it checks: every element stream moves in
the widest global accesses its bytes per thread allow (128-bit from 16 bytes up), no local memory, no spills on sm_90, no fp64 per element.

**Cost model (a prediction, not a measurement).** Per element: the bytes a step must move
(each stream read and/or written once, at its storage width) and the SASS instructions a thread
issues (the static count over its elements; for the table kernels that count holds both the
whole-block and the masked path, so it is an upper bound). On an H100 SXM (132 SMs, 4 issue
slots of 32 lanes per SM per cycle at 1.755 GHz, copy bandwidth ``--bandwidth`` in GB/s):

    memory time = bytes / bandwidth        issue time = instructions / (132 * 4 * 32 * clock)
    issue share = issue time / memory time at 90 % of bandwidth     (target: <= 0.5)
    predicted fraction of copy bandwidth = memory time / max(memory time, issue time)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

# H100 SXM: multiprocessors, clock under a streaming load, copy bandwidth (read + write) in GB/s.
H100 = {"sms": 132, "clock_ghz": 1.755, "bandwidth_gbs": 3000.0}
ISSUE_LANES_PER_SM = 4 * 32  # four schedulers, one warp instruction each per cycle
TARGET_FRACTION = 0.9  # "memory-bound": the issue share is judged at 90 % of copy bandwidth
ARCHS = (90, 80)

KERNELS = {  # short name -> (module, kernel)
    "adam": ("fastopt.kernels.adam", "_adam_kernel"),
    "adam_steps": ("fastopt.kernels.adam", "_adam_steps_kernel"),
    "sgd": ("fastopt.kernels.sgd", "_sgd_kernel"),
    "adam_int8": ("fastopt.kernels.adam_int8", "_adam_int8_kernel"),
    "saga": ("fastopt.kernels.saga", "_saga_kernel"),
    # every declared elementwise optimizer: the skeleton with its per-element function (the
    # constexpr MATH, recorded as "module:function")
    "elementwise": ("fastopt.kernels.elementwise", "_elementwise_kernel"),
    # Adafactor's passes (fastopt.kernels.adafactor): the tiles' and the per-param ones
    "adafactor_stats": ("fastopt.kernels.adafactor", "_stats_kernel"),
    "adafactor_statistics": ("fastopt.kernels.adafactor", "_statistics_kernel"),
    "adafactor_means": ("fastopt.kernels.adafactor", "_means_kernel"),
    "adafactor_tiles": ("fastopt.kernels.adafactor", "_tiles_kernel"),
    "adafactor_coefficients": ("fastopt.kernels.adafactor", "_coefficients_kernel"),
}
TILE_KERNELS = ("adafactor_stats", "adafactor_tiles")  # a program per tile of a matrix
# Kernels of per-param scalars, computed in double as torch.optim computes them from Python
# floats (Adam's bias corrections, Adafactor's step coefficient): fp64 there is not per element.
SCALAR_KERNELS = ("adam_steps", "adafactor_coefficients")
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")


# ---------------------------------------------------------------------------------------------
# Which elements streams each kernel reads ("L") and writes ("S"), from its constexprs.

def streams(kernel: str, constexprs: dict) -> list:
    """[(pointer argument, "L", "S" or "LS")] of the per-element streams of one variant."""
    c = constexprs
    if kernel == "adam":
        out = [("param_ptr", "LS"), ("grad_ptr", "L"), ("exp_avg_ptr", "LS"),
               ("exp_avg_sq_ptr", "LS")]
        if c.get("AMSGRAD"):
            out.append(("max_exp_avg_sq_ptr", "LS"))
    elif kernel == "sgd":
        out = [("param_ptr", "LS"), ("grad_ptr", "L")]
        if c.get("HAS_MOMENTUM"):
            out.append(("momentum_buffer_ptr", "S" if c.get("FIRST_STEP") else "LS"))
    elif kernel == "adam_int8":
        out = [("param_ptr", "LS"), ("grad_ptr", "L"), ("m_codes_ptr", "LS"),
               ("v_codes_ptr", "LS")]
    elif kernel == "saga":
        out = [("param_ptr", "LS"), ("grad_ptr", "L"), ("row_ptr", "LS"), ("mean_ptr", "LS")]
    elif kernel == "elementwise":
        out = [("param_ptr", "LS"), ("grad_ptr", "L")]
        out += [(f"b{k}_ptr", "LS") for k in range(4) if c.get("BUFFERS", 0) >> k & 1]
    elif kernel == "adafactor_stats":  # a matrix's (a vector's: the param alone)
        return [("param_ptr", "L"), ("grad_ptr", "L")] + (
            [("master_ptr", "L")] if c.get("HAS_MASTER") else [])
    elif kernel == "adafactor_tiles":
        if not c.get("APPLY"):
            return [("grad_ptr", "L")]
        out = [("param_ptr", "LS"), ("grad_ptr", "L")]
    else:
        return []
    if c.get("HAS_MASTER"):
        out.append(("master_ptr", "LS"))
    return out


def elements_per_program(kernel: str, constexprs: dict) -> int:
    if kernel == "adam_int8":
        return constexprs["ROWS_PER_PROGRAM"] * constexprs["QBLOCK"]
    if kernel in TILE_KERNELS:
        from fastopt.kernels import adafactor
        return adafactor.TILE_ROWS.value * adafactor.TILE_COLS.value
    return constexprs.get("BLOCK_SIZE", 0)


def extra_bytes_per_element(kernel: str, constexprs: dict) -> float:
    """Bytes beyond the element streams: the 8-bit state's fp32 block scales, read and written."""
    if kernel == "adam_int8":
        return 2 * 2 * 4 / constexprs["QBLOCK"]
    return 0.0


_SIZES = {"fp64": 8, "i64": 8, "u64": 8, "fp32": 4, "i32": 4, "u32": 4, "bf16": 2, "fp16": 2,
          "i16": 2, "u8": 1, "i8": 1, "u1": 1}


def element_size(pointer_type: str) -> int:
    return _SIZES[pointer_type.lstrip("*k")]


def stream_type(spec: dict, pointer: str) -> str:
    """What one element of a stream is stored as: its pointer's type, or ``u4`` for 4-bit
    codes (two to a byte)."""
    if spec["kernel"] == "adam_int8" and spec["constexprs"].get("CODE_BITS") == 4 \
            and pointer in ("m_codes_ptr", "v_codes_ptr"):
        return "u4"
    return spec["signature"].get(pointer, "").lstrip("*")


def stream_bytes(spec: dict, pointer: str) -> float:
    """Bytes of one element of a stream."""
    kind = stream_type(spec, pointer)
    return 0.5 if kind == "u4" else element_size(kind)


# ---------------------------------------------------------------------------------------------
# Recording the launches a run makes (under the interpreter) as GPU specializations.

RECORDED: dict = {}  # key -> spec


def _gpu_constant(name: str, value):
    """The interpreter runs bigger programs (kernels/launch.py); a GPU launches these."""
    from fastopt.kernels import adam_int8, launch

    if name == "BLOCK_SIZE" and value == launch.INTERPRETER_BLOCK_SIZE:
        return launch.BLOCK_SIZE
    if name == "ROWS_PER_PROGRAM" and value % adam_int8.INTERPRETER_ROWS == 0:
        return adam_int8.ROWS * value // adam_int8.INTERPRETER_ROWS  # (4-bit: twice the rows)
    return value


def spec_of(kernel: str, fn, args: tuple, kwargs: dict) -> dict:
    """The specialization a CUDA launch of ``fn(*args, **kwargs)`` compiles: ``{kernel,
    signature: {arg: type}, constexprs: {arg: value}, divisible: [args], num_warps}``."""
    import inspect

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    options = {k: kwargs.pop(k) for k in list(kwargs) if k in LAUNCH_OPTIONS}
    bound = inspect.signature(fn).bind(*args, **kwargs)
    annotations = {k: str(v) for k, v in getattr(fn, "__annotations__", {}).items()}
    signature, constexprs, divisible = {}, {}, []
    for name, value in bound.arguments.items():
        if "constexpr" in annotations.get(name, ""):
            constexprs[name] = _gpu_constant(name, function_name(value))
            continue
        kind, attr = native_specialize_impl(CUDABackend, value, False, True, True)
        if kind == "constexpr":
            constexprs[name] = value
            continue
        signature[name] = kind
        if attr == "D":
            divisible.append(name)
    return {"kernel": kernel, "signature": signature, "constexprs": constexprs,
            "divisible": divisible, "num_warps": options.get("num_warps", 4),
            "enable_fp_fusion": options.get("enable_fp_fusion", True)}


def function_name(value):
    """A ``@triton.jit`` function passed as a constexpr, as "module:function" (JSON holds it)."""
    fn = getattr(value, "fn", None)
    if fn is not None and callable(fn):
        return f"{fn.__module__}:{fn.__name__}"
    return value


def function_of(value):
    """The ``@triton.jit`` function a "module:function" constexpr names (others unchanged)."""
    if isinstance(value, str) and ":" in value:
        module, name = value.split(":")
        return getattr(importlib.import_module(module), name)
    return value


def key_of(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


@contextlib.contextmanager
def recording(into: dict = RECORDED):
    """Record every launch of a fastopt kernel under Triton's interpreter into ``into``."""
    try:  # Triton's own specialization rules (Triton 3.4 and later)
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # an older Triton: nothing is recorded
        yield into
        return

    names = {(module, kernel): short for short, (module, kernel) in KERNELS.items()}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        short = names.get((self.fn.__module__, self.fn.__name__))
        if short is not None and not warmup:
            spec = spec_of(short, self.fn, args, dict(kwargs))
            into.setdefault(key_of(spec), spec)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield into
    finally:
        InterpretedFunction.run = original


# ---------------------------------------------------------------------------------------------
# The variants a GPU launches, for the aligned layout (every pointer 16-byte aligned, counts
# divisible by 16), beyond what a CPU run reaches.

_INTS = {"adam": {"n_elements": "i32", "base_offset": "i32", "seed_word": "i32"},
         "sgd": {"n_elements": "i32"},
         "adam_int8": {"n_blocks": "i32", "base": "i32", "seed_word": "i32"},
         "elementwise": {"n_elements": "i32", "base_offset": "i32", "seed_word": "i32"}}
_TABLE_TYPES = {"grad_table_ptr": "*i64", "param_table_ptr": "*i64", "block_param_ptr": "*i32",
                "block_offset_ptr": "*i64", "slot_start_ptr": "*i64", "slot_size_ptr": "*i64",
                "betas_ptr": "*fp64", "row_ptr": "*fp32"}


def _variant(kernel: str, dtypes: dict, constexprs: dict, ints: dict = (), num_warps: int = 4) -> dict:
    """A spec with every pointer aligned: ``dtypes`` maps pointer args to element types (others
    fp32), ``ints`` int args to types (all divisible by 16)."""
    module, name = KERNELS[kernel]
    fn = getattr(importlib.import_module(module), name)
    fn = getattr(fn, "fn", fn)
    import inspect
    signature, divisible = {}, []
    for arg in inspect.signature(fn).parameters:
        if arg in constexprs:
            continue
        if arg.endswith("_ptr"):
            signature[arg] = dtypes.get(arg, _TABLE_TYPES.get(arg, "*fp32"))
            divisible.append(arg)
        elif arg in dict(ints):
            signature[arg] = dict(ints)[arg]
            divisible.append(arg)
        else:
            signature[arg] = "fp32"
    return {"kernel": kernel, "signature": signature, "constexprs": dict(constexprs),
            "divisible": divisible, "num_warps": num_warps, "enable_fp_fusion": True}


def _declared_groups(cls) -> list:
    """An optimizer built on one element with its defaults, and with every option on (flags
    True, a weight decay and a momentum): its first param group each, with the optimizer."""
    import torch

    on = {}
    for option, default in cls._option_defaults().items():
        if option in ("foreach", "fused", "capturable", "differentiable", "use_triton"):
            continue
        if isinstance(default, bool):
            on[option] = True
        elif option in ("weight_decay", "momentum"):
            on[option] = 0.1 if option == "weight_decay" else 0.9
    out = []
    for options in ({}, on):
        try:
            opt = cls([torch.zeros(1, requires_grad=True)], **options)
        except (ValueError, TypeError, RuntimeError):
            continue
        out.append((opt, opt.param_groups[0]))
    return out


def elementwise_variants() -> list:
    """Every registered elementwise optimizer's kernel (fastopt.registry): its defaults in fp32
    on the grad-table route (the default loop's); with every option on, in each storage a GPU
    run takes (fp32, bf16 state, bf16 params with fp32 masters or stochastic rounding, fp16
    params with fp32 masters and a clip's grad divisor and skip flag) on that route, and in fp32 on the flat buffer and by address (params left where their owner keeps
    them)."""
    from fastopt import registry
    from fastopt.kernels import launch
    from fastopt.kernels.elementwise import LR_ON_DEVICE_FLAG

    out, seen = [], set()
    for cls in registry.classes().values():
        declared = cls.declaration
        if declared.kernel is None or declared.update is not None or id(declared) in seen:
            continue
        seen.add(id(declared))
        math = function_name(getattr(importlib.import_module(
            f"fastopt.kernels.{declared.kernel}"), declared.kernel))
        for number, (opt, group) in enumerate(_declared_groups(cls)):
            _, flags = declared.hyper(opt, group)
            present = sum(1 << k for k, b in enumerate(declared.buffers) if b.present(group))
            storages = [("fp32", "fp32", False, False, False)]
            if number:  # every option on: the storages too
                storages += [("fp32", "bf16", False, False, False),
                             ("bf16", "fp32", True, False, False),
                             # fp16 masters with a clip's grad divisor and skip flag: the
                             # heaviest combination (it spilled under Triton 3.6)
                             ("fp16", "fp32", True, False, True)]
                if cls._takes("stochastic_rounding"):
                    storages.append(("bf16", "bf16", False, True, False))
                # masters as remainders beside bf16 state (2 or 1 bytes a param)
                storages += [("bf16", "bf16", "i16", False, False),
                             ("bf16", "bf16", "i8", False, False)]
            for param, state, master, rounding, clipped in storages:
                routes = [(True, False)]  # the default loop's route: fresh grads by address
                if number and param == "fp32" and state == "fp32":
                    routes += [(False, False), (True, True)]  # the flat buffer, by address
                for table, by_address in routes:
                    dtypes = {"param_ptr": "*" + param, "grad_ptr": "*" + param,
                              "master_ptr": "*" + master_type(master),
                              **{f"b{k}_ptr": "*" + state for k in range(4)}}
                    spec = _variant("elementwise", dtypes, dict(
                        MATH=math, FLAGS=flags, BUFFERS=present,
                        STEP_COLUMN=declared.scalar_names.index("step")
                        if declared.counts_steps else 0,
                        MAXIMIZE=bool(group.get("maximize")), LR_ON_DEVICE=False,
                        HAS_GRAD_SCALE=clipped, HAS_FOUND_INF=clipped, HAS_MASTER=bool(master),
                        STOCHASTIC_ROUNDING=rounding, GRAD_TABLE=table, PARAM_TABLE=by_address,
                        BLOCK_SIZE=launch.BLOCK_SIZE), _INTS["elementwise"])
                    spec["enable_fp_fusion"] = False
                    out.append(spec)
        assert LR_ON_DEVICE_FLAG  # (the flag bit is set per launch, never here)
    return out


def master_type(master) -> str:
    """The master pointer's element type: fp32 masters (``True``), their remainders ("i16",
    "i8"); without masters the pointer is unused (fp32)."""
    return master if isinstance(master, str) else "fp32"


def gpu_variants() -> list:
    """Adam/AdamW, SGD and 8-bit Adam in every storage combination a GPU run takes."""
    from fastopt.kernels import adam_int8, launch
    from fastopt.quantization import FORMATS, INT8

    out = []
    adam_ints = _INTS["adam"]
    for table, by_address in ((False, False), (True, False), (True, True)):
        for param, state, master, rounding in (
                ("fp32", "fp32", False, False), ("fp32", "bf16", False, False),
                ("bf16", "fp32", True, False),
                ("bf16", "bf16", False, False), ("bf16", "bf16", False, True),
                ("bf16", "bf16", True, False), ("fp16", "fp32", True, False),
                ("bf16", "fp32", "i16", False), ("bf16", "bf16", "i16", False),
                ("bf16", "bf16", "i8", False)):
            dtypes = {"param_ptr": "*" + param, "grad_ptr": "*" + param,
                      "master_ptr": "*" + master_type(master),
                      "exp_avg_ptr": "*" + state, "exp_avg_sq_ptr": "*" + state,
                      "max_exp_avg_sq_ptr": "*" + state, "momentum_buffer_ptr": "*" + state}
            for amsgrad in (False, True):
                out.append(_variant("adam", dtypes, dict(
                    AMSGRAD=amsgrad, HAS_WEIGHT_DECAY=True, DECOUPLED=True, MAXIMIZE=False,
                    LR_ON_DEVICE=False, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False,
                    HAS_MASTER=bool(master), STOCHASTIC_ROUNDING=rounding, GRAD_TABLE=table,
                    PARAM_TABLE=by_address, BLOCK_SIZE=launch.BLOCK_SIZE), adam_ints))
            if rounding:
                continue
            out.append(_variant("sgd", dtypes, dict(
                HAS_MOMENTUM=True, FIRST_STEP=False, NESTEROV=False, HAS_WEIGHT_DECAY=True,
                MAXIMIZE=False, LR_ON_DEVICE=False, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False,
                HAS_MASTER=bool(master), GRAD_TABLE=table, PARAM_TABLE=by_address,
                BLOCK_SIZE=launch.BLOCK_SIZE), _INTS["sgd"]))
    for fmt in FORMATS.values():
        for param, master, rounding in (("fp32", False, False), ("bf16", True, False),
                                        ("bf16", False, True), ("bf16", "i16", False),
                                        ("bf16", "i8", False)):
            out.append(_variant("adam_int8", {
                "param_ptr": "*" + param, "grad_ptr": "*" + param, "m_codes_ptr": "*u8",
                "master_ptr": "*" + master_type(master),
                "v_codes_ptr": "*u8", "block_table_ptr": "*i64",
                "signed_guesses_ptr": "*u8", "unsigned_guesses_ptr": "*u8"}, dict(
                    HAS_WEIGHT_DECAY=True, DECOUPLED=True, MAXIMIZE=False, LR_ON_DEVICE=False,
                    HAS_GRAD_SCALE=False, HAS_FOUND_INF=False, HAS_MASTER=bool(master),
                    STOCHASTIC_ROUNDING=rounding,
                    ROWS_PER_PROGRAM=adam_int8.rows_per_program(fmt, master),
                    QBLOCK=fmt.block, CODE_BITS=fmt.bits), _INTS["adam_int8"],
                adam_int8.NUM_WARPS))
    return out + elementwise_variants() + adafactor_variants()


def adafactor_variants() -> list:
    """Adafactor's five kernels in each storage a GPU run takes: fp32; bf16 state; bf16 and
    fp16 params with fp32 masters, a clip's grad divisor and a weight decay."""
    out = []
    for param, state, master in (("fp32", "fp32", False), ("fp32", "bf16", False),
                                 ("bf16", "fp32", True), ("fp16", "bf16", True),
                                 ("bf16", "bf16", False), ("fp16", "fp16", False)):
        dtypes = {"param_ptr": "*" + param, "grad_ptr": "*" + param, "master_ptr": "*fp32",
                  "row_var_ptr": "*" + state, "col_var_ptr": "*" + state,
                  "variance_ptr": "*" + state, "info_ptr": "*i64", "tile_ptr": "*i32",
                  "chunk_ptr": "*i32", "matrix_ptr": "*i32"}
        # half params without masters: torch's math op by op in their type (HALF)
        half = 0 if master else {"bf16": 1, "fp16": 2}.get(param, 0)
        # fresh grads read where they lie (the default loop's); fp32 also from the flat buffer
        for table in (True, False) if param == state == "fp32" else (True,):
            flags = dict(HAS_MASTER=master, HAS_GRAD_SCALE=master, HALF=half, GRAD_TABLE=table)
            out.append(_variant("adafactor_stats", dtypes, flags))
            for apply in (False, True):
                out.append(_variant("adafactor_tiles", dtypes, dict(
                    flags, HAS_DECAY=master, APPLY=apply), num_warps=8 if apply else 4))
        out.append(_variant("adafactor_statistics", dtypes, dict(HALF=half)))
        out.append(_variant("adafactor_means", dtypes, dict(HALF=half)))
        for bits in ("i64", "i32"):  # an option's bits: i32 where they fit (eps2 = 0.0)
            out.append(_variant("adafactor_coefficients", {"info_ptr": "*i64"},
                                dict(MAXIMIZE=False, HALF=half),
                                {"eps2_bits": bits, "d_bits": "i64"}))
    for spec in out:
        spec["enable_fp_fusion"] = False
    return out


# ---------------------------------------------------------------------------------------------
# Compiling one specialization and reading what the compiler made of it.

_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_PTX_FP64 = re.compile(r"^\s*(?:@%p\d+\s+)?(?:add|sub|mul|fma|div|sqrt|rcp|max|min|setp\.\w+)"
                       r"(?:\.\w+)*\.f64\b", re.MULTILINE)
_FP64 = re.compile(r"^\s*(?:@!?P\d+\s+)?(DADD|DMUL|DFMA|DSETP|DMNMX|MUFU\.\w*64H|F2F\.F64|"
                   r"F2F\.F32\.F64|I2F\.F64|F2I\.\w*F64)")


def _access_width(qualifiers: str) -> int:
    """Bytes one thread moves in one PTX global access with these qualifiers."""
    parts = qualifiers.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 32)
    return lanes * bits // 8


def _triton_ptxas_flags(spec: dict) -> list:
    """The flags Triton's own ``make_cubin`` gives ptxas for this launch, so that registers and
    spills are those of the binary a GPU would run: ``--fmad=false`` unless fp fusion is on,
    and the register allocation level newer Tritons set (``--regAllocOptLevel=2``)."""
    import inspect

    from triton.backends.nvidia import compiler

    flags = [] if spec.get("enable_fp_fusion", True) else ["--fmad=false"]
    if "--regAllocOptLevel=2" in inspect.getsource(compiler.CUDABackend.make_cubin):
        flags.append("--regAllocOptLevel=2")
    return flags


def compile_spec(spec: dict, arch: int, sass: bool = True) -> dict:
    """Compile ``spec`` for ``sm_{arch}`` with Triton's real compiler and report on it
    (``sass``: disassemble it too, for the instruction counts of the cost model; without it
    local memory and fp64 are read from the PTX)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    module, name = KERNELS[spec["kernel"]]
    kernel = getattr(importlib.import_module(module), name)
    signature, constexprs, attrs = {}, {}, {}
    for i, arg in enumerate(kernel.arg_names):
        if arg in spec["constexprs"]:
            signature[arg] = "constexpr"
            constexprs[(i,)] = function_of(spec["constexprs"][arg])
        else:
            signature[arg] = spec["signature"][arg]
            if arg in spec["divisible"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    result = {"arch": arch}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                            attrs=attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec["num_warps"],
                                           "enable_fp_fusion": spec.get("enable_fp_fusion",
                                                                        True)})
    except Exception as error:  # reported, and failed on, by the caller
        result["error"] = f"{type(error).__name__}: {str(error)[-2000:]}"
        return result
    ptx = compiled.asm["ptx"]
    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # Triton before 3.5 picks the ptxas for every target itself
        ptxas = get_ptxas().path
    target = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as folder:
        ptx_file = os.path.join(folder, "kernel.ptx")
        cubin_file = os.path.join(folder, "kernel.cubin")
        with open(ptx_file, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, f"-arch={target}", "-v", *_triton_ptxas_flags(spec),
                              ptx_file, "-o", cubin_file], capture_output=True, text=True)
        report = log.stdout + log.stderr
        sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "nvdisasm"), "-c",
                               cubin_file], capture_output=True, text=True).stdout if sass else ""
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else -1  # noqa
    instructions = [line.split("*/", 1)[1] for line in sass.splitlines()
                    if re.match(r"\s*/\*[0-9a-f]{4,6}\*/", line)]
    loads, stores = {}, {}
    for kind, qualifiers in _ACCESS.findall(ptx):
        counts = loads if kind == "ld" else stores
        width = _access_width(qualifiers)
        counts[width] = counts.get(width, 0) + 1
    result.update(
        registers=number(r"Used (\d+) registers"),
        spill_bytes=max(number(r"(\d+) bytes spill stores"), 0)
        + max(number(r"(\d+) bytes spill loads"), 0),
        stack_bytes=max(number(r"(\d+) bytes stack frame"), 0),
        local=".local" in ptx or "LDL" in sass or "STL" in sass,
        loads=loads, stores=stores,
        sass=len(instructions),
        path=common_path_length(sass),
        fp64=sum(1 for line in instructions if _FP64.match(line)) if sass
        else len(_PTX_FP64.findall(ptx)),
    )
    return result


LOOP_ITERATIONS = 20  # a loop on the common path runs this often (log2 of a 1e6 step count)


def common_path_length(sass: str) -> int:
    """Instructions a thread issues on the shortest way from the kernel's entry to an EXIT:
    the fast path (slow-path subroutine calls count one; a table kernel's whole block, not its
    masked last block), with each loop met on it counted ``LOOP_ITERATIONS`` times."""
    import heapq

    code, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(code)
        elif re.match(r"\s*/\*[0-9a-f]{4,6}\*/", line):
            code.append(line.split("*/", 1)[1].strip().rstrip(";").strip())
    if not code:
        return 0

    def successors(i: int) -> list:
        text = code[i]
        predicated = text.startswith("@")
        op = text.split()[1] if predicated else text.split()[0]
        if op.startswith("BRA"):
            target = re.search(r"`\((\.L_x_\d+)\)", text)
            targets = [labels[target.group(1)]] if target and target.group(1) in labels else []
            return targets + ([i + 1] if predicated else [])
        if op.startswith("EXIT") or op.startswith("RET"):
            return [i + 1] if predicated else []
        return [i + 1]

    distance, previous, queue, end = {0: 1}, {}, [(1, 0)], None
    while queue:
        d, i = heapq.heappop(queue)
        if d > distance.get(i, 1 << 30):
            continue
        nexts = successors(i)
        if not nexts:
            end = i
            break
        for j in nexts:
            if j < len(code) and d + 1 < distance.get(j, 1 << 30):
                distance[j], previous[j] = d + 1, i
                heapq.heappush(queue, (d + 1, j))
    if end is None:
        return len(code)
    on_path, i = {end}, end
    while i in previous:
        i = previous[i]
        on_path.add(i)
    length = distance[end]
    for i in on_path:  # backward branches whose loop the path runs through
        target = re.search(r"BRA.*`\((\.L_x_\d+)\)", code[i])
        if target and labels.get(target.group(1), i + 1) <= i and labels[target.group(1)] in on_path:
            length += (LOOP_ITERATIONS - 1) * (i - labels[target.group(1)] + 1)
    return length


def _compile_all(specs: list, archs=ARCHS, workers: int | None = None) -> list:
    return _compile_jobs([(spec, arch) for spec in specs for arch in archs], workers)


def _compile_jobs(jobs: list, workers: int | None = None, sass: bool = True) -> list:
    """Compile each (spec, arch) job, on as many processes as there are cores."""
    if not jobs:
        return []
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    job = _compile_job if sass else _compile_job_without_sass
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(job, jobs, chunksize=4))
    return [dict(r, spec=spec) for r, (spec, _) in zip(results, jobs)]


def _compile_job(job):
    return compile_spec(*job)


def _compile_job_without_sass(job):
    return compile_spec(*job, sass=False)


# ---------------------------------------------------------------------------------------------
# Checks and the cost model.

def analyse(result: dict, machine: dict = H100) -> dict:
    """The checks and the model's numbers for one compiled specialization."""
    spec = result["spec"]
    kernel, c, sig = spec["kernel"], spec["constexprs"], spec["signature"]
    per_program = elements_per_program(kernel, c)
    threads = 32 * spec["num_warps"]
    per_thread = per_program / threads if per_program else 0
    out = {"problems": []}
    if "error" in result:
        out["problems"].append("does not compile: " + result["error"].splitlines()[-1][:200])
        return out
    if result["local"] or result["stack_bytes"]:
        out["problems"].append(f"local memory ({result['stack_bytes']} bytes of stack)")
    if result["arch"] == 90 and result["spill_bytes"]:
        out["problems"].append(f"spills {result['spill_bytes']} bytes")
    stream_list = streams(kernel, c)
    if not stream_list:
        return out
    # The aligned layout: every stream 16-byte aligned and, for a flat launch, an element
    # count divisible by 16 (a table launch masks by the slot sizes in its tables instead).
    aligned = all(p in spec["divisible"] for p, _ in stream_list) and (
        kernel == "adam_int8" or kernel in TILE_KERNELS or c.get("GRAD_TABLE")
        or "n_elements" in spec["divisible"])
    if aligned:  # each stream in the widest accesses its per-thread bytes allow (16 at most)
        for what, kind, counts in (("load", "L", result["loads"]),
                                   ("store", "S", result["stores"])):
            needed: dict = {}
            for p, how in stream_list:
                if kind in how:
                    size = per_thread * stream_bytes(spec, p)
                    width = int(min(16, size))
                    needed[width] = needed.get(width, 0) + int(size // width)
            for width, count in sorted(needed.items()):
                have = sum(v for w, v in counts.items() if int(w) >= width)
                wider = sum(n for w, n in needed.items() if w > width)
                if have - wider < count:
                    out["problems"].append(f"{what}s: {max(have - wider, 0)} of {count} "
                                           f"{8 * width}-bit accesses per thread")
    if result["fp64"] > 8 and kernel not in SCALAR_KERNELS:
        out["problems"].append(f"{result['fp64']} fp64 instructions per thread")
    bytes_per_element = sum(stream_bytes(spec, p) * len(how) for p, how in stream_list) \
        + extra_bytes_per_element(kernel, c)
    if not result["sass"]:  # compiled without its SASS: no instruction counts to model
        out.update(aligned=aligned, bytes_per_element=bytes_per_element)
        return out
    sass_per_element = result["path"] / per_thread
    bandwidth = machine["bandwidth_gbs"] * 1e9
    issue_rate = machine["sms"] * ISSUE_LANES_PER_SM * machine["clock_ghz"] * 1e9
    memory_time = bytes_per_element / bandwidth
    issue_time = sass_per_element / issue_rate
    out.update(
        aligned=aligned,
        bytes_per_element=bytes_per_element,
        sass_per_element=sass_per_element,
        issue_share=issue_time / (memory_time / TARGET_FRACTION),
        predicted_fraction=memory_time / max(memory_time, issue_time),
    )
    return out


def describe(spec: dict) -> str:
    """A short name for a variant: kernel, storage types, the flags that are set, the route."""
    c, sig = spec["constexprs"], spec["signature"]
    parts = [spec["kernel"]]
    if isinstance(c.get("MATH"), str):  # an elementwise optimizer's function
        parts = [c["MATH"].split(":")[1]]
        if c.get("FLAGS"):
            parts.append(f"flags={c['FLAGS']}")
    types = [stream_type(spec, p) for p, _ in streams(spec["kernel"], c)]
    if len(types) > 2:
        parts.append(f"{types[0]}, state {types[2]}")
    elif types:
        parts.append(types[0])
    parts += [k.lower() for k, v in sorted(c.items())
              if v is True and k not in ("GRAD_TABLE", "PARAM_TABLE") and k != "MATH"]
    if c.get("HAS_MASTER") and sig.get("master_ptr", "*fp32") != "*fp32":
        parts.append(f"master {sig['master_ptr'].lstrip('*')}")
    parts.append("param-table" if c.get("PARAM_TABLE") else
                 "grad-table" if c.get("GRAD_TABLE") else "flat")
    if spec["kernel"] in ("adam_steps",):
        parts = parts[:1]
    return " ".join(p for p in parts if p)


def report(results: list, machine: dict = H100) -> tuple:
    """(table text, problems) over compiled results."""
    rows, problems = [], []
    header = ("| variant | sm | regs | spill B | 128-bit ld/st | SASS (path) | fp64 | B/elem | "
              "SASS/elem | issue share | predicted |")
    rows.append(header)
    rows.append("|" + " --- |" * (header.count("|") - 1))
    for result in sorted(results, key=lambda r: (describe(r["spec"]), r["arch"])):
        a = analyse(result, machine)
        name = describe(result["spec"])
        for problem in a["problems"]:
            problems.append(f"{name} sm_{result['arch']}: {problem}")
        if "error" in result:
            rows.append(f"| {name} | {result['arch']} | compile error | | | | | | | | |")
            continue
        wide = f"{result['loads'].get(16, 0)}/{result['stores'].get(16, 0)}"
        model = ("| {bytes_per_element:.2f} | {sass_per_element:.1f} | {issue_share:.2f} | "
                 "{predicted_fraction:.2f} |".format(**a)) if "sass_per_element" in a \
            else "| | | | |"
        rows.append(f"| {name} | {result['arch']} | {result['registers']} | "
                    f"{result['spill_bytes']} | {wide} | {result['sass']} ({result['path']}) | "
                    f"{result['fp64']} "
                    + model)
    return "\n".join(rows), problems


def model_key(spec: dict) -> str | None:
    """The key ``benchmarks/gpu_bench.py`` looks a measured row up by: kernel, param and state
    storage, master / stochastic rounding, route (None for kernels without element streams)."""
    c, sig, kernel = spec["constexprs"], spec["signature"], spec["kernel"]
    if isinstance(c.get("MATH"), str):  # an elementwise optimizer: its function's name
        kernel = c["MATH"].split(":")[1]
    state = {"adam": "exp_avg_ptr", "sgd": "momentum_buffer_ptr",
             "adam_int8": "m_codes_ptr"}.get(kernel, "b0_ptr" if "b0_ptr" in sig else None)
    if state is None:
        return None
    route = ("param-table" if c.get("PARAM_TABLE") else "grad-table" if c.get("GRAD_TABLE")
             else "flat")
    remainder = {"*i16": "+remainder", "*i8": "+remainder8"}.get(sig.get("master_ptr"))
    extra = (remainder or "+master") if c.get("HAS_MASTER") else \
        "+sr" if c.get("STOCHASTIC_ROUNDING") else ""
    if c.get("AMSGRAD"):
        extra += "+amsgrad"
    return (f"{kernel} {sig['param_ptr'].lstrip('*')}/{stream_type(spec, state)}{extra} "
            f"{route}")


def model(results: list) -> dict:
    """{model_key: {bytes_per_element, sass_per_element}} on sm_90, for gpu_bench.py to
    predict each row's fraction of the bandwidth it measures."""
    out = {}
    for result in results:
        key = model_key(result["spec"])
        a = analyse(result)
        if key and result["arch"] == 90 and "sass_per_element" in a:
            out[key] = {"bytes_per_element": a["bytes_per_element"],
                        "sass_per_element": a["sass_per_element"]}
    return out


def predicted_fraction(entry: dict, bandwidth_gbs: float, machine: dict = H100) -> float:
    """The model's fraction of copy bandwidth for one ``model()`` entry at ``bandwidth_gbs``."""
    memory_time = entry["bytes_per_element"] / (bandwidth_gbs * 1e9)
    issue_time = entry["sass_per_element"] / (
        machine["sms"] * ISSUE_LANES_PER_SM * machine["clock_ghz"] * 1e9)
    return memory_time / max(memory_time, issue_time)


def unique(specs: list) -> list:
    return list({key_of(s): s for s in specs}.values())


def distinct(specs: list) -> list:
    """One spec per (kernel, constexprs, argument types): of launches that differ only in which
    pointers and ints were 16-divisible, the most aligned (the layout's common case, which the
    128-bit check applies to)."""
    best: dict = {}
    for spec in specs:
        key = json.dumps([spec["kernel"], spec["constexprs"], spec["signature"]], sort_keys=True)
        if key not in best or len(spec["divisible"]) > len(best[key]["divisible"]):
            best[key] = spec
    return list(best.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="print the table")
    parser.add_argument("--specs", help="JSON list of recorded specializations to add")
    parser.add_argument("--no-variants", action="store_true",
                        help="only the recorded specializations, not gpu_variants()")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--workers", type=int, help="compiling processes (default: one per core)")
    parser.add_argument("--specs-arch", type=int, nargs="+",
                        help="targets for the --specs launches (default: --arch); the GPU "
                             "variants are compiled for every --arch")
    parser.add_argument("--bandwidth", type=float, default=H100["bandwidth_gbs"],
                        help="copy bandwidth in GB/s for the model (default: an H100's)")
    parser.add_argument("--kernel", nargs="+", choices=list(KERNELS), help="only these kernels")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--model", help="write the cost model per variant here (gpu_bench.py "
                        "reads benchmarks/results/kernel-model.json)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    variants = [] if args.no_variants else unique(gpu_variants())
    recorded = []
    if args.specs:
        with open(args.specs) as f:
            known = {key_of(s) for s in gpu_variants()}  # compiled as variants (maybe apart)
            recorded = [s for s in distinct(json.load(f)) if key_of(s) not in known]
    if args.kernel:
        variants = [s for s in variants if s["kernel"] in args.kernel]
        recorded = [s for s in recorded if s["kernel"] in args.kernel]
    # the recorded launches are checked for what they are (they compile, no local memory, no
    # spills, 128-bit accesses, no fp64): the cost model's instruction counts, which need the
    # SASS, are the GPU variants'
    results = _compile_jobs([(s, arch) for s in variants for arch in args.arch],
                            args.workers) + \
        _compile_jobs([(s, arch) for s in recorded for arch in (args.specs_arch or args.arch)],
                      args.workers, sass=False)
    machine = dict(H100, bandwidth_gbs=args.bandwidth)
    table, problems = report(results, machine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r, **analyse(r, machine)) for r in results], f, indent=1)
    if args.model:
        with open(args.model, "w") as f:
            json.dump(model(results), f, indent=1, sort_keys=True)
    if args.report:
        print(f"{len(results)} compiles ({len(variants)} GPU variants, {len(recorded)} "
              f"recorded launches); model: {machine} (a prediction)\n")
        print(table)
    for problem in problems:
        print("PROBLEM", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
