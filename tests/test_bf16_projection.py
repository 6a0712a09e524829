"""``proj_precision="bf16"``: the projection, the back-projection and the randomized refresh's
GEMMs on bf16 operands with float32 accumulation, the state float32.

Every GEMM is held to float64 within the bound of ``galorex.projection.matmul_bf16``:
|C − AB| ≤ (2u + u² + γ_K)·|A||B| + u·|C| elementwise, u = 2⁻⁸ (bf16's unit roundoff: both operands
rounded), γ_K = K·2⁻²⁴/(1 − K·2⁻²⁴) (float32 accumulation over the inner dimension K), the last term
where the GEMM is native (its result rounded to bf16). Both the native GEMM (torch's bf16 matmul)
and the emulation (bf16-rounded operands multiplied in float32) are tested on every machine.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import galorex
from galorex import projection as proj
from galorex.lowp.projection import project_lowprec, projection_bases

pytestmark = pytest.mark.usefixtures("single_thread")

U_BF16 = 2.0**-8
U_FP32 = 2.0**-24


def gemm_constant(k: int, native: bool) -> float:
    """The relative bound c of one bf16 GEMM with inner dimension k: |C − AB| ≤ c·|A||B|
    (the output rounding u·|C| ≤ u·(1 + c₀)·|A||B| folded in where native)."""
    gamma = k * U_FP32 / (1 - k * U_FP32)
    c0 = 2 * U_BF16 + U_BF16**2 + gamma
    return c0 + U_BF16 * (1 + c0) if native else c0


def assert_within(actual: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    err = (actual.double() - exact).abs()
    worst = float((err / bound.clamp_min(1e-300)).max())
    assert worst <= 1.0, f"an entry is off by {worst:.3g}x its bound"


def _matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Entries over four orders of magnitude, so the bound is tested beyond one exponent.
    return torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, cols).roll(seed % cols)


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
@given(m=st.integers(1, 24), k=st.integers(1, 300), n=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_matmul_bf16_is_within_its_bound_of_float64(native, m, k, n, seed):
    a, b = _matrix(m, k, seed), _matrix(k, n, seed + 1)
    out = proj.matmul_bf16(a, b, native=native)
    assert out.dtype == torch.float32
    exact = a.double() @ b.double()
    # float64's own product is off by γ_K in float64 at most: negligible, but added for rigour.
    scale = a.double().abs() @ b.double().abs()
    assert_within(out, exact, (gemm_constant(k, native) + 2 * k * 2.0**-53) * scale)


def test_matmul_bf16_is_not_float32():
    """The bound is not vacuous: bf16 operands are visibly coarser than float32 ones."""
    a, b = _matrix(16, 256, 1), _matrix(256, 16, 2)
    exact = a.double() @ b.double()
    err = float((proj.matmul_bf16(a, b, native=False).double() - exact).norm() / exact.norm())
    err32 = float(((a @ b).double() - exact).norm() / exact.norm())
    assert err > 100 * err32 and err < 4 * U_BF16


def _bases(m: int, n: int, rank: int, side: str, seed: int) -> list[torch.Tensor]:
    return proj.compute_bases(_matrix(m, n, seed), rank, side)


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_projection_and_back_projection_on_bf16_bases(side, native, monkeypatch):
    monkeypatch.setattr(proj, "bf16_gemm_is_native", lambda device: native)
    m, n, rank = 40, 56, 6
    g = _matrix(m, n, 3)
    bases = _bases(m, n, rank, side, 4)
    low_bases = projection_bases(bases, "bf16")
    assert all(b.dtype == torch.bfloat16 for b in low_bases)
    b64 = [b.double() for b in bases]
    absb = [b.abs() for b in b64]

    # R = project(G): one GEMM over m (left) or n (right), two for full.
    low = proj.project(g, low_bases, side)
    assert low.dtype == torch.float32
    exact = proj.project(g.double(), b64, side)
    scale = proj.project(g.double().abs(), absb, side)
    if side == "full":
        c1, c2 = gemm_constant(m, native), gemm_constant(n, native)
        constant = c1 + c2 * (1 + c1)
    else:
        constant = gemm_constant(m if side == "left" else n, native)
    assert_within(low, exact, constant * scale)
    assert torch.equal(project_lowprec(g, bases, side, "bf16"), low)  # the loop's entry point

    # W ← beta·W + alpha·project_back(D): the GEMM over r (two for full), then float32's
    # rounding of the scaled sum (one addmm, or a multiply and an add).
    d = _matrix(*low.shape, 5)
    w = _matrix(m, n, 6)
    beta, alpha = 0.99, -0.3
    out = proj.add_projected_back_(w.clone(), d, low_bases, side, alpha=alpha, beta=beta)
    exact = beta * w.double() + alpha * proj.project_back(d.double(), b64, side)
    back = proj.project_back(d.double().abs(), absb, side)
    r = low.shape[0] if side == "left" else low.shape[-1]
    if side == "full":
        c1 = gemm_constant(r, native)
        constant = c1 + gemm_constant(r, native) * (1 + c1)
    else:
        constant = gemm_constant(r, native)
    bound = abs(alpha) * constant * back + 3 * U_FP32 * (beta * w.double().abs() + abs(alpha) * back)
    assert_within(out, exact, bound)
    assert_within(proj.project_back(d, low_bases, side), proj.project_back(d.double(), b64, side), constant * back)


def _spectrum_matrix(m: int, n: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An (m×n) float32 matrix with singular values 10…3 on the top ``rank`` and 0.5…0.01 below."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    sigma = torch.cat(
        [torch.linspace(10, 3, rank), torch.logspace(torch.log10(torch.tensor(0.5)), -2, min(m, n) - rank)]
    )
    return ((u * sigma.double()) @ v.T).float(), sigma.double()


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_refresh_in_bf16_is_orthonormal_and_captures_the_energy(side, native, monkeypatch):
    """The basis is re-orthonormalised in float32: ‖QᵀQ − I‖ within Householder QR's float32
    bound (Higham, Accuracy and Stability, Thm 19.4: m·k^{3/2}·u₃₂ with constant 1). Its span is the
    dominant subspace of G perturbed by E, ‖E‖_F ≤ (2u + γ)·‖G‖_F (G rounded once, every GEMM's
    other operand rounded once); Wedin's theorem gives sin θ ≤ 2‖E‖/δ (δ: the gap at r), and the
    captured energy fraction drops by at most 2 sin θ from float32's."""
    monkeypatch.setattr(proj, "bf16_gemm_is_native", lambda device: native)
    m, n, rank = 64, 48, 6
    g, sigma = _spectrum_matrix(m, n, rank, 11)
    results = {}
    for bf16 in (False, True):
        generator = torch.Generator().manual_seed(5)
        (basis,) = proj.compute_bases(
            g, rank, side, "randomized", oversample=4, power_iters=2, generator=generator, bf16=bf16
        )
        assert basis.dtype == torch.float32
        rows, k = basis.shape
        ortho = float((basis.double().T @ basis.double() - torch.eye(k, dtype=torch.float64)).norm())
        assert ortho <= rows * k**1.5 * U_FP32, ortho
        results[bf16] = proj.captured_energy(g, [basis], side)
    delta = float(sigma[rank - 1] - sigma[rank])
    e = (2 * U_BF16 + max(m, n) * U_FP32) * float(torch.linalg.norm(g.double()))
    assert results[False] - results[True] <= 2 * (2 * e / delta)
    assert results[True] > 0.99  # and in practice it is float32's (measured in docs/benchmarks.md)


