"""Orthonormal Walsh–Hadamard rotations: Sylvester matrices, block-diagonal rotations, a torch FWHT.

H₁ = [1],  H₂ₙ = [[Hₙ, Hₙ], [Hₙ, −Hₙ]] / √2   (Sylvester order, orthonormal: H Hᵀ = I, H = Hᵀ)

A block rotation of a dimension d divisible by a power-of-two block b is R = D · diag(H_b, …, H_b),
with D an optional diagonal of random ±1 signs; x ↦ x R rotates the last dimension and x ↦ x Rᵀ
undoes it. HALO (Ashkboos et al., 2025, "HALO: Hadamard-Assisted Lower-Precision Optimization for
LLMs") puts such rotations on both operands of a GEMM's inner dimension: (X R)(W R)ᵀ = X Wᵀ.
"""

from __future__ import annotations

import functools
import math

import torch

from triton_kernels import hadamard as tk_hadamard
from triton_kernels.dispatch import select_backend

__all__ = [
    "block_hadamard_matrix",
    "default_block_size",
    "fwht",
    "hadamard_transform",
    "is_power_of_two",
    "random_signs",
    "rotate",
    "sylvester",
    "unrotate",
]

MAX_DEFAULT_BLOCK = 256
# The largest block the Triton kernels rotate, and the dtypes they take; beyond them the torch
# path runs whichever backend is chosen (the kernels' coverage, not a fallback).
TRITON_MAX_BLOCK = tk_hadamard.MAX_TRITON_BLOCK
TRITON_DTYPES = tk_hadamard.TRITON_DTYPES


def is_power_of_two(n: int) -> bool:
    """Whether ``n`` is an int of the form 2ᵏ, k ≥ 0."""
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def _check_block(dim: int, block_size: int, what: str = "the last dimension") -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or not is_power_of_two(block_size):
        raise ValueError(f"block_size must be a power of two, got {block_size!r}")
    if dim % block_size != 0:
        raise ValueError(f"block_size={block_size} does not divide {what} ({dim})")


def default_block_size(dim: int, cap: int | None = MAX_DEFAULT_BLOCK) -> int:
    """The Hadamard block for a dimension: the whole dimension when it is a power of two (HALO's
    choice), else the largest power of two ≤ ``cap`` that divides it (1 for an odd dimension: no
    rotation).

    Args:
        dim: the length of the rotated dimension, a positive int.
        cap: the largest block for a dimension that is not a power of two (None: no cap).

    Raises:
        ValueError: ``dim`` is not a positive int.
    """
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if is_power_of_two(dim):
        return dim
    block = dim & -dim  # the largest power of two dividing dim
    if cap is not None:
        block = min(block, cap)
    return block


