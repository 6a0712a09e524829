"""Rounding bounds for comparing two float32 implementations of one optimizer step from the same
weights, state and gradient (importable because conftest.py puts tests/ on sys.path).

Two correct implementations differ only by rounding, and by how much depends on the kernels a CPU
picks (AVX2/AVX-512/AMX, thread count, summation order). A fixed tolerance on a whole trajectory
cannot bound that: once the gradients come from the model, every refresh takes an SVD of gradients
that differ by rounding, and the bases then differ by that rounding over the gap between the r-th
and (r+1)-th singular values (Davis–Kahan). So the comparisons here are one step at a time, from a
shared start, within a bound derived from the step's own arithmetic (Higham's γ_k = k·u/(1 − k·u)
for a length-k dot product, u the unit round-off, a few u per elementwise operation), evaluated
in float64 on the shared inputs. Each bound is on one implementation's distance from the exact
result; the two implementations then differ by at most twice it.
"""

from __future__ import annotations

import math

import torch

from galorex import projection as proj

U32 = torch.finfo(torch.float32).eps / 2  # unit round-off of float32: |fl(x ∘ y) − x ∘ y| ≤ u·|x ∘ y|


def gamma(k: int, u: float = U32) -> float:
    """Higham's γ_k: a sum of k products is off by at most γ_k times the sum of their |products|."""
    return k * u / (1 - k * u)


def _abs(bases: list[torch.Tensor]) -> list[torch.Tensor]:
    return [b.detach().double().abs() for b in bases]


def project_rounding(g: torch.Tensor, bases: list[torch.Tensor] | None, side: str | None) -> torch.Tensor:
    """Elementwise bound on the rounding of ``project(G)``: γ_k·|P|ᵀ|G| (k the inner dimension; for
    ``full`` the two products, k = m + n). Zero without bases (an unprojected parameter)."""
    g = g.detach().double()
    if bases is None:
        return torch.zeros_like(g)
    m, n = g.shape
    k = {"left": m, "right": n, "full": m + n}[side]
    return gamma(k) * proj.project(g.abs(), _abs(bases), side)


def back(d: torch.Tensor, bases: list[torch.Tensor] | None, side: str | None) -> torch.Tensor:
    """project_back with |P| of a non-negative low-rank tensor (the identity without bases)."""
    if bases is None:
        return d
    return proj.project_back(d, _abs(bases), side)


def back_rounding_gamma(bases: list[torch.Tensor] | None, side: str | None) -> float:
    """γ of project_back's sums: r products per entry (2r for ``full``'s two products)."""
    if bases is None:
        return 0.0
    r = bases[0].shape[1]
    return gamma(2 * r if side == "full" else r)


