"""Scaled FP8 and INT8 GEMMs, C = (A·s_a)(B·s_b)ᵀ (+ bias), and their torch twins.

A is (M, K), B is (N, K) — K-major, the layout Hopper's FP8 tensor cores want for the second operand —
and the scales are per tensor (shape ()) or per row (shape (M, 1) / (N, 1)). Products accumulate in
fp32 (FP8) or int32 (INT8) and are scaled once in the epilogue, as in HALO's quantised linear
layers (Ashkboos et al., "HALO: Hadamard-Assisted Lower-Precision Optimization for LLMs", 2025).
"""

from __future__ import annotations

import torch

from ._helpers import round_to_bf16
from ._jit import LazyKernel, check_same_device, tl
from .dispatch import select_backend

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_operands(a, b, a_scale, b_scale, out_dtype, bias, kind: str):
    ok = FP8_DTYPES if kind == "fp8" else (torch.int8,)
    names = "torch.float8_e4m3fn or torch.float8_e5m2" if kind == "fp8" else "torch.int8"
    for name, t in (("a", a), ("b", b), ("a_scale", a_scale), ("b_scale", b_scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in ok:
            raise TypeError(f"{name} must be {names}, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    (m, k), (n, k2) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"a is (M, K) = {tuple(a.shape)} and b is (N, K) = {tuple(b.shape)}: K differs")
    for name, s, rows in (("a_scale", a_scale, m), ("b_scale", b_scale, n)):
        if s.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {s.dtype}")
        if tuple(s.shape) not in ((), (rows, 1)):
            raise ValueError(f"{name} must have shape () or ({rows}, 1), got {tuple(s.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {out_dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError("bias must be a floating-point torch.Tensor or None")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    check_same_device(a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias)


def _epilogue_reference(acc64: torch.Tensor, a_scale, b_scale, out_dtype, bias) -> torch.Tensor:
    # The kernel's epilogue in the same order: fp32 accumulator · s_a · s_b (+ bias), one rounding out.
    acc = acc64.to(torch.float32)
    out = acc * a_scale.reshape(-1, 1) * b_scale.reshape(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def scaled_gemm_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin of :func:`fp8_gemm` and :func:`int8_gemm` (one function: their arithmetic is the
    same), and the reference of galorex's scaled GEMM: the products summed in float64 — exact for
    INT8 operands and for FP8 ones at any K these layers meet — then the kernels' epilogue, the
    sum rounded to fp32, times s_a and s_b (+ bias in fp32), rounded once to ``out_dtype``.

    Args:
        a, b: (M, K) and (N, K), both FP8 (either format) or both int8.
        a_scale, b_scale: float32, shape () or (M, 1) / (N, 1).
        out_dtype: bfloat16, float16 or float32.
        bias: None or a floating-point (N,) tensor.
    """
    _check_operands(a, b, a_scale, b_scale, out_dtype, bias, "int8" if a.dtype == torch.int8 else "fp8")
    return _epilogue_reference(a.double() @ b.double().t(), a_scale, b_scale, out_dtype, bias)


# The twins under the names of their kernels.
fp8_gemm_reference = int8_gemm_reference = scaled_gemm_reference


def _scaled_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    sa_ptr,
    sb_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    sa_stride,
    sb_stride,
    IS_INT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row-tiles share each column panel of B while it is in L2.
    pid = tl.program_id(0)
    num_m = (M + BM - 1) // BM
    num_n = (N + BN - 1) // BN
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # Wrapping the row indices keeps the main loop's loads unmasked along M and N; the wrapped rows
    # are computed and never stored.
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :] * stride_ak
    # B is read as a (BK, BN) tile of the (N, K) matrix: K-major, as sm_90's FP8 wgmma wants.
    b_ptrs = b_ptr + bn[None, :] * stride_bn + rk[:, None] * stride_bk
    if IS_INT:
        acc = tl.full((BM, BN), 0, tl.int32)
    else:
        acc = tl.full((BM, BN), 0, tl.float32)
    for k in range((K + BK - 1) // BK):
        k_left = K - k * BK
        # Zeros past K in both operands: a garbage NaN times a zero would still poison the sum.
        if IS_INT:
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        # `acc += dot` rather than dot(a, b, acc): on sm_90 the latter accumulates FP8 imprecisely.
        acc += tl.dot(a, b)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk

    sa = tl.load(sa_ptr + am * sa_stride)
    sb = tl.load(sb_ptr + bn * sb_stride)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + bn).to(tl.float32)[None, :]
    if OUT_BF16:
        out = round_to_bf16(out)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


_GEMM_CONFIGS = [
    {"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BM": 256, "BN": 128, "BK": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BM": 64, "BN": 128, "BK": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
]
_GEMM = LazyKernel(
    _scaled_gemm_kernel,
    configs=_GEMM_CONFIGS,
    key=["M", "N", "K", "IS_INT"],
    # tl.dot needs tiles of at least 16 on a GPU; the interpreter would take smaller ones.
    interpret_config={"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4},
    helpers=(round_to_bf16,),
)


def _gemm_triton(a, b, a_scale, b_scale, out_dtype, bias, is_int: bool) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return _epilogue_reference(
            torch.zeros((m, n), dtype=torch.float64, device=a.device), a_scale, b_scale, out_dtype, bias
        )
    _GEMM.launch(
        lambda meta: (-(-m // meta["BM"]) * -(-n // meta["BN"]),),
        a,
        b,
        out,
        a_scale,
        b_scale,
        bias.contiguous() if bias is not None else out,  # read with unit stride; unread without HAS_BIAS
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        0 if a_scale.dim() == 0 else a_scale.stride(0),
        0 if b_scale.dim() == 0 else b_scale.stride(0),
        IS_INT=is_int,
        HAS_BIAS=bias is not None,
        OUT_BF16=out_dtype == torch.bfloat16,
    )
    return out


def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """C = (a · a_scale)(b · b_scale)ᵀ (+ bias) for FP8 a (M, K) and b (N, K), fp32 accumulation.

    Any strides (a K-major b is the layout Hopper's FP8 tensor cores want). Dispatch:
    :func:`triton_kernels.select_backend` (op ``scaled_gemm``).

    Args:
        a, b: (M, K) and (N, K), ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        a_scale, b_scale: float32, shape () or per row (M, 1) / (N, 1).
        out_dtype: bfloat16, float16 or float32 (one rounding from the fp32 epilogue).
        bias: None or a floating-point (N,) tensor, added in fp32.
    """
    _check_operands(a, b, a_scale, b_scale, out_dtype, bias, "fp8")
    if select_backend(a.device, "scaled_gemm") != "triton":
        return scaled_gemm_reference(a, b, a_scale, b_scale, out_dtype, bias)
    return _gemm_triton(a, b, a_scale, b_scale, out_dtype, bias, is_int=False)


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """C = (a · a_scale)(b · b_scale)ᵀ (+ bias) for int8 a (M, K) and b (N, K), int32 accumulation.

    Exact integer products and sums, then one fp32 epilogue.

    Args:
        a, b: (M, K) and (N, K) int8.
        a_scale, b_scale, out_dtype, bias: as :func:`fp8_gemm`.
    """
    _check_operands(a, b, a_scale, b_scale, out_dtype, bias, "int8")
    if select_backend(a.device, "scaled_gemm") != "triton":
        return scaled_gemm_reference(a, b, a_scale, b_scale, out_dtype, bias)
    return _gemm_triton(a, b, a_scale, b_scale, out_dtype, bias, is_int=True)
