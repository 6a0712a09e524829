"""HaloLinear through the Triton kernels, as it runs on CUDA, checked on the CPU under the interpreter.

With the Triton backend (``GALOREX_BACKEND=triton`` on a GPU) ``galorex.halo`` sends rotations,
quantisation and GEMMs to ``triton_kernels`` (fused ``hadamard_quantize_fp8`` /
``hadamard_quantize_int8`` for rotated operands). Under ``TRITON_INTERPRET=1`` the same dispatch
(``triton_kernels.select_backend``) picks the kernels for CPU tensors, and the interpreter runs
them: the layer's outputs and both gradients must match the torch path, and the kernels the design
says are used must be the ones called (counted by wrapping them). This is what catches wiring
mistakes (argument order, transposes, scale shapes) before a GPU run."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from triton_support import interpreted, needs_triton, poisoned_outputs

from galorex.halo import HaloLinear

pytestmark = [needs_triton, pytest.mark.usefixtures("single_thread")]


def _run(layer: HaloLinear, x: torch.Tensor, ey: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(ey)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


KERNELS = {
    "hadamard": ("hadamard_transform",),
    "quant": ("quantize_fp8", "quantize_int8", "hadamard_quantize_fp8", "hadamard_quantize_int8"),
    "gemm": ("fp8_gemm", "int8_gemm"),
}


def _count_kernel_calls(monkeypatch) -> Counter[str]:
    """Wrap the ``triton_kernels`` functions galorex.lowp calls so that each call is counted (a
    call that then took the torch twin would still count: the interpreter is on wherever this is
    used, so every call reaches its kernel)."""
    import importlib

    used: Counter[str] = Counter()
    for module, names in KERNELS.items():
        mod = importlib.import_module(f"triton_kernels.{module}")
        for name in names:
            monkeypatch.setattr(mod, name, _counting(getattr(mod, name), name, used))
    return used


def _counting(real, name: str, used: Counter[str]):
    def counted(*args, **kwargs):
        used[name] += 1
        return real(*args, **kwargs)

    return counted


CASES = [
    *[(level, fmt, "row", False, torch.float32) for level in (0, 1, 2) for fmt in ("fp8", "int8")],
    *[(level, fmt, "tensor", True, torch.float32) for level in (1, 2) for fmt in ("fp8", "int8")],
    # bf16: the GEMM kernels write bf16 (and add the bias) in their epilogue
    *[(level, "fp8", "row", False, torch.bfloat16) for level in (0, 2)],
    *[(level, "int8", "tensor", True, torch.bfloat16) for level in (0, 1)],
]
# Measured worst relative difference from the torch path: ≤ 2.6e-7 in float32 (the same 8-bit
# operands summed in another order; a float32 rotation could also tip a value across a rounding tie
# of the 8-bit grid, ~1e-3 here, which these seeds do not hit); ≤ 1e-9 in bf16, where one bf16
# rounding absorbs them (a one-ulp flip in one element would be ~1e-4). A wiring mistake, a lost
# bias or a double rounding is far outside.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("level,fmt,granularity,save_quantized,dtype", CASES)
def test_halo_linear_through_the_kernels_matches_the_torch_path(
    monkeypatch, level, fmt, granularity, save_quantized, dtype
):
    import galorex.lowp.gemm as gemm_mod

    torch.manual_seed(0)
    layer = HaloLinear(
        64, 32, level=level, fmt=fmt, granularity=granularity, save_quantized=save_quantized, dtype=dtype
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 64, generator=g)
    x[..., 5] *= 30.0  # an outlier channel, so rotation and scales matter
    x = x.to(dtype)
    ey = torch.randn(2, 24, 32, generator=g).to(dtype)
    reference = _run(layer, x, ey)

    used = _count_kernel_calls(monkeypatch)
    monkeypatch.setattr(gemm_mod, "_REFUSED", set())  # what earlier tests' fallbacks left there
    with interpreted(), poisoned_outputs():
        got = _run(layer, x, ey)

    gemm = "int8_gemm" if fmt == "int8" else "fp8_gemm"
    assert used[gemm] == 3  # Y, E_X and G
    assert not gemm_mod._REFUSED  # no GEMM went to the torch side and fell back unnoticed
    if level >= 1:  # X R_K and W R_K rotated and quantised in one kernel each
        assert used["hadamard_quantize_int8" if fmt == "int8" else "hadamard_quantize_fp8"] >= 2
    for what, a, b in zip(("Y", "E_X", "G", "bias grad"), got, reference):
        assert a.shape == b.shape and a.dtype == b.dtype == dtype and torch.isfinite(a).all(), what
        assert _rel(a, b) < TOLERANCE[dtype], (what, _rel(a, b))


# A few representative cases on the GPU: each new kernel specialisation is compiled and autotuned
# over all its configs there (a GEMM config takes ~1.5 s to compile), so all 14 would take minutes.
CUDA_CASES = [
    (1, "fp8", "row", False, torch.bfloat16),
    (2, "int8", "row", False, torch.bfloat16),
    (1, "int8", "tensor", True, torch.bfloat16),
    (0, "fp8", "row", False, torch.float32),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton path as it runs on a GPU)")
@pytest.mark.parametrize("level,fmt,granularity,save_quantized,dtype", CUDA_CASES)
def test_cuda_halo_linear_matches_the_torch_path(monkeypatch, level, fmt, granularity, save_quantized, dtype):
    """On a GPU: GALOREX_BACKEND=triton (the Triton kernels) against GALOREX_BACKEND=torch, same layer."""
    import galorex.lowp.gemm as gemm_mod
    from triton_kernels import BACKEND_ENV

    monkeypatch.setattr(gemm_mod, "_REFUSED", set())  # what earlier tests' fallbacks left there
    torch.manual_seed(0)
    kw = dict(level=level, fmt=fmt, granularity=granularity, save_quantized=save_quantized)
    layer = HaloLinear(256, 128, device="cuda", dtype=dtype, **kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 256, generator=g)
    x[..., 5] *= 30.0
    x, ey = x.to("cuda", dtype), torch.randn(4, 64, 128, generator=g).to("cuda", dtype)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    reference = _run(layer, x, ey)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    got = _run(layer, x, ey)
    # Nothing fell back to the torch side: this compares Triton against torch.
    assert not gemm_mod._REFUSED, gemm_mod._REFUSED
    for what, a, b in zip(("Y", "E_X", "G", "bias grad"), got, reference):
        assert a.dtype == b.dtype == dtype and torch.isfinite(a).all(), what
        # The torch path's _scaled_mm may only give row-scaled products in bf16 on some CUDA builds
        # (2^-9 relative per element), and a rotation tie can flip one 8-bit code; a wiring mistake
        # is O(1). This is a wiring check; the accuracy of each path is tested on the CPU.
        assert _rel(a, b) < 1e-2, (what, _rel(a, b))


@pytest.mark.parametrize("precision", ["fp8", "fp8-hadamard", "int8", "int8-hadamard"])
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_lowprec_projection_through_the_kernels_matches_the_torch_path(monkeypatch, precision, side):
    import galorex.lowp.gemm as gemm_mod
    from galorex.lowp.projection import project_lowprec

    g = torch.Generator().manual_seed(2)
    grad = torch.randn(64, 96, generator=g)
    grad[:, 3] *= 40.0
    left = torch.linalg.qr(torch.randn(64, 16, generator=g))[0]
    right = torch.linalg.qr(torch.randn(96, 16, generator=g))[0]
    bases = {"left": [left], "right": [right], "full": [left, right]}[side]
    reference = project_lowprec(grad, bases, side, precision)
    used = _count_kernel_calls(monkeypatch)
    monkeypatch.setattr(gemm_mod, "_REFUSED", set())
    with interpreted(), poisoned_outputs():
        got = project_lowprec(grad, bases, side, precision)
    gemms = 2 if side == "full" else 1
    assert used["int8_gemm" if precision.startswith("int8") else "fp8_gemm"] == gemms
    if precision.endswith("-hadamard"):
        assert used["hadamard_quantize_int8" if precision.startswith("int8") else "hadamard_quantize_fp8"] == 2 * gemms
    assert _rel(got, reference) < 1e-5, _rel(got, reference)


def test_blocks_and_dtypes_the_kernels_do_not_take_use_the_torch_path(monkeypatch):
    """Blocks past 16384 (one Triton program's registers) and float64 go to the torch rotation
    instead of raising on CUDA."""
    from galorex.halo import hadamard_transform
    from galorex.lowp.hadamard import fwht_kron
    from galorex.lowp.quant import rotate_quantize

    used = _count_kernel_calls(monkeypatch)
    wide = torch.randn(2, 32768, generator=torch.Generator().manual_seed(3))
    with interpreted():
        assert torch.equal(hadamard_transform(wide), fwht_kron(wide))
        x64 = wide[:, :64].double()
        assert torch.equal(hadamard_transform(x64), fwht_kron(x64))
        q, s = rotate_quantize(wide, 32768, None, "int8", "row")
    assert q.shape == wide.shape and s.shape == (2, 1)
    assert "hadamard_quantize_int8" not in used
