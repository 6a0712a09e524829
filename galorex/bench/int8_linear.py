"""``python -m galorex.bench int8-linear``: forward + backward of one linear layer with INT8 weights
(``galorex.weights``: dequantised to the compute dtype for each GEMM) against the same layer as an
``nn.Linear`` in that dtype (``--dtype``, bf16 by default), timed side by side (interleaved rounds,
medians and the median of per-round ratios).

    python -m galorex.bench int8-linear [--in-features 4096 --out-features 11008 --tokens 256 --repeats 9]
        [--dtype bf16|fp32]

bf16 is the compute dtype of the 7B recipe; fp32 is there for CPUs without bf16 arithmetic (AVX2
only: torch's bf16 GEMMs run there at a small fraction of float32's speed, so the bf16 figure is
neither users' nor measurable in reasonable time).

The weight gets its gradient in both (the INT8 layer's is the dense ∂L/∂W, in the compute dtype,
that an optimizer receives); the dequantisation, once in forward and once in backward, is the INT8 layer's extra work.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import _env, _write

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUICK = {"in_features": 256, "out_features": 512, "tokens": 64, "repeats": 3}


def add_parser(sub: Any) -> None:
    b = sub.add_parser("int8-linear", help="forward + backward of an INT8-weight linear layer vs nn.Linear")
    b.add_argument("--in-features", type=int, default=4096)
    b.add_argument("--out-features", type=int, default=11008)
    b.add_argument("--tokens", type=int, default=256, help="rows of the input (batch × sequence)")
    b.add_argument("--group-size", type=int, default=256)
    b.add_argument("--repeats", type=int, default=9)
    b.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="the compute dtype of both layers")


def _pass(layer: nn.Linear, x: torch.Tensor, g: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    layer(x).backward(g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    layer.weight.grad = None
    x.grad = None
    return elapsed


def bench_int8_linear(args: argparse.Namespace) -> dict[str, Any]:
    from ..weights import quantize_weights

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    dense = nn.Linear(args.in_features, args.out_features, bias=False, device=device, dtype=dtype)
    quantized = nn.Linear(args.in_features, args.out_features, bias=False, device=device, dtype=dtype)
    quantized.weight.data.copy_(dense.weight.data)
    quantize_weights(quantized, group_size=args.group_size, target_modules="all-linear")
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(args.tokens, args.out_features, device=device, dtype=dtype)
    base = f"{args.dtype} nn.Linear"
    layers = {base: dense, "INT8 weights": quantized}
    for layer in layers.values():  # warm-up
        _pass(layer, x, g, device)
    times: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(args.repeats):
        for name, layer in layers.items():
            times[name].append(_pass(layer, x, g, device))
    ratios = [q / d for q, d in zip(times["INT8 weights"], times[base])]
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"Forward + backward (∂L/∂x and ∂L/∂W) of a {args.in_features} → {args.out_features} linear layer on "
        f"{args.tokens} tokens, {device}, {args.repeats} interleaved rounds, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
        f"| layer | median (ms) | vs {args.dtype}, ratio of medians | vs {args.dtype}, median per round |",
        "| --- | ---: | ---: | ---: |",
        f"| {base} | {1e3 * med[base]:.1f} | 1.00× | 1.00× |",
        f"| INT8 weights (groups of {args.group_size}, {args.dtype} compute) | {1e3 * med['INT8 weights']:.1f} | "
        f"{med['INT8 weights'] / med[base]:.2f}× | {statistics.median(ratios):.2f}× |",
    ]
    data = {"args": vars(args) | {"device": str(device)}, "times": times, "ratios": ratios, "env": _env()}
    _write(Path(args.out), "int8_linear", "\n".join(lines), data)
    return data
