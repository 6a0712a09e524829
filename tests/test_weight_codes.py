"""INT8 group codes and the rounding rules (galorex.weights.codes): error bounds, unbiasedness with
a bound derived from the number of draws, at most one code step, reproducible draws, the float64
reference of the stochastic rule, bf16 stochastic rounding, and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from galorex.weights import codes as C

pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hoeffding(draws: int, cells: int, miss: float = 1e-9) -> float:
    """A bound t with P(some cell's mean of ``draws`` Bernoulli draws is ≥ t from its mean) ≤ miss
    (Hoeffding per cell, union over ``cells``): P(|mean − p| ≥ t) ≤ 2 exp(−2 n t²)."""
    return math.sqrt(math.log(2 * cells / miss) / (2 * draws))


@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    groups=st.sampled_from([32, 64, 256]),
    magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_nearest_codes_are_within_half_a_step(rows, cols, groups, magnitude, seed):
    w = torch.randn(rows, cols, generator=_gen(seed)) * magnitude
    codes, scales = C.quantize(w, groups)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert scales.numel() == C.num_groups(w.numel(), groups)
    assert int(codes.abs().max()) <= C.QMAX
    w64, s64 = w.double().reshape(-1), scales.double().repeat_interleave(groups)[: w.numel()]
    # s is absmax/127 in float32 and x = w/s is rounded to the nearest integer: |q·s − w| ≤ s/2,
    # plus the float32 rounding of s and of the division (a few ulps of the code's magnitude).
    err = (codes.double().reshape(-1) * s64 - w64).abs()
    assert bool((err <= s64 * (0.5 + 256 * 2**-24)).all())
    back = C.dequantize(codes, scales, groups, torch.float64)
    assert torch.equal(back.reshape(-1), codes.double().reshape(-1) * s64)  # exact in float64


def test_dequantize_rounds_the_exact_product_once():
    w = torch.randn(40, 96, generator=_gen(1))
    codes, scales = C.quantize(w, 64)
    exact = codes.double().reshape(-1, 64) * scales.double().unsqueeze(1)  # ≤ 16 significant bits
    assert torch.equal(exact.float().double(), exact)  # so float32 holds it exactly
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert torch.equal(C.dequantize(codes, scales, 64, dtype), exact.reshape(40, 96).to(dtype))


@given(values=st.lists(st.floats(min_value=0.0, max_value=2.0**127, width=32, allow_nan=False), max_size=50))
def test_scales_round_up_to_the_next_bf16_value(values):
    s = torch.tensor(values, dtype=torch.float32)
    up = C.round_up_to_bf16(s)
    assert torch.equal(up.to(torch.bfloat16).float(), up)  # a bf16 value
    assert bool((up >= s).all())
    below = up.to(torch.bfloat16)  # the bf16 value just below ``up`` is below s (or up == s)
    prev = torch.nextafter(below, torch.zeros_like(below)).float()
    assert bool(((up == s) | (prev < s)).all())


def test_stochastic_rounding_is_unbiased_within_the_draw_bound():
    values = torch.linspace(-3.0, 3.0, 61)  # fractions 0, 0.1, … 0.9 on a grid of step 1
    # One group of 64 per row: the 61 values, 127 (so the scale is exactly 1) and two zeros; 4096
    # rows are 4096 independent draws of every value.
    row = torch.cat([values, torch.tensor([127.0, 0.0, 0.0])])
    codes, scales = C.quantize(row.repeat(4096, 1), 64, "stochastic", _gen(0))
    assert torch.equal(scales, torch.ones(4096))
    q, x = codes[:, :61].double(), values.double()
    assert bool(((q - x).abs() < 1).all())  # never more than one step away
    assert bool((q == torch.floor(x)).logical_or(q == torch.floor(x) + 1).all())
    up = (q - torch.floor(x)).mean(dim=0)  # how often each value rounded up
    assert bool(((up - (x - torch.floor(x))).abs() <= _hoeffding(4096, 61)).all())


def test_stochastic_codes_follow_the_float64_rule_with_the_same_draws():
    w = torch.randn(33, 128, generator=_gen(2)) * 0.02
    codes, scales = C.quantize(w, 256, "stochastic", _gen(7))
    # The same draws, chunk by chunk as the write makes them.
    draws = C.uniform_draws(w.numel(), _gen(7), w.device).double()
    s64 = scales.double().repeat_interleave(256)[: w.numel()]
    x = w.reshape(-1).double() / s64
    ref = torch.floor(x) + (draws < x - torch.floor(x)).double()
    # float32 divides where float64 does: the two may disagree only where u is within the float32
    # error of x's fraction (|x| ≤ 127: a few ulps of 127).
    differ = ref != codes.reshape(-1).double()
    band = (draws - (x - torch.floor(x))).abs() <= 4 * 127 * 2**-24
    assert bool((~differ | band).all())
    assert int(differ.sum()) <= int(band.sum())


def test_draws_are_reproducible_and_seed_dependent():
    w = torch.randn(64, 64, generator=_gen(3))
    a = C.quantize(w, 32, "stochastic", _gen(11))[0]
    b = C.quantize(w, 32, "stochastic", _gen(11))[0]
    c = C.quantize(w, 32, "stochastic", _gen(12))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_chunks_and_a_short_tail(monkeypatch):
    w = torch.randn(1000, 7, generator=_gen(4))  # 7000 elements: the last group (24) is short
    codes, scales = C.quantize(w, 64)
    monkeypatch.setattr(C, "CHUNK_GROUPS", 3)  # many chunks: the same nearest codes
    chunked = C.quantize(w, 64)
    assert torch.equal(chunked[0], codes) and torch.equal(chunked[1], scales)
    assert scales.numel() == C.num_groups(7000, 64) == 110
    assert float(scales[-1]) == float(C.round_up_to_bf16(w.reshape(-1)[109 * 64 :].abs().max() / 127))
    back = C.dequantize(codes, scales, 64, torch.float32).reshape(-1)
    assert bool(((back - w.reshape(-1)).abs() <= scales.repeat_interleave(64)[:7000] * 0.5001).all())


def test_zero_groups_and_non_finite_values():
    w = torch.zeros(4, 64)
    w[1, 3] = 2.0
    codes, scales = C.quantize(w, 64, "stochastic", _gen(0))
    assert torch.equal(scales, C.round_up_to_bf16(torch.tensor([0.0, 2.0 / 127, 0.0, 0.0])))
    assert int((codes != 0).sum()) == 1 and abs(float(codes[1, 3]) * float(scales[1]) - 2.0) < float(scales[1])
    w[2, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        C.quantize(w, 64)


@pytest.mark.parametrize("size", [32, 64, 256, 4096])
def test_group_sizes_that_are_multiples_of_32_pass(size):
    assert C.check_group_size(size) == size


@pytest.mark.parametrize("bad", [0, 48, -32, 31, 1.5, True, "64"])
def test_bad_group_sizes_name_the_setting(bad):
    with pytest.raises(ValueError, match="weight_group_size must be a positive multiple of 32"):
        C.check_group_size(bad, "weight_group_size")


# ----------------------------------------------------------------------------- bf16
def test_bf16_nearest_is_torchs_cast():
    w = torch.randn(100, 33, generator=_gen(6))
    out = torch.empty(100, 33, dtype=torch.bfloat16)
    assert torch.equal(C.round_to_bf16_(out, w, "nearest"), w.to(torch.bfloat16))


def test_bf16_stochastic_rounding_is_unbiased_and_within_one_ulp():
    # 1 + k/64 of a bf16 step above 1.0 (step 2^-7), each drawn 8192 times.
    steps = torch.arange(64, dtype=torch.float64) / 64
    x = (1.0 + steps * 2**-7).float()
    w = torch.cat([x, -x]).repeat(8192, 1).contiguous()
    out = C.round_to_bf16_(torch.empty_like(w, dtype=torch.bfloat16), w, "stochastic", _gen(8))
    lo = torch.cat([torch.full((64,), 1.0), torch.full((64,), -1.0)])
    delta = (out.double() - lo.double()).abs() / 2**-7  # 0 or 1 step, away from zero
    assert bool(((delta == 0) | (delta == 1)).all())
    frac = torch.cat([steps, steps])
    assert bool(((delta.mean(dim=0) - frac).abs() <= _hoeffding(8192, 128)).all())


def test_bf16_stochastic_keeps_specials_and_never_overflows():
    big = torch.finfo(torch.bfloat16).max
    w = torch.tensor([float("inf"), -float("inf"), float("nan"), big, -big, 3.3895e38, 0.0, -0.0])
    out = C.round_to_bf16_(torch.empty(8, dtype=torch.bfloat16), w, "stochastic", _gen(9))
    assert out[0] == float("inf") and out[1] == -float("inf") and torch.isnan(out[2])
    assert bool(torch.isfinite(out[3:]).all())
    assert out[6] == 0 and out[7] == 0


def test_bf16_draws_are_reproducible():
    w = torch.randn(300, generator=_gen(10))
    a = C.round_to_bf16_(torch.empty(300, dtype=torch.bfloat16), w, "stochastic", _gen(1))
    b = C.round_to_bf16_(torch.empty(300, dtype=torch.bfloat16), w, "stochastic", _gen(1))
    assert torch.equal(a, b)
