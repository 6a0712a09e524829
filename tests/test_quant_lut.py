"""The table quantiser (galorex.optim.code_lut) against torch.bucketize(right=True), the reference:
every boundary's neighbourhood, every bin's end points, special values, random bit patterns, and
quantize_blockwise's bytes with the table on and off."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from galorex.optim import state8bit as s8
from galorex.optim.code_lut import build_code_lut, lut_bucketize

# (code, keep_positive): the three boundary sets quantize_blockwise uses.
CASES = [("signed", False), ("unsigned_sqrt", False), ("unsigned_sqrt", True)]
SNAN_LO, SNAN_HI = -0x007F_FFFF, -0x007F_0001  # 0xFF800001 … 0xFF80FFFF as int32


def _code(name: str) -> torch.Tensor:
    return s8.signed_code() if name == "signed" else s8.unsigned_code()


def _floats(bits: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns (as uint32 values or int32) → float32."""
    bits = bits.to(torch.int64) & 0xFFFF_FFFF
    return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)


def _ulps(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    out, up, down = [x], x, x
    for _ in range(k):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, -float("inf")))
        out += [up, down]
    return out


def _no_snan(u: torch.Tensor) -> torch.Tensor:
    """u without the signalling NaNs of −inf's bin (see code_lut's docstring)."""
    return u[~((u.view(torch.int32) >= SNAN_LO) & (u.view(torch.int32) <= SNAN_HI))]


def _reference(u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(u, b, right=True, out_int32=True)


def _check(u: torch.Tensor, b: torch.Tensor) -> None:
    lut = build_code_lut(b)
    got = lut_bucketize(u.contiguous(), lut).to(torch.int32)
    want = _reference(u, b)
    bad = (got != want).nonzero().view(-1)
    assert bad.numel() == 0, (
        f"{bad.numel()} mismatches, first u={u[bad[:4]].tolist()} "
        f"bits={[hex(v & 0xFFFFFFFF) for v in u[bad[:4]].view(torch.int32).tolist()]} "
        f"got={got[bad[:4]].tolist()} want={want[bad[:4]].tolist()}"
    )


@pytest.mark.parametrize(("name", "keep"), CASES)
def test_every_boundary_neighbourhood_bin_end_and_special_value(name, keep):
    b = s8.code_boundaries(_code(name), keep)
    lut = build_code_lut(b)
    assert lut.count.dtype == torch.uint8 and lut.steps == 1  # one compare per element
    k = torch.arange(1 << 16, dtype=torch.int64) << 16
    ends = torch.cat([_floats(k), _floats(k + 0xFFFF), _floats(k + 1), _floats(k + 0xFFFE)])
    code = _code(name)
    special = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, 2.0**-126, -(2.0**-126), 2.0**-149, -(2.0**-149), float("inf"), -float("inf")]
        + [float("nan")] * 2
    )
    special[-1] = -special[-1]  # a NaN with the sign bit set
    points = torch.cat(_ulps(b, 2) + _ulps(code, 2) + _ulps(special[:-2], 2) + [ends, special])
    for p in (points, -points):
        _check(_no_snan(p), b)


def test_negative_inf_bin_signalling_nans_are_the_documented_exception():
    b = s8.code_boundaries(s8.signed_code())
    snan = _floats(torch.tensor([0xFF800001, 0xFF80FFFF]))
    assert torch.isnan(snan).all()
    assert lut_bucketize(snan, build_code_lut(b)).tolist() == [0, 0]
    assert _reference(snan, b).tolist() == [b.numel()] * 2
    # Arithmetic never yields them: a division (what quantize_blockwise applies) returns quiet NaNs.
    assert not ((snan / 1.0).view(torch.int32) & 0x0040_0000 == 0).any()


@given(
    st.sampled_from(CASES),
    st.lists(
        st.integers(0, 0xFFFF_FFFF).filter(lambda v: not 0xFF80_0001 <= v <= 0xFF80_FFFF), min_size=1, max_size=64
    ),
)
def test_random_bit_patterns_match_bucketize(case, bits):
    _check(_floats(torch.tensor(bits)), s8.code_boundaries(_code(case[0]), case[1]))


