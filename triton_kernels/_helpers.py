"""Device helpers shared by the kernels (plain functions; :mod:`._jit` decorates them per mode).

Both do their rounding with integer and exact float operations, so that the compiled kernel and
the interpreter agree bit for bit with torch's casts: the interpreter's own fp32 -> bf16 cast
truncates and its fp32 -> fp8 cast drops rounding carries and does not saturate (TRITON_NOTES.md).
"""

from __future__ import annotations

from ._jit import tl


def round_to_bf16(x):
    """fp32 -> the nearest bfloat16 value (ties to even), still held in fp32; exact to cast after.

    Adding 0x7FFF plus the lowest kept bit to the raw bits and clearing the low 16 bits is
    round-half-to-even on the 8-bit mantissa (finite inputs; a carry moves into the exponent).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = bits & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def round_to_fp8_grid(y, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, FP8_MAX: tl.constexpr):
    """fp32 -> the nearest value of an fp8 format (saturating at ±FP8_MAX, ties to even), in fp32.

    The grid step in the binade of |y| is 2^(e − MANT_BITS) with e = max(floor(log2|y|), MIN_EXP);
    e is read from the exponent bits (exact, unlike a log2), and |y|/step is rounded half-to-even
    with floor, which is exact for the small integers involved.
    """
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, MIN_EXP)
    step = ((e - MANT_BITS + 127) << 23).to(tl.float32, bitcast=True)
    t = a / step
    r = tl.floor(t)
    frac = t - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    q = (r + tl.where(up, 1.0, 0.0)) * step
    # y's sign bit ORed into q (≥ 0), not y < 0 nor a negation, so that -0.0 stays -0.0 as torch's
    # cast keeps it: Triton 3.6's interpreter computes -q as 0 - q, which is +0.0 for q = 0.
    sign = y.to(tl.uint32, bitcast=True) & 0x80000000
    return (q.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


def round_half_even(t):
    """fp32 -> the nearest integer (ties to even), in fp32; exact for |t| < 2^23."""
    r = tl.floor(t)
    frac = t - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return r + tl.where(up, 1.0, 0.0)


def fwht_rows(x, ROWS: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr):
    """Unnormalised Walsh–Hadamard transform of each row of a (ROWS, B) fp32 tile.

    Butterfly (a, c) -> (a + c, a − c) on the lowest bit of the in-row index, then the bits rotate
    right by one (the pair index goes to the top): after LOG2B stages every bit has been
    transformed once, lowest first as in the torch twin, and sits in its place again.
    """
    for _ in tl.static_range(LOG2B):
        a, c = tl.split(tl.reshape(x, (ROWS, B // 2, 2)))
        x = tl.reshape(tl.permute(tl.join(a + c, a - c), (0, 2, 1)), (ROWS, B))
    return x


def row_max(x):
    """The maximum of each row of a 2-D tile.

    Spelled as tl.reduce with triton's own max combiner rather than tl.max: tl.max is a
    ``@triton.jit`` function that triton decorates when it is imported, so unless
    TRITON_INTERPRET=1 was set before `import triton` the interpreter refuses to call it. The
    interpreter recognises this combiner and reduces with numpy.
    """
    return tl.reduce(x, 1, tl.standard._elementwise_max)
