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
``ASTSource``) for ``sm_90``/``sm_80``; Triton's own ptxas (``get_ptxas``) reports registers,
spills and stack; nvdisasm gives the SASS. Per kernel it checks: every element stream moves in
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
}
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
    else:
        return []
    if c.get("HAS_MASTER"):
        out.append(("master_ptr", "LS"))
    return out


def elements_per_program(kernel: str, constexprs: dict) -> int:
    if kernel == "adam_int8":
        return constexprs["ROWS_PER_PROGRAM"] * constexprs["QBLOCK"]
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


# ---------------------------------------------------------------------------------------------
# Recording the launches a run makes (under the interpreter) as GPU specializations.

RECORDED: dict = {}  # key -> spec


def _gpu_constant(name: str, value):
    """The interpreter runs bigger programs (kernels/launch.py); a GPU launches these."""
    from fastopt.kernels import adam_int8, launch

    if name == "BLOCK_SIZE" and value == launch.INTERPRETER_BLOCK_SIZE:
        return launch.BLOCK_SIZE
    if name == "ROWS_PER_PROGRAM" and value == adam_int8.INTERPRETER_ROWS:
        return adam_int8.ROWS
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
            constexprs[name] = _gpu_constant(name, value)
            continue
        kind, attr = native_specialize_impl(CUDABackend, value, False, True, True)
        if kind == "constexpr":
            constexprs[name] = value
            continue
        signature[name] = kind
        if attr == "D":
            divisible.append(name)
    return {"kernel": kernel, "signature": signature, "constexprs": constexprs,
            "divisible": divisible, "num_warps": options.get("num_warps", 4)}


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
         "adam_int8": {"n_blocks": "i32", "base": "i32", "seed_word": "i32"}}
_TABLE_TYPES = {"grad_table_ptr": "*i64", "param_table_ptr": "*i64", "block_param_ptr": "*i32",
                "block_offset_ptr": "*i64", "slot_start_ptr": "*i64", "slot_size_ptr": "*i64",
                "betas_ptr": "*fp64"}


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
            "divisible": divisible, "num_warps": num_warps}


def gpu_variants() -> list:
    """Adam/AdamW, SGD and 8-bit Adam in every storage combination a GPU run takes."""
    from fastopt.kernels import adam_int8, launch
    from fastopt.quantization import BLOCK

    out = []
    adam_ints = _INTS["adam"]
    for table, by_address in ((False, False), (True, False), (True, True)):
        for param, state, master, rounding in (
                ("fp32", "fp32", False, False), ("fp32", "bf16", False, False),
                ("bf16", "fp32", True, False),
                ("bf16", "bf16", False, False), ("bf16", "bf16", False, True),
                ("bf16", "bf16", True, False), ("fp16", "fp32", True, False)):
            dtypes = {"param_ptr": "*" + param, "grad_ptr": "*" + param,
                      "exp_avg_ptr": "*" + state, "exp_avg_sq_ptr": "*" + state,
                      "max_exp_avg_sq_ptr": "*" + state, "momentum_buffer_ptr": "*" + state}
            for amsgrad in (False, True):
                out.append(_variant("adam", dtypes, dict(
                    AMSGRAD=amsgrad, HAS_WEIGHT_DECAY=True, DECOUPLED=True, MAXIMIZE=False,
                    LR_ON_DEVICE=False, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False,
                    HAS_MASTER=master, STOCHASTIC_ROUNDING=rounding, GRAD_TABLE=table,
                    PARAM_TABLE=by_address, BLOCK_SIZE=launch.BLOCK_SIZE), adam_ints))
            if rounding:
                continue
            out.append(_variant("sgd", dtypes, dict(
                HAS_MOMENTUM=True, FIRST_STEP=False, NESTEROV=False, HAS_WEIGHT_DECAY=True,
                MAXIMIZE=False, LR_ON_DEVICE=False, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False,
                HAS_MASTER=master, GRAD_TABLE=table, PARAM_TABLE=by_address,
                BLOCK_SIZE=launch.BLOCK_SIZE), _INTS["sgd"]))
    for param, master, rounding in (("fp32", False, False), ("bf16", True, False),
                                    ("bf16", False, True)):
        out.append(_variant("adam_int8", {
            "param_ptr": "*" + param, "grad_ptr": "*" + param, "m_codes_ptr": "*u8",
            "v_codes_ptr": "*u8", "block_table_ptr": "*i64", "signed_guesses_ptr": "*u8",
            "unsigned_guesses_ptr": "*u8"}, dict(
                HAS_WEIGHT_DECAY=True, DECOUPLED=True, MAXIMIZE=False, LR_ON_DEVICE=False,
                HAS_GRAD_SCALE=False, HAS_FOUND_INF=False, HAS_MASTER=master,
                STOCHASTIC_ROUNDING=rounding, ROWS_PER_PROGRAM=adam_int8.ROWS,
                QBLOCK=BLOCK), _INTS["adam_int8"], adam_int8.NUM_WARPS))
    return out


# ---------------------------------------------------------------------------------------------
# Compiling one specialization and reading what the compiler made of it.

_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_FP64 = re.compile(r"^\s*(?:@!?P\d+\s+)?(DADD|DMUL|DFMA|DSETP|DMNMX|MUFU\.\w*64H|F2F\.F64|"
                   r"F2F\.F32\.F64|I2F\.F64|F2I\.\w*F64)")


