"""Scaled low-precision GEMM: (a·s_a)(b·s_b)ᵀ with FP8 or INT8 operands and fp32 accumulation.

Backends, first that applies: Triton (``triton_kernels.fp8_gemm`` / ``int8_gemm``) for CUDA tensors
when ``triton_kernels.dispatch.select_backend`` picks Triton; ``torch._scaled_mm`` (FP8) or
``torch._int_mm`` (INT8) where this torch has them and accepts the shapes (both run on the CPU in
torch ≥ 2.13; on CUDA they want dimensions in multiples of 16 or 8, and ``_scaled_mm`` no e5m2×e5m2);
else the exact emulation: dequantise to float32 and matmul. A backend that raises for a
(device, dtypes, granularity) combination is remembered and skipped from then on.
"""

from __future__ import annotations

import torch

from .hadamard import _triton_op

__all__ = ["BACKENDS", "scaled_gemm", "scaled_gemm_reference"]

BACKENDS = ("auto", "triton", "torch", "emulate")
_FAILED: set[tuple] = set()


def scaled_gemm_reference(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """(a·s_a)(b·s_b)ᵀ in float32: a (M,K), b (N,K), s_a () or (M,1), s_b () or (N,1).

    Computed as (a bᵀ)·s_a·s_bᵀ: the scales are constant along K, so they go on the (M,N) output,
    and the quantised values themselves are exact in float32."""
    out = qa.to(torch.float32) @ qb.to(torch.float32).t()
    return out.mul_(sa).mul_(sb.reshape(1, -1) if sb.dim() else sb)


def _torch_scaled(qa, sa, qb, sb, out_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The product through ``torch._int_mm`` / ``torch._scaled_mm``, or None where this torch has
    neither. On CUDA an FP8 product is asked for in ``out_dtype`` directly (cuBLAS rounds once from
    its float32 accumulator: no float32 result and conversion pass); elsewhere it is float32."""
    if qa.dtype == torch.int8:
        if not hasattr(torch, "_int_mm"):
            return None
        acc = torch._int_mm(qa.contiguous(), qb.contiguous().t())
        # int32 → float32 is exact below 2²⁴; beyond, it rounds by < 1e-7 relative.
        return acc.to(torch.float32) * sa * sb.reshape(1, -1)
    if not hasattr(torch, "_scaled_mm"):
        return None
    m, n = qa.shape[0], qb.shape[0]
    if sa.dim() == 0 and sb.dim() == 0:
        sa_, sb_ = sa, sb
    else:  # row-wise: (M,1) and (1,N)
        sa_ = sa.reshape(-1, 1).expand(m, 1).contiguous()
        sb_ = sb.reshape(1, -1).expand(1, n).contiguous()
    a, bt = qa.contiguous(), qb.contiguous().t()
    cuda_out = out_dtype in (torch.bfloat16, torch.float16, torch.float32) and qa.device.type == "cuda"
    want = out_dtype if cuda_out else torch.float32
    try:
        out = torch._scaled_mm(a, bt, scale_a=sa_, scale_b=sb_, out_dtype=want)
    except RuntimeError:
        if qa.device.type != "cuda":
            raise
        # Some CUDA builds take row-wise scales only with a bf16 output: 8 bits of mantissa, still
        # far finer than the operands' 3 (e4m3).
        out = torch._scaled_mm(a, bt, scale_a=sa_, scale_b=sb_, out_dtype=torch.bfloat16)
    out = out[0] if isinstance(out, tuple) else out  # torch < 2.5 returned (out, amax)
    return out if out.dtype == want else out.to(torch.float32)


# What the Triton kernels write directly (their epilogue rounds once, from the fp32 accumulator).
_KERNEL_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scaled_gemm(
    qa: torch.Tensor,
    sa: torch.Tensor,
    qb: torch.Tensor,
    sb: torch.Tensor,
    backend: str = "auto",
    out_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(a·s_a)(b·s_b)ᵀ (+ bias) as ``out_dtype`` (M,N), a (M,K) and b (N,K) both K-major, through the
    first backend that applies (see the module docstring); ``backend`` forces one ("emulate" is the
    reference). Every backend forms the float32 product, adds the bias in float32 and rounds once to
    ``out_dtype``; the Triton kernels do it in their epilogue, so a bf16 output is written directly
    (half the bytes of a float32 one, and no separate conversion pass). Compiled for a GPU, that
    epilogue may fuse the bias add into one FMA (a float32 rounding fewer: ≤ 1 ulp of float32)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if qa.dim() != 2 or qb.dim() != 2 or qa.shape[1] != qb.shape[1]:
        raise ValueError(f"expected a (M,K) and b (N,K), got {tuple(qa.shape)} and {tuple(qb.shape)}")
    if bias is not None and (
        not bias.is_floating_point() or tuple(bias.shape) != (qb.shape[0],) or bias.device != qa.device
    ):
        # Checked here, not by a backend: a kernel refusing it would be remembered as a failure.
        raise ValueError(
            f"bias must be a floating-point tensor of shape ({qb.shape[0]},) on {qa.device}, "
            f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}"
        )
    # Shape alignment is in the key: CUDA kernels refuse unaligned shapes that others accept.
    aligned = tuple(d % 16 == 0 for d in (qa.shape[0], qa.shape[1], qb.shape[0]))
    key_base = (qa.device.type, qa.dtype, qb.dtype, sa.dim(), sb.dim(), aligned, out_dtype, bias is not None)
    if backend in ("auto", "triton"):
        name = "int8_gemm" if qa.dtype == torch.int8 else "fp8_gemm"
        kernel = _triton_op(name, qa.device)
        if kernel is not None and ("triton",) + key_base not in _FAILED:
            try:
                a, b = qa.contiguous(), qb.contiguous()
                if out_dtype in _KERNEL_OUT_DTYPES:
                    return kernel(a, b, sa, sb, out_dtype=out_dtype, bias=bias)
                return _finish(kernel(a, b, sa, sb, out_dtype=torch.float32), out_dtype, bias)
            except Exception:
                if backend == "triton":
                    raise
                _FAILED.add(("triton",) + key_base)
        elif backend == "triton":
            raise RuntimeError("backend='triton': no triton_kernels GEMM for this device here")
    if backend in ("auto", "torch") and ("torch",) + key_base not in _FAILED:
        try:
            # With a bias the product stays float32 so that the sum is rounded once (``_finish``).
            out = _torch_scaled(qa, sa, qb, sb, out_dtype if bias is None else torch.float32)
        except Exception:
            if backend == "torch":
                raise
            _FAILED.add(("torch",) + key_base)
            out = None
        if out is not None:
            return _finish(out, out_dtype, bias)
        if backend == "torch":
            raise RuntimeError("backend='torch': this torch has no scaled GEMM for these operands")
    return _finish(scaled_gemm_reference(qa, sa, qb, sb), out_dtype, bias)


def _finish(out: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """The float32 product (+ bias in float32), rounded once to ``out_dtype``."""
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)
