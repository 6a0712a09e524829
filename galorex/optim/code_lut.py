"""Exact ``torch.bucketize(u, boundaries, right=True)`` for float32 u through a table on its bits.

The top 16 bits of a float32 (sign, exponent, 7 mantissa bits) cut the floats into 65536 bins,
each a contiguous interval of values. For bin k with least value lo_k and greatest hi_k (NaNs
aside), the count of boundaries ≤ u is at least c_k = #{b ≤ lo_k} and at most c_k + K, where K is
the most boundaries any bin holds in (lo_k, hi_k]. So, with b padded by one NaN entry (u ≥ NaN is
false: the count never passes len(b)),

    idx = c[bits(u) >> 16],   then K times:   idx += (u ≥ b[idx])

is the count of boundaries ≤ u, the same integer bucketize(right=True) returns, for sorted b. The
first step reads its threshold from a second table t_k = b[c_k] indexed by the same bin, so for
K = 1 (both 8-bit moment codes) it is two gathers from 65536-entry tables, one compare and one add:
a few elementwise passes instead of a binary search per element. Only IEEE comparisons and integer
arithmetic: bit for bit the same on any device (measured only on CPU; see docs/benchmarks.md).

NaN: bucketize's search (``!(b > u)``) sends a NaN past every boundary, to len(b); every bin of
NaNs gets c = len(b), and +inf shares its bin with NaNs and also maps to len(b). The bin of −inf
(0xFF80) also holds the signalling NaNs 0xFF800001…0xFF80FFFF; it gets −inf's count (0), so those
NaNs (never the result of arithmetic: a division returns a quiet NaN) map to 0, not len(b).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["CodeLut", "build_code_lut", "lut_bucketize"]

_BINS = 1 << 16
_SHIFT = 16
_NEG_INF_BIN = 0xFF80


class CodeLut(NamedTuple):
    """Tables for :func:`lut_bucketize`: count (uint8 if len(b) ≤ 255 else int32), threshold
    (float32 b[count]), padded boundaries (float32, len(b) + 1, last NaN), and K (a host int)."""

    count: torch.Tensor
    threshold: torch.Tensor
    padded: torch.Tensor
    steps: int


def build_code_lut(boundaries: torch.Tensor) -> CodeLut:
    """The tables for sorted float32 ``boundaries`` (1-D, on any device; built on the CPU).

    Reads K back to the host once, so build it at cache time, not inside a step.
    """
    if boundaries.dtype != torch.float32 or boundaries.dim() != 1:
        raise ValueError("boundaries must be a 1-D float32 tensor")
    b = boundaries.detach().cpu()
    bins = torch.arange(_BINS, dtype=torch.int64) << _SHIFT
    first = (bins - ((bins >> 31) << 32)).to(torch.int32).view(torch.float32)  # low bits 0
    last = (bins + 0xFFFF - (((bins + 0xFFFF) >> 31) << 32)).to(torch.int32).view(torch.float32)
    lo, hi = torch.minimum(first, last), torch.maximum(first, last)  # NaN in either gives NaN
    count = torch.bucketize(lo, b, right=True)
    top = torch.bucketize(hi, b, right=True)
    count[_NEG_INF_BIN] = top[_NEG_INF_BIN] = torch.bucketize(first[_NEG_INF_BIN], b, right=True)
    steps = int((top - count).max())
    padded = torch.cat([b, b.new_full((1,), float("nan"))])
    dtype = torch.uint8 if b.numel() <= 255 else torch.int32
    device = boundaries.device
    return CodeLut(count.to(dtype).to(device), padded[count].to(device), padded.to(device), steps)


def lut_bucketize(u: torch.Tensor, lut: CodeLut) -> torch.Tensor:
    """bucketize(u, boundaries, right=True) for contiguous float32 ``u``, in lut.count's dtype.

    Args:
        u: contiguous float32 tensor (any shape) on the tables' device.
        lut: from :func:`build_code_lut` of the boundaries.
    Returns:
        A new tensor of u's shape: the number of boundaries ≤ each element (see the module doc for
        the signalling NaNs of −inf's bin).
    """
    flat = u.view(-1)
    key = flat.view(torch.int32).bitwise_right_shift(_SHIFT).bitwise_and_(_BINS - 1)
    idx = lut.count.index_select(0, key)
    idx.add_(torch.ge(flat, lut.threshold.index_select(0, key)))
    del key
    for _ in range(lut.steps - 1):
        idx.add_(torch.ge(flat, lut.padded.index_select(0, idx.to(torch.int32))))
    return idx.view(u.shape)
