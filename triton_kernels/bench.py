"""Correctness, then speed, of the Triton kernels on a GPU: ``python -m triton_kernels.bench``.

    python -m triton_kernels.bench --out bench-out/triton      # the GPU table (CUDA needed)
    python -m triton_kernels.bench --interpret-smoke --out DIR  # tiny sizes under TRITON_INTERPRET=1

It first checks every kernel against its torch twin on the device and stops (exit 1) if one is
off; then it times, in one process:
- ``hadamard_transform`` on bf16, 2^26 entries, blocks 128…4096, in GB/s against a device-to-device
  copy of the same tensor (goal ≥ 70% of copy), and the fused ``hadamard_quantize_fp8``;
- ``fp8_gemm`` at 8192³ and M×N×K = 4096×4096×11008 in TFLOP/s against ``torch._scaled_mm`` and a
  bf16 ``torch.matmul`` (goal ≥ 80% of _scaled_mm and ≥ 1.5× bf16);
- ``fused_galore_adam_step`` for 4096×4096 and 4096×11008 weights at ranks 128 and 512 against the
  unfused torch path, its twin (goal ≥ 1.3× faster).
It prints a Markdown table and writes ``triton_bench.md`` and ``triton_bench.json`` into ``--out``.
The smoke mode runs the same code on the CPU at toy sizes: its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .dispatch import BACKEND_ENV, select_backend, triton_available

E4M3 = torch.float8_e4m3fn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], Any], device: torch.device, smoke: bool) -> float:
    """Median milliseconds per call: triton's do_bench (L2 flushed between runs) on a GPU, one
    timed call after one warm-up in the smoke mode."""
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


# --- correctness ----------------------------------------------------------------------------------


def _check(name: str, err: float, tol: float, note: str = "") -> dict[str, Any]:
    return {"check": name, "max_error": float(err), "tolerance": float(tol), "ok": bool(err <= tol), "note": note}


def _fp8_steps_apart(q: torch.Tensor, qr: torch.Tensor) -> tuple[float, int]:
    """Largest difference in fp8 codes (adjacent same-sign values differ by one) and how many differ."""
    a, b = q.view(torch.int8).int(), qr.view(torch.int8).int()
    # Sign-magnitude codes to a monotone integer line.
    a = torch.where(a < 0, -(a & 0x7F), a)
    b = torch.where(b < 0, -(b & 0x7F), b)
    diff = (a - b).abs()
    return float(diff.max()) if diff.numel() else 0.0, int((diff > 0).sum())


def correctness(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    from .gemm import fp8_gemm, fp8_gemm_reference, int8_gemm, int8_gemm_reference
    from .hadamard import hadamard_transform, hadamard_transform_reference
    from .lowrank import (
        fused_galore_adam_step,
        fused_galore_adam_step_reference,
        project,
        project_reference,
    )
    from .quant import (
        hadamard_quantize_fp8,
        hadamard_quantize_fp8_reference,
        hadamard_quantize_int8,
        hadamard_quantize_int8_reference,
        quantize_fp8,
        quantize_fp8_reference,
    )

    g = torch.Generator(device="cpu").manual_seed(0)
    results = []
    rows = 16 if smoke else 256
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 1e-2)):
        for b in (128, 4096 if not smoke else 256):
            x = torch.randn(rows, 2 * b, generator=g).to(device=device, dtype=dtype)
            err = (hadamard_transform(x, b).float() - hadamard_transform_reference(x, b).float()).abs().max()
            results.append(_check(f"hadamard_transform {str(dtype)[6:]} b={b}", err, tol))
    x = torch.randn(rows, 1024, generator=g).to(device=device, dtype=torch.bfloat16) * 5
    for gran in ("tensor", "row"):
        q, s = quantize_fp8(x, E4M3, gran)
        qr, sr = quantize_fp8_reference(x, E4M3, gran)
        steps, n_diff = _fp8_steps_apart(q, qr)
        results.append(
            _check(
                f"quantize_fp8 {gran} (fp8 codes apart)",
                steps,
                1,
                f"{n_diff} codes, {int((s != sr).sum())} scales differ",
            )
        )
        q, s = hadamard_quantize_fp8(x, 128, E4M3, gran)
        qr, sr = hadamard_quantize_fp8_reference(x, 128, E4M3, gran)
        steps, n_diff = _fp8_steps_apart(q, qr)
        # fp32 rotations may differ in the last bit from the twin's (FMA contraction): one code.
        results.append(_check(f"hadamard_quantize_fp8 {gran} (fp8 codes apart)", steps, 1, f"{n_diff} differ"))
        q, s = hadamard_quantize_int8(x, 128, gran)
        qr, sr = hadamard_quantize_int8_reference(x, 128, gran)
        apart = (q.to(torch.int16) - qr.to(torch.int16)).abs()
        n_diff = int((apart > 0).sum())
        results.append(_check(f"hadamard_quantize_int8 {gran} (codes apart)", apart.max(), 1, f"{n_diff} differ"))
        q, s = quantize_fp8(x.t(), E4M3, gran)
        qr, sr = quantize_fp8_reference(x.t().contiguous(), E4M3, gran)
        steps, n_diff = _fp8_steps_apart(q, qr)
        name = f"quantize_fp8 {gran} of a transposed view (fp8 codes apart)"
        results.append(_check(name, steps, 1, f"{n_diff} differ"))
    m, n, k = (48, 40, 96) if smoke else (512, 384, 1024)
    a = torch.randint(-16, 17, (m, k), generator=g).float().to(E4M3).to(device)
    b = torch.randint(-16, 17, (n, k), generator=g).float().to(E4M3).to(device)
    one = torch.tensor(1.0, device=device)
    out = fp8_gemm(a, b, one, one, torch.float32)
    exact = fp8_gemm_reference(a, b, one, one, torch.float32)
    results.append(_check("fp8_gemm integer operands (exact)", (out - exact).abs().max(), 0))
    a = (torch.randn(m, k, generator=g) * 4).to(E4M3).to(device)
    b = (torch.randn(n, k, generator=g) * 4).to(E4M3).to(device)
    sa = (torch.rand(m, 1, generator=g) + 0.5).to(device)
    sb = (torch.rand(n, 1, generator=g) + 0.5).to(device)
    out = fp8_gemm(a, b, sa, sb, torch.float32)
    ref = fp8_gemm_reference(a, b, sa, sb, torch.float32)
    results.append(_check("fp8_gemm rowwise (rel. to max)", ((out - ref).abs().max() / ref.abs().max()), 1e-5))
    a8 = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(device)
    b8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    out = int8_gemm(a8, b8, one, one, torch.float32)
    exact = int8_gemm_reference(a8, b8, one, one, torch.float32)
    results.append(_check("int8_gemm (exact)", (out - exact).abs().max(), 0))

    m, n, r = (40, 72, 16) if smoke else (512, 768, 64)
    for side in ("left", "right"):
        G = torch.randn(m, n, generator=g).to(device)
        P = torch.linalg.qr(torch.randn(m if side == "left" else n, r, generator=g))[0].to(device)
        err = (project(G, P, side) - project_reference(G, P, side)).abs().max()
        results.append(_check(f"project {side}", err, 1e-4))
        low = (r, n) if side == "left" else (m, r)
        W = torch.randn(m, n, generator=g).to(device)
        W2 = W.clone()
        ea, es = torch.zeros(low, device=device), torch.zeros(low, device=device)
        ea2, es2 = ea.clone(), es.clone()
        hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, scale=0.25)
        for t in range(1, 4):
            R = torch.randn(low, generator=g).to(device)
            fused_galore_adam_step(W, R, ea, es, P, side, step=t, **hp)
            fused_galore_adam_step_reference(W2, R, ea2, es2, P, side, step=t, **hp)
        results.append(_check(f"fused_galore_adam_step {side}", (W - W2).abs().max(), 1e-5))
    return results


# --- speed ----------------------------------------------------------------------------------------


def bench_hadamard(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    from .hadamard import hadamard_transform
    from .quant import hadamard_quantize_fp8, hadamard_quantize_int8

    shape = (64, 256) if smoke else (1 << 14, 1 << 12)  # 2^26 entries on a GPU
    blocks = (16, 256) if smoke else (128, 256, 512, 1024, 2048, 4096)
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    moved = 2 * x.numel() * x.element_size()
    copy_ms = _time_ms(lambda: y.copy_(x), device, smoke)
    copy_gbs = moved / copy_ms / 1e6
    rows = [
        {
            "table": "hadamard",
            "op": "copy_ (device to device)",
            "block": "",
            "ms": copy_ms,
            "GB/s": copy_gbs,
            "vs copy": 1.0,
        }
    ]
    for b in blocks:
        ms = _time_ms(lambda: hadamard_transform(x, b), device, smoke)
        gbs = moved / ms / 1e6
        frac = gbs / copy_gbs
        rows.append(
            {
                "table": "hadamard",
                "op": "hadamard_transform bf16",
                "block": b,
                "ms": ms,
                "GB/s": gbs,
                "vs copy": frac,
                "goal": "≥0.70",
                "met": frac >= 0.70,
            }
        )
    b = blocks[0]
    fused_bytes = x.numel() * (x.element_size() + 1)  # read bf16, write fp8 (scales are tiny)
    for gran in ("row", "tensor"):
        ms = _time_ms(lambda: hadamard_quantize_fp8(x, b, E4M3, gran), device, smoke)
        gbs = fused_bytes / ms / 1e6
        rows.append(
            {
                "table": "hadamard",
                "op": f"hadamard_quantize_fp8 {gran}",
                "block": b,
                "ms": ms,
                "GB/s": gbs,
                "vs copy": gbs / copy_gbs,
            }
        )
        ms = _time_ms(lambda: hadamard_quantize_int8(x, b, gran), device, smoke)
        gbs = fused_bytes / ms / 1e6
        rows.append(
            {
                "table": "hadamard",
                "op": f"hadamard_quantize_int8 {gran}",
                "block": b,
                "ms": ms,
                "GB/s": gbs,
                "vs copy": gbs / copy_gbs,
            }
        )
    # HALO's backward quantises Xᵀ and E_Yᵀ per row straight from the transposed view (tall tiles;
    # what galorex.halo does) — timed against copying to contiguous first, the alternative.
    from .quant import quantize_fp8

    xt = x.t()
    for op, fn in (
        ("quantize_fp8 row of xᵀ, strided view", lambda: quantize_fp8(xt, E4M3, "row")),
        ("quantize_fp8 row of xᵀ, .contiguous() first", lambda: quantize_fp8(xt.contiguous(), E4M3, "row")),
    ):
        ms = _time_ms(fn, device, smoke)
        gbs = fused_bytes / ms / 1e6
        rows.append({"table": "hadamard", "op": op, "block": "", "ms": ms, "GB/s": gbs, "vs copy": gbs / copy_gbs})
    return rows


def bench_fp8_gemm(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    from .gemm import fp8_gemm

    shapes = [(64, 64, 64)] if smoke else [(8192, 8192, 8192), (4096, 4096, 11008)]
    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)
    for m, n, k in shapes:
        a16 = torch.randn(m, k, generator=g).to(device=device, dtype=torch.bfloat16)
        b16 = torch.randn(n, k, generator=g).to(device=device, dtype=torch.bfloat16)
        a, b = a16.to(E4M3), b16.to(E4M3)
        sa, sb = torch.tensor(1.0, device=device), torch.tensor(1.0, device=device)
        sar = torch.ones(m, 1, device=device)
        sbr = torch.ones(n, 1, device=device)
        flops = 2 * m * n * k
        timings = {
            "torch.matmul bf16": lambda: a16 @ b16.t(),
            "torch._scaled_mm tensorwise": lambda: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16),
            "fp8_gemm tensorwise": lambda: fp8_gemm(a, b, sa, sb, torch.bfloat16),
            "torch._scaled_mm rowwise": lambda: torch._scaled_mm(
                a, b.t(), sar, sbr.t().contiguous(), out_dtype=torch.bfloat16
            ),
            "fp8_gemm rowwise": lambda: fp8_gemm(a, b, sar, sbr, torch.bfloat16),
        }
        measured = {}
        for op, fn in timings.items():
            try:
                measured[op] = _time_ms(fn, device, smoke)
            except Exception as exc:  # e.g. a torch build whose _scaled_mm lacks rowwise scales
                measured[op] = None
                print(f"  {op} at {m}x{n}x{k}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        bf16_ms = measured["torch.matmul bf16"]
        for op, ms in measured.items():
            row = {
                "table": "fp8_gemm",
                "op": op,
                "MxNxK": f"{m}x{n}x{k}",
                "ms": ms,
                "TFLOP/s": flops / ms / 1e9 if ms else None,
            }
            if op.startswith("fp8_gemm") and ms:
                ref = measured["torch._scaled_mm " + op.split()[-1]]
                row["vs _scaled_mm"] = ref / ms if ref else None
                row["vs bf16"] = bf16_ms / ms if bf16_ms else None
                row["goal"] = "≥0.80× _scaled_mm, ≥1.5× bf16"
                row["met"] = bool(
                    row["vs _scaled_mm"] and row["vs bf16"] and row["vs _scaled_mm"] >= 0.8 and row["vs bf16"] >= 1.5
                )
            rows.append(row)
    return rows


def bench_galore(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    from .lowrank import fused_galore_adam_step, fused_galore_adam_step_reference

    shapes = [(40, 72)] if smoke else [(4096, 4096), (4096, 11008)]
    ranks = (16,) if smoke else (128, 512)
    hp = dict(step=10, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, scale=0.25)
    rows = []
    g = torch.Generator(device="cpu").manual_seed(2)
    for m, n in shapes:
        side = "right" if m >= n else "left"  # galore-torch's "std" rule
        for r in ranks:
            for wdtype in (torch.float32, torch.bfloat16):
                W = torch.randn(m, n, generator=g).to(device=device, dtype=wdtype)
                P = torch.linalg.qr(torch.randn(m if side == "left" else n, r, generator=g))[0].to(device)
                low = (r, n) if side == "left" else (m, r)
                R = torch.randn(low, generator=g).to(device)
                ea, es = torch.zeros(low, device=device), torch.rand(low, generator=g).to(device)
                args = (W, R, ea, es, P, side)
                fused = _time_ms(lambda: fused_galore_adam_step(*args, **hp), device, smoke)
                unfused = _time_ms(lambda: fused_galore_adam_step_reference(*args, **hp), device, smoke)
                rows.append(
                    {
                        "table": "galore",
                        "op": f"{m}x{n} {str(wdtype)[6:]} W, side {side}",
                        "rank": r,
                        "fused ms": fused,
                        "torch ms": unfused,
                        "speed-up": unfused / fused,
                        "goal": "≥1.3",
                        "met": unfused / fused >= 1.3,
                    }
                )
    return rows


# --- report ---------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def to_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    out = [
        f"Triton kernels on {meta['device']} — {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"Python {meta['python']}{' (interpreter smoke run: timings mean nothing)' if meta['smoke'] else ''}",
        "",
        f"`{meta['command']}`",
        "",
        "| check | max error | tolerance | ok | note |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    out += [
        f"| {c['check']} | {c['max_error']:.3g} | {c['tolerance']:.3g} | {'yes' if c['ok'] else 'NO'} | {c['note']} |"
        for c in report["correctness"]
    ]
    for table in ("hadamard", "fp8_gemm", "galore"):
        rows = [r for r in report["rows"] if r["table"] == table]
        if not rows:
            continue
        cols = [k for k in rows[0] if k != "table"]
        for r in rows:
            cols += [k for k in r if k not in cols and k != "table"]
        out += ["", "| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
        out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triton_kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/triton"), help="folder for triton_bench.md/.json")
    parser.add_argument("--interpret-smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument(
        "--only", choices=("hadamard", "fp8_gemm", "galore"), action="append", help="run only these tables"
    )
    args = parser.parse_args(argv)
    smoke = args.interpret_smoke
    if not triton_available():
        print("triton_kernels.bench: triton cannot be imported here (pip install 'galorex[triton]')", file=sys.stderr)
        return 2
    if smoke:
        # Set before any kernel is built; the kernels are built per mode on first launch.
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
    else:
        if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
            print(
                "triton_kernels.bench needs a CUDA GPU (and TRITON_INTERPRET unset); none is available here. "
                "Use --interpret-smoke for a tiny CPU run under the Triton interpreter.",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cuda")
    if os.environ.get(BACKEND_ENV, "auto").strip().lower() == "torch":
        print(f"triton_kernels.bench: {BACKEND_ENV}=torch; unset it to time the kernels", file=sys.stderr)
        return 2
    # The kernels are what is measured here, whatever the default of each operation on this device.
    saved = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = "triton"
    try:
        select_backend(device, "hadamard")  # raises if Triton cannot run here after all
        return _run(args, argv, device, smoke)
    finally:
        if saved is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = saved


def _run(args: argparse.Namespace, argv: list[str] | None, device: torch.device, smoke: bool) -> int:
    import triton

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": "python -m triton_kernels.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "smoke": smoke,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    print(f"# {meta['device']}: correctness first", flush=True)
    checks = correctness(device, smoke)
    for c in checks:
        print(
            f"  {'ok ' if c['ok'] else 'BAD'} {c['check']}: {c['max_error']:.3g} "
            f"(tolerance {c['tolerance']:.3g}) {c['note']}",
            flush=True,
        )
    report: dict[str, Any] = {"meta": meta, "correctness": checks, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    if all(c["ok"] for c in checks):
        tables = args.only or ["hadamard", "fp8_gemm", "galore"]
        bench = {"hadamard": bench_hadamard, "fp8_gemm": bench_fp8_gemm, "galore": bench_galore}
        for name in tables:
            t0 = time.perf_counter()
            report["rows"] += bench[name](device, smoke)
            print(f"# {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    text = to_markdown(report)
    (args.out / "triton_bench.md").write_text(text)
    (args.out / "triton_bench.json").write_text(json.dumps(report, indent=2, default=str))
    print(text)
    if not all(c["ok"] for c in checks):
        print("correctness checks failed: no timings taken", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
