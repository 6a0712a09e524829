"""Block-wise 8-bit storage for Adam moments (in the spirit of Dettmers et al., 2022, "8-bit
Optimizers via Block-wise Quantization").

    a_b = max_{i∈b} |x_i|,   q_i = argmin_k |code_k − x_i / a_b|,   x̂_i = code[q_i] · a_b

A tensor is cut into blocks of ``block_size`` consecutive elements (row-major order); each block
keeps one float32 scale (its absmax) and one uint8 code index per element, so 8-bit state costs
numel + 4·⌈numel/block_size⌉ bytes instead of 4·numel. Per-block scales keep one outlier from
flattening the resolution of the whole tensor; the non-linear codes keep small values (most of an
Adam moment) from collapsing to zero.

Two dynamic-tree codes, 256 sorted float32 entries each; decade [10⁻ᵉ⁻¹, 10⁻ᵉ] holds twice as many
linearly spaced values as the decade below it, because a block's values mostly sit within a decade
or two of its absmax:

- :func:`signed_code` (first moment m): 64, 32, …, 1 values in the decades [0.1, 1] … [10⁻⁷, 10⁻⁶]
  (bin midpoints), mirrored, plus exact 0, +1 and −1; the mirror drops the smallest magnitude to
  make 256. Smallest positive 5.5·10⁻⁷, smallest negative −3.25·10⁻⁶. Relative error of nearest
  rounding (:func:`max_relative_error`): ≤ 0.78 % in [0.9, 1], ≤ 6.2 % in [0.1, 1], ≤ 11 % in
  [0.01, 0.1], ≤ 18 % in [10⁻³, 10⁻²].
- :func:`unsigned_code` (√ of the second moment): 0 and 128, 64, …, 1 values in the decades
  [0.1, 1] … [10⁻⁸, 10⁻⁷] (bin right ends, so 1 is an entry). Smallest positive 10⁻⁷. Relative
  error: ≤ 0.39 % in [0.9, 1], ≤ 3.4 % in [0.1, 1], ≤ 6.6 % in [0.01, 0.1], ≤ 12.3 % in
  [10⁻³, 10⁻²]. The second-moment path never rounds a positive √v to 0 (see
  :func:`quantize_second_moment`).

Nearest rounding cannot follow an EMA whose per-step change is below half a code gap (β₂ = 0.999
moves v by 0.1 % a step): an 8-bit moment changes through its block's absmax (an exact entry) and
through steps large enough to cross a gap. That is inherent to deterministic 8-bit state, and why
8-bit Adam tracks 32-bit Adam closely but not bit-for-bit (see tests/test_state8bit.py).

Everything is plain tensors (uint8 codes, float32 scales), computed on the input's device without
host synchronisation; :func:`pack_moment` returns a dict of tensors that checkpoints with
``torch.load(weights_only=True)``. Quantisation is exact nearest-code rounding of the float32 value
x/a (ties go to the larger code entry), built from IEEE-exact operations (division, comparison,
multiplication), so CPU and CUDA give the same bytes. Non-finite inputs are not supported (an inf
or NaN makes its block's absmax non-finite); nothing checks for them, since that would need a sync.
"""

from __future__ import annotations

import math

import torch

from .blocks import _blocks, _check_block_size, _num_blocks
from .code_lut import CodeLut, build_code_lut, lut_bucketize

__all__ = [
    "BLOCK_SIZE",
    "MIN_8BIT_NUMEL",
    "KINDS",
    "SIGNED",
    "UNSIGNED_SQRT",
    "build_signed_code",
    "build_unsigned_code",
    "signed_code",
    "unsigned_code",
    "code_boundaries",
    "use_8bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_second_moment",
    "dequantize_second_moment",
    "half_gap",
    "blockwise_error_bound",
    "max_relative_error",
    "pack_moment",
    "unpack_moment",
    "packed_nbytes",
    "quantize_int4_blockwise",
    "dequantize_int4_blockwise",
    "quantize_int8_blockwise",
    "dequantize_int8_blockwise",
    "basis_nbytes",
    "rotate_basis",
    "unrotate_basis",
    "encode_basis",
    "decode_basis",
    "roundtrip_basis",
    "BASIS_CODECS",
    "BASIS_SUFFIXES",
    "INT4_BLOCK_SIZE",
    "ROTATED",
    "basis_code_suffix",
    "basis_rotation_block",
    "int4_nbytes",
    "int8_nbytes",
]

