"""GaLore's low-rank projection and a fused Adam step that applies the update through the basis.

GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", 2024)
keeps Adam's moments for R = PᵀG (side "left": W is m×n, P m×r) or R = GP (side "right": P n×r) and
updates W ← (1 − lr·wd)·W − lr·scale·P·D (left) or ·D·Pᵀ (right), D = m̂ / (√v̂ + ε) with
m̂ = m/(1 − β₁ᵗ) and √v̂ = √v/√(1 − β₂ᵗ) (torch.optim.AdamW's ε placement). The fused step computes
D tile by tile in the GEMM's prologue, so neither D nor the full-size update is ever stored.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._helpers import round_to_bf16
from ._jit import LazyKernel, check_same_device, tl
from .dispatch import select_backend

SIDES = ("left", "right")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def _check_project(G: torch.Tensor, P: torch.Tensor, side: str) -> None:
    _check_side(side)
    for name, t in (("G", G), ("P", P)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    m, n = G.shape
    want = m if side == "left" else n
    if P.shape[0] != want:
        raise ValueError(
            f"side={side!r} needs P with {want} rows ({'m' if side == 'left' else 'n'} of G's {m}×{n}), "
            f"got P of shape {tuple(P.shape)}"
        )
    check_same_device(G=G, P=P)


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def project_reference(G: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
    """Torch twin of :func:`project`: PᵀG (left) or GP (right) in fp32 (fp64 for fp64 input)."""
    _check_project(G, P, side)
    work = _work_dtype(G, P)
    g, p = G.to(work), P.to(work)
    return p.t() @ g if side == "left" else g @ p


def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # C = A @ B for any strides (P's transpose is a stride swap), operands upcast to fp32 first:
    # bf16 tl.dot is garbage in the interpreter, and GaLore's fp32 bases want fp32 products anyway.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    acc = tl.full((BM, BN), 0, tl.float32)
    for k0 in range(0, K, BK):
        kk = (k0 + rk).to(tl.int64)
        a = tl.load(a_ptr + am[:, None] * stride_am + kk[None, :] * stride_ak, mask=kk[None, :] < K, other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + bn[None, :] * stride_bn, mask=kk[:, None] < K, other=0.0)
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc, mask=mask)


def _moments_kernel(g_ptr, m_ptr, v_ptr, numel, beta1, beta2, BLOCK: tl.constexpr):
    # m ← lerp(m, g, 1 − β₁) (torch's formula for weights below ½), v ← β₂·v + (1 − β₂)·g², in place.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


def _galore_apply_kernel(
    w_ptr,
    p_ptr,
    m_ptr,
    v_ptr,
    M,
    N,
    R,
    stride_wm,
    stride_wn,
    stride_p0,
    stride_p1,
    stride_lr0,
    decay,
    alpha,
    bias1,
    bias2_sqrt,
    eps,
    LEFT: tl.constexpr,
    OUT_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # W[tile] ← decay·W[tile] + alpha·Σ_k A[:, k]·B[k, :], with the Adam direction D computed from
    # the (already updated) moments for each k-slice it enters: left A = P, B = D; right A = D, B = Pᵀ.
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
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    acc = tl.full((BM, BN), 0, tl.float32)
    for k0 in range(0, R, BK):
        kk = (k0 + rk).to(tl.int64)
        if LEFT:
            # P is (M, R); the moments are (R, N), row stride stride_lr0.
            a = tl.load(p_ptr + am[:, None] * stride_p0 + kk[None, :] * stride_p1, mask=kk[None, :] < R, other=0.0)
            a = a.to(tl.float32)
            lmask = (kk < R)[:, None]
            loffs = kk[:, None] * stride_lr0 + bn[None, :]
            mom = tl.load(m_ptr + loffs, mask=lmask, other=0.0)
            sq = tl.load(v_ptr + loffs, mask=lmask, other=0.0)
            d = mom / (tl.sqrt_rn(sq) / bias2_sqrt + eps) / bias1
            b = tl.where(lmask, d, 0.0)
        else:
            # The moments are (M, R); P is (N, R), read as Pᵀ.
            lmask = (kk < R)[None, :]
            loffs = am[:, None] * stride_lr0 + kk[None, :]
            mom = tl.load(m_ptr + loffs, mask=lmask, other=0.0)
            sq = tl.load(v_ptr + loffs, mask=lmask, other=0.0)
            d = mom / (tl.sqrt_rn(sq) / bias2_sqrt + eps) / bias1
            a = tl.where(lmask, d, 0.0)
            b = tl.load(p_ptr + bn[None, :] * stride_p0 + kk[:, None] * stride_p1, mask=(kk < R)[:, None], other=0.0)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    w_ptrs = w_ptr + rm.to(tl.int64)[:, None] * stride_wm + rn.to(tl.int64)[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    w = w * decay + alpha * acc
    if OUT_BF16:
        w = round_to_bf16(w)
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=mask)


_MM_CONFIGS = [
    {"BM": 128, "BN": 128, "BK": 32, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 32, "num_warps": 4, "num_stages": 4},
    {"BM": 128, "BN": 64, "BK": 32, "num_warps": 4, "num_stages": 4},
]
_MATMUL = LazyKernel(
    _matmul_kernel,
    configs=_MM_CONFIGS,
    key=["M", "N", "K", "PRECISION"],
    interpret_config={"BM": 32, "BN": 32, "BK": 16},
)
_MOMENTS = LazyKernel(
    _moments_kernel, configs=[{"BLOCK": 1024, "num_warps": 4}], key=[], interpret_config={"BLOCK": 1024}
)
_APPLY = LazyKernel(
    _galore_apply_kernel,
    configs=[{**cfg, "GROUP_M": 8} for cfg in _MM_CONFIGS],
    key=["M", "N", "R", "LEFT", "OUT_BF16", "PRECISION"],
    interpret_config={"BM": 32, "BN": 32, "BK": 16, "GROUP_M": 4},
    helpers=(round_to_bf16,),
    # Autotuning runs the in-place update once per config: put W back after each trial.
    restore_value=["w_ptr"],
)


def _precision() -> str:
    # Follow torch's switch for fp32 matmuls. For "highest" (torch's default: IEEE fp32 products)
    # use 3xTF32, which splits each operand into two TF32 parts and keeps fp32-level accuracy on
    # the tensor cores; a plain IEEE tl.dot would run on the CUDA cores at a fraction of the speed.
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def project(G: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
    """R = PᵀG (side "left", P m×r, R r×n) or R = GP (side "right", P n×r, R m×r), fp32 out.

    fp32 accumulation; products at fp32-level accuracy (3xTF32 on a GPU) unless
    ``torch.set_float32_matmul_precision`` allows TF32. Dispatch: :func:`triton_kernels.select_backend`
    (op ``project``); float64 operands take the torch twin.

    Args:
        G: the (m, n) gradient.
        P: the orthonormal basis, (m, r) for "left" or (n, r) for "right".
        side: "left" or "right".
    """
    _check_project(G, P, side)
    if (
        G.numel() == 0
        or P.numel() == 0
        or select_backend(G.device, "project") != "triton"
        or _work_dtype(G, P) == torch.float64
    ):
        return project_reference(G, P, side)
    m, n = G.shape
    r = P.shape[1]
    if side == "left":  # (r, m) @ (m, n)
        a, (sam, sak), b, (sbk, sbn), M, N, K = P, (P.stride(1), P.stride(0)), G, G.stride(), r, n, m
    else:  # (m, n) @ (n, r)
        a, (sam, sak), b, (sbk, sbn), M, N, K = G, G.stride(), P, P.stride(), m, r, n
    out = torch.empty((M, N), dtype=torch.float32, device=G.device)
    _MATMUL.launch(
        lambda meta: (-(-M // meta["BM"]), -(-N // meta["BN"])),
        a,
        b,
        out,
        M,
        N,
        K,
        sam,
        sak,
        sbk,
        sbn,
        PRECISION=_precision(),
    )
    return out


def _check_step(weight, low_grad, exp_avg, exp_avg_sq, basis, side, step, lr, beta1, beta2, eps, weight_decay, scale):
    _check_side(side)
    tensors = {"weight": weight, "low_grad": low_grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "basis": basis}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    m, n = weight.shape
    r = basis.shape[1]
    want_basis = (m, r) if side == "left" else (n, r)
    if tuple(basis.shape) != want_basis:
        raise ValueError(f"side={side!r}: basis must be {want_basis} for a {m}×{n} weight, got {tuple(basis.shape)}")
    want_low = (r, n) if side == "left" else (m, r)
    for name in ("low_grad", "exp_avg", "exp_avg_sq"):
        if tuple(tensors[name].shape) != want_low:
            raise ValueError(f"side={side!r}: {name} must be {want_low}, got {tuple(tensors[name].shape)}")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an int >= 1 (bias correction), got {step!r}")
    for name, value in (
        ("lr", lr),
        ("beta1", beta1),
        ("beta2", beta2),
        ("eps", eps),
        ("weight_decay", weight_decay),
        ("scale", scale),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite real number, got {value!r}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_same_device(**tensors)


def _bias_terms(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


def fused_galore_adam_step_reference(
    weight: torch.Tensor,
    low_grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    basis: torch.Tensor,
    side: str,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
) -> None:
    """Torch twin of :func:`fused_galore_adam_step` (the unfused path: D materialised, then addmm)."""
    _check_step(weight, low_grad, exp_avg, exp_avg_sq, basis, side, step, lr, beta1, beta2, eps, weight_decay, scale)
    bias1, bias2_sqrt = _bias_terms(step, beta1, beta2)
    g = low_grad.to(exp_avg.dtype)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    direction = (exp_avg / denom).div_(bias1)
    decay, alpha = 1.0 - lr * weight_decay, -lr * scale
    p = basis.to(direction.dtype)
    a, b = (p, direction) if side == "left" else (direction, p.t())
    if weight.dtype == direction.dtype:
        weight.mul_(decay).addmm_(a, b, alpha=alpha)
    else:
        # One rounding into a low-precision weight, as the fused kernel does.
        weight.copy_(weight.to(direction.dtype).mul_(decay).addmm_(a, b, alpha=alpha))


def fused_galore_adam_step(
    weight: torch.Tensor,
    low_grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    basis: torch.Tensor,
    side: str,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
) -> None:
    """One GaLore-Adam step for one weight, in place on ``weight``, ``exp_avg`` and ``exp_avg_sq``.

    m ← β₁m + (1−β₁)R, v ← β₂v + (1−β₂)R², D = (m/(1−β₁ᵗ)) / (√v/√(1−β₂ᵗ) + ε),
    W ← (1 − lr·wd)·W − lr·scale·(P·D if side == "left" else D·Pᵀ)  [GaLore, Zhao et al. 2024].
    Triton path: the moments are updated by one elementwise kernel, then one GEMM computes D for
    each k-slice in its prologue and writes W once in its epilogue. fp32 moments (contiguous);
    fp32/fp16/bf16 weight and basis; scalars are Python numbers (no host sync).

    Args:
        weight: W (m, n), updated in place.
        low_grad: R (r, n) for "left", (m, r) for "right".
        exp_avg, exp_avg_sq: m and v, R's shape, updated in place.
        basis: P, (m, r) for "left" or (n, r) for "right".
        side: "left" or "right".
        step: t ≥ 1, for the bias corrections.
        lr, beta1, beta2, eps, weight_decay, scale: AdamW's and GaLore's hyperparameters.
    """
    _check_step(weight, low_grad, exp_avg, exp_avg_sq, basis, side, step, lr, beta1, beta2, eps, weight_decay, scale)
    if weight.numel() == 0 or select_backend(weight.device, "galore_adam_step") != "triton":
        return fused_galore_adam_step_reference(
            weight,
            low_grad,
            exp_avg,
            exp_avg_sq,
            basis,
            side,
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            scale=scale,
        )
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 on the Triton path, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous on the Triton path (it is updated in place)")
    for name, t in (("weight", weight), ("basis", basis), ("low_grad", low_grad)):
        if t.dtype not in TRITON_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 on the Triton path, got {t.dtype}")
    m, n = weight.shape
    r = basis.shape[1]
    bias1, bias2_sqrt = _bias_terms(step, beta1, beta2)
    g = low_grad.contiguous()
    numel = g.numel()
    if numel:
        _MOMENTS.launch(
            lambda meta: (-(-numel // meta["BLOCK"]),), g, exp_avg, exp_avg_sq, numel, float(beta1), float(beta2)
        )
    _APPLY.launch(
        lambda meta: (-(-m // meta["BM"]) * -(-n // meta["BN"]),),
        weight,
        basis,
        exp_avg,
        exp_avg_sq,
        m,
        n,
        r,
        weight.stride(0),
        weight.stride(1),
        basis.stride(0),
        basis.stride(1),
        exp_avg.stride(0),
        1.0 - lr * weight_decay,
        -lr * scale,
        bias1,
        bias2_sqrt,
        float(eps),
        LEFT=side == "left",
        OUT_BF16=weight.dtype == torch.bfloat16,
        PRECISION=_precision(),
    )
