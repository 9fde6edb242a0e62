"""The Adam and SGD kernels compiled for an H100 (sm_90) by Triton's real compiler, without a
GPU: in every way a step reads its grads (the flat grad buffer, an address table, params by
address too), a whole block moves every stream with 128-bit vector loads and stores.

The arguments are specialized as Triton's launcher specializes them for the aligned layout:
16-byte aligned pointers and element counts divisible by 16 (``tt.divisibility``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

pytest.importorskip("triton")

# Pointer arguments that are not fp32 element streams.
POINTER_TYPES = {"grad_table_ptr": "*i64", "param_table_ptr": "*i64", "block_param_ptr": "*i32",
                 "block_offset_ptr": "*i64", "slot_start_ptr": "*i64", "slot_size_ptr": "*i64",
                 "betas_ptr": "*fp64"}
INTS = ("n_elements", "base_offset", "seed_word")
# (kernel, flags, streams loaded, streams stored): AdamW reads param, grad, exp_avg, exp_avg_sq
# and writes param, exp_avg, exp_avg_sq; SGD with momentum reads param, grad, buffer and
# writes param, buffer.
KERNELS = {
    "adamw": ("_adam_kernel", dict(AMSGRAD=False, HAS_WEIGHT_DECAY=True, DECOUPLED=True,
                                   MAXIMIZE=False, LR_ON_DEVICE=False, HAS_GRAD_SCALE=False,
                                   HAS_FOUND_INF=False, HAS_MASTER=False,
                                   STOCHASTIC_ROUNDING=False), 4, 3),
    "sgd-momentum": ("_sgd_kernel", dict(HAS_MOMENTUM=True, FIRST_STEP=False, NESTEROV=False,
                                         HAS_WEIGHT_DECAY=False, MAXIMIZE=False,
                                         LR_ON_DEVICE=False, HAS_GRAD_SCALE=False,
                                         HAS_FOUND_INF=False, HAS_MASTER=False), 3, 2),
}
MODES = {"flat": (False, False), "grad-table": (True, False), "grad-and-param-table": (True, True)}
BLOCK_SIZE, NUM_WARPS = 1024, 4  # kernels/launch.py: 8 fp32 per thread = two 16-byte vectors


def ptx_of(kernel, flags: dict) -> str:
    """``kernel`` (a ``@triton.jit`` function) compiled for sm_90 with ``flags``: its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in flags:
            signature[name] = "constexpr"
            constexprs[(i,)] = flags[name]
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in INTS:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": NUM_WARPS})
    return compiled.asm["ptx"]


def global_accesses() -> dict:
    """For every (kernel, mode): counts of each kind of global load and store in its PTX, and
    whether it uses local memory. Run without TRITON_INTERPRET (the real compiler)."""
    from fastopt.kernels import adam, sgd

    kernels = {"_adam_kernel": adam._adam_kernel, "_sgd_kernel": sgd._sgd_kernel}
    out = {}
    for name, (kernel, flags, _, _) in KERNELS.items():
        for mode, (grad_table, param_table) in MODES.items():
            ptx = ptx_of(kernels[kernel], dict(flags, GRAD_TABLE=grad_table,
                                               PARAM_TABLE=param_table, BLOCK_SIZE=BLOCK_SIZE))
            out[f"{name}/{mode}"] = {
                "loads": Counter(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx)),
                "stores": Counter(re.findall(r"st\.global(?:\.[a-z0-9]+)*", ptx)),
                "local": ".local" in ptx,
            }
    return out


@pytest.fixture(scope="module")
def accesses() -> dict:
    """``global_accesses()`` from a child process: the test session runs the kernels under the
    interpreter, whose kernels the real compiler cannot take."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                            env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(KERNELS))
def test_whole_blocks_use_128_bit_accesses_on_every_stream(name, mode, accesses):
    _, _, loaded, stored = KERNELS[name]
    found = accesses[f"{name}/{mode}"]
    loads, stores = found["loads"], found["stores"]
    vectors_per_stream = BLOCK_SIZE // (32 * NUM_WARPS) // 4
    assert loads.get("ld.global.v4.b32", 0) == loaded * vectors_per_stream, loads
    assert stores.get("st.global.v4.b32", 0) == stored * vectors_per_stream, stores
    if not MODES[mode][0]:  # the flat buffers' counts are multiples of 16: no scalar stream
        assert stores.get("st.global.b32", 0) == 0, stores
    assert not found["local"]  # no local memory (spills)


if __name__ == "__main__":
    print(json.dumps(global_accesses()))
