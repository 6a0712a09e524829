"""GPU benchmark: HaloLinear forward+backward against bf16 ``nn.Linear`` (needs CUDA).

    python -m galorex.bench.halo_gpu [--tokens 8192 --in-features 4096 --out-features 4096] [--out bench-out]

Times (CUDA events, median of --iters after --warmup) one forward+backward of a bf16 ``nn.Linear``
and of ``HaloLinear`` at every level and format (bf16 input and master weight), also with
``save_quantized=True`` (per tensor, levels 0 and 1), with the bytes each layer saves for backward;
the bare scaled GEMMs (``torch._scaled_mm`` e4m3, ``torch._int_mm``) and bf16 matmul at the same
shape, and the Hadamard transform and quantiser alone; checks HaloLinear's error against float64
on a slice; and writes halo_gpu.md / halo_gpu.json. Well under five minutes on one H200 (estimated
from the torch-path run in docs/benchmarks.md). Exits with status 2 and a message when there is
no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _time(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # the --device cpu smoke run
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m galorex.bench.halo_gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run at small sizes")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("halo_gpu: no CUDA device here; this benchmark needs a GPU (nothing was measured)", file=sys.stderr)
        return 2

    from ..halo import HaloLinear, fwht, quantize
    from ..lowp import gemm as halo_gemm

    dev = torch.device(args.device)
    t, k, n = args.tokens, args.in_features, args.out_features
    torch.manual_seed(0)
    x = torch.randn(t, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ey = torch.randn(t, n, device=dev, dtype=torch.bfloat16)
    flops = 3 * 2 * t * k * n
    rows: list[dict[str, Any]] = []

    def fwd_bwd(layer):
        def run():
            x.grad = None
            layer.weight.grad = None
            layer(x).backward(ey)

        return run

    base = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    base_s = _time(fwd_bwd(base), args.warmup, args.iters)
    rows.append({"what": "nn.Linear bf16 fwd+bwd", "s": base_s, "tflops": flops / base_s / 1e12, "vs_bf16": 1.0})

    # Error on a slice against float64, to see the GPU path computes what the CPU tests check; and
    # the bytes each layer keeps for backward (save_quantized: 8-bit X R_K and W R_K instead of X).
    from .halo import saved_bytes

    xs = x.detach()[:1024].float()
    variants = [
        (fmt, level, gran, False, "auto")
        for fmt in ("fp8", "int8")
        for level in (0, 1, 2)
        for gran in ("row", "tensor")
    ]
    variants += [(fmt, level, "tensor", True, "auto") for fmt in ("fp8", "int8") for level in (0, 1)]
    # The same layers with cuBLAS GEMMs (torch._scaled_mm / torch._int_mm) behind the Triton
    # rotation and quantisation kernels: which GEMM is faster here decides the default.
    variants += [("fp8", 0, "row", False, "torch"), ("fp8", 1, "row", False, "torch")]
    variants += [("int8", 2, "row", False, "torch"), ("fp8", 0, "tensor", True, "torch")]
    for fmt, level, gran, saved, gemm in variants:
        layer = HaloLinear(
            k,
            n,
            bias=False,
            level=level,
            fmt=fmt,
            granularity=gran,
            save_quantized=saved,
            backend=gemm,
            device=dev,
            dtype=torch.bfloat16,
        )
        with torch.no_grad():
            layer.weight.copy_(base.weight)
        s = _time(fwd_bwd(layer), args.warmup, args.iters)
        with torch.no_grad():
            y = layer(xs).double()
            ref = xs.double() @ base.weight.double().T
            err = float((y - ref).norm() / ref.norm())
        rows.append(
            {
                "what": f"HaloLinear {fmt} level {level} {gran}{' save_quantized' if saved else ''}"
                f"{' (cuBLAS GEMMs)' if gemm == 'torch' else ''} fwd+bwd",
                "s": s,
                "tflops": flops / s / 1e12,
                "vs_bf16": base_s / s,
                "rel_err_Y": err,
                "saved_MiB": saved_bytes(layer, x) / 2**20,
            }
        )

    a16, b16 = torch.randn(t, k, device=dev, dtype=torch.bfloat16), torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    s = _time(lambda: a16 @ b16.T, args.warmup, args.iters)
    rows.append({"what": "bf16 matmul (one GEMM)", "s": s, "tflops": 2 * t * k * n / s / 1e12})
    qa, sa = quantize(a16.float(), "e4m3", "row")
    qb, sb = quantize(b16.float(), "e4m3", "row")
    for gran, (sa_, sb_) in (("row", (sa, sb)), ("tensor", (sa.amax(), sb.amax()))):
        try:
            s = _time(lambda: halo_gemm._torch_scaled(qa, sa_, qb, sb_), args.warmup, args.iters)
            rows.append(
                {"what": f"torch._scaled_mm e4m3 {gran} (one GEMM)", "s": s, "tflops": 2 * t * k * n / s / 1e12}
            )
        except Exception as e:  # report, do not hide
            rows.append({"what": f"torch._scaled_mm e4m3 {gran}", "error": f"{type(e).__name__}: {e}"[:200]})
    qa8, sa8 = quantize(a16.float(), "int8", "row")
    qb8, sb8 = quantize(b16.float(), "int8", "row")
    try:
        s = _time(lambda: halo_gemm._torch_scaled(qa8, sa8, qb8, sb8), args.warmup, args.iters)
        rows.append({"what": "torch._int_mm int8 row (one GEMM)", "s": s, "tflops": 2 * t * k * n / s / 1e12})
    except Exception as e:
        rows.append({"what": "torch._int_mm int8", "error": f"{type(e).__name__}: {e}"[:200]})
    a32 = a16.float()
    s = _time(lambda: fwht(a32, k if (k & (k - 1)) == 0 else None), args.warmup, args.iters)
    rows.append({"what": f"torch FWHT fp32 {t}x{k}", "s": s, "GB/s": 2 * a32.numel() * 4 / s / 1e9})
    from ..lowp.hadamard import fwht_kron

    s = _time(lambda: fwht_kron(a32, k if (k & (k - 1)) == 0 else None), args.warmup, args.iters)
    rows.append({"what": f"torch Kronecker-GEMM Hadamard fp32 {t}x{k}", "s": s, "GB/s": 2 * a32.numel() * 4 / s / 1e9})
    s = _time(lambda: quantize(a32, "e4m3", "row"), args.warmup, args.iters)
    rows.append({"what": f"quantize e4m3 row {t}x{k}", "s": s, "GB/s": a32.numel() * 5 / s / 1e9})

    failed = sorted(str(key) for key in halo_gemm._REFUSED)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke run)"
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": gpu,
        "date": time.strftime("%Y-%m-%d"),
        "shape": [t, k, n],
        "gemm_backends_that_failed": failed,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    lines = [
        f"HaloLinear vs bf16 nn.Linear, {t} tokens × {k} → {n}, {env['gpu']}, torch {env['torch']}, "
        f"median of {args.iters}; GEMM backends that failed and fell back: {failed or 'none'}",
        "",
        "| what | ms | TFLOP/s | speed vs bf16 | rel. error of Y | saved for backward (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['what']} | {r['error']} | | | | |")
            continue
        tf = f"{r['tflops']:.0f}" if "tflops" in r else f"{r['GB/s']:.0f} GB/s"
        vs = f"{r['vs_bf16']:.2f}×" if "vs_bf16" in r else ""
        err = f"{r['rel_err_Y']:.4f}" if "rel_err_Y" in r else ""
        mib = f"{r['saved_MiB']:.2f}" if "saved_MiB" in r else ""
        lines.append(f"| {r['what']} | {r['s'] * 1e3:.2f} | {tf} | {vs} | {err} | {mib} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "halo_gpu.md").write_text(table + "\n")
    (out / "halo_gpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
