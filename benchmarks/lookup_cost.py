"""What a code-table lookup costs in the compiled CPU loop of quantized state, against the time
per element of torch's fused fp32 AdamW step (the step issue 19 compares lean state with).

    python -m benchmarks.lookup_cost [--elements 4194304] [--repeats 5]

Four loops, each compiled the way ``fastopt.compiled`` compiles the quantized step (its inductor
options, dynamic shapes): decoding 8-bit codes (``compiled._decode``: a lookup in the code table
times the block's scale) and encoding fp32 values (``compiled._codes``: a lookup in the
encoder's cell table plus an addition), each beside the same loop with the lookup replaced by a
conversion of the same shape. The quantized step makes four lookups an element (both moments
decoded, both encoded); inductor loads a looked-up vector one element at a time.
"""

from __future__ import annotations

import argparse
import timeit

import torch

from fastopt import compiled, quantization


def _decode(codes, scales, values, out):
    out.copy_(compiled._decode(codes, scales, values))


def _decode_without_lookup(codes, scales, values, out):
    out.copy_(codes.to(torch.float32) * scales[:, None])


def _encode(x, cells, out):
    out.copy_(compiled._codes(x, cells))


def _encode_without_lookup(x, cells, out):
    out.copy_((x * 100).to(torch.int32))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 22)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    n = args.elements - args.elements % 256
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    tables, cells = quantization.code_and_cell_tables(quantization.INT8, cpu)
    codes = torch.randint(0, 256, (n // 256, 256), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n // 256, generator=gen)
    x = torch.rand(n // 256, 256, generator=gen) * 2 - 1
    loops = {
        "decode": (_decode, (codes, scales, tables[0], torch.empty(n // 256, 256))),
        "decode without lookup": (_decode_without_lookup,
                                  (codes, scales, tables[0], torch.empty(n // 256, 256))),
        "encode": (_encode, (x, cells[0], torch.empty(n // 256, 256, dtype=torch.uint8))),
        "encode without lookup": (_encode_without_lookup,
                                  (x, cells[0], torch.empty(n // 256, 256, dtype=torch.uint8))),
    }
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    m, v, step = torch.zeros(n), torch.zeros(n), torch.tensor(3.0)

    def fused_adamw():
        torch._fused_adamw_([p], [g], [m], [v], [], [step], lr=1e-3, beta1=0.9, beta2=0.999,
                            weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)

    calls = {"torch fused fp32 AdamW": fused_adamw}
    for name, (body, tensors) in loops.items():
        loop = torch.compile(body, dynamic=True, fullgraph=True, options=compiled._INDUCTOR)
        loop(*tensors)
        calls[name] = lambda loop=loop, tensors=tensors: loop(*tensors)
    ns = {}
    for name, call in calls.items():
        call()
        seconds = min(timeit.repeat(call, number=10, repeat=args.repeats)) / 10
        ns[name] = seconds * 1e9 / n
    print(f"{n} elements, {torch.get_num_threads()} threads, ns an element:")
    for name, value in ns.items():
        print(f"  {name:<24} {value:6.3f}")
    lookups = ns["decode"] - ns["decode without lookup"] + ns["encode"] \
        - ns["encode without lookup"]
    print(f"four lookups an element (two decodes, two encodes): {2 * lookups:.2f} ns; "
          f"0.5x torch's fused step allows {2 * ns['torch fused fp32 AdamW']:.2f} ns in all")
    return ns


if __name__ == "__main__":
    main()
