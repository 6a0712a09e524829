"""Low-precision GaLore projections: the ``proj_precision`` parameter-group key.

The projection R = Pᵀ G (left), G Q (right) or Pᵀ G Q (full) is a GEMM whose inner dimension is a
side of the weight. Values:

    None                     the compute dtype (float32, float64 for float64 weights)
    "bf16"                   the projection *and* the back-projection on bf16 operands with float32
                             accumulation, and the randomized refresh's GEMMs with G likewise
                             (its QRs and small SVD in float32); the bases and the optimizer state
                             stay float32 (:func:`projection_bases`, ``galorex.projection``)
    "fp8", "fp8-hadamard"    the projection on e4m3 operands
    "int8", "int8-hadamard"  the projection on INT8 operands (the basis in INT8, as Q-GaLore keeps it)

The quantised values scale per row (one scale per basis vector and one per gradient row/column),
the ``-hadamard`` ones after a block Hadamard rotation R of the inner dimension on both operands,
(Pᵀ R)(Rᵀ G) = Pᵀ G, as HALO (Ashkboos et al., 2025) does for a linear layer's GEMMs; only their
projection is quantised: the SVD refresh, Adam's state and the back-projection are untouched.
"bf16" is refused for float64 parameters (it would round them to 8 significant bits unasked).
Errors are measured by ``python -m galorex.bench halo`` and ``refresh`` (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from ..projection import project
from .gemm import scaled_gemm
from .hadamard import default_block_size
from .quant import rotate_quantize

__all__ = [
    "BF16",
    "PROJ_PRECISION",
    "PROJ_PRECISIONS",
    "QUANTISED_PRECISIONS",
    "check_proj_precision",
    "project_lowprec",
    "projection_bases",
]

PROJ_PRECISION = "proj_precision"
BF16 = "bf16"
QUANTISED_PRECISIONS = ("fp8", "fp8-hadamard", "int8", "int8-hadamard")
PROJ_PRECISIONS = (BF16, *QUANTISED_PRECISIONS)


def check_proj_precision(value) -> None:
    """Raise a ValueError naming the key unless ``value`` is None or one of :data:`PROJ_PRECISIONS`."""
    if value is not None and value not in PROJ_PRECISIONS:
        raise ValueError(f"{PROJ_PRECISION!r} must be None or one of {PROJ_PRECISIONS}, got {value!r}")


def projection_bases(bases: list[torch.Tensor], precision: str | None) -> list[torch.Tensor]:
    """The bases the step's GEMMs take: bf16 copies for ``"bf16"`` (with them every GEMM of
    ``galorex.projection`` runs on bf16 operands with float32 accumulation), the bases as they are
    otherwise.

    Args:
        bases: the float bases (from the state, or generated).
        precision: the group's ``proj_precision``.
    """
    if precision == BF16:
        return [b.to(torch.bfloat16) for b in bases]
    return bases


def _lowprec_matmul_nt(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a bᵀ (a: M×K, b: N×K) with both operands quantised per row, K rotated if asked."""
    fmt = "int8" if precision.startswith("int8") else "e4m3"
    block = default_block_size(a.shape[1]) if precision.endswith("-hadamard") else None
    # Rotated: one fused rotate-and-quantise kernel per operand on CUDA (made contiguous first, the
    # rotation runs along rows); unrotated, the quantiser reads the (possibly transposed) view.
    if block is not None:
        a, b = a.contiguous(), b.contiguous()
    qa, sa = rotate_quantize(a, block, None, fmt, "row")
    qb, sb = rotate_quantize(b, block, None, fmt, "row")
    return scaled_gemm(qa, sa, qb, sb)


def project_lowprec(g: torch.Tensor, bases: list[torch.Tensor], side: str, precision: str) -> torch.Tensor:
    """``galorex.projection.project`` with its GEMMs in ``precision`` (see the module docstring):
    for ``"bf16"`` on bf16 operands with float32 accumulation (``galorex.projection.matmul_bf16``);
    for the quantised values each GEMM a bᵀ takes both operands in float32 and quantises them with
    one scale per row (each row runs along the inner dimension, rotated first for ``-hadamard``),
    then multiplies the codes with :func:`galorex.lowp.gemm.scaled_gemm`.

    Args:
        g: the (m×n) gradient matrix.
        bases: [P] for ``left``/``right``, [Pₗ, Pᵣ] for ``full`` (orthonormal columns).
        side: "left" (Pᵀ G), "right" (G P) or "full" (Pₗᵀ G Pᵣ).
        precision: one of :data:`PROJ_PRECISIONS`.

    Returns:
        The low-rank gradient in g's dtype.

    Raises:
        ValueError: an unknown ``precision`` or ``side``.
    """
    check_proj_precision(precision)
    if precision == BF16:
        return project(g, projection_bases(bases, precision), side).to(g.dtype)
    dtype = g.dtype
    g32 = g.to(torch.float32)
    if side == "left":
        out = _lowprec_matmul_nt(bases[0].to(torch.float32).t(), g32.t(), precision)
    elif side == "right":
        out = _lowprec_matmul_nt(g32, bases[0].to(torch.float32).t(), precision)
    elif side == "full":
        left = _lowprec_matmul_nt(bases[0].to(torch.float32).t(), g32.t(), precision)
        out = _lowprec_matmul_nt(left, bases[1].to(torch.float32).t(), precision)
    else:
        raise ValueError(f"unknown side {side!r}")
    return out.to(dtype)
