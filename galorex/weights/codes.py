"""Group-wise INT8 weight codes and the two rounding rules, as plain functions of tensors.

A weight W is stored as INT8 codes q and one float32 scale per group of ``group_size`` consecutive
elements of W in row-major order (the last group may be shorter):

    s_g = ⌈max_{i∈g} |W_i| / 127⌉_bf16,     W_i ≈ q_i · s_g,     q_i ∈ {−127, …, 127}

(symmetric: no zero point; ``docs/benchmarks.md`` has the error measured against the asymmetric
min/max code). The scale is rounded up to the next bf16 value (at most 2⁻⁸ larger): q·s then has
at most 16 significant bits, so the bf16 weight of a forward GEMM, bf16(q·s), is computed exactly
by two vectorised bf16 passes (cast the codes, multiply by the scale) rather than a mixed-dtype one,
and the float32 working copy of a write holds q·s exactly.

Quantising x = W/s (0 where s = 0) rounds either to nearest (ties to even) or stochastically, with
u ~ U[0, 1) drawn from a seeded generator:

    q = ⌊x⌋ + 𝟙[u < x − ⌊x⌋]          E[q] = x,   |q − x| < 1

The same rule rounds a float32 weight onto the bf16 grid (:func:`round_to_bf16_`): a bf16 value is
the top 16 bits of a float32 one, so adding a uniform 16-bit integer r to the low half of the bit
pattern and truncating rounds the magnitude up with probability (low half)/2¹⁶, the fraction the
magnitude lies above its bf16 floor.

Everything works chunk by chunk (:data:`CHUNK_GROUPS` groups at a time), so the float32 temporaries
of a write are a few MiB whatever the weight's size; the draws are made chunk by chunk in the same
order, so a given generator state gives the same codes on every call.
"""

from __future__ import annotations

import torch

QMAX = 127
# Groups handled per chunk: 2^14 groups of 256 = 4 Mi elements, 16 MiB of float32 per temporary.
CHUNK_GROUPS = 1 << 14
ROUNDINGS = ("nearest", "stochastic")
# Float32 temporaries of one chunk alive at once in a stochastic write (the values, |x| for the
# scales, ⌊x⌋, the draws), what galorex.memory counts for it.
WRITE_TEMPORARIES = 4


def chunk_elements(group_size: int) -> int:
    """Elements a write handles at a time."""
    return CHUNK_GROUPS * int(group_size)