@given(st.sampled_from(CASES), st.integers(0, 2**31 - 1), st.floats(-1.0, 1.0, width=32))
def test_random_values_in_unit_interval_match_bucketize(case, seed, centre):
    g = torch.Generator().manual_seed(seed)
    u = (centre + torch.randn(4096, generator=g) * 10.0 ** torch.randint(-9, 1, (4096,), generator=g)).clamp(-1, 1)
    _check(u, s8.code_boundaries(_code(case[0]), case[1]))


@pytest.mark.parametrize("n", [7, 150])
def test_clustered_boundaries_need_several_steps(n):
    """Boundaries packed inside single bins (K > 1) and more than 255 of them (int32 counts)."""
    g = torch.Generator().manual_seed(n)
    b = torch.cat([torch.rand(n, generator=g) * 0.01 + 0.5, -torch.rand(n, generator=g), torch.tensor([0.0])])
    b = b.sort().values
    lut = build_code_lut(b)
    assert lut.steps > 1
    assert lut.count.dtype == (torch.uint8 if b.numel() <= 255 else torch.int32)
    k = torch.arange(1 << 16, dtype=torch.int64) << 16
    _check(
        _no_snan(torch.cat(_ulps(b, 2) + [_floats(k), _floats(k + 0xFFFF), torch.rand(4096, generator=g) * 2 - 1])), b
    )


def _quantize_both(x, code, block, keep):
    assert s8._USE_LUT
    fast = s8.quantize_blockwise(x, code, block, keep_positive=keep)
    s8._USE_LUT = False
    try:
        ref = s8.quantize_blockwise(x, code, block, keep_positive=keep)
    finally:
        s8._USE_LUT = True
    return fast, ref


@pytest.mark.parametrize(("name", "keep"), CASES)
@pytest.mark.parametrize(("shape", "block", "dtype"), [((37, 129), 256, torch.float32), ((4096,), 64, torch.bfloat16)])
def test_quantize_blockwise_bytes_equal_with_and_without_table(name, keep, shape, block, dtype):
    g = torch.Generator().manual_seed(sum(shape) + block)
    x = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-12, 3, shape, generator=g)
    flat = x.view(-1)
    b = s8.code_boundaries(_code(name), keep)
    exact = torch.cat(_ulps(b, 1))  # u exactly on and beside every boundary (absmax 1 blocks)
    flat[: exact.numel()] = exact if name == "signed" else exact.abs()
    flat[::block] = 1.0
    flat[-5:] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")])
    flat[-2 * block - 3] = float("inf")
    x = x.abs() if name != "signed" else x
    (q, a), (q_ref, a_ref) = _quantize_both(x.to(dtype), _code(name), block, keep)
    assert q.dtype == torch.uint8 and q.shape == x.shape and q.untyped_storage().nbytes() == x.numel()
    assert torch.equal(q, q_ref)
    assert torch.equal(a.view(torch.int32), a_ref.view(torch.int32))


def test_uncached_code_and_compile_use_bucketize():
    code = s8.build_unsigned_code()  # equal entries, but not the cached tensor: no table for it
    assert s8._boundaries_for(code, False)[1] is None
    assert s8._boundaries_for(s8.unsigned_code(), True)[1] is not None
    x = torch.rand(5000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s8.quantize_blockwise(x, code)[0], s8.quantize_blockwise(x, s8.unsigned_code())[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_table_equals_cpu_bucketize():
    for name, keep in CASES:
        b = s8.code_boundaries(_code(name), keep)
        u = torch.cat(_ulps(b, 2) + [torch.rand(1 << 20) * 2 - 1])
        got = lut_bucketize(u.cuda(), build_code_lut(b.cuda())).cpu().to(torch.int32)
        assert torch.equal(got, _reference(u, b))
