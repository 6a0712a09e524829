"""Symmetric scaled quantisation to FP8 (e4m3, e5m2) and INT8, per tensor or per row.

    s = amax / q_max   (amax over the tensor, or over each row),   q = round_F(clamp(x / s, ±q_max)),   x ≈ q · s

with round_F the round-to-nearest-even of the format F (the FP8 grid, or the integers for INT8),
q_max = 448 (e4m3), 57344 (e5m2), 127 (INT8, so that −q stays representable). An all-zero tensor
or row gets s = 1 (no NaN). Scales are float32 tensors computed on the device: no ``.item()``, so
no host synchronisation (HALO's reference code calls ``.item()`` per GEMM). Values beyond the range
saturate: torch's own cast to fp8 does not promise to, so we clamp first.
"""

from __future__ import annotations

import torch

from triton_kernels import quant as tk_quant
from triton_kernels.dispatch import select_backend

from . import hadamard

__all__ = [
    "FORMATS",
    "GRANULARITIES",
    "dequantize",
    "format_max",
    "grid_step",
    "quantize",
    "rotate_quantize",
    "storage_dtype",
]

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FORMATS = ("e4m3", "e5m2", "int8")
GRANULARITIES = ("tensor", "row")
# (mantissa bits, smallest normal exponent) of the FP8 formats, for the grid spacing.
_FP8_GRID = {name: tk_quant.FP8_FORMATS[dtype] for name, dtype in FP8.items()}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


def storage_dtype(fmt: str) -> torch.dtype:
    """The torch dtype codes of ``fmt`` ("e4m3", "e5m2" or "int8") are stored in."""
    _check_format(fmt)
    return torch.int8 if fmt == "int8" else FP8[fmt]


def format_max(fmt: str) -> float:
    """The largest magnitude a quantised value takes (q_max)."""
    _check_format(fmt)
    return 127.0 if fmt == "int8" else float(torch.finfo(FP8[fmt]).max)


def _check_input(x: torch.Tensor, fmt: str, granularity: str) -> None:
    _check_format(fmt)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")


def quantize(
    x: torch.Tensor, fmt: str, granularity: str = "tensor", scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with x ≈ q·s; s is float32 of shape () per tensor, (rows, 1) per row (rows = the
    product of the leading dimensions). A given ``scale`` (of that shape) is used instead of
    amax/q_max, and values beyond q_max·s saturate. The Triton kernel where
    :func:`triton_kernels.select_backend` picks Triton for op ``quantize`` (not for a given
    ``scale``, which the kernels do not take), else :func:`quantize_reference`.

    Args:
        x: a float32/float16/bfloat16/float64 tensor with a non-empty last dimension.
        fmt: "e4m3", "e5m2" or "int8".
        granularity: "tensor" or "row".
        scale: None, or the float32 scale to use.
    """
    _check_input(x, fmt, granularity)
    if scale is None and select_backend(x.device, "quantize") == "triton":
        x2 = x.reshape(-1, x.shape[-1])
        if fmt == "int8":
            q, s = tk_quant.quantize_int8(x2, granularity)
        else:
            q, s = tk_quant.quantize_fp8(x2, FP8[fmt], granularity)
        return q.view(x.shape), s
    return quantize_reference(x, fmt, granularity, scale)


def quantize_reference(
    x: torch.Tensor, fmt: str, granularity: str = "tensor", scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path of :func:`quantize`: the Triton kernels' own twin,
    ``triton_kernels.quantize_reference``, in galorex's format names; arguments as :func:`quantize`."""
    _check_input(x, fmt, granularity)
    return tk_quant.quantize_reference(x, storage_dtype(fmt), granularity, scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x̂ = q·s in ``dtype``, computed in float32.

    Args:
        q: codes from :func:`quantize` (FP8 or int8).
        scale: their float32 scale, () per tensor or (rows, 1) per row (rows = the product of q's
            leading dimensions).
        dtype: the dtype of the result.
    """
    if scale.dim() == 0:
        return (q.to(torch.float32) * scale).to(dtype)
    rows = q.reshape(-1, q.shape[-1]).to(torch.float32) * scale
    return rows.view(q.shape).to(dtype)


def grid_step(y: torch.Tensor, fmt: str) -> torch.Tensor:
    """Spacing of the format's grid around the (already scaled) values ``y``: 1 for INT8; for FP8
    2^(max(⌊log₂|y|⌋, e_min) − mantissa bits), the subnormal spacing below the smallest normal.
    Round-to-nearest errs by at most half of it.

    Args:
        y: values in units of the scale (x/s), any shape.
        fmt: "e4m3", "e5m2" or "int8".
    """
    _check_format(fmt)
    if fmt == "int8":
        return torch.ones_like(y, dtype=torch.float32)
    mant, emin = _FP8_GRID[fmt]
    a = y.float().abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a)))).clamp(min=emin)
    return torch.exp2(e - mant)


def rotate_quantize(
    t: torch.Tensor, block: int | None, signs: torch.Tensor | None, fmt: str, granularity: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q(t R) with R = diag(signs)·blockdiag(H_block) along the last dimension, or Q(t) when
    ``block`` is None (no rotation). The rotation is computed in float32 from t's own dtype. Where
    :func:`triton_kernels.select_backend` picks Triton for op ``quantize`` and the kernels take t
    (float32/float16/bfloat16, 1 < block ≤ 16384) the rotation and quantisation run as one fused
    kernel (``hadamard_quantize_fp8`` / ``hadamard_quantize_int8``: no float32 copy of t, one read
    of t and one write of q with per-row scales, two reads of t per tensor; random signs cost one
    more elementwise pass, t·signs); otherwise t is rotated as a float32 copy, then quantised.
    Unrotated tensors go to :func:`quantize` as they are (it reads any float dtype, with no float32
    copy).

    Args:
        t: a floating-point tensor, rotated along its last dimension.
        block: the Hadamard block (a power of two dividing t's last dimension), or None.
        signs: None, or ±1 of t's last dimension's length (the diagonal D).
        fmt: "e4m3", "e5m2" or "int8".
        granularity: "tensor" or "row".

    Returns:
        (q, s) as :func:`quantize` returns them, for t R.
    """
    if block is None:
        return quantize(t, fmt, granularity)
    if (
        1 < block <= hadamard.TRITON_MAX_BLOCK
        and t.dtype in hadamard.TRITON_DTYPES
        and select_backend(t.device, "quantize") == "triton"
    ):
        _check_input(t, fmt, granularity)
        src = t if signs is None else t * signs.to(t.dtype)  # ±1: exact in any dtype
        src = src.reshape(-1, src.shape[-1])
        if fmt == "int8":
            q, s = tk_quant.hadamard_quantize_int8(src, block, granularity)
        else:
            q, s = tk_quant.hadamard_quantize_fp8(src, block, FP8[fmt], granularity)
        return q.view(t.shape), s
    return quantize(hadamard.rotate(t.to(torch.float32), block, signs), fmt, granularity)