def sylvester(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal (n×n) Sylvester–Hadamard matrix H_n/√n (H Hᵀ = I, H = Hᵀ).

    Args:
        n: the order, a power of two.
        dtype, device: of the result (built in float64, rounded once to ``dtype``).
    """
    if not is_power_of_two(n):
        raise ValueError(f"n must be a power of two, got {n!r}")
    return (tk_hadamard.hadamard_matrix(n).to(device) / math.sqrt(n)).to(dtype)


def block_hadamard_matrix(
    dim: int,
    block_size: int,
    signs: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense R = D · diag(H_b, …, H_b) (d×d): the plain reference of :func:`rotate`.

    Args:
        dim: d, a multiple of ``block_size``.
        block_size: b, a power of two.
        signs: None, or the d entries ±1 of the diagonal D.
        dtype, device: of the result (built in float64, rounded once).
    """
    _check_block(dim, block_size, "dim")
    r = torch.block_diag(*([sylvester(block_size, torch.float64, device)] * (dim // block_size)))
    if signs is not None:
        r = signs.to(torch.float64).reshape(-1, 1) * r
    return r.to(dtype)


def random_signs(dim: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A reproducible float32 vector of ``dim`` entries ±1, drawn on the CPU from ``seed`` (so the
    same on every device), then moved to ``device``."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    s = torch.randint(0, 2, (dim,), generator=g).float().mul_(2).sub_(1)
    return s.to(device) if device is not None else s


def _transform_block(x: torch.Tensor, block_size: int | None) -> tuple[int, int]:
    """(last dimension, block) for a transform of x, or a clear error for what cannot be rotated."""
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    dim = x.shape[-1]
    b = dim if block_size is None else block_size
    if block_size is None and not is_power_of_two(dim):
        raise ValueError(f"the last dimension ({dim}) is not a power of two: give a block_size that divides it")
    _check_block(dim, b)
    return dim, b


def fwht(x: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform of each block of the last dimension, x ↦ x·H_b:
    log₂(b) butterfly stages (a, b) ↦ (a + b, a − b), O(d log b), then one scale by 1/√b, in
    float32 (float64 for float64 input) and rounded once to x's dtype. The reference of every
    Hadamard path (:func:`fwht_kron`, the Triton kernel): it is the Triton kernel's own twin,
    ``triton_kernels.hadamard_transform_reference``, behind galorex's argument checks.

    Args:
        x: a floating-point tensor; the transform runs along its last dimension.
        block_size: b, a power of two dividing the last dimension (None: the whole dimension,
            which must then be a power of two).
    """
    _, b = _transform_block(x, block_size)
    return tk_hadamard.hadamard_transform_reference(x, b)


# Factors of the Kronecker form are applied as GEMMs with ±1 matrices of at most this size.
KRON_FACTOR = 64


@functools.lru_cache(maxsize=32)
def _signs_matrix(n: int, device: torch.device) -> torch.Tensor:
    """The unnormalised Sylvester matrix (entries ±1) as float32 on ``device``, cached."""
    return sylvester(n, torch.float64, device).mul_(math.sqrt(n)).round_().to(torch.float32)


def fwht_kron(x: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """The same x·H_b as :func:`fwht`, through GEMMs: H_{b₁b₂} = H_{b₁} ⊗ H_{b₂} (Sylvester), so a
    block of b entries viewed as a b₁×b₂×… array is multiplied by a small ±1 matrix along each axis
    (factors ≤ 64). O(d·Σbᵢ) work instead of O(d log b), but a handful of GEMMs instead of log₂ b
    elementwise passes (timed against the butterfly by ``python -m galorex.bench.halo_gpu``,
    docs/benchmarks.md). Computed in float32 (float64 for float64 input); equal to :func:`fwht` to
    float32 rounding (tested).

    Args:
        x: a floating-point tensor; the transform runs along its last dimension.
        block_size: as :func:`fwht`.
    """
    dim, b = _transform_block(x, block_size)
    factors, rest = [], b
    while rest > KRON_FACTOR:
        factors.append(KRON_FACTOR)
        rest //= KRON_FACTOR
    factors.append(rest)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work).reshape(-1, dim // b, *factors)
    for axis, n in enumerate(factors, start=2):
        if n == 1:
            continue
        # Under torch.compile the matrix is built in the graph (dynamo would bypass the cache anyway).
        make = _signs_matrix.__wrapped__ if torch.compiler.is_compiling() else _signs_matrix
        h = make(n, y.device).to(work)
        y = torch.movedim(torch.movedim(y, axis, -1) @ h, -1, axis)
    return (y.reshape(x.shape) * (1.0 / math.sqrt(b))).to(x.dtype)


def hadamard_transform(x: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """x·H_b block-wise: the Triton kernel where :func:`triton_kernels.select_backend` picks Triton
    for op ``hadamard`` (CUDA: only with ``GALOREX_BACKEND=triton`` until a GPU run flips the
    default) and the kernel takes x (float32/float16/bfloat16, blocks up to 16384); else
    :func:`fwht_kron`. The butterfly :func:`fwht` is the reference both are tested against.

    Args:
        x: a floating-point tensor; the transform runs along its last dimension.
        block_size: as :func:`fwht`.

    Returns:
        x·blockdiag(H_b/√b, …) in x's dtype.
    """
    _, b = _transform_block(x, block_size)
    if select_backend(x.device, "hadamard") == "triton" and x.dtype in TRITON_DTYPES and b <= TRITON_MAX_BLOCK:
        return tk_hadamard.hadamard_transform(x, b)
    return fwht_kron(x, block_size)


def rotate(x: torch.Tensor, block_size: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """x ↦ x R with R = D·diag(H_b, …) along the last dimension (D = diag(signs) if given).

    Args:
        x: a floating-point tensor.
        block_size: b, a power of two dividing x's last dimension.
        signs: None, or ±1 of x's last dimension's length (applied before the transform).
    """
    if signs is not None:
        x = x * signs.to(x.dtype)
    return hadamard_transform(x, block_size)


def unrotate(x: torch.Tensor, block_size: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """x ↦ x Rᵀ = x·diag(H_b, …)·D, the inverse of :func:`rotate` (H_b is symmetric); arguments
    as :func:`rotate`."""
    y = hadamard_transform(x, block_size)
    return y * signs.to(y.dtype) if signs is not None else y