BLOCK_SIZE = 256
MIN_8BIT_NUMEL = 4096

SIGNED = "signed"
UNSIGNED_SQRT = "unsigned_sqrt"
KINDS = (SIGNED, UNSIGNED_SQRT)

_CODE_SIZE = 256
_SIGNED_DECADES = 7  # [1e-7, 1e-6] … [0.1, 1]: 1 + 2 + … + 64 = 127 values a side
_UNSIGNED_DECADES = 8  # [1e-8, 1e-7] … [0.1, 1]: 1 + 2 + … + 128 = 255 values
_TINY = 2.0**-126  # smallest normal float32: the keep_positive boundary


# ================================================================================== codes


def _dynamic_tree(decades: int, right_ends: bool) -> list[float]:
    """2ᵉ linearly spaced values in decade e = 0 (lowest) … decades−1 ([0.1, 1]), ascending.

    Values are the midpoints (or right ends) of 2ᵉ equal bins of [0.1, 1]·10^(e+1−decades).
    """
    values = []
    for e in range(decades):
        n = 2**e
        scale = 10.0 ** (e + 1 - decades)
        offset = 1.0 if right_ends else 0.5
        values += [scale * (0.1 + 0.9 * (k + offset) / n) for k in range(n)]
    return values


def build_signed_code() -> torch.Tensor:
    """The signed dynamic-tree code (CPU float32, 256 sorted entries in [−1, 1]); uncached.

    Midpoints keep each decade's values off its ends; 1 is added so a block's absmax element (and
    its negative) round-trips exactly, and the mirror drops the tiniest magnitude to fit 256.
    """
    positive = _dynamic_tree(_SIGNED_DECADES, right_ends=False) + [1.0]  # 128 values
    values = [-p for p in reversed(positive)][:-1] + [0.0] + positive  # 127 + 1 + 128
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


def build_unsigned_code() -> torch.Tensor:
    """The unsigned dynamic-tree code (CPU float32, 256 sorted entries in [0, 1]); uncached.

    Without a sign bit there is room for a 128-value top decade and an eighth decade; right ends
    make 1 an entry (the block's absmax round-trips) and 0 keeps an all-zero moment exact.
    """
    values = [0.0] + _dynamic_tree(_UNSIGNED_DECADES, right_ends=True)
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


def code_boundaries(code: torch.Tensor, keep_positive: bool = False) -> torch.Tensor:
    """Decision boundaries for bucketize(right=True): b_i = the least float32 ≥ (c_i + c_{i+1})/2.

    The exact midpoint (float64) rounded *up* to float32 makes "u < b_i" equivalent to "u is
    nearer c_i than c_{i+1}" for every float32 u, so rounding is exactly nearest (ties upward).
    ``keep_positive`` (for codes [0, c₁ > 2⁻¹²⁵, …]; not checked, to stay sync-free) moves b₀ down
    to 2⁻¹²⁶ so every u ≥ 2⁻¹²⁶ maps to c₁ or above: a positive value is never stored as 0.
    """
    c = code.detach().to(torch.float64)
    mid = (c[:-1] + c[1:]) / 2  # exact unless the entries are over 2²⁹ apart in magnitude
    b = mid.to(torch.float32)
    up = torch.nextafter(b, torch.full_like(b, math.inf))
    b = torch.where(b.to(torch.float64) < mid, up, b)
    if keep_positive:
        b[0] = _TINY
    return b


# (kind, device) -> code; (id(code), keep_positive) -> (code, boundaries, lut) for the cached
# codes, so the steady state recomputes nothing. The strong reference to code keeps its id unique.
_CODE_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}
_BOUNDARIES: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor, CodeLut]] = {}
# Index by the exact table of code_lut (the default) or by torch.bucketize (the reference, also
# used for uncached codes and under torch.compile); both give the same bytes.
_USE_LUT = True
_BUILDERS = {SIGNED: build_signed_code, UNSIGNED_SQRT: build_unsigned_code}


