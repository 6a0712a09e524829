"""galorex.halo: Hadamard rotations, FP8/INT8 quantisation, the scaled GEMM and HaloLinear.

The reference for HaloLinear is a float64 emulation written here from the maths (dense rotation
matrices, quantisation rounded onto the format's grid by arithmetic, not by a dtype cast).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from galorex.halo import (
    HaloLinear,
    block_hadamard_matrix,
    convert_to_halo,
    default_block_size,
    dequantize,
    format_max,
    fwht,
    grid_step,
    quantize,
    random_signs,
    rotate,
    scaled_gemm,
    scaled_gemm_reference,
    sylvester,
    unrotate,
)

pytestmark = pytest.mark.usefixtures("single_thread")

from halo_support import assert_pipeline_close, check_against_float64, rel, train_converted_llama

LEVELS = (0, 1, 2)
FORMATS = ("fp8", "int8")
GRANS = ("tensor", "row")


# ----------------------------------------------------------------------------- Hadamard
@given(k=st.integers(0, 9))
def test_sylvester_is_orthonormal_and_symmetric(k):
    n = 2**k
    h = sylvester(n, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h.T, rtol=0, atol=0)
    assert torch.all(h.abs() == 1 / math.sqrt(n))


@given(
    log_block=st.integers(0, 8),
    blocks=st.integers(1, 4),
    rows=st.integers(1, 5),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_block_rotation_matches_dense_preserves_norms_and_inverts(log_block, blocks, rows, signed, seed):
    b = 2**log_block
    d = b * blocks
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    s = random_signs(d, seed).double() if signed else None
    r = block_hadamard_matrix(d, b, s, torch.float64)
    torch.testing.assert_close(r @ r.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    y = rotate(x, b, s)
    torch.testing.assert_close(y, x @ r, rtol=0, atol=1e-12)  # the butterfly equals the dense matrix
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(unrotate(y, b, s), x, rtol=0, atol=1e-12)


def test_fwht_whole_dimension_leading_dims_and_dtype():
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    y = fwht(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, x @ sylvester(64), rtol=1e-5, atol=1e-6)
    xb = x.bfloat16()
    assert fwht(xb, 16).dtype == torch.bfloat16


def test_default_block_size():
    assert default_block_size(128) == 128 and default_block_size(4096) == 4096
    assert default_block_size(352) == 32 and default_block_size(11008) == 256 and default_block_size(7) == 1


def test_hadamard_bad_input():
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(3, 12))
    with pytest.raises(ValueError, match="block_size=16 does not divide"):
        fwht(torch.zeros(3, 24), 16)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        fwht(torch.zeros(3, 24), 12)
    with pytest.raises(TypeError, match="floating-point"):
        fwht(torch.zeros(3, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="power of two"):
        sylvester(12)


# ----------------------------------------------------------------------------- quantisation
def _round_to_grid(y: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round-half-even onto the format's grid by arithmetic (the float64 reference of the casts)."""
    step = grid_step(y, fmt).double()
    return torch.round(y.double() / step) * step


@given(
    fmt=st.sampled_from(["e4m3", "e5m2", "int8"]),
    gran=st.sampled_from(GRANS),
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([1e-3, 1.0, 1e4]),
)
def test_quantise_error_within_half_a_grid_step(fmt, gran, rows, cols, seed, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, cols, generator=g) * math.log1p(spread))
    q, s = quantize(x, fmt, gran)
    assert q.dtype == (torch.int8 if fmt == "int8" else {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt])
    assert s.dtype == torch.float32 and tuple(s.shape) == (() if gran == "tensor" else (rows, 1))
    y = x.double() / s.double()
    err = (q.double() - y).abs()
    # Half a grid step, plus float32's rounding of x / s.
    assert torch.all(err <= 0.5 * grid_step(y, fmt).double() + 1e-6 * y.abs()), err.max()
    # The cast rounds to the nearest grid point, ties to even, exactly as arithmetic does.
    y32 = (x.float() / s).double()
    torch.testing.assert_close(
        q.double(), _round_to_grid(y32, fmt).clamp(-format_max(fmt), format_max(fmt)), rtol=0, atol=0
    )
    torch.testing.assert_close(dequantize(q, s), q.float() * s, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int8"])
def test_quantise_saturates(fmt):
    qmax = format_max(fmt)
    x = torch.tensor([[1e9, -1e9, 3 * qmax, -0.5 * qmax]])
    q, _ = quantize(x, fmt, scale=torch.tensor(1.0))
    assert q.float().tolist()[0][:3] == [qmax, -qmax, qmax]
    q, _ = quantize(x, fmt, "row", scale=torch.ones(1, 1))
    assert q.float()[0, 1] == -qmax
    # amax-derived scales: the largest value lands exactly on ±q_max.
    q, s = quantize(x, fmt)
    assert q.float().abs().max() == qmax


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int8"])
@pytest.mark.parametrize("gran", GRANS)
def test_quantise_zeros_gives_no_nan(fmt, gran):
    x = torch.zeros(4, 8)
    x[1] = torch.linspace(-1, 1, 8)
    q, s = quantize(x, fmt, gran)
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all()
    assert (q.float()[0] == 0).all()
    q, s = quantize(torch.zeros(3, 5), fmt, gran)
    assert (s == 1).all() and (q.float() == 0).all()


def test_quantise_bad_input():
    with pytest.raises(ValueError, match="fmt must be one of"):
        quantize(torch.ones(2, 2), "fp4")
    with pytest.raises(ValueError, match="granularity must be one of"):
        quantize(torch.ones(2, 2), "int8", "col")
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(2, 2, dtype=torch.int64), "int8")
    with pytest.raises(ValueError, match="scale must have shape"):
        quantize(torch.ones(2, 2), "int8", "row", scale=torch.tensor(1.0))


