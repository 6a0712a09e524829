"""project and fused_galore_adam_step: the twin against torch.optim.AdamW and galorex's own step maths
in float64, the kernels against the twin run in float64."""

from __future__ import annotations

import math

import pytest
import torch
from triton_support import (
    assert_interpreter_did_not_leak,
    compile_for_hopper,
    interpreted,
    needs_triton,
    run_kernel,
)

from galorex.optim.galore import adam_directions
from triton_kernels import (
    fused_galore_adam_step,
    fused_galore_adam_step_reference,
    project,
    project_reference,
)

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, scale=0.25)
# (side, m, n, r): odd sizes, so that every tile of the 32×32×16 interpreter config is partly masked.
CASES = [("left", 37, 53, 9), ("right", 53, 37, 9), ("left", 40, 70, 20)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _basis(rows: int, r: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, r, generator=_gen(seed), dtype=torch.float64))[0].to(dtype)


def _problem(side, m, n, r, seed, wdtype=torch.float32):
    g = _gen(seed)
    weight = torch.randn(m, n, generator=g).to(wdtype)
    basis = _basis(m if side == "left" else n, r, seed + 1)
    low = (r, n) if side == "left" else (m, r)
    grads = [torch.randn(low, generator=g) for _ in range(3)]
    return weight, basis, grads


# --- the twin -------------------------------------------------------------------------------------


def test_twin_with_identity_basis_is_torch_adamw():
    # P = I (r = m, side left) and scale 1: the GaLore step is AdamW's. Three steps in float64
    # against torch.optim.AdamW (single-tensor path).
    g = _gen(0)
    m, n = 6, 5
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    grads = [torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(3)]
    param = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    w = w0.clone()
    ea, es = torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64)
    eye = torch.eye(m, dtype=torch.float64)
    for t, grad in enumerate(grads, start=1):
        param.grad = grad.clone()
        opt.step()
        fused_galore_adam_step_reference(w, grad, ea, es, eye, "left", step=t, **{**HP, "scale": 1.0})
    torch.testing.assert_close(w, param.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ea, opt.state[param]["exp_avg"], rtol=1e-14, atol=0)
    torch.testing.assert_close(es, opt.state[param]["exp_avg_sq"], rtol=1e-14, atol=0)


@pytest.mark.parametrize(("side", "m", "n", "r"), CASES[:2])
def test_twin_is_galorex_step_maths(side, m, n, r):
    # The maths galorex's GaLoreAdamW runs (adam_directions, then W ← (1−lr·wd)W − lr·scale·back(D)).
    weight, basis, grads = _problem(side, m, n, r, 1, torch.float64)
    basis = basis.double()
    w_ref = weight.clone()
    low = grads[0].shape
    ea, es = torch.zeros(low, dtype=torch.float64), torch.zeros(low, dtype=torch.float64)
    ea2, es2 = ea.clone(), es.clone()
    for t, grad in enumerate(grads, start=1):
        grad = grad.double()
        fused_galore_adam_step_reference(weight, grad, ea, es, basis, side, step=t, **HP)
        (d,) = adam_directions([grad], [ea2], [es2], [t], HP["beta1"], HP["beta2"], HP["eps"])
        update = basis @ d if side == "left" else d @ basis.t()
        w_ref.mul_(1 - HP["lr"] * HP["weight_decay"]).add_(update, alpha=-HP["lr"] * HP["scale"])
    torch.testing.assert_close(weight, w_ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ea, ea2, rtol=0, atol=0)


def test_project_twin_definition():
    g = _gen(2)
    G = torch.randn(7, 5, generator=g, dtype=torch.float64)
    P = _basis(7, 3, 3, torch.float64)
    torch.testing.assert_close(project_reference(G, P, "left"), P.t() @ G)
    Q = _basis(5, 2, 4, torch.float64)
    torch.testing.assert_close(project_reference(G, Q, "right"), G @ Q)


# --- the kernels ----------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(("side", "m", "n", "r"), CASES)
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
def test_project_kernel(side, m, n, r, gdtype):
    G = torch.randn(m, n, generator=_gen(5)).to(gdtype)
    P = _basis(m if side == "left" else n, r, 6)
    out = run_kernel(project, G, P, side)
    exact = project_reference(G.double(), P.double(), side)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    k = m if side == "left" else n
    # fp32 accumulation of k products (TF32 would need ~2^-11 on a GPU; the interpreter is fp32).
    torch.testing.assert_close(out.double(), exact, rtol=k * 2.0**-24, atol=k * 2.0**-24)


@needs_triton
def test_project_kernel_strided_inputs():
    G = torch.randn(53, 37, generator=_gen(7)).t()  # (37, 53), not contiguous
    P = _basis(53, 8, 8).t().contiguous().t()  # column-major basis
    out = run_kernel(project, G, P, "right")
    torch.testing.assert_close(out.double(), project_reference(G.double(), P.double(), "right"), rtol=1e-5, atol=1e-5)
    out = run_kernel(project, G, _basis(37, 8, 9), "left")
    torch.testing.assert_close(
        out.double(), project_reference(G.double(), _basis(37, 8, 9).double(), "left"), rtol=1e-5, atol=1e-5
    )


def _run_three_steps(step_fn, weight, basis, grads, side, work=None):
    low = grads[0].shape
    dtype = torch.float32 if work is None else work
    ea, es = torch.zeros(low, dtype=dtype), torch.zeros(low, dtype=dtype)
    for t, grad in enumerate(grads, start=1):
        step_fn(weight, grad.to(dtype), ea, es, basis, side, step=t, **HP)
    return weight, ea, es


