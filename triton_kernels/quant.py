"""Symmetric FP8 and INT8 quantisation (per tensor or per row), the fused Hadamard + FP8 and
Hadamard + INT8 ones, and their torch twins.

q = round(clamp(x / s)), s = amax(|x|) / q_max (s = 1 where amax = 0), so x ≈ q · s: the scaling
that HALO (Ashkboos et al., 2025) applies after a Hadamard rotation, and that FP8 training recipes
(Micikevicius et al., "FP8 Formats for Deep Learning", 2022) use per tensor or per row.
"""

from __future__ import annotations

import math

import torch

from ._helpers import fwht_rows, round_half_even, round_to_fp8_grid, row_max
from ._jit import LazyKernel, interpreting, next_power_of_2, tl
from .dispatch import select_backend
from .hadamard import _check_triton_input, _fwht, check_block_size

GRANULARITIES = ("tensor", "row")
# (mantissa bits, smallest normal exponent) of the two OCP FP8 formats torch carries.
FP8_FORMATS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
INT8_MAX = 127
FUSED_ROW_MAX = 16384  # a row up to this many entries is rotated and quantised in one pass


def _check_x(x: torch.Tensor, granularity: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in FP8_FORMATS:
        raise TypeError(f"x must be a float32/float16/bfloat16/float64 tensor, got {x.dtype}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
    if granularity == "row" and x.dim() == 0:
        raise ValueError("granularity='row' needs x with at least one dimension")


def _check_fp8_dtype(dtype: torch.dtype) -> tuple[int, int, float]:
    if dtype not in FP8_FORMATS:
        raise ValueError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    mant, min_exp = FP8_FORMATS[dtype]
    return mant, min_exp, float(torch.finfo(dtype).max)


def _qmax(dtype: torch.dtype) -> float:
    if dtype == torch.int8:
        return float(INT8_MAX)
    return _check_fp8_dtype(dtype)[2]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, 1) if x.dim() == 0 else x.reshape(-1, x.shape[-1])


def _scale_from_amax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    # On device and without .item(): where() keeps an all-zero tensor at scale 1 instead of 0/0.
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def _amax(x2: torch.Tensor, granularity: str) -> torch.Tensor:
    a = x2.abs()
    return a.amax() if granularity == "tensor" else a.amax(dim=1, keepdim=True)


def quantize_reference(
    x: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    granularity: str = "tensor",
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of every quantiser here, and galorex's torch path (``galorex.lowp``).

    s = amax|x| / q_max per tensor or per row (s = 1 where amax = 0), or the given ``scale``;
    q = round(clamp(x / s, ±q_max)) computed in fp32: torch's round-to-nearest-even cast for FP8,
    ``torch.round`` (half to even) for INT8. The clamp comes first because torch's cast to FP8
    does not saturate.

    Args:
        x: a float32/float16/bfloat16/float64 tensor; rows are the product of its leading dims.
        dtype: ``torch.float8_e4m3fn``, ``torch.float8_e5m2`` or ``torch.int8``.
        granularity: ``"tensor"`` (a scale of shape ()) or ``"row"`` (shape (rows, 1)).
        scale: a float32 scale of that shape to use instead of amax / q_max.
    """
    _check_x(x, granularity)
    qmax = _qmax(dtype)
    x2 = _rows(x).float()
    if scale is None:
        scale = _scale_from_amax(_amax(x2, granularity), qmax)
    else:
        want = () if granularity == "tensor" else (x2.shape[0], 1)
        if tuple(scale.shape) != want:
            raise ValueError(f"scale must have shape {want} for granularity={granularity!r}, got {tuple(scale.shape)}")
        scale = scale.to(device=x.device, dtype=torch.float32)
    y = (x2 / scale).clamp_(-qmax, qmax)  # a fresh quotient: clamping in place is safe
    q = y.round_().to(torch.int8) if dtype == torch.int8 else y.to(dtype)
    return q.reshape(x.shape), scale


def quantize_fp8_reference(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, granularity: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of :func:`quantize_fp8`: :func:`quantize_reference` with an FP8 ``dtype``."""
    _check_fp8_dtype(dtype)
    return quantize_reference(x, dtype, granularity)


def quantize_int8_reference(x: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of :func:`quantize_int8`: :func:`quantize_reference` with ``torch.int8``."""
    return quantize_reference(x, torch.int8, granularity)


def hadamard_quantize_reference(
    x: torch.Tensor, block_size: int | None, dtype: torch.dtype = torch.float8_e4m3fn, granularity: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of the fused kernels: the rotation in fp32 (``hadamard_transform_reference``
    without its final cast), quantised from fp32 by :func:`quantize_reference`."""
    _check_x(x, granularity)
    b = check_block_size(x, block_size)
    return quantize_reference(_fwht(x.float(), b), dtype, granularity)


def hadamard_quantize_fp8_reference(
    x: torch.Tensor, block_size: int | None, dtype: torch.dtype = torch.float8_e4m3fn, granularity: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of :func:`hadamard_quantize_fp8` (:func:`hadamard_quantize_reference`)."""
    _check_fp8_dtype(dtype)
    return hadamard_quantize_reference(x, block_size, dtype, granularity)


def hadamard_quantize_int8_reference(
    x: torch.Tensor, block_size: int | None, granularity: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of :func:`hadamard_quantize_int8` (:func:`hadamard_quantize_reference`)."""
    return hadamard_quantize_reference(x, block_size, torch.int8, granularity)


# --- kernels -------------------------------------------------------------------------------------


def _absmax_kernel(
    x_ptr, part_ptr, rows, cols, stride_row, stride_col, n_colblocks, BR: tl.constexpr, BC: tl.constexpr
):
    # part[row, column block] = max |x| over that tile row; the reduction over blocks is torch's.
    # One grid axis (CUDA caps the second at 65535 programs): program = row block · n_colblocks + cb.
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % n_colblocks
    r = (pid // n_colblocks) * BR + tl.arange(0, BR)
    c = cb * BC + tl.arange(0, BC)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    x = tl.load(x_ptr + r[:, None] * stride_row + c[None, :] * stride_col, mask=mask, other=0.0)
    amax = row_max(tl.abs(x.to(tl.float32)))
    tl.store(part_ptr + r * n_colblocks + cb, amax, mask=r < rows)


def _quant_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    scale_stride,
    rows,
    cols,
    stride_row,
    stride_col,
    IS_FP8: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    QMAX: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    # One grid axis (CUDA caps the second at 65535 programs): program = row block · column blocks + c.
    pid = tl.program_id(0).to(tl.int64)
    n_colblocks = (cols + BC - 1) // BC
    r = (pid // n_colblocks) * BR + tl.arange(0, BR)
    c = (pid % n_colblocks) * BC + tl.arange(0, BC)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    x = tl.load(x_ptr + r[:, None] * stride_row + c[None, :] * stride_col, mask=mask, other=0.0)
    s = tl.load(scale_ptr + r * scale_stride, mask=r < rows, other=1.0)
    y = x.to(tl.float32) / s[:, None]
    if IS_FP8:
        q = round_to_fp8_grid(y, MANT_BITS, MIN_EXP, QMAX)
    else:
        q = tl.minimum(tl.maximum(round_half_even(y), -QMAX), QMAX)
    tl.store(q_ptr + r[:, None] * cols + c[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)


def _hadamard_absmax_kernel(
    x_ptr,
    part_ptr,
    n_blockrows,
    n_blocks,
    stride_row,
    stride_col,
    B: tl.constexpr,
    LOG2B: tl.constexpr,
    TILE: tl.constexpr,
):
    # part[block-row] = max |H x| over one block of one row (pass 1 of 2 for per-tensor scales).
    ROWS: tl.constexpr = (TILE + B - 1) // B
    q = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    live = q < n_blockrows
    col = tl.arange(0, B)
    src = (q // n_blocks)[:, None] * stride_row + ((q % n_blocks)[:, None] * B + col[None, :]) * stride_col
    x = tl.load(x_ptr + src, mask=live[:, None], other=0.0).to(tl.float32)
    y = fwht_rows(x, ROWS, B, LOG2B)
    tl.store(part_ptr + q, row_max(tl.abs(y)), mask=live)


def _hadamard_quant_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    scale_stride,
    n_blockrows,
    n_blocks,
    stride_row,
    stride_col,
    inv_sqrt_b,
    B: tl.constexpr,
    LOG2B: tl.constexpr,
    IS_FP8: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    QMAX: tl.constexpr,
    TILE: tl.constexpr,
):
    # Pass 2 of 2: rotate again (recomputing is cheaper than storing the rotation) and quantise.
    ROWS: tl.constexpr = (TILE + B - 1) // B
    q = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    live = q < n_blockrows
    row = q // n_blocks
    col = tl.arange(0, B)
    src = row[:, None] * stride_row + ((q % n_blocks)[:, None] * B + col[None, :]) * stride_col
    x = tl.load(x_ptr + src, mask=live[:, None], other=0.0).to(tl.float32)
    y = fwht_rows(x, ROWS, B, LOG2B) * inv_sqrt_b
    s = tl.load(scale_ptr + row * scale_stride, mask=live, other=1.0)
    if IS_FP8:
        out = round_to_fp8_grid(y / s[:, None], MANT_BITS, MIN_EXP, QMAX)
    else:
        out = tl.minimum(tl.maximum(round_half_even(y / s[:, None]), -QMAX), QMAX)
    tl.store(q_ptr + q[:, None] * B + col[None, :], out.to(q_ptr.dtype.element_ty), mask=live[:, None])


def _hadamard_quant_row_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    n_blocks,
    stride_row,
    stride_col,
    inv_sqrt_b,
    B: tl.constexpr,
    LOG2B: tl.constexpr,
    NB_PAD: tl.constexpr,
    IS_FP8: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    QMAX: tl.constexpr,
):
    # One program per row: one read of x, the row's amax and scale in registers, one write of q.
    row = tl.program_id(0).to(tl.int64)
    blk = tl.arange(0, NB_PAD).to(tl.int64)  # offsets · stride_col may pass 2³¹ for a strided view
    col = tl.arange(0, B)
    live = blk < n_blocks
    src = row * stride_row + (blk[:, None] * B + col[None, :]) * stride_col
    x = tl.load(x_ptr + src, mask=live[:, None], other=0.0).to(tl.float32)
    y = fwht_rows(x, NB_PAD, B, LOG2B) * inv_sqrt_b
    amax = tl.reduce(row_max(tl.abs(y)), 0, tl.standard._elementwise_max)
    s = tl.where(amax > 0, amax / QMAX, 1.0)
    tl.store(scale_ptr + row, s)
    if IS_FP8:
        out = round_to_fp8_grid(y / s, MANT_BITS, MIN_EXP, QMAX)
    else:
        out = tl.minimum(tl.maximum(round_half_even(y / s), -QMAX), QMAX)
    tl.store(
        q_ptr + row * (n_blocks * B) + blk[:, None] * B + col[None, :],
        out.to(q_ptr.dtype.element_ty),
        mask=live[:, None],
    )


_TILE_CONFIGS = [
    {"BR": 16, "BC": 256, "num_warps": 4},
    {"BR": 8, "BC": 1024, "num_warps": 8},
    {"BR": 1, "BC": 4096, "num_warps": 8},
    # tall tiles for column-major (transposed) input, whose stride_row is 1
    {"BR": 128, "BC": 32, "num_warps": 4},
    {"BR": 64, "BC": 64, "num_warps": 4},
]
# The absmax tile is fixed by the caller (the partial maxima's layout depends on it).
_ABSMAX = LazyKernel(_absmax_kernel, configs=[{"num_warps": 8}], key=[], interpret_config={}, helpers=(row_max,))
_QUANT = LazyKernel(
    _quant_kernel,
    configs=_TILE_CONFIGS,
    key=["cols", "stride_row", "IS_FP8"],
    interpret_config={"BR": 16, "BC": 128},
    helpers=(round_to_fp8_grid, round_half_even),
)
_H_ABSMAX = LazyKernel(
    _hadamard_absmax_kernel,
    configs=[{"TILE": 4096, "num_warps": 8}],
    key=[],
    interpret_config={"TILE": 1024},
    helpers=(fwht_rows, row_max),
)
_H_QUANT = LazyKernel(
    _hadamard_quant_kernel,
    configs=[{"TILE": 4096, "num_warps": 8}],
    key=[],
    interpret_config={"TILE": 1024},
    helpers=(fwht_rows, round_to_fp8_grid, round_half_even),
)
_H_QUANT_ROW = LazyKernel(
    _hadamard_quant_row_kernel,
    configs=[{"num_warps": 8}, {"num_warps": 16}],
    key=["B", "NB_PAD", "IS_FP8"],
    interpret_config={},
    helpers=(fwht_rows, round_to_fp8_grid, round_half_even, row_max),
)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _quantize_triton(x: torch.Tensor, qdtype: torch.dtype, granularity: str, fmt: tuple[int, int, float]):
    x2 = _rows(x)
    rows, cols = x2.shape
    # A transposed view (column-major: HALO's backward quantises Xᵀ and E_Yᵀ per row) is read in
    # tall tiles, so that each load runs along its contiguous dimension.
    column_major = rows > 1 and x2.stride(0) == 1
    br, bc = (16, 128) if interpreting() else ((128, 32) if column_major else (8, 1024))
    n_colblocks = _cdiv(cols, bc)
    part = torch.empty((rows, n_colblocks), dtype=torch.float32, device=x.device)
    q = torch.empty((rows, cols), dtype=qdtype, device=x.device)
    _ABSMAX.launch(
        lambda m: (_cdiv(rows, br) * n_colblocks,),
        x2,
        part,
        rows,
        cols,
        x2.stride(0),
        x2.stride(1),
        n_colblocks,
        BR=br,
        BC=bc,
    )
    scale = _scale_from_amax(_amax(part, granularity), fmt[2])
    _QUANT.launch(
        lambda m: (_cdiv(rows, m["BR"]) * _cdiv(cols, m["BC"]),),
        x2,
        q,
        scale,
        0 if granularity == "tensor" else 1,
        rows,
        cols,
        x2.stride(0),
        x2.stride(1),
        IS_FP8=qdtype != torch.int8,
        MANT_BITS=fmt[0],
        MIN_EXP=fmt[1],
        QMAX=fmt[2],
    )
    return q.reshape(x.shape), scale


def quantize_fp8(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, granularity: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with x ≈ q.float() · s, q = sat(round(x / s)) in ``dtype``, s = amax|x| / fp8_max.

    An all-zero tensor (or row) gets scale 1. Saturating, round-to-nearest-even, computed on the
    device without a host sync. Dispatch: :func:`triton_kernels.select_backend` (op ``quantize``).

    Args:
        x: a float32/float16/bfloat16/float64 tensor.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        granularity: "tensor" (a float32 scale of shape ()) or "row" (shape (rows, 1), rows =
            the product of the leading dimensions).

    Returns:
        (q of x's shape in ``dtype``, s).
    """
    _check_x(x, granularity)
    fmt = _check_fp8_dtype(dtype)
    if x.numel() == 0 or select_backend(x.device, "quantize") != "triton":
        return quantize_fp8_reference(x, dtype, granularity)
    return _quantize_triton(x, dtype, granularity, fmt)


def quantize_int8(x: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with x ≈ q.float() · s, q = clamp(round_half_even(x / s), −127, 127) int8, s = amax|x| / 127.

    Args:
        x, granularity: as :func:`quantize_fp8`.
    """
    _check_x(x, granularity)
    if x.numel() == 0 or select_backend(x.device, "quantize") != "triton":
        return quantize_int8_reference(x, granularity)
    return _quantize_triton(x, torch.int8, granularity, (0, 0, float(INT8_MAX)))


def hadamard_quantize_fp8(
    x: torch.Tensor, block_size: int | None, dtype: torch.dtype = torch.float8_e4m3fn, granularity: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8(hadamard_transform(x, block_size)) fused: the rotation is never written out.

    The rotation is quantised from fp32 (it is not rounded to x's dtype first), so for fp16/bf16
    inputs q can differ by one fp8 step from the unfused composition where that rounding tips a
    tie. With ``granularity="row"`` and rows of at most 16384 entries it is one pass (one read of x,
    one write of q); per-tensor scales need the global amax first, so x is read twice.

    Args:
        x: as :func:`quantize_fp8` (fp32, fp16 or bf16 on the Triton path).
        block_size: as :func:`triton_kernels.hadamard_transform`.
        dtype, granularity: as :func:`quantize_fp8`.
    """
    _check_x(x, granularity)
    b = check_block_size(x, block_size)
    fmt = _check_fp8_dtype(dtype)
    if x.numel() == 0 or select_backend(x.device, "quantize") != "triton":
        return hadamard_quantize_fp8_reference(x, b, dtype, granularity)
    return _hadamard_quantize_triton(x, b, dtype, granularity, fmt)


def hadamard_quantize_int8(
    x: torch.Tensor, block_size: int | None, granularity: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8(hadamard_transform(x, block_size)) fused, as :func:`hadamard_quantize_fp8` (the
    same passes; codes round half to even and saturate at ±127). HALO's INT8 levels, where the
    rotation pays most, quantise every rotated operand this way. Bit-exact against its twin under
    the interpreter; compiled for a GPU, Triton's fp32 division is not IEEE-rounded, so a value on
    a rounding boundary can land one code away (as for the FP8 kernels).

    Args:
        x, block_size, granularity: as :func:`hadamard_quantize_fp8`.
    """
    _check_x(x, granularity)
    b = check_block_size(x, block_size)
    if x.numel() == 0 or select_backend(x.device, "quantize") != "triton":
        return hadamard_quantize_int8_reference(x, b, granularity)
    return _hadamard_quantize_triton(x, b, torch.int8, granularity, (0, 0, float(INT8_MAX)))


def _hadamard_quantize_triton(x, b, qdtype, granularity, fmt):
    _check_triton_input(x, b)
    x2 = _rows(x)
    rows, n = x2.shape
    n_blocks = n // b
    log2b = int(math.log2(b))
    q = torch.empty((rows, n), dtype=qdtype, device=x.device)
    nb_pad = next_power_of_2(n_blocks)
    if granularity == "row" and nb_pad * b <= FUSED_ROW_MAX:
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        _H_QUANT_ROW.launch(
            lambda m: (rows,),
            x2,
            q,
            scale,
            n_blocks,
            x2.stride(0),
            x2.stride(1),
            b**-0.5,
            B=b,
            LOG2B=log2b,
            NB_PAD=nb_pad,
            IS_FP8=qdtype != torch.int8,
            MANT_BITS=fmt[0],
            MIN_EXP=fmt[1],
            QMAX=fmt[2],
        )
        return q.reshape(x.shape), scale
    n_blockrows = rows * n_blocks
    part = torch.empty((n_blockrows,), dtype=torch.float32, device=x.device)
    grid = lambda m: (_cdiv(n_blockrows, max(1, m["TILE"] // b)),)
    # The absmax pass sees the unscaled rotation: scale its maxima by 1/√b exactly as pass 2 does.
    _H_ABSMAX.launch(grid, x2, part, n_blockrows, n_blocks, x2.stride(0), x2.stride(1), B=b, LOG2B=log2b)
    inv = torch.tensor(b**-0.5, dtype=torch.float32, device=x.device)
    part = part.reshape(rows, n_blocks) * inv
    scale = _scale_from_amax(_amax(part, granularity), fmt[2])
    _H_QUANT.launch(
        grid,
        x2,
        q,
        scale,
        0 if granularity == "tensor" else 1,
        n_blockrows,
        n_blocks,
        x2.stride(0),
        x2.stride(1),
        b**-0.5,
        B=b,
        LOG2B=log2b,
        IS_FP8=qdtype != torch.int8,
        MANT_BITS=fmt[0],
        MIN_EXP=fmt[1],
        QMAX=fmt[2],
    )
    return q.reshape(x.shape), scale