# ----------------------------------------------------------------------------- scaled GEMM
@pytest.mark.parametrize("fa,fb", [("e4m3", "e4m3"), ("e5m2", "e4m3"), ("int8", "int8")])
@pytest.mark.parametrize("gran", GRANS)
def test_scaled_gemm_backends_agree(fa, fb, gran):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(24, 48, generator=g), torch.randn(40, 48, generator=g)
    qa, sa = quantize(a, fa, gran)
    qb, sb = quantize(b, fb, gran)
    exact = (qa.double() * sa.double()) @ (qb.double() * sb.double()).T
    ref = scaled_gemm_reference(qa, sa, qb, sb)
    torch.testing.assert_close(ref.double(), exact, rtol=1e-5, atol=1e-5)
    auto = scaled_gemm(qa, sa, qb, sb)
    torch.testing.assert_close(auto.double(), exact, rtol=1e-5, atol=1e-5)
    if (fa == "int8" and hasattr(torch, "_int_mm")) or (fa != "int8" and hasattr(torch, "_scaled_mm")):
        forced = scaled_gemm(qa, sa, qb, sb, backend="torch")
        torch.testing.assert_close(forced.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "torch", "emulate"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_gemm_adds_the_bias_in_float32_and_rounds_once(backend, out_dtype):
    g = torch.Generator().manual_seed(2)
    qa, sa = quantize(torch.randn(24, 48, generator=g), "e4m3", "row")
    qb, sb = quantize(torch.randn(40, 48, generator=g), "e4m3", "row")
    bias = torch.randn(40, generator=g).to(torch.bfloat16)
    fp32 = scaled_gemm(qa, sa, qb, sb, backend=backend)
    out = scaled_gemm(qa, sa, qb, sb, backend=backend, out_dtype=out_dtype, bias=bias)
    assert out.dtype == out_dtype
    assert torch.equal(out, (fp32 + bias.float()).to(out_dtype))
    assert torch.equal(scaled_gemm(qa, sa, qb, sb, backend=backend, out_dtype=out_dtype), fp32.to(out_dtype))
    for bad in (torch.ones(1), torch.ones(40, dtype=torch.int32), torch.ones(40, 1)):
        with pytest.raises(ValueError, match=r"bias must be .* shape \(40,\)"):
            scaled_gemm(qa, sa, qb, sb, backend=backend, out_dtype=out_dtype, bias=bad)


def test_scaled_gemm_bad_input():
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="backend must be one of"):
        scaled_gemm(q, torch.tensor(1.0), q, torch.tensor(1.0), backend="cutlass")
    with pytest.raises(ValueError, match=r"expected a \(M,K\) and b \(N,K\)"):
        scaled_gemm(q, torch.tensor(1.0), q.T, torch.tensor(1.0))


# ----------------------------------------------------------------------------- HaloLinear vs float64
def _q64(x: torch.Tensor, fmt: str, gran: str) -> torch.Tensor:
    """Float64 quantise → dequantise of a 2-D tensor, the format's grid applied by arithmetic."""
    qmax = format_max(fmt)
    amax = x.abs().amax() if gran == "tensor" else x.abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = (x / s).clamp(-qmax, qmax)
    return _round_to_grid(y, fmt).clamp(-qmax, qmax) * s