@needs_triton
@pytest.mark.parametrize(("side", "m", "n", "r"), CASES)
def test_fused_step_fp32_weight_against_float64_twin(side, m, n, r):
    weight, basis, grads = _problem(side, m, n, r, 10)
    w64, ea64, es64 = _run_three_steps(
        fused_galore_adam_step_reference, weight.double(), basis.double(), grads, side, torch.float64
    )
    with interpreted():
        w, ea, es = _run_three_steps(fused_galore_adam_step, weight.clone(), basis, grads, side)
    # Every entry of W moves (decay ≠ 1 and a dense update), so a tile the kernel skipped would show.
    assert (w != weight).all()
    torch.testing.assert_close(ea.double(), ea64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(es.double(), es64, rtol=1e-6, atol=1e-9)
    # The update is lr·scale·|P·D| ≤ 2.5e-3·√r per entry; fp32 keeps it to a few ulps of |W|.
    torch.testing.assert_close(w.double(), w64, rtol=2e-6, atol=2e-6)


@needs_triton
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_fused_step_low_precision_weight(wdtype):
    side, m, n, r = CASES[0]
    weight, basis, grads = _problem(side, m, n, r, 11, wdtype)
    w_ref, _, _ = _run_three_steps(fused_galore_adam_step_reference, weight.clone(), basis, grads, side)
    with interpreted():
        w, _, _ = _run_three_steps(fused_galore_adam_step, weight.clone(), basis, grads, side)
    assert w.dtype == wdtype
    # Both round W once per step from the same fp32 value up to fp32 noise: at most one ulp apart.
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[wdtype]
    assert ((w.double() - w_ref.double()).abs() <= ulp * w_ref.double().abs() + 1e-6).all()


@needs_triton
def test_fused_step_strided_weight_and_bf16_basis():
    # W given as a transposed view of its storage (a module holding Wᵀ), basis in bf16.
    side, m, n, r = CASES[1]
    weight, basis, grads = _problem(side, m, n, r, 12)
    storage = weight.t().contiguous()
    w_view = storage.t()
    basis16 = basis.to(torch.bfloat16)
    w_ref, _, _ = _run_three_steps(fused_galore_adam_step_reference, weight.clone(), basis16, grads, side)
    with interpreted():
        _run_three_steps(fused_galore_adam_step, w_view, basis16, grads, side)
    torch.testing.assert_close(w_view, w_ref, rtol=2e-6, atol=2e-6)


@needs_triton
def test_fused_step_needs_contiguous_fp32_moments():
    side, m, n, r = CASES[0]
    weight, basis, grads = _problem(side, m, n, r, 13)
    ea = torch.zeros(n, r).t()
    es = torch.zeros(r, n)
    with interpreted(), pytest.raises(ValueError, match="exp_avg must be contiguous"):
        fused_galore_adam_step(weight, grads[0], ea, es, basis, side, step=1, **HP)
    with interpreted(), pytest.raises(TypeError, match="exp_avg_sq must be float32"):
        fused_galore_adam_step(weight, grads[0], es.clone(), es.double(), basis, side, step=1, **HP)


def _bad(**over):
    side, m, n, r = "left", 6, 5, 2
    args = dict(
        weight=torch.zeros(m, n),
        low_grad=torch.zeros(r, n),
        exp_avg=torch.zeros(r, n),
        exp_avg_sq=torch.zeros(r, n),
        basis=torch.zeros(m, r),
        side=side,
    )
    kw = dict(step=1, **HP)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return lambda: fused_galore_adam_step(**args, **kw)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (_bad(side="up"), ValueError, "side must be"),
        (_bad(basis=torch.zeros(5, 2)), ValueError, r"basis must be \(6, 2\)"),
        (_bad(exp_avg=torch.zeros(5, 2)), ValueError, r"exp_avg must be \(2, 5\)"),
        (_bad(step=0), ValueError, "step must be an int >= 1"),
        (_bad(step=1.0), ValueError, "step must be an int"),
        (_bad(beta2=1.0), ValueError, "beta2 must be in"),
        (_bad(lr=math.nan), TypeError, "lr must be a finite"),
        (_bad(eps=-1.0), ValueError, "eps must be >= 0"),
        (lambda: project(torch.zeros(4, 3), torch.zeros(3, 2), "left"), ValueError, "P with 4 rows"),
    ],
)
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


@needs_triton
@pytest.mark.parametrize("left", [True, False])
def test_fused_step_compiles_to_wgmma_on_hopper(left):
    # 3xTF32 (torch's default "highest" fp32 matmul precision) still runs on the tensor cores.
    import triton_kernels.lowrank as lowrank

    ptx = compile_for_hopper(
        lowrank._APPLY,
        {
            "w_ptr": "*fp32",
            "p_ptr": "*fp32",
            "m_ptr": "*fp32",
            "v_ptr": "*fp32",
            "M": "i32",
            "N": "i32",
            "R": "i32",
            "stride_wm": "i32",
            "stride_p0": "i32",
            "stride_lr0": "i32",
            "decay": "fp32",
            "alpha": "fp32",
            "bias1": "fp32",
            "bias2_sqrt": "fp32",
            "eps": "fp32",
        },
        {
            "stride_wn": 1,
            "stride_p1": 1,
            "LEFT": left,
            "OUT_BF16": False,
            "PRECISION": "tf32x3",
            "BM": 128,
            "BN": 128,
            "BK": 32,
            "GROUP_M": 8,
        },
        num_warps=8,
        aligned=("w_ptr", "p_ptr", "m_ptr", "v_ptr", "stride_wm", "stride_p0", "stride_lr0"),
    )
    assert "wgmma.mma_async" in ptx
    assert "st.local" not in ptx


def test_interpreter_did_not_leak(monkeypatch):
    assert_interpreter_did_not_leak(monkeypatch)
