"""Launch sizes for the elementwise optimizer kernels, in one place.

Each program updates ``BLOCK_SIZE`` consecutive elements. With 4 warps (128 threads) and 1024
elements a thread holds 8 consecutive values: 32 bytes of fp32 or 16 of bf16, so every load and
store can be a 16-byte vector access. The grid covers ``n`` with a masked tail; offsets are int64
inside the kernels, so buffers over 2**31 elements are addressed correctly. These numbers are the
starting point the GPU microbenchmark (benchmarks/gpu_bench.py) checks on real hardware.
"""

from __future__ import annotations

import math
import os
import struct

BLOCK_SIZE = 1024
NUM_WARPS = 4
# Triton's CPU interpreter runs programs one after another, each with a fixed cost: there a
# bigger block only means fewer programs (the masked tail is exercised the same way).
INTERPRETER_BLOCK_SIZE = 65536


# Whether the kernels run under Triton's CPU interpreter: Triton decides it when the kernel
# modules are decorated (TRITON_INTERPRET, read at import), so it is read once here with them
# (at every launch it cost about 1 us a call, several calls a bucket and step).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK_SIZE = INTERPRETER_BLOCK_SIZE if INTERPRETED else BLOCK_SIZE


def block_size() -> int:
    return _BLOCK_SIZE


def fp32(value) -> float:
    """A float kernel argument as the kernel sees it on a GPU: rounded to fp32. Triton's
    interpreter hands a kernel its float arguments as Python floats, so arithmetic between two
    of them there (``1.0 - beta2``) would run in fp64 and hide what the GPU computes; rounded
    here, both see the same fp32 value."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond fp32's range: infinite, as the GPU takes it
        return math.copysign(math.inf, value)


def grid(n: int, block: int) -> tuple:
    return ((n + block - 1) // block,)