def _emulate64(x, w, b, ey, level, fmt, gran, grad_fp8="e4m3"):
    """(Y, E_X, G) of the quantise-rotate-GEMM pipeline, in float64 with dense rotations."""
    f, fg = ("int8", "int8") if fmt == "int8" else ("e4m3", grad_fp8)
    n, k = w.shape
    rk = block_hadamard_matrix(k, default_block_size(k), dtype=torch.float64)
    rn = block_hadamard_matrix(n, default_block_size(n), dtype=torch.float64)
    xa, wa = (x @ rk, w @ rk) if level >= 1 else (x, w)
    y = _q64(xa, f, gran) @ _q64(wa, f, gran).T + b
    ea, wta = (ey @ rn, w.T @ rn) if level >= 2 else (ey, w.T)
    ex = _q64(ea, fg, gran) @ _q64(wta, f, gran).T
    gw = _q64(ey.T.contiguous(), fg, gran) @ _q64(x.T.contiguous(), f, gran).T
    return y, ex, gw


def _layer(level, fmt, gran, k=64, n=32, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    layer = HaloLinear(k, n, level=level, fmt=fmt, granularity=gran, dtype=dtype, **kw)
    return layer


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gran", GRANS)
def test_halo_linear_matches_float64_emulation_and_float64_layer(level, fmt, gran):
    layer = _layer(level, fmt, gran)
    check_against_float64(layer, lambda x, w, b, e: _emulate64(x, w, b, e, level, fmt, gran), fmt, seed=10 + level)


@pytest.mark.parametrize("grad_fp8", ["e4m3", "e5m2"])
def test_halo_linear_gradient_fp8_format(grad_fp8):
    layer = _layer(2, "fp8", "row", grad_fp8=grad_fp8)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 64, generator=g, requires_grad=True)
    ey = torch.randn(48, 32, generator=g) * 1e-3
    layer(x).backward(ey)
    _, rex, rg = _emulate64(
        x.detach().double(),
        layer.weight.detach().double(),
        layer.bias.detach().double(),
        ey.double(),
        2,
        "fp8",
        "row",
        grad_fp8,
    )
    assert_pipeline_close(x.grad, rex)
    assert_pipeline_close(layer.weight.grad, rg)


def test_halo_linear_bf16_input_and_weight():
    layer = _layer(1, "fp8", "row", dtype=torch.bfloat16)
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(4)).bfloat16().requires_grad_(True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.bfloat16
    ref = x.detach().double() @ layer.weight.detach().double().T + layer.bias.detach().double()
    assert rel(y.detach(), ref) < 0.06


def test_halo_linear_fp32_weight_bf16_input():
    layer = _layer(1, "int8", "tensor")
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(5)).bfloat16().requires_grad_(True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32


def test_halo_linear_without_bias_zero_input_and_random_signs():
    layer = _layer(2, "fp8", "tensor", bias=False, random_signs=True, seed=7)
    assert layer.signs_in is not None and set(layer.signs_in.tolist()) == {-1.0, 1.0}
    assert "signs_in" not in layer.state_dict()
    x = torch.zeros(5, 64, requires_grad=True)
    y = layer(x)
    y.backward(torch.zeros(5, 32))
    assert (y == 0).all() and torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(6))
    ref = x.double() @ layer.weight.detach().double().T
    assert rel(layer(x).detach(), ref) < 0.06


