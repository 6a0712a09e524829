"""fp8_gemm / int8_gemm: bit for bit against torch._scaled_mm and torch._int_mm where the sums are
exact, within fp32 rounding of the float64 twin otherwise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_support import (
    assert_interpreter_did_not_leak,
    compile_for_hopper,
    interpreted,
    needs_triton,
    run_kernel,
)

from triton_kernels import fp8_gemm, fp8_gemm_reference, int8_gemm, int8_gemm_reference

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
M, N, K = 37, 45, 70  # none a multiple of the 32-tiles: masked edges in every direction


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _small_integers(shape, fp8, seed):
    # Integers up to 16 are exact in both FP8 formats; products up to 256 summed over K < 2^16 stay
    # exact in fp32, so every summation order gives the same accumulator.
    return torch.randint(-16, 17, shape, generator=_gen(seed)).float().to(fp8)


@needs_triton
@pytest.mark.parametrize("fp8", [E4M3, E5M2])
@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_bit_exact_against_scaled_mm(fp8, rowwise, out_dtype):
    a, b = _small_integers((M, K), fp8, 0), _small_integers((N, K), fp8, 1)
    # Powers of two: the scaling is exact whatever order the epilogue multiplies in.
    if rowwise:
        sa = 2.0 ** torch.randint(-3, 4, (M, 1), generator=_gen(2)).float()
        sb = 2.0 ** torch.randint(-3, 4, (N, 1), generator=_gen(3)).float()
        ref = torch._scaled_mm(a, b.t(), sa, sb.t().contiguous(), out_dtype=out_dtype)
    else:
        sa, sb = torch.tensor(0.25), torch.tensor(2.0)
        ref = torch._scaled_mm(a, b.t(), sa, sb, out_dtype=out_dtype)
    out = run_kernel(fp8_gemm, a, b, sa, sb, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert torch.equal(out, ref)
    assert torch.equal(fp8_gemm_reference(a, b, sa, sb, out_dtype), ref)


@needs_triton
def test_fp8_bias_bit_exact_against_scaled_mm():
    a, b = _small_integers((M, K), E4M3, 4), _small_integers((N, K), E4M3, 5)
    sa, sb = torch.tensor(0.5), torch.tensor(4.0)
    bias = torch.randn(N, generator=_gen(6)).to(torch.bfloat16)
    ref = torch._scaled_mm(a, b.t(), sa, sb, bias=bias, out_dtype=torch.bfloat16)
    assert torch.equal(run_kernel(fp8_gemm, a, b, sa, sb, torch.bfloat16, bias), ref)


@needs_triton
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_random_values_within_fp32_rounding(out_dtype):
    g = _gen(7)
    a = (torch.randn(M, K, generator=g) * 8).to(E4M3)
    b = (torch.randn(N, K, generator=g) * 8).to(E4M3)
    sa, sb = torch.rand(M, 1, generator=g) + 0.1, torch.rand(N, 1, generator=g) + 0.1
    bias = torch.randn(N, generator=g)
    out = run_kernel(fp8_gemm, a, b, sa, sb, out_dtype, bias)
    ref = fp8_gemm_reference(a, b, sa, sb, torch.float32, bias)
    # fp32 accumulation: K·eps32 relative to Σ|products|, then the output dtype's rounding.
    mag = (a.double().abs() @ b.double().abs().t()) * sa.double() * sb.double().t()
    out_eps = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[out_dtype]
    err = (out.double() - ref.double()).abs()
    assert (err <= K * 2.0**-24 * mag + out_eps * ref.double().abs() + 1e-30).all()


@needs_triton
def test_fp8_strided_operands():
    # a and b given as transposed views (K contiguous nowhere): read through strides.
    g = _gen(8)
    a = (torch.randn(K, M, generator=g) * 4).to(E4M3).t()
    b = (torch.randn(K, N, generator=g) * 4).to(E4M3).t()
    sa, sb = torch.tensor(0.5), torch.tensor(0.25)
    out = run_kernel(fp8_gemm, a, b, sa, sb, torch.float32)
    ref = fp8_gemm_reference(a.contiguous(), b.contiguous(), sa, sb, torch.float32)
    torch.testing.assert_close(out, ref, rtol=K * 2.0**-24, atol=1e-6)


@needs_triton
@settings(max_examples=6)
@given(m=st.integers(1, 70), n=st.integers(1, 70), k=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_int8_exact_against_int_mm(m, n, k, seed):
    g = _gen(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    one = torch.tensor(1.0)
    out = run_kernel(int8_gemm, a, b, one, one, torch.float32)
    # |sum| <= 100·127² < 2^24: the int32 accumulator converts to fp32 exactly.
    assert torch.equal(out, torch._int_mm(a, b.t()).float())


@needs_triton
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_scaled_with_bias_matches_twin_exactly(out_dtype):
    g = _gen(9)
    a = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    sa, sb = torch.rand(M, 1, generator=g) / 100, torch.rand(N, 1, generator=g) / 100
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    out = run_kernel(int8_gemm, a, b, sa, sb, out_dtype, bias)
    # Exact integer sums, then the same fp32 epilogue in the same order: equal bits.
    assert torch.equal(out, int8_gemm_reference(a, b, sa, sb, out_dtype, bias))
    strided = run_kernel(int8_gemm, a.t().contiguous().t(), b, sa, torch.tensor(0.01), out_dtype)
    assert torch.equal(strided, int8_gemm_reference(a, b, sa, torch.tensor(0.01), out_dtype))


def test_int8_twin_agrees_with_int_mm_on_large_sums():
    # The twin sums in float64, exact for any int8 product sum of this size.
    g = _gen(10)
    a = torch.randint(-127, 128, (32, 4096), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 4096), generator=g, dtype=torch.int8)
    one = torch.tensor(1.0)
    assert torch.equal(int8_gemm_reference(a, b, one, one, torch.float32), torch._int_mm(a, b.t()).float())


_A8, _B8 = torch.zeros(4, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8)
_ONE = torch.tensor(1.0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: int8_gemm(_A8.float(), _B8, _ONE, _ONE), TypeError, "a must be torch.int8"),
        (lambda: fp8_gemm(_A8, _B8, _ONE, _ONE), TypeError, "a must be torch.float8"),
        (lambda: int8_gemm(_A8, _B8[:, :4], _ONE, _ONE), ValueError, "K differs"),
        (lambda: int8_gemm(_A8, _B8, torch.ones(3, 1), _ONE), ValueError, r"a_scale must have shape \(\) or \(4, 1\)"),
        (lambda: int8_gemm(_A8, _B8, _ONE.double(), _ONE), TypeError, "a_scale must be float32"),
        (lambda: int8_gemm(_A8, _B8, _ONE, _ONE, torch.int32), ValueError, "out_dtype"),
        (lambda: int8_gemm(_A8, _B8, _ONE, _ONE, bias=torch.ones(4)), ValueError, r"bias must have shape \(3,\)"),
        (lambda: int8_gemm(_A8[0], _B8, _ONE, _ONE), ValueError, "a must be 2-D"),
    ],
)
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()
    with interpreted(), pytest.raises(error, match=message):
        call()


@needs_triton
def test_empty_k_gives_bias_only():
    a, b = torch.zeros(3, 0, dtype=torch.int8), torch.zeros(2, 0, dtype=torch.int8)
    bias = torch.tensor([1.5, -2.0])
    out = run_kernel(int8_gemm, a, b, _ONE, _ONE, torch.float32, bias)
    assert torch.equal(out, bias.expand(3, 2))


@needs_triton
@pytest.mark.parametrize("is_int", [False, True])
def test_kernel_compiles_to_pipelined_wgmma_on_hopper(is_int):
    # What a launch with contiguous operands builds (unit K strides, 16-aligned pointers): B is read
    # K-major, so the FP8/INT8 dot maps onto Hopper's wgmma, fed by multi-stage cp.async loads.
    import triton_kernels.gemm as gemm

    cfg = gemm._GEMM_CONFIGS[0]
    operand = "*i8" if is_int else "*fp8e4nv"
    ptx = compile_for_hopper(
        gemm._GEMM,
        {
            "a_ptr": operand,
            "b_ptr": operand,
            "c_ptr": "*bf16",
            "sa_ptr": "*fp32",
            "sb_ptr": "*fp32",
            "bias_ptr": "*bf16",
            "M": "i32",
            "N": "i32",
            "K": "i32",
            "stride_am": "i32",
            "stride_bn": "i32",
            "sa_stride": "i32",
            "sb_stride": "i32",
        },
        {
            "stride_ak": 1,
            "stride_bk": 1,
            "IS_INT": is_int,
            "HAS_BIAS": True,
            "OUT_BF16": True,
            "BM": cfg["BM"],
            "BN": cfg["BN"],
            "BK": cfg["BK"],
            "GROUP_M": cfg["GROUP_M"],
        },
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        aligned=("a_ptr", "b_ptr", "c_ptr", "N", "K", "stride_am", "stride_bn"),
    )
    assert "wgmma.mma_async" in ptx
    assert "cp.async" in ptx
    assert "st.local" not in ptx


def test_interpreter_did_not_leak(monkeypatch):
    assert_interpreter_did_not_leak(monkeypatch)
