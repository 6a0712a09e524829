"""Scaled low-precision GEMM: (a·s_a)(b·s_b)ᵀ with FP8 or INT8 operands and fp32 accumulation.

Backends: ``triton`` (``triton_kernels.fp8_gemm`` / ``int8_gemm``); ``torch``
(``torch._scaled_mm`` for FP8, ``torch._int_mm`` for INT8: both run on the CPU in torch ≥ 2.13;
on CUDA they want dimensions in multiples of 16 or 8, and ``_scaled_mm`` no e5m2×e5m2); and
``emulate``, the reference (``triton_kernels.scaled_gemm_reference``: exact float64 sums, the
kernels' fp32 epilogue). ``backend="auto"`` asks :func:`triton_kernels.select_backend` (op
``scaled_gemm``) for triton or torch; on the torch side it takes ``emulate`` where this torch has
no scaled GEMM, and where torch's refuses a combination of operands on the GPU, with a
:class:`LowPrecisionFallbackWarning` the first time for each combination. A backend named
explicitly runs or raises.
"""

from __future__ import annotations

import warnings

import torch

from triton_kernels import gemm as tk_gemm
from triton_kernels.dispatch import select_backend

__all__ = ["BACKENDS", "LowPrecisionFallbackWarning", "scaled_gemm", "scaled_gemm_reference"]

BACKENDS = ("auto", "triton", "torch", "emulate")
# What the Triton kernels write directly (their epilogue rounds once, from the fp32 accumulator).
_KERNEL_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Combinations of operands torch's scaled GEMM refused under backend="auto" (warned once each).
_REFUSED: set[tuple] = set()


class LowPrecisionFallbackWarning(UserWarning):
    """``backend="auto"``: torch's scaled GEMM refused these operands, so the reference ran."""


def scaled_gemm_reference(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """(a·s_a)(b·s_b)ᵀ in float32: a (M,K), b (N,K), s_a () or (M,1), s_b () or (N,1).

    ``triton_kernels.scaled_gemm_reference`` with a float32 output: the products of the quantised
    values summed exactly (float64), rounded to float32, then times s_a and s_b (the scales are
    constant along K, so they go on the (M,N) output).

    Args:
        qa, sa: FP8 or int8 (M, K) codes and their float32 scale, () or (M, 1).
        qb, sb: the same kind of (N, K) codes and their scale, () or (N, 1).
    """
    return tk_gemm.scaled_gemm_reference(qa, qb, sa, sb, out_dtype=torch.float32)


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
        if qa.device.type != "cuda" or want == torch.bfloat16:
            raise
        # Some CUDA builds take row-wise scales only with a bf16 output: 8 bits of mantissa, still
        # far finer than the operands' 3 (e4m3). The same backend, asked for what it serves.
        out = torch._scaled_mm(a, bt, scale_a=sa_, scale_b=sb_, out_dtype=torch.bfloat16)
    out = out[0] if isinstance(out, tuple) else out  # torch < 2.5 returned (out, amax)
    return out if out.dtype == want else out.to(torch.float32)


def _check(qa, sa, qb, sb, backend: str, bias: torch.Tensor | None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if qa.dim() != 2 or qb.dim() != 2 or qa.shape[1] != qb.shape[1]:
        raise ValueError(f"expected a (M,K) and b (N,K), got {tuple(qa.shape)} and {tuple(qb.shape)}")
    if bias is not None and (
        not bias.is_floating_point() or tuple(bias.shape) != (qb.shape[0],) or bias.device != qa.device
    ):
        raise ValueError(
            f"bias must be a floating-point tensor of shape ({qb.shape[0]},) on {qa.device}, "
            f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}"
        )


def scaled_gemm(
    qa: torch.Tensor,
    sa: torch.Tensor,
    qb: torch.Tensor,
    sb: torch.Tensor,
    backend: str = "auto",
    out_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(a·s_a)(b·s_b)ᵀ (+ bias) as ``out_dtype`` (M,N), a (M,K) and b (N,K) both K-major.

    Every backend forms the float32 product, adds the bias in float32 and rounds once to
    ``out_dtype``; the Triton kernels do it in their epilogue, so a bf16 output is written directly
    (half the bytes of a float32 one, and no separate conversion pass). Compiled for a GPU, that
    epilogue may fuse the bias add into one FMA (a float32 rounding fewer: ≤ 1 ulp of float32).

    Args:
        qa, sa: FP8 or int8 (M, K) codes and their float32 scale, () or (M, 1).
        qb, sb: the same kind of (N, K) codes and their scale, () or (N, 1).
        backend: "auto", "triton", "torch" or "emulate" (module docstring).
        out_dtype: the dtype of the result.
        bias: None or a floating-point (N,) tensor on the operands' device.
    """
    _check(qa, sa, qb, sb, backend, bias)
    if backend != "emulate":
        side = select_backend(qa.device, "scaled_gemm", None if backend == "auto" else backend)
        if side == "triton":
            a, b = qa.contiguous(), qb.contiguous()
            kernel = tk_gemm.int8_gemm if qa.dtype == torch.int8 else tk_gemm.fp8_gemm
            if out_dtype in _KERNEL_OUT_DTYPES:
                return kernel(a, b, sa, sb, out_dtype=out_dtype, bias=bias)
            return _finish(kernel(a, b, sa, sb, out_dtype=torch.float32), out_dtype, bias)
        out = _torch_side(qa, sa, qb, sb, backend, out_dtype if bias is None else torch.float32)
        if out is not None:
            return _finish(out, out_dtype, bias)
    return _finish(scaled_gemm_reference(qa, sa, qb, sb), out_dtype, bias)


def _torch_side(qa, sa, qb, sb, backend: str, out_dtype: torch.dtype) -> torch.Tensor | None:
    """torch's scaled GEMM, or None for the reference: where this torch has none, or (``auto``
    only, with a warning the first time) where it refuses these operands. With a bias the caller
    asks for float32, so that the sum is rounded once (``_finish``)."""
    # Shape alignment is in the key: CUDA kernels refuse unaligned shapes that others accept.
    aligned = tuple(d % 16 == 0 for d in (qa.shape[0], qa.shape[1], qb.shape[0]))
    key = (qa.device.type, qa.dtype, qb.dtype, sa.dim(), sb.dim(), aligned, out_dtype)
    if backend == "auto" and key in _REFUSED:
        return None
    try:
        out = _torch_scaled(qa, sa, qb, sb, out_dtype)
    except RuntimeError as exc:
        if backend == "torch":
            raise
        _REFUSED.add(key)
        warnings.warn(
            f"scaled_gemm: torch's scaled GEMM refused {tuple(qa.shape)} {qa.dtype} × {tuple(qb.shape)} {qb.dtype} "
            f"on {qa.device.type} ({str(exc).splitlines()[0][:200]}); using the reference (float32 "
            "emulation) for this combination from now on",
            LowPrecisionFallbackWarning,
            stacklevel=3,
        )
        return None
    if out is None and backend == "torch":
        raise RuntimeError("backend='torch': this torch has no scaled GEMM for these operands")
    return out


def _finish(out: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """The float32 product (+ bias in float32), rounded once to ``out_dtype``."""
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)