def _device(device: torch.device | str | None) -> torch.device:
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cached(kind: str, device: torch.device | str | None) -> torch.Tensor:
    key = (kind, _device(device))
    code = _CODE_CACHE.get(key)
    if code is None:
        cpu = _BUILDERS[kind]()
        code = cpu.to(key[1])  # one host→device copy per device and code, ever
        for keep in (False, True) if kind == UNSIGNED_SQRT else (False,):
            b = code_boundaries(cpu, keep)
            _BOUNDARIES[(id(code), keep)] = (code, b.to(key[1]), build_code_lut(b.to(key[1])))
        _CODE_CACHE[key] = code
    return code


def signed_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The cached signed code on ``device`` (default CPU). Shared: do not modify it in place."""
    return _cached(SIGNED, device)


def unsigned_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The cached unsigned code on ``device`` (default CPU). Shared: do not modify it in place."""
    return _cached(UNSIGNED_SQRT, device)


def _boundaries_for(code: torch.Tensor, keep_positive: bool) -> tuple[torch.Tensor, CodeLut | None]:
    if torch.compiler.is_compiling():
        # id() of a traced tensor means nothing; 255 midpoints are cheap to recompute in a graph.
        return code_boundaries(code, keep_positive), None
    entry = _BOUNDARIES.get((id(code), keep_positive))
    if entry is not None and entry[0] is code:
        return entry[1], entry[2]
    return code_boundaries(code, keep_positive), None  # building a table reads K to the host


# ================================================================================== quantisation


def use_8bit(numel: int) -> bool:
    """True when a tensor of ``numel`` elements is stored in 8 bits.

    Below MIN_8BIT_NUMEL the saving is a few kilobytes and not worth the precision (biases, norms).
    """
    return numel >= MIN_8BIT_NUMEL


def _check_code(code: torch.Tensor, device: torch.device) -> None:
    if code.dtype != torch.float32 or code.dim() != 1 or not 2 <= code.numel() <= _CODE_SIZE:
        raise ValueError("code must be a 1-D float32 tensor of 2 to 256 sorted entries")
    if code.device != device:
        raise ValueError(f"code is on {code.device}, the tensor on {device}")


