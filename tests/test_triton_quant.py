"""quantize_fp8 / quantize_int8 / hadamard_quantize_fp8 / hadamard_quantize_int8: twins against
their definitions, kernels bit for bit against the twins (which use torch's own casts and
torch.round)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_support import (
    assert_interpreter_did_not_leak,
    bits,
    compile_for_hopper,
    interpreted,
    needs_triton,
    run_kernel,
)

from triton_kernels import (
    hadamard_quantize_fp8,
    hadamard_quantize_fp8_reference,
    hadamard_quantize_int8,
    hadamard_quantize_int8_reference,
    hadamard_transform_reference,
    quantize_fp8,
    quantize_fp8_reference,
    quantize_int8,
    quantize_int8_reference,
)

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
IN_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _sample(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x.view(-1, shape[-1])[1] = 0.0  # an all-zero row: scale 1 there, no NaN
    x.view(-1)[7] = 1e-7  # far below the smallest fp8 step
    x.view(-1)[8] = -1e-7  # rounds to -0.0: the sign bit must survive
    return x.to(dtype)


# --- the twins against their definitions ----------------------------------------------------------


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_reference_scale_and_reconstruction(fp8, granularity):
    x = _sample((6, 5, 40), torch.float32, 0)
    q, s = quantize_fp8_reference(x, fp8, granularity)
    fmax = torch.finfo(fp8).max
    x2 = x.reshape(-1, 40)
    if granularity == "tensor":
        assert s.shape == () and s == x.abs().max() / fmax
    else:
        assert s.shape == (30, 1)
        assert s[1] == 1.0  # the zero row
    assert q.shape == x.shape and q.dtype == fp8
    deq = q.reshape(-1, 40).float() * s
    # Half an fp8 step relative to the value (2^-4 for e4m3, 2^-3 for e5m2) above the subnormals.
    rel = {torch.float8_e4m3fn: 2.0**-4, torch.float8_e5m2: 2.0**-3}[fp8]
    normal = x2.abs() / s >= torch.finfo(fp8).tiny
    assert ((deq - x2).abs() <= rel * x2.abs() + 1e-12)[normal].all()
    # The largest magnitude lands on ±fp8_max exactly.
    assert (q.float().abs().amax() == fmax).item()


def test_reference_all_zero_tensor_has_unit_scale():
    q, s = quantize_fp8_reference(torch.zeros(4, 8))
    assert s == 1.0 and (q.float() == 0).all()
    q, s = quantize_int8_reference(torch.zeros(4, 8), "row")
    assert (s == 1.0).all() and (q == 0).all()


@pytest.mark.parametrize("fp8", FP8)
def test_twin_maps_amax_to_fp8_max(fp8):
    x = torch.tensor([1.0, -3.0, 2.9999])
    q, s = quantize_fp8_reference(x, fp8)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == torch.finfo(fp8).max


# --- kernels against twins ------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_quantize_fp8_bit_exact(dtype, fp8, granularity):
    x = _sample((3, 13, 300), dtype, 1)  # 39 rows × 300: partial tiles both ways
    q, s = run_kernel(quantize_fp8, x, fp8, granularity)
    qr, sr = quantize_fp8_reference(x, fp8, granularity)
    assert q.dtype == fp8 and q.shape == x.shape and s.shape == sr.shape and s.dtype == torch.float32
    assert torch.equal(s, sr)
    assert torch.equal(bits(q), bits(qr))


@needs_triton
@pytest.mark.parametrize("fp8", FP8)
def test_fp8_rounding_on_every_grid_point_and_tie(fp8):
    # Scale 1 (amax = fp8_max), then every finite fp8 value, every midpoint between neighbours (a tie:
    # to even), points just either side of the midpoints, and -0.0.
    # The interpreter's own fp32 -> fp8 cast gets ~2% of these wrong; the kernel rounds in fp32 first.
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).float()
    grid = torch.unique(codes[torch.isfinite(codes)])
    mids = (grid[1:] + grid[:-1]) / 2
    eps = (grid[1:] - grid[:-1]) / 64
    fmax = torch.finfo(fp8).max
    x = torch.cat([grid, mids, mids + eps, mids - eps, torch.tensor([-0.0])])
    q, s = run_kernel(quantize_fp8, x, fp8)
    assert s == 1.0
    assert torch.equal(bits(q), bits(x.clamp(-fmax, fmax).to(fp8)))


@needs_triton
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_quantize_int8_exact_with_ties(granularity):
    # Row 0 sets the scale to exactly 1 and holds k + 1/2 ties (half to even, like torch.round).
    ties = torch.arange(-126, 127, dtype=torch.float32) + 0.5
    row0 = torch.cat([torch.tensor([127.0, -127.0]), ties])  # 255 entries
    x = torch.stack([row0, torch.randn(255, generator=torch.Generator().manual_seed(4)) * 7])
    for dtype in IN_DTYPES:
        xd = x.to(dtype)
        q, s = run_kernel(quantize_int8, xd, granularity)
        qr, sr = quantize_int8_reference(xd, granularity)
        assert q.dtype == torch.int8 and torch.equal(s, sr) and torch.equal(q, qr)
    q, _ = quantize_int8_reference(x, granularity)
    assert torch.equal(q[0, 2:].float(), torch.round(ties))


@needs_triton
def test_quantize_non_contiguous_and_row_scale_shape():
    base = _sample((64, 37), torch.float32, 5)
    x = base.t()  # (37, 64), strides (1, 37)
    q, s = run_kernel(quantize_fp8, x, torch.float8_e4m3fn, "row")
    qr, sr = quantize_fp8_reference(x.contiguous(), torch.float8_e4m3fn, "row")
    assert s.shape == (37, 1) and torch.equal(s, sr) and torch.equal(bits(q), bits(qr))
    q, s = run_kernel(quantize_int8, x[:, ::3], "row")
    qr, sr = quantize_int8_reference(x[:, ::3].contiguous(), "row")
    assert torch.equal(q, qr) and torch.equal(s, sr)


@needs_triton
@settings(max_examples=8)
@given(rows=st.integers(1, 9), cols=st.integers(1, 300), seed=st.integers(0, 2**16), row=st.booleans())
def test_quantize_fp8_bit_exact_any_shape(rows, cols, seed, row):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 10
    granularity = "row" if row else "tensor"
    q, s = run_kernel(quantize_fp8, x, torch.float8_e4m3fn, granularity)
    qr, sr = quantize_fp8_reference(x, torch.float8_e4m3fn, granularity)
    assert torch.equal(s, sr) and torch.equal(bits(q), bits(qr))


@needs_triton
@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("block_size", [16, 128])
def test_hadamard_quantize_bit_exact(dtype, granularity, block_size):
    # 21 rows of 384 = 3 blocks of 128: the one-pass row kernel pads 3 blocks to 4.
    x = _sample((3, 7, 384), dtype, block_size)
    q, s = run_kernel(hadamard_quantize_fp8, x, block_size, torch.float8_e4m3fn, granularity)
    qr, sr = hadamard_quantize_fp8_reference(x, block_size, torch.float8_e4m3fn, granularity)
    assert torch.equal(s, sr) and torch.equal(bits(q), bits(qr))
    if dtype == torch.float32:
        # For fp32 input the fused op is exactly quantize_fp8(hadamard_transform(x)).
        qc, sc = quantize_fp8_reference(hadamard_transform_reference(x, block_size), torch.float8_e4m3fn, granularity)
        assert torch.equal(sc, s) and torch.equal(bits(qc), bits(q))


@needs_triton
@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_hadamard_quantize_int8_bit_exact(dtype, granularity):
    # One-pass row kernel (3 blocks of 128 padded to 4) and the two-pass per-tensor path.
    x = _sample((3, 7, 384), dtype, 128)
    x.view(-1)[20] = 0.5 * 127 / 64  # not a tie after rotation; ties are covered below
    q, s = run_kernel(hadamard_quantize_int8, x, 128, granularity)
    qr, sr = hadamard_quantize_int8_reference(x, 128, granularity)
    assert q.dtype == torch.int8 and torch.equal(s, sr) and torch.equal(q, qr)
    assert q.abs().max() == 127  # the amax entry of each scale maps to ±127
    if dtype == torch.float32:
        qc, sc = quantize_int8_reference(hadamard_transform_reference(x, 128), granularity)
        assert torch.equal(sc, s) and torch.equal(qc, q)


@needs_triton
def test_hadamard_quantize_int8_long_rows_and_ties():
    # Rows past 16384 entries take the two-pass path per row; exact halves round to even.
    x = torch.randn(2, 32768, generator=torch.Generator().manual_seed(8))
    x[1] = 0.0
    q, s = run_kernel(hadamard_quantize_int8, x, 4096, "row")
    qr, sr = hadamard_quantize_int8_reference(x, 4096, "row")
    assert torch.equal(s, sr) and s[1] == 1.0 and torch.equal(q, qr)
    # A block of one nonzero entry rotates to ±v/√b everywhere: with the scale set by a 127·k
    # entry elsewhere, k/2 + ½ steps land on exact ties.
    t = torch.zeros(1, 32)
    t[0, 0] = 127.0 * 4.0  # rotated: ±127·4/√16 = ±127 in the first block → scale 1
    t[0, 16] = 2.5 * 4.0  # rotated: ±2.5 in the second block → ties, to ±2
    q, s = run_kernel(hadamard_quantize_int8, t, 16, "row")
    qr, sr = hadamard_quantize_int8_reference(t, 16, "row")
    assert torch.equal(q, qr) and set(q[0, 16:].abs().tolist()) == {2}


@needs_triton
@pytest.mark.parametrize("fp8", FP8)
def test_hadamard_quantize_long_rows_take_two_passes(fp8):
    # Rows longer than 16384 entries cannot be held by one program: the two-pass path per row.
    x = torch.randn(2, 32768, generator=torch.Generator().manual_seed(6))
    x[1] = 0.0
    q, s = run_kernel(hadamard_quantize_fp8, x, 4096, fp8, "row")
    qr, sr = hadamard_quantize_fp8_reference(x, 4096, fp8, "row")
    assert torch.equal(s, sr) and s[1] == 1.0 and torch.equal(bits(q), bits(qr))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: quantize_fp8(torch.ones(4), granularity="col"), ValueError, "granularity"),
        (lambda: quantize_fp8(torch.ones(4), dtype=torch.float16), ValueError, "dtype"),
        (lambda: quantize_fp8(torch.ones(4, dtype=torch.int32)), TypeError, "x must be"),
        (lambda: quantize_int8(torch.tensor(2.0), "row"), ValueError, "row"),
        (lambda: hadamard_quantize_fp8(torch.ones(4, 24), 16), ValueError, "block_size=16 must divide"),
        (lambda: hadamard_quantize_int8(torch.ones(4, 24), 16), ValueError, "block_size=16 must divide"),
        (lambda: hadamard_quantize_int8(torch.ones(4, 16), 16, "col"), ValueError, "granularity"),
    ],
)
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()
    with interpreted(), pytest.raises(error, match=message):
        call()


@needs_triton
def test_fused_row_kernel_compiles_for_hopper_without_spills():
    import triton_kernels.quant as quant

    ptx = compile_for_hopper(
        quant._H_QUANT_ROW,
        {
            "x_ptr": "*bf16",
            "q_ptr": "*fp8e4nv",
            "scale_ptr": "*fp32",
            "n_blocks": "i32",
            "stride_row": "i32",
            "inv_sqrt_b": "fp32",
        },
        {
            "stride_col": 1,
            "B": 128,
            "LOG2B": 7,
            "NB_PAD": 128,
            "IS_FP8": True,
            "MANT_BITS": 3,
            "MIN_EXP": -6,
            "QMAX": 448.0,
        },
        num_warps=16,
        aligned=("x_ptr", "q_ptr", "stride_row"),
    )
    assert "st.local" not in ptx


@needs_triton
def test_fused_int8_row_kernel_compiles_for_hopper_without_spills():
    import triton_kernels.quant as quant

    ptx = compile_for_hopper(
        quant._H_QUANT_ROW,
        {
            "x_ptr": "*bf16",
            "q_ptr": "*i8",
            "scale_ptr": "*fp32",
            "n_blocks": "i32",
            "stride_row": "i32",
            "inv_sqrt_b": "fp32",
        },
        {
            "stride_col": 1,
            "B": 128,
            "LOG2B": 7,
            "NB_PAD": 32,
            "IS_FP8": False,
            "MANT_BITS": 0,
            "MIN_EXP": 0,
            "QMAX": 127.0,
        },
        num_warps=8,
        aligned=("x_ptr", "q_ptr", "stride_row"),
    )
    assert "st.local" not in ptx and "e4m3" not in ptx  # no spills; the FP8 branch compiled out


@needs_triton
def test_tall_tiles_for_transposed_input_compile_for_hopper_without_spills():
    """The tiles a GPU uses for a column-major view (Xᵀ in HALO's backward): stride_row = 1."""
    import triton_kernels.quant as quant

    for kernel, signature, constexprs, warps in (
        (
            quant._ABSMAX,
            {"x_ptr": "*bf16", "part_ptr": "*fp32", "rows": "i32", "cols": "i32", "stride_col": "i32"},
            {"stride_row": 1, "n_colblocks": 128, "BR": 128, "BC": 32},
            8,
        ),
        (
            quant._QUANT,
            {
                "x_ptr": "*bf16",
                "q_ptr": "*fp8e4nv",
                "scale_ptr": "*fp32",
                "scale_stride": "i32",
                "rows": "i32",
                "cols": "i32",
                "stride_col": "i32",
            },
            {"stride_row": 1, "IS_FP8": True, "MANT_BITS": 3, "MIN_EXP": -6, "QMAX": 448.0, "BR": 128, "BC": 32},
            4,
        ),
    ):
        # As launched for a 16-aligned column-major view: no spills, and coalesced 128-bit loads.
        aligned = ("x_ptr", "stride_col", "rows", "cols")
        ptx = compile_for_hopper(kernel, signature, constexprs, num_warps=warps, aligned=aligned)
        assert "st.local" not in ptx and "ld.global.v4" in ptx


def test_interpreter_did_not_leak(monkeypatch):
    assert_interpreter_did_not_leak(monkeypatch)