def _access_width(qualifiers: str) -> int:
    """Bytes one thread moves in one PTX global access with these qualifiers."""
    parts = qualifiers.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 32)
    return lanes * bits // 8


def compile_spec(spec: dict, arch: int) -> dict:
    """Compile ``spec`` for ``sm_{arch}`` with Triton's real compiler and report on it."""
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
            constexprs[(i,)] = spec["constexprs"][arg]
        else:
            signature[arg] = spec["signature"][arg]
            if arg in spec["divisible"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    result = {"arch": arch}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                            attrs=attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec["num_warps"]})
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
        log = subprocess.run([ptxas, f"-arch={target}", "-v", ptx_file, "-o", cubin_file],
                             capture_output=True, text=True)
        report = log.stdout + log.stderr
        sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "nvdisasm"), "-c",
                               cubin_file], capture_output=True, text=True).stdout
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
        fp64=sum(1 for line in instructions if _FP64.match(line)),
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
    jobs = [(spec, arch) for spec in specs for arch in archs]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_compile_job, jobs, chunksize=4))
    return [dict(r, spec=spec) for r, (spec, _) in zip(results, jobs)]


def _compile_job(job):
    return compile_spec(*job)


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
        kernel == "adam_int8" or c.get("GRAD_TABLE") or "n_elements" in spec["divisible"])
    if aligned:  # each stream in the widest accesses its per-thread bytes allow (16 at most)
        for what, kind, counts in (("load", "L", result["loads"]),
                                   ("store", "S", result["stores"])):
            needed: dict = {}
            for p, how in stream_list:
                if kind in how:
                    size = per_thread * element_size(sig[p])
                    width = int(min(16, size))
                    needed[width] = needed.get(width, 0) + int(size // width)
            for width, count in sorted(needed.items()):
                have = sum(v for w, v in counts.items() if int(w) >= width)
                wider = sum(n for w, n in needed.items() if w > width)
                if have - wider < count:
                    out["problems"].append(f"{what}s: {max(have - wider, 0)} of {count} "
                                           f"{8 * width}-bit accesses per thread")
    if result["fp64"] > 8:
        out["problems"].append(f"{result['fp64']} fp64 instructions per thread")
    bytes_per_element = sum(element_size(sig[p]) * len(how) for p, how in stream_list) \
        + extra_bytes_per_element(kernel, c)
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
    types = [sig.get(p, "").lstrip("*") for p, _ in streams(spec["kernel"], c)]
    if len(types) > 2:
        parts.append(f"{types[0]}, state {types[2]}")
    elif types:
        parts.append(types[0])
    parts += [k.lower() for k, v in sorted(c.items())
              if v is True and k not in ("GRAD_TABLE", "PARAM_TABLE")]
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
                 "{predicted_fraction:.2f} |".format(**a)) if "bytes_per_element" in a \
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
    state = {"adam": "exp_avg_ptr", "sgd": "momentum_buffer_ptr",
             "adam_int8": "m_codes_ptr"}.get(kernel)
    if state is None:
        return None
    route = ("param-table" if c.get("PARAM_TABLE") else "grad-table" if c.get("GRAD_TABLE")
             else "flat")
    extra = "+master" if c.get("HAS_MASTER") else "+sr" if c.get("STOCHASTIC_ROUNDING") else ""
    if c.get("AMSGRAD"):
        extra += "+amsgrad"
    return (f"{kernel} {sig['param_ptr'].lstrip('*')}/{sig[state].lstrip('*')}{extra} "
            f"{route}")


def model(results: list) -> dict:
    """{model_key: {bytes_per_element, sass_per_element}} on sm_90, for gpu_bench.py to
    predict each row's fraction of the bandwidth it measures."""
    out = {}
    for result in results:
        key = model_key(result["spec"])
        a = analyse(result)
        if key and result["arch"] == 90 and "bytes_per_element" in a:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="print the table")
    parser.add_argument("--specs", help="JSON list of recorded specializations to add")
    parser.add_argument("--no-variants", action="store_true",
                        help="only the recorded specializations, not gpu_variants()")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--bandwidth", type=float, default=H100["bandwidth_gbs"],
                        help="copy bandwidth in GB/s for the model (default: an H100's)")
    parser.add_argument("--kernel", nargs="+", choices=list(KERNELS), help="only these kernels")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--model", help="write the cost model per variant here (gpu_bench.py "
                        "reads benchmarks/results/kernel-model.json)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    specs = [] if args.no_variants else gpu_variants()
    if args.specs:
        with open(args.specs) as f:
            specs += json.load(f)
    if args.kernel:
        specs = [s for s in specs if s["kernel"] in args.kernel]
    results = _compile_all(unique(specs), tuple(args.arch))
    machine = dict(H100, bandwidth_gbs=args.bandwidth)
    table, problems = report(results, machine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r, **analyse(r, machine)) for r in results], f, indent=1)
    if args.model:
        with open(args.model, "w") as f:
            json.dump(model(results), f, indent=1, sort_keys=True)
    if args.report:
        print(f"{len(results)} compiles ({len(unique(specs))} specializations x "
              f"{len(args.arch)} targets); model: {machine} (a prediction)\n")
        print(table)
    for problem in problems:
        print("PROBLEM", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