def _outlier_inputs(tokens=256, k=256, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    channels = torch.randperm(k, generator=g)[:4]
    # LLM-like activation outliers: a few channels 20-200x the rest. (With outliers of 1e3-1e5 the
    # output is dominated by those channels, which per-tensor INT8 then represents well anyway.)
    x[:, channels] *= torch.tensor([20.0, 50.0, 100.0, 200.0])
    return x, channels


def test_rotation_pays_for_int8_on_outlier_channels():
    x, _ = _outlier_inputs()
    errors = {}
    for level in (0, 1):
        layer = _layer(level, "int8", "tensor", k=256, n=128, seed=1)
        ref = x.double() @ layer.weight.detach().double().T + layer.bias.detach().double()
        errors[level] = rel(layer(x).detach(), ref)
    assert errors[1] * 2 <= errors[0], errors  # measured: 0.069 (level 0) vs 0.013 (level 1)


def test_halo_linear_bad_input():
    with pytest.raises(ValueError, match="block_size=64 does not divide in_features"):
        HaloLinear(96, 32, level=1, block_size=64)
    with pytest.raises(ValueError, match="does not divide out_features"):
        HaloLinear(64, 48, level=2, block_size=32)
    with pytest.raises(ValueError, match="level must be one of"):
        HaloLinear(64, 32, level=3)
    with pytest.raises(ValueError, match="level must be one of"):
        HaloLinear(64, 32, level=True)
    with pytest.raises(ValueError, match="fmt must be one of"):
        HaloLinear(64, 32, fmt="fp4")
    with pytest.raises(ValueError, match="granularity must be one of"):
        HaloLinear(64, 32, granularity="block")
    with pytest.raises(ValueError, match="grad_fp8 must be one of"):
        HaloLinear(64, 32, grad_fp8="e3m4")
    layer = HaloLinear(64, 32)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        layer(torch.ones(3, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.ones(3, 63))


# ----------------------------------------------------------------------------- convert_to_halo
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(64, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64, bias=False))
        self.lm_head = nn.Linear(64, 10)


def test_convert_to_halo_swaps_in_place_and_keeps_parameters():
    torch.manual_seed(0)
    model = _Block()
    params = {name: p for name, p in model.named_parameters()}
    x = torch.randn(8, 64)
    before = model.lm_head(model.mlp(model.attn(x)))
    assert convert_to_halo(model, level=2, fmt="int8", granularity="row") == 3
    assert isinstance(model.attn, HaloLinear) and isinstance(model.mlp[2], HaloLinear)
    assert type(model.lm_head) is nn.Linear
    assert model.mlp[0].halo.block_out == 32 and model.mlp[0].halo.level == 2
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
    y = model.lm_head(model.mlp(model.attn(x)))
    assert rel(y.detach(), before.detach()) < 0.05
    assert convert_to_halo(model) == 0  # nothing left to swap
    assert convert_to_halo(_Block(), skip=("lm_head", "mlp")) == 1
    signed = _Block()
    convert_to_halo(signed, level=1, random_signs=True, seed=3)
    assert signed.attn.signs_in is not None and signed.attn.signs_in.device == signed.attn.weight.device
    assert not torch.equal(signed.attn.signs_in, torch.ones(64))


def test_convert_to_halo_bad_input():
    with pytest.raises(ValueError, match="level must be one of"):
        convert_to_halo(_Block(), level=5)
    with pytest.raises(ValueError, match="module 'attn'.*block_size=128 does not divide in_features"):
        convert_to_halo(_Block(), block_size=128)
    with pytest.raises(TypeError, match="nn.Module"):
        convert_to_halo("model")


def test_a_converted_llama_trains():
    losses = train_converted_llama(level=1, fmt="fp8")
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize(
    "dim,block", [(8, 1), (16, 2), (96, 32), (128, 64), (192, 64), (256, 128), (4096, 4096), (8192, 512)]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kronecker_hadamard_equals_the_butterfly(dim, block, dtype):
    from galorex.lowp.hadamard import fwht, fwht_kron

    g = torch.Generator().manual_seed(dim + block)
    x = torch.randn(3, 5, dim, generator=g, dtype=torch.float64).to(dtype)
    fast = fwht_kron(x, block)
    assert fast.dtype == dtype and fast.shape == x.shape
    if dtype == torch.bfloat16:
        # Computed in float32 and rounded once: within half a bf16 step of the exact transform
        # (the bf16 butterfly rounds at every stage, so it is not the yardstick here).
        exact = fwht(x.double(), block)
        assert ((fast.double() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-5).all()  # + float32 sums
    else:
        tol = {torch.float64: 1e-12, torch.float32: 2e-6}[dtype]
        torch.testing.assert_close(fast, fwht(x, block), rtol=tol, atol=tol)
    if dtype == torch.float64:  # and both are x·diag(H_b, …) exactly
        from galorex.lowp.hadamard import block_hadamard_matrix

        dense = x @ block_hadamard_matrix(dim, block, dtype=torch.float64)
        torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)


def test_hadamard_transform_takes_the_kronecker_path_on_the_cpu():
    from galorex.lowp.hadamard import fwht_kron, hadamard_transform

    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hadamard_transform(x, 64), fwht_kron(x, 64))
    with pytest.raises(ValueError, match="power of two"):
        fwht_kron(torch.randn(2, 96))
    with pytest.raises(TypeError, match="floating"):
        fwht_kron(torch.ones(2, 8, dtype=torch.int32))