def quantize_blockwise(
    x: torch.Tensor,
    code: torch.Tensor,
    block_size: int = BLOCK_SIZE,
    *,
    keep_positive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, absmax): q_i = index of the code entry nearest x_i/a_b (uint8, x's shape), a_b = max|x|.

    An all-zero block keeps absmax 0 and divides by 1 instead, so it maps to the code's 0 entry
    rather than to NaN. Any shape and strides; computed in float32 whatever x's dtype. The code
    must be sorted ascending (not checked: that would need a sync). The index is
    bucketize(u, boundaries, right=True); for the cached codes it is read from code_lut's exact
    table on u's bits (the same bytes, tested; not measured on CUDA), for other codes and under
    torch.compile from torch.bucketize.

    Args:
        x: a floating-point tensor; blocks run over its row-major flattening.
        code: a 1-D float32 code of 2 to 256 sorted entries, on x's device.
        block_size: elements per absmax.
        keep_positive: as in :func:`code_boundaries`.
    """
    _check_block_size(block_size)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    _check_code(code, x.device)
    numel = x.numel()
    blocks = _blocks(x.detach().to(torch.float32).reshape(-1), block_size)
    absmax = blocks.abs().amax(dim=1)
    divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    u = blocks / divisor[:, None]
    boundaries, lut = _boundaries_for(code, keep_positive)
    if _USE_LUT and lut is not None:  # the cached codes: same indices, uint8 directly
        return lut_bucketize(u.view(-1)[:numel], lut).view(x.shape), absmax
    idx = torch.bucketize(u, boundaries, out_int32=True, right=True)
    # Slice before converting so q owns exactly numel bytes (a padded view would be saved whole).
    q = idx.view(-1)[:numel].to(torch.uint8).view(x.shape)
    return q, absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """x̂_i = code[q_i] · a_b as a new float32 tensor of q's shape; arguments as
    :func:`quantize_blockwise` returned and took them (uint8 ``q``, float32 ``absmax``)."""
    _check_block_size(block_size)
    if q.dtype != torch.uint8:
        raise TypeError(f"q must be uint8, got {q.dtype}")
    _check_code(code, q.device)
    numel = q.numel()
    if absmax.shape != (_num_blocks(numel, block_size),):
        raise ValueError(f"absmax has shape {tuple(absmax.shape)}, expected ({_num_blocks(numel, block_size)},)")
    out = code.index_select(0, q.reshape(-1).to(torch.int32))
    scale = absmax.to(torch.float32)
    full = numel // block_size  # scale in place, whole blocks then the tail: no padded copy
    out[: full * block_size].view(full, block_size).mul_(scale[:full, None])
    if full * block_size < numel:
        out[full * block_size :].mul_(scale[full])
    return out.view(q.shape)


def quantize_second_moment(v: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, absmax of √v): √v in the unsigned code, a positive √v never as 0; v < 0 counts as 0.

    Adam divides by √v, so √v is what must be accurate: the code's relative error lands on the
    update unchanged (coding v would give √v̂ half of v's relative error, but v = g² spans twice
    the decades, so the same 255 levels would cover half the range of g as coarsely). A v̂ rounded
    to 0 under a non-zero m turns the step m/(√v̂ + ε) into m/ε, so a positive √v below the
    smallest entry rounds up to it instead (over-estimating a denominator only shortens a step).
    """
    s = v.detach().to(torch.float32).clamp_min(0).sqrt()
    return quantize_blockwise(s, unsigned_code(v.device), block_size, keep_positive=True)


def dequantize_second_moment(q: torch.Tensor, absmax: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """v̂ = (code[q] · a_b)², float32, ≥ 0: relative error about twice √v̂'s."""
    return dequantize_blockwise(q, absmax, unsigned_code(q.device), block_size).square_()


# ================================================================================== error bounds


def half_gap(u: torch.Tensor, code: torch.Tensor, keep_positive: bool = False) -> torch.Tensor:
    """Worst |chosen code − u| over u's code interval: (c_{i+1} − c_i)/2, 0 on an entry; float64.

    Outside [c_0, c_last] it is the distance to the end entry; with ``keep_positive``, u in
    [2⁻¹²⁶, c₁) may go to c₁, so the bound there is c₁ − u. Rounding errs by at most this: the
    bound is exact, not asymptotic.
    """
    c = code.detach().to(torch.float64)
    uu = u.detach().to(torch.float64)
    i = torch.searchsorted(c, uu, right=True)  # number of entries ≤ u
    lower = c[(i - 1).clamp(0, c.numel() - 1)]
    upper = c[i.clamp(0, c.numel() - 1)]
    inside = (upper - lower) / 2
    out = torch.where(i == 0, c[0] - uu, torch.where(i == c.numel(), uu - c[-1], inside))
    out = torch.where(lower == uu, torch.zeros_like(out), out)
    if keep_positive:
        out = torch.where((uu >= _TINY) & (uu < c[1]), c[1] - uu, out)
    return out


def blockwise_error_bound(
    x: torch.Tensor, code: torch.Tensor, block_size: int = BLOCK_SIZE, keep_positive: bool = False
) -> torch.Tensor:
    """a_b · half_gap(x_i/a_b): the per-element bound on |x̂ − x| before float32 round-off; float64.

    u = x/a_b is formed exactly as :func:`quantize_blockwise` forms it (float32 division), so the
    bracket is the one the quantiser saw; the division and the product code·a each add ≤ ½ ulp.
    """
    _check_block_size(block_size)
    blocks = _blocks(x.detach().to(torch.float32).reshape(-1), block_size)
    absmax = blocks.abs().amax(dim=1)
    divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    u = blocks / divisor[:, None]
    bound = half_gap(u, code.to(x.device), keep_positive) * absmax.to(torch.float64)[:, None]
    return bound.view(-1)[: x.numel()].reshape(x.shape)


def max_relative_error(code: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> float:
    """max (c_{i+1} − c_i)/(c_{i+1} + c_i) over positive neighbours whose interval meets [lo, hi].

    Nearest rounding of u in [c_i, c_{i+1}] errs by at most that fraction of u (the worst u is the
    midpoint), so it bounds the relative error for every u in [max(lo, c_min⁺), hi].
    """
    c = code.detach().to(torch.float64).cpu()
    c = c[c > 0]
    lower, upper = c[:-1], c[1:]
    meets = (upper > lo) & (lower < hi)
    if not bool(meets.any()):
        raise ValueError("no interval between positive code entries meets [lo, hi]")
    return ((upper - lower) / (upper + lower))[meets].max().item()


# ================================================================================== state container


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def pack_moment(x: torch.Tensor, kind: str, block_size: int = BLOCK_SIZE) -> dict[str, torch.Tensor]:
    """A moment as a dict of tensors: {"q", "absmax"} in 8 bits, or {"value"} (a float32 copy).

    ``kind`` "signed" for Adam's m, "unsigned_sqrt" for v (stored as √v, see
    :func:`quantize_second_moment`). Only tensors, so optimizer state stays weights_only-loadable;
    the small path copies so that, as with 8 bits, the dict never aliases the caller's tensor.

    Args:
        x: the moment (any shape); in 8 bits from :data:`MIN_8BIT_NUMEL` elements on.
        kind: :data:`SIGNED` or :data:`UNSIGNED_SQRT`.
        block_size: elements per absmax.
    """
    _check_kind(kind)
    if not use_8bit(x.numel()):
        return {"value": x.detach().to(torch.float32, copy=True)}
    if kind == SIGNED:
        q, absmax = quantize_blockwise(x, signed_code(x.device), block_size)
    else:
        q, absmax = quantize_second_moment(x, block_size)
    return {"q": q, "absmax": absmax}


def unpack_moment(
    d: dict[str, torch.Tensor],
    shape: torch.Size | tuple[int, ...],
    kind: str,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """The float32 moment of ``shape`` that :func:`pack_moment` stored (with this ``kind`` and
    ``block_size``), as a new tensor; a ValueError if the stored size differs from ``shape``'s."""
    _check_kind(kind)
    shape = torch.Size(shape)
    stored = d["value"] if "value" in d else d["q"]
    if stored.numel() != shape.numel():
        raise ValueError(f"packed moment has {stored.numel()} elements, shape {tuple(shape)} has {shape.numel()}")
    if "value" in d:
        return stored.to(torch.float32, copy=True).reshape(shape)
    q, absmax = stored.reshape(shape), d["absmax"]
    if kind == SIGNED:
        return dequantize_blockwise(q, absmax, signed_code(q.device), block_size)
    return dequantize_second_moment(q, absmax, block_size)


def packed_nbytes(numel: int, kind: str, block_size: int = BLOCK_SIZE) -> int:
    """Bytes :func:`pack_moment` holds: numel + 4·⌈numel/block_size⌉ in 8 bits, else 4·numel.

    The same for both kinds (√v has the same layout as m); ``kind`` is checked, for symmetry.
    """
    _check_kind(kind)
    _check_block_size(block_size)
    if not use_8bit(numel):
        return 4 * numel
    return numel + 4 * _num_blocks(numel, block_size)


# The 4- and 8-bit basis codes live in basis_codes; their names stay importable from here.
from .basis_codes import (  # noqa: E402
    BASIS_CODECS,
    BASIS_SUFFIXES,
    INT4_BLOCK_SIZE,
    ROTATED,
    basis_code_suffix,
    basis_nbytes,
    basis_rotation_block,
    decode_basis,
    dequantize_int4_blockwise,
    dequantize_int8_blockwise,
    encode_basis,
    int4_nbytes,
    int8_nbytes,
    quantize_int4_blockwise,
    quantize_int8_blockwise,
    rotate_basis,
    roundtrip_basis,
    unrotate_basis,
)