def num_groups(numel: int, group_size: int) -> int:
    """Groups of ``group_size`` consecutive elements covering ``numel`` (the last may be short)."""
    return -(-int(numel) // int(group_size))


def check_group_size(group_size: object, what: str = "group_size") -> int:
    """``group_size`` as an int, or a ValueError naming ``what``: it must be a positive multiple of 32
    (so a group's codes fill whole 32-byte vectors and never straddle a row of a weight whose width
    is a multiple of it)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 32:
        raise ValueError(f"{what} must be a positive multiple of 32, got {group_size!r}")
    return group_size


def _chunks(numel: int, group_size: int):
    """(start, end) element ranges of whole groups, CHUNK_GROUPS groups each."""
    step = chunk_elements(group_size)
    for a in range(0, numel, step):
        yield a, min(numel, a + step)


def _grouped(flat: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A flat chunk as (full groups × group_size) and its short tail (or None)."""
    full = flat.numel() // group_size * group_size
    body = flat[:full].view(-1, group_size)
    tail = flat[full:].view(1, -1) if full < flat.numel() else None
    return body, tail


def round_up_to_bf16(s: torch.Tensor) -> torch.Tensor:
    """Non-negative finite float32 values rounded up to the next bf16 value (exact ones unchanged):
    the low 16 bits of the pattern carried into the top ones."""
    bits = s.contiguous().view(torch.int32)
    return (bits + 0xFFFF).bitwise_and_(-65536).view(torch.float32)


def uniform_draws(numel: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """u ~ U[0, 1) in float32 for one chunk of stochastic rounding."""
    return torch.rand(numel, generator=generator, device=device, dtype=torch.float32)


def _round(x: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    """x rounded to integers by ``rounding`` (module docstring), reusing x's storage (the result
    is x itself to nearest, ⌊x⌋ stochastically; x then holds the fractions)."""
    if rounding == "nearest":
        return x.round_()
    floor = torch.floor(x)
    x.sub_(floor)  # the fraction, exactly: x and ⌊x⌋ are within a factor 2 or ⌊x⌋ = 0
    up = uniform_draws(x.numel(), generator, x.device).view_as(x) < x
    return floor.add_(up)


def quantize_(
    w: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> None:
    """Write the codes and scales of ``w`` (any shape, any float dtype) into ``codes`` (int8, the
    same number of elements) and ``scales`` (float32, :func:`num_groups` elements), chunk by chunk.

    Args:
        w: the weight's values (float32 for a write after an update).
        codes, scales: the storage to fill (contiguous).
        group_size: elements per scale.
        rounding: ``nearest`` or ``stochastic`` (draws from ``generator``).
        generator: the stochastic draws' generator (on ``w``'s device).

    Raises:
        ValueError: an unknown ``rounding``.
        FloatingPointError: ``w`` holds a non-finite value (the storage is then left unchanged
            from that chunk on; the caller names the parameter).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    flat_w, flat_q = w.reshape(-1), codes.view(-1)
    for a, b in _chunks(flat_w.numel(), group_size):
        x = flat_w[a:b].to(torch.float32, copy=True)
        s = scales[a // group_size : num_groups(b, group_size)]
        for part, first in _parts(x, group_size):
            scale = part.abs().amax(dim=1).div_(QMAX)
            if not bool(torch.isfinite(scale).all()):
                raise FloatingPointError("the weight holds a non-finite value")
            scale = round_up_to_bf16(scale)
            s[first : first + part.shape[0]] = scale
            part.div_(scale.clamp_min_(torch.finfo(torch.float32).tiny).unsqueeze(1))
        flat_q[a:b] = _round(x, rounding, generator).clamp_(-QMAX, QMAX)


def _parts(x: torch.Tensor, group_size: int):
    """The full-group body and the short tail of a flat chunk, each with its first group's index."""
    body, tail = _grouped(x, group_size)
    yield body, 0
    if tail is not None:
        yield tail, body.shape[0]


def quantize(
    w: torch.Tensor,
    group_size: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (codes, scales) of ``w``: codes int8 in ``w``'s shape, scales float32 per group
    (:func:`quantize_` for the arguments)."""
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(num_groups(w.numel(), group_size), dtype=torch.float32, device=w.device)
    quantize_(w, codes, scales, group_size, rounding, generator)
    return codes, scales


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W = q·s in ``dtype``: the exact product rounded once to ``dtype``, in ``codes``' shape, with
    no float32 temporary of the whole weight. bf16: the codes cast to bf16 and multiplied by the
    scales in bf16 (exact products of ≤ 16 bits, one rounding: scales are bf16 values); float32 and
    float64: cast, then multiplied (exact); other dtypes: the float32 product, then cast.

    Args:
        codes: int8 codes (contiguous).
        scales: their float32 scales.
        group_size: elements per scale.
        dtype: the result's dtype.
        out: a contiguous tensor of ``codes``' shape and ``dtype`` to write into, or None.
    """
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    flat_q, flat_out = codes.view(-1), out.view(-1)
    o_body, o_tail = _grouped(flat_out, group_size)
    n = o_body.shape[0]
    if dtype in (torch.bfloat16, torch.float32, torch.float64):
        flat_out.copy_(flat_q)
        s = scales.to(dtype)  # exact: every scale is a bf16 value
        if n:
            o_body.mul_(s[:n].unsqueeze(1))
        if o_tail is not None:
            o_tail.mul_(s[n:].unsqueeze(1))
        return out
    q_body, q_tail = _grouped(flat_q, group_size)
    if n:
        torch.mul(q_body, scales[:n].unsqueeze(1), out=o_body)
    if q_tail is not None:
        torch.mul(q_tail, scales[n:].unsqueeze(1), out=o_tail)
    return out


def round_to_bf16_(
    out: torch.Tensor,
    w: torch.Tensor,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``out`` (bf16) ← ``w`` (float32) rounded to nearest (torch's cast) or stochastically (module
    docstring: a uniform 16-bit integer added below the bf16 bits, then truncated), chunk by chunk.
    Infinities and NaNs pass through; a finite value never rounds up to infinity (it stays at the
    largest finite bf16 of its sign).

    Args:
        out: the bf16 destination (contiguous).
        w: float32 values of the same shape.
        rounding: ``nearest`` or ``stochastic``.
        generator: the draws' generator (stochastic only).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if out.dtype != torch.bfloat16 or w.dtype != torch.float32:
        raise TypeError(f"round_to_bf16_ takes a bf16 out and float32 values, got {out.dtype} and {w.dtype}")
    if rounding == "nearest":
        return out.copy_(w)
    flat_w, flat_out = w.reshape(-1), out.view(-1)
    step = CHUNK_GROUPS * 256
    big = torch.finfo(torch.bfloat16).max
    for a in range(0, flat_w.numel(), step):
        b = min(flat_w.numel(), a + step)
        bits = flat_w[a:b].view(torch.int32)
        noise = torch.randint(0, 1 << 16, (b - a,), generator=generator, device=w.device, dtype=torch.int32)
        # Only finite values take the noise: a NaN's payload or an infinity must not change class.
        noise.masked_fill_(~torch.isfinite(flat_w[a:b]), 0)
        rounded = (bits + noise).bitwise_and_(-65536).view(torch.float32)
        # A carry out of the largest finite bf16 would give ±inf: keep it finite.
        rounded = torch.where(torch.isinf(rounded) & torch.isfinite(flat_w[a:b]), rounded.clamp(-big, big), rounded)
        flat_out[a:b] = rounded  # exact: the low 16 bits are zero
    return out
