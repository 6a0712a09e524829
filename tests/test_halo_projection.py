"""The ``proj_precision`` group key: GaLore's projection GEMM on quantised operands (bf16: in
test_bf16_projection.py)."""

from __future__ import annotations

import pytest
import torch

import galorex
from galorex import projection as proj
from galorex.halo import block_hadamard_matrix, default_block_size, format_max, grid_step
from galorex.lowp.projection import QUANTISED_PRECISIONS, project_lowprec

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_pipeline_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 agreement with the float64 emulation: 1e-5 relative in norm, and no element off by more
    than 1e-3 of the largest. (An element whose fp32 value sits on a rounding boundary of the
    format may round to the neighbouring grid point in one of the two: that is one grid step in
    one element, well inside these bounds; a wrong rotation, scale or format is far outside.)"""
    actual, expected = actual.double(), expected.double()
    rel = float((actual - expected).norm() / expected.norm().clamp_min(1e-300))
    assert rel < 1e-5, rel
    worst = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))
    assert worst < 1e-3, worst


def _q64_rows(x: torch.Tensor, fmt: str) -> torch.Tensor:
    qmax = format_max(fmt)
    amax = x.abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = (x / s).clamp(-qmax, qmax)
    step = grid_step(y, fmt).double()
    return (torch.round(y / step) * step).clamp(-qmax, qmax) * s


def _emulate64(g: torch.Tensor, p: torch.Tensor, side: str, precision: str) -> torch.Tensor:
    fmt = "int8" if precision.startswith("int8") else "e4m3"
    a, b = (p.T, g.T) if side == "left" else (g, p.T)  # the product is a bᵀ, inner dim last
    if precision.endswith("-hadamard"):
        r = block_hadamard_matrix(a.shape[1], default_block_size(a.shape[1]), dtype=torch.float64)
        a, b = a @ r, b @ r
    return _q64_rows(a.contiguous(), fmt) @ _q64_rows(b.contiguous(), fmt).T


def _gradient(outliers: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(128, 256, generator=g)
    if outliers:
        grad[torch.randperm(128, generator=g)[:3]] *= 50.0
    return grad


@pytest.mark.parametrize("precision", QUANTISED_PRECISIONS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_lowprec_projection_matches_float64_emulation(precision, side):
    grad = _gradient(True)
    bases = proj.compute_bases(grad, 16, side)
    low = project_lowprec(grad, bases, side, precision)
    ref = _emulate64(grad.double(), bases[0].double(), side, precision)
    assert_pipeline_close(low, ref)
    exact = proj.project(grad.double(), [bases[0].double()], side)
    # Measured: FP8 ≤ 0.025, INT8 ≤ 0.009 relative error (Frobenius) on these gradients.
    bound = 0.05 if precision.startswith("fp8") else 0.02
    assert float((low.double() - exact).norm() / exact.norm()) < bound


def test_hadamard_pays_for_int8_projection_on_outlier_rows():
    grad = _gradient(True)
    bases = proj.compute_bases(grad, 16, "left")
    exact = proj.project(grad, bases, "left")
    err = {
        p: float((project_lowprec(grad, bases, "left", p) - exact).norm() / exact.norm())
        for p in ("int8", "int8-hadamard")
    }
    assert err["int8-hadamard"] * 2 <= err["int8"], err  # measured 0.0084 vs 0.0026


def test_full_side_and_dtype():
    grad = _gradient(False).bfloat16()
    bases = [b.float() for b in proj.compute_bases(grad.float(), 8, "full")]
    low = project_lowprec(grad, bases, "full", "fp8-hadamard")
    assert low.dtype == torch.bfloat16 and low.shape == (8, 8)
    exact = proj.project(grad.float(), bases, "full")
    assert float((low.float() - exact).norm() / exact.norm()) < 0.1


def test_galore_with_proj_precision_trains_like_full_precision():
    results = {}
    for precision in (None, "int8-hadamard", "fp8"):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(64, 128) * 0.1)
        target = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
        opt = galorex.GaLoreAdamW(
            [{"params": [w], "rank": 16, "update_proj_gap": 20, "scale": 1.0, "proj_precision": precision}], lr=3e-2
        )
        for _ in range(60):
            opt.zero_grad()
            loss = (w - target).square().mean()
            loss.backward()
            opt.step()
        results[precision] = loss.item()
        assert all(isinstance(v, torch.Tensor) for v in opt.state[w].values())
    assert results["int8-hadamard"] < 1.05 * results[None] and results["fp8"] < 1.05 * results[None], results


def test_proj_precision_bad_value():
    w = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="'proj_precision' must be None or one of"):
        galorex.GaLoreAdamW([{"params": [w], "rank": 2, "proj_precision": "int4"}])
    with pytest.raises(ValueError, match="proj_precision"):
        project_lowprec(torch.zeros(4, 4), [torch.zeros(4, 2)], "left", "fp16")