def test_bf16_is_refused_for_float64_weights():
    w = nn.Parameter(torch.zeros(8, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'proj_precision' 'bf16' would round .*float64.*use proj_precision=None"):
        galorex.GaLoreAdamW([{"params": [w], "rank": 2, "proj_precision": "bf16"}])
    galorex.GaLoreAdamW([{"params": [w], "rank": 2}])  # float64 without bf16 is fine
    bias = nn.Parameter(torch.zeros(8, dtype=torch.float64))  # 1-D: never projected, accepted
    galorex.GaLoreAdamW([{"params": [bias], "rank": 2, "proj_precision": "bf16"}])


def _regression(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 32))


def _groups(model, precision, **extra):
    return [
        {
            "params": [model[0].weight, model[2].weight],
            "rank": 8,
            "update_proj_gap": 5,
            "proj_precision": precision,
            **extra,
        },
        {"params": [model[0].bias, model[2].bias]},
    ]


def _train(model, opt, steps: int, seed: int = 1) -> float:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 48, generator=g), torch.randn(64, 32, generator=g)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_galore_with_bf16_projections_trains_like_float32_and_keeps_float32_state(method):
    losses = {}
    for precision in (None, "bf16"):
        model = _regression()
        opt = galorex.GaLoreAdamW(_groups(model, precision, refresh_method=method), lr=1e-2)
        losses[precision] = _train(model, opt, 30)
        for p in opt.param_groups[0]["params"]:
            assert {k: v.dtype for k, v in opt.state[p].items() if v.is_floating_point()} == dict.fromkeys(
                ("step", "proj_step", "basis", "exp_avg", "exp_avg_sq"), torch.float32
            )
    # 30 steps of a 64×48 and a 32×64 least-squares fit: bf16 operands perturb each update by
    # about u relative; the loss after them is float32's to within a few u.
    assert abs(losses["bf16"] - losses[None]) <= 8 * U_BF16 * losses[None], losses


