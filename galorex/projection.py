"""Low-rank projection of gradient matrices, as in GaLore (Zhao et al., 2024,
"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection").

A gradient G (m×n) is projected onto rank r with an orthonormal basis P taken from G's top singular
vectors: ``left`` keeps P (m×r) and works on Pᵀ G (r×n), ``right`` keeps P (n×r) and works on G P
(m×r), ``full`` keeps both and works on Pₗᵀ G Pᵣ (r×r). Bases are columns, always orthonormal.

Everything here is a pure function of tensors: the optimizer stores the bases in its state, so a
checkpoint holds tensors only.

Bases in bf16 (``proj_precision="bf16"``: the loop hands the rule bf16 copies of its float32 bases)
make every GEMM with them run on bf16 operands with float32 accumulation (:func:`matmul_bf16`), the
other operand rounded to bf16 too and the result in float32; so :func:`project`,
:func:`project_back` and :func:`add_projected_back_` serve both precisions, and a rule never asks
which one it has.
"""

from __future__ import annotations

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
REFRESH_METHODS = ("svd", "randomized")
SIDES = ("left", "right", "full")


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient of any rank ≥ 2 as the matrix (shape[0], rest): a view when the
    strides allow it (``reshape``), else a copy."""
    return t.reshape(matrix_shape(t.shape))


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(m, n) = (shape[0], the product of the other dimensions)."""
    m = int(shape[0])
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return m, n


def projection_side(proj_type: str, m: int, n: int) -> str:
    """Which side an (m×n) gradient is projected on, with galore-torch's meaning of ``proj_type``.

    ``std`` shrinks the smaller dimension (so the stored basis is the smaller one): right when m ≥ n,
    left otherwise. ``reverse_std`` does the opposite. ``left``, ``right`` and ``full`` are literal.

    Args:
        proj_type: one of :data:`PROJ_TYPES`.
        m, n: the gradient matrix's shape.

    Returns:
        "left", "right" or "full".

    Raises:
        ValueError: an unknown ``proj_type``.
    """
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in SIDES:
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}; expected one of {PROJ_TYPES}")


def effective_rank(rank: int, m: int, n: int) -> int:
    """The rank is clipped to min(m, n): a basis cannot have more orthonormal columns than rows."""
    return max(1, min(int(rank), m, n))


def lowrank_shape(side: str, m: int, n: int, rank: int) -> tuple[int, int]:
    """Shape of the low-rank gradient of an (m×n) matrix: (r, n) left, (m, r) right, (r, r) full,
    r = :func:`effective_rank`."""
    r = effective_rank(rank, m, n)
    return {"left": (r, n), "right": (m, r), "full": (r, r)}[side]


def basis_shapes(side: str, m: int, n: int, rank: int) -> list[tuple[int, int]]:
    """Shapes of the stored bases: one for left/right, two (left then right) for full."""
    r = effective_rank(rank, m, n)
    return {"left": [(m, r)], "right": [(n, r)], "full": [(m, r), (n, r)]}[side]


# ----------------------------------------------------------------------------- bf16 GEMMs
def bf16_gemm_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: CUDA (tensor cores), or a CPU whose
    oneDNN has bf16 GEMMs (AVX512-BF16 or AMX). Elsewhere torch's bf16 GEMM is a slow fallback, and
    :func:`matmul_bf16` multiplies the bf16-rounded operands in float32 instead."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _CPU_BF16_GEMM


# Read once: a compiled step reads the constant instead of calling into oneDNN (a graph break).
_CPU_BF16_GEMM = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_operand(t: torch.Tensor, native: bool) -> torch.Tensor:
    """``t`` rounded to bf16 (round to nearest even, unit roundoff u = 2⁻⁸), as a bf16 tensor for a
    native bf16 GEMM, else as float32 holding the bf16 values (exact: bf16 ⊂ float32)."""
    low = t.to(torch.bfloat16)
    return low if native else low.to(torch.float32)


def bf16_product(a: torch.Tensor, b: torch.Tensor, native: bool) -> torch.Tensor:
    """a @ b of two :func:`bf16_operand` results, in float32. Natively the GEMM accumulates in
    float32 and rounds its result to bf16 once (CPU oneDNN and cuBLAS return the operands' dtype;
    cuBLAS may also reduce split-K partial sums in bf16 unless
    ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` is False); emulated, the
    products of bf16 values are exact in float32 and the sums accumulate in float32."""
    out = a @ b
    return out.to(torch.float32) if native else out


def matmul_bf16(a: torch.Tensor, b: torch.Tensor, *, native: bool | None = None) -> torch.Tensor:
    """a @ b on bf16 operands with float32 accumulation, in float32.

    Each entry obeys |C − AB| ≤ (2u + u² + γ_K)·(|A||B|) + u·|C| elementwise, u = 2⁻⁸ (bf16's unit
    roundoff, both operands rounded), γ_K = K·2⁻²⁴/(1 − K·2⁻²⁴) (float32 accumulation over the
    inner dimension K), the last term only where the GEMM is native (its result rounded to bf16).

    Args:
        a, b: (M×K) and (K×N), any float dtype (a bf16 one is used as it is).
        native: run torch's bf16 GEMM (True) or multiply the rounded operands in float32 (False);
            None asks :func:`bf16_gemm_is_native` for the operands' device.
    """
    if native is None:
        native = bf16_gemm_is_native(a.device)
    return bf16_product(bf16_operand(a, native), bf16_operand(b, native), native)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # A bf16 basis beside a float32 operand: the bf16 GEMM (module docstring); else torch's own.
    if a.dtype != b.dtype and torch.bfloat16 in (a.dtype, b.dtype):
        return matmul_bf16(a, b)
    return a @ b