def adam_step_bounds(
    *,
    w: torch.Tensor,
    grad: torch.Tensor,
    m_prev: torch.Tensor,
    v_prev: torch.Tensor,
    bases: list[torch.Tensor] | None,
    side: str | None,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float = 1.0,
    eps_mode: str = "torch",
) -> dict[str, torch.Tensor]:
    """Bounds (as float64 tensors) on |a − b| for two float32 implementations a, b of one (GaLore)
    AdamW step from the same weight ``w`` (an m×n matrix, or 1-D), gradient, moments and bases:
    keys ``exp_avg``, ``exp_avg_sq`` and ``weight``.

    The step: R = project(G) (G itself without bases), m = β₁m₀ + (1−β₁)R, v = β₂v₀ + (1−β₂)R²,
    D = a·m/(b·√v + ε) (``torch``: a = 1/(1−β₁ᵗ), b = 1/√(1−β₂ᵗ); ``galore_torch``: a = √(1−β₂ᵗ)/(1−β₁ᵗ),
    b = 1), W' = (1 − lr·wd)·W − lr·scale·project_back(D) (in either order of decay and update).
    One implementation's errors, to first order and then bounded above:

    - R: δR = γ_k·|P|ᵀ|G| (``project_rounding``).
    - m: (1−β₁)·δR + 4u·(|m₀| + |R|) (a lerp or a multiply-add: a few roundings of its operands).
    - v: (1−β₂)·(2|R|·δR + δR²) + 4u·(β₂v₀ + (1−β₂)R²) (all terms ≥ 0).
    - √v: δ√v ≤ min(δv / (2√v), √δv); the denominator is then at least b·(√v − δ√v) + ε.
    - D: a·δm/den_lo + |a·m|·b·δ√v/(den·den_lo) + 8u·|D|.
    - W': lr·scale·(|P|·δD + (γ_r + 4u)·|P||D|) + 4u·|W| (γ_r for project_back's r-term sums).
    """
    f64 = torch.float64
    beta1, beta2 = betas
    w = w.detach().to(f64)
    g = grad.detach().to(f64)
    m0, v0 = m_prev.detach().to(f64), v_prev.detach().to(f64)
    low = g if bases is None else proj.project(g, [b.detach().to(f64) for b in bases], side)
    d_low = project_rounding(grad, bases, side)
    m = beta1 * m0 + (1 - beta1) * low
    v = beta2 * v0 + (1 - beta2) * low.square()
    m_tol = (1 - beta1) * d_low + 4 * U32 * (m0.abs() + low.abs())
    v_tol = (1 - beta2) * (2 * low.abs() * d_low + d_low.square()) + 4 * U32 * (beta2 * v0 + (1 - beta2) * low.square())
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    a, b = (1 / bc1, 1 / math.sqrt(bc2)) if eps_mode == "torch" else (math.sqrt(bc2) / bc1, 1.0)
    sqrt_v = v.sqrt()
    d_sqrt = torch.minimum(v_tol / (2 * sqrt_v).clamp_min(1e-300), v_tol.sqrt())
    den = b * sqrt_v + eps
    den_lo = (b * (sqrt_v - d_sqrt)).clamp_min(0) + eps
    d = a * m / den
    d_tol = a * m_tol / den_lo + (a * m).abs() * b * d_sqrt / (den * den_lo) + 8 * U32 * d.abs()
    alpha = lr * scale
    w_tol = alpha * (
        back(d_tol, bases, side) + (back_rounding_gamma(bases, side) + 4 * U32) * back(d.abs(), bases, side)
    )
    w_tol = w_tol + 4 * U32 * w.abs()
    # one implementation's distance from the exact step, doubled: the distance between two
    return {"exp_avg": 2 * m_tol, "exp_avg_sq": 2 * v_tol, "weight": 2 * w_tol}


def worst_ratio(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> float:
    """max |actual − expected| / tol (0 where both are equal): ≤ 1 means within the bound."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(diff) if tol.numel() == 1 else tol.reshape(diff.shape)
    ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / tol.clamp_min(1e-300))
    return float(ratio.max()) if ratio.numel() else 0.0


def update_bounds(w0: torch.Tensor, w_ref: torch.Tensor, k: int) -> torch.Tensor:
    """Bound on |a − b| for two float32 evaluations a, b of one step W0 → W' from the same gradient and
    state, where the reference took W0 to ``w_ref``: 2·(4u·|W0| + (γ_k + 16u)·max|W' − W0|).

    For a step that is not written out term by term here (Adafactor, the natural gradient's
    Woodbury solve, the weight-norm reparametrisation): its update is a chain of products whose
    sums have at most ``k`` terms (γ_k) and of at most 16 elementwise roundings, each error bounded
    relative to the largest update entry (norm-wise, not entry by entry), plus the rounding of
    decay·W0 + update (4u·|W0|)."""
    w0 = w0.detach().double()
    update = (w_ref.detach().double() - w0).abs().max()
    return 2 * (4 * U32 * w0.abs() + (gamma(k) + 16 * U32) * update)


def state_bounds(ref: torch.Tensor, k: int) -> torch.Tensor:
    """The same for an optimizer state tensor: 2·(γ_k + 16u)·max|s| (norm-wise)."""
    return 2 * (gamma(k) + 16 * U32) * ref.detach().double().abs().max()