def test_bf16_projections_resume_bit_for_bit():
    model = _regression()
    opt = galorex.GaLoreAdamW(_groups(model, "bf16", refresh_schedule="staggered"), lr=1e-2)
    _train(model, opt, 4)
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buffer)
    buffer.seek(0)
    weights, state = torch.load(buffer, weights_only=True)
    twin = _regression(seed=1)
    twin.load_state_dict(weights)
    twin_opt = galorex.GaLoreAdamW(_groups(twin, "bf16", refresh_schedule="staggered"), lr=1e-2)
    twin_opt.load_state_dict(state)
    _train(model, opt, 6, seed=2)
    _train(twin, twin_opt, 6, seed=2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_bf16_projections_in_layerwise_mode_and_for_generated_bases():
    runs = []
    for layerwise in (False, True):
        model = _regression()
        opt = galorex.GaLoreAdamW(_groups(model, "bf16"), lr=1e-2, layerwise=layerwise)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 48, generator=g), torch.randn(64, 32, generator=g)
        for _ in range(7):
            if not layerwise:
                opt.zero_grad(set_to_none=True)
            (model(x) - y).square().mean().backward()
            opt.step()
        runs.append(model)
    assert all(torch.equal(p, q) for p, q in zip(*(r.parameters() for r in runs)))
    model = _regression()
    apollo = galorex.ApolloAdamW(_groups(model, "bf16", proj="random"), lr=1e-2)
    before = _train(model, apollo, 1)
    assert _train(model, apollo, 20) < before


def test_bf16_projections_compile_to_one_graph_without_breaks():
    """compile=True: the bf16 GEMMs trace (the CPU's bf16 capability is read once, at import);
    aot_eager runs the same operators as eager, so the two runs agree exactly."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        runs = []
        for compile in (False, {"backend": "aot_eager"}):
            model = _regression()
            opt = galorex.GaLoreAdamW(_groups(model, "bf16"), lr=1e-2, compile=compile)
            _train(model, opt, 6)
            runs.append(model)
        assert not torch._dynamo.utils.counters["graph_break"]
        assert all(torch.equal(p, q) for p, q in zip(*(r.parameters() for r in runs)))
    finally:
        torch._dynamo.reset()