def _addmm_(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float, beta: float) -> torch.Tensor:
    """target ← beta·target + alpha·(a @ b) in place, a @ b through :func:`_mm`'s choice."""
    if a.dtype == b.dtype == target.dtype or torch.bfloat16 not in (a.dtype, b.dtype):
        return target.addmm_(a, b, beta=beta, alpha=alpha)
    native = bf16_gemm_is_native(target.device)
    a, b = bf16_operand(a, native), bf16_operand(b, native)
    if not native:
        if target.dtype == torch.float32:
            return target.addmm_(a, b, beta=beta, alpha=alpha)
        wide = target.to(torch.float32).addmm_(a, b, beta=beta, alpha=alpha)
        return target.copy_(wide)
    if target.dtype == torch.bfloat16:
        return target.addmm_(a, b, beta=beta, alpha=alpha)  # one rounding of the sum, as ever
    product = a @ b
    if beta != 1.0:
        target.mul_(beta)
    return target.add_(product, alpha=alpha)


def randomized_left_basis(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = 16,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``a`` by a randomized range finder
    (Halko, Martinsson & Tropp, 2011, Alg. 4.4 then 5.1).

    Y = (A Aᵀ)^q A Ω spans the dominant column space; each product is re-orthonormalised (QR) so
    that small singular directions survive in float32. A small SVD of B = Qᵀ A (k × n) then rotates
    Q onto the singular vectors, so the result is ordered like the exact SVD's. When B is wide it is
    first reduced by a QR of Bᵀ = Q₂R: B = Rᵀ Q₂ᵀ with Q₂ᵀ orthonormal rows, so B's left singular
    vectors are those of the k × k matrix Rᵀ. The reduction is exact (no squared condition number,
    unlike an eigendecomposition of B Bᵀ), and a wide SVD costs several times a QR of the same size
    on the CPU.

    With ``bf16`` the four kinds of GEMM with A (A Ω, Aᵀ Q, A Z, Qᵀ A — all of the work that grows
    with m·n) take bf16 operands with float32 accumulation (:func:`matmul_bf16`; A rounded once);
    every QR, the small SVD and the final rotation stay in float32, so the basis is orthonormal to
    float32 rounding and only its span carries bf16's error.

    Args:
        a: the m × n matrix (float32 or float64; float32 with ``bf16``).
        rank: how many singular vectors to return (≤ min(m, n)).
        oversample: extra sketch columns beyond ``rank``.
        power_iters: q, the number of power iterations.
        generator: draws the Gaussian test matrix Ω, for reproducible bases.
        bf16: run the GEMMs with A on bf16 operands (``proj_precision="bf16"``).
    """
    m, n = a.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, device=a.device, dtype=a.dtype, generator=generator)
    if bf16:
        native = bf16_gemm_is_native(a.device)
        a_low = bf16_operand(a, native)

        def mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return bf16_product(bf16_operand(x, native), bf16_operand(y, native), native)
    else:
        a_low, mm = a, torch.matmul
    q = torch.linalg.qr(mm(a_low, omega)).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(mm(a_low.mT, q)).Q
        q = torch.linalg.qr(mm(a_low, z)).Q
    b = mm(q.mT, a_low)
    del a_low
    if b.shape[1] > b.shape[0]:
        b = torch.linalg.qr(b.mT).R.mT
    ub, _, _ = torch.linalg.svd(b, full_matrices=False)
    return q @ ub[:, :rank]


def compute_bases(
    g: torch.Tensor,
    rank: int,
    side: str,
    method: str = "svd",
    *,
    oversample: int = 16,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    bf16: bool = False,
) -> list[torch.Tensor]:
    """Orthonormal bases (as columns) for projecting the matrix ``g`` on ``side`` at ``rank``.

    ``svd``: the leading r singular vectors of one ``torch.linalg.svd`` of G (as galore-torch
    computes them); ``randomized``: :func:`randomized_left_basis` of G (left) or Gᵀ (right).

    Args:
        g: the (m×n) gradient, already in the dtype the bases are wanted in (float32 or float64).
        rank: the rank, clipped by :func:`effective_rank`.
        side: "left" (P: m×r), "right" (Q: n×r) or "full" (both).
        method: "svd" or "randomized".
        oversample, power_iters, generator: the range finder's settings (``randomized`` only).
        bf16: the range finder's GEMMs on bf16 operands (``randomized`` only; the SVD stays float32).

    Returns:
        One contiguous basis for left/right, [left, right] for full.

    Raises:
        ValueError: an unknown ``method`` or ``side``.
    """
    m, n = g.shape
    r = effective_rank(rank, m, n)

    if method == "svd":
        # One SVD of G itself for every side, as galore-torch does: the singular vectors' signs then
        # match the reference's, which matters when moments are kept across a refresh.
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        # Copies, not views: a view would keep the whole SVD factor alive in the optimizer state.
        left = u[:, :r].clone(memory_format=torch.contiguous_format)
        right = vh[:r].mT.clone(memory_format=torch.contiguous_format)
        return {"left": [left], "right": [right], "full": [left, right]}[side]
    if method != "randomized":
        raise ValueError(f"unknown refresh_method {method!r}; expected one of {REFRESH_METHODS}")

    def left_of(a: torch.Tensor) -> torch.Tensor:
        return randomized_left_basis(
            a, r, oversample=oversample, power_iters=power_iters, generator=generator, bf16=bf16
        ).contiguous()

    if side == "left":
        return [left_of(g)]
    if side == "right":
        return [left_of(g.mT)]
    if side == "full":
        return [left_of(g), left_of(g.mT)]
    raise ValueError(f"unknown side {side!r}")


def project(g: torch.Tensor, bases: list[torch.Tensor], side: str) -> torch.Tensor:
    """G ↦ Pᵀ G (left), G P (right), Pₗᵀ G Pᵣ (full).

    Args:
        g: the (m×n) matrix.
        bases: [P] for left/right, [Pₗ, Pᵣ] for full, as :func:`compute_bases` returns them.
        side: "left", "right" or "full".
    """
    if side == "left":
        return _mm(bases[0].mT, g)
    if side == "right":
        return _mm(g, bases[0])
    return _mm(_mm(bases[0].mT, g), bases[1])


def project_back(low: torch.Tensor, bases: list[torch.Tensor], side: str) -> torch.Tensor:
    """The adjoint of :func:`project`: R ↦ P R (left), R Pᵀ (right), Pₗ R Pᵣᵀ (full); arguments
    as :func:`project`, ``low`` the low-rank matrix."""
    if side == "left":
        return _mm(bases[0], low)
    if side == "right":
        return _mm(low, bases[0].mT)
    return _mm(_mm(bases[0], low), bases[1].mT)


def add_projected_back_(
    target: torch.Tensor,
    low: torch.Tensor,
    bases: list[torch.Tensor],
    side: str,
    *,
    alpha: float,
    beta: float = 1.0,
) -> torch.Tensor:
    """target ← beta·target + alpha·project_back(low), in place, without a full-size temporary.

    One ``addmm_`` (for ``full``, after forming the small Pₗ R); with bf16 bases the product runs on
    bf16 operands (module docstring), in one ``addmm_`` where the GEMM is emulated or the target is
    bf16, else as a bf16 product added in a second pass.

    Args:
        target: an (m×n) matrix (a view of the weight) of the same dtype as ``low`` (and as the
            bases, unless they are bf16).
        low: the low-rank matrix R.
        bases, side: as :func:`project`.
        alpha: the factor of the projected-back R.
        beta: the factor of ``target`` (the decoupled decay 1 − lr·wd).

    Returns:
        ``target``.
    """
    if side == "left":
        return _addmm_(target, bases[0], low, beta=beta, alpha=alpha)
    if side == "right":
        return _addmm_(target, low, bases[0].mT, beta=beta, alpha=alpha)
    return _addmm_(target, _mm(bases[0], low), bases[1].mT, beta=beta, alpha=alpha)


def energy(t: torch.Tensor) -> float:
    """‖t‖²_F accumulated in float64 (a float32 sum over tens of millions of entries loses digits)."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2)


def captured_energy(g: torch.Tensor, bases: list[torch.Tensor], side: str) -> float:
    """‖project(G)‖²_F / Σᵢ₌₁ʳ σᵢ(G)²: the fraction of the best rank-r energy the bases capture
    (1.0 = as good as the exact SVD; Eckart–Young). Arguments as :func:`project`."""
    low = project(g, bases, side)
    r = low.shape[0] if side == "left" else low.shape[-1]
    best = float((torch.linalg.svdvals(g).double()[:r] ** 2).sum())
    return energy(low) / best if best > 0 else 1.0


def transition_matrices(old: list[torch.Tensor], new: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rᵢ = P_newᵢᵀ P_oldᵢ: the change of coordinates from the old subspace to the new one.

    Args:
        old, new: the bases before and after a refresh (one per side, as :func:`compute_bases`).
    """
    return [pn.mT @ po for po, pn in zip(old, new)]


def reproject_lowrank(low: torch.Tensor, transitions: list[torch.Tensor], side: str) -> torch.Tensor:
    """Carry a low-rank tensor expressed in the old basis into the new one:
    project(project_back(low, old), new) = R low (left), low Rᵀ (right), Rₗ low Rᵣᵀ (full).

    Args:
        low: the low-rank tensor in the old basis.
        transitions: from :func:`transition_matrices`.
        side: "left", "right" or "full".
    """
    if side == "left":
        return transitions[0] @ low
    if side == "right":
        return low @ transitions[0].mT
    return transitions[0] @ low @ transitions[1].mT
