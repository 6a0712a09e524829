"""GaLoreAdamW's fused Triton step (``triton_kernels.fused_galore_adam_step``) against the shared
torch path: same trajectory to fp32 rounding, across refreshes, both projection sides, every
moment policy. Run on the CPU under the Triton interpreter (switched on per test only)."""

from __future__ import annotations

import pytest
import torch
from triton_support import assert_interpreter_did_not_leak, interpreted, needs_triton

from galorex import GaLoreAdamW
from galorex.optim.plan import Work

pytestmark = needs_triton


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 24x40 and 40x24 weights: the projection goes on both sides (std picks the smaller one).
    return torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Tanh(), torch.nn.Linear(24, 40))


class _torch_backend:
    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        self.mp.setenv("GALOREX_BACKEND", "torch")

    def __exit__(self, *exc):
        self.mp.undo()


EPS32 = torch.finfo(torch.float32).eps


def _one_step_bounds(opt: GaLoreAdamW, before: dict, after: dict, p: torch.Tensor, grad_low: torch.Tensor):
    """Elementwise bounds on how far two correct float32 implementations of one step can differ.

    The update is W' = (1 − lr·wd)·W − lr·scale·back(D) with back(D) = P D (left) or D Pᵀ (right), a
    sum of r products: its rounding is at most γ_r·|P||D| (γ_r = r·eps/(1 − r·eps), Higham's bound),
    plus a few roundings in D's elementwise arithmetic, plus one rounding of W'. The moments are a
    couple of multiply-adds each: a few roundings of |β·m| + |(1 − β)·g|."""
    group = opt.param_groups[1]
    beta1, beta2 = group["betas"]
    lr, scale, eps = group["lr"], group["scale"], group["eps"]
    basis, m, v, t = after["basis"], after["exp_avg"], after["exp_avg_sq"], float(after["step"])
    d = (m / (1 - beta1**t)) / (v.sqrt() / (1 - beta2**t) ** 0.5 + eps)
    r = basis.shape[1]
    gamma = r * EPS32 / (1 - r * EPS32)
    a, b = (basis.abs(), d.abs()) if d.shape[0] == basis.shape[1] else (d.abs(), basis.abs().T)
    w_tol = (gamma + 8 * EPS32) * lr * scale * (a @ b) + 2 * EPS32 * p.detach().abs()
    m_prev, v_prev = before["exp_avg"], before["exp_avg_sq"]
    m_tol = 4 * EPS32 * (beta1 * m_prev.abs() + (1 - beta1) * grad_low.abs())
    v_tol = 4 * EPS32 * (beta2 * v_prev.abs() + (1 - beta2) * grad_low.square())
    return w_tol, {"exp_avg": m_tol, "exp_avg_sq": v_tol}


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    excess = ((actual - expected).abs() - tol).max().item()
    assert excess <= 0, f"{what}: a difference exceeds its rounding bound by {excess:.3e}"


@pytest.mark.parametrize("policy", ["keep", "reset", "reproject"])
def test_fused_step_follows_the_torch_path(policy, monkeypatch):
    """Step by step from the same weights, state and gradient, the fused step lands within the
    rounding bound of one float32 step of the shared path (``_one_step_bounds``); then both continue
    from the shared path's result. Comparing whole trajectories would instead compare two runs whose
    refreshes take SVDs of gradients that differ by rounding, and the bases differ by that rounding
    over the gap between the r-th and (r+1)-th singular values (Davis–Kahan): a machine-dependent
    amount that no fixed tolerance bounds."""
    models = [_model(0), _model(0)]
    opts = []
    for model in models:
        weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
        biases = [m.bias for m in model if isinstance(m, torch.nn.Linear)]
        opts.append(
            GaLoreAdamW(
                [
                    {"params": biases},
                    {"params": weights, "rank": 8, "update_proj_gap": 3, "scale": 0.5, "moment_policy": policy},
                ],
                lr=2e-2,
                weight_decay=0.1,
            )
        )
    (plain_model, fused_model), (plain, fused) = models, opts
    used = []
    original = fused._fused_path_applies

    def spy(group, items):
        result = original(group, items)
        used.append(result)
        return result

    fused._fused_path_applies = spy
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        fused_model.load_state_dict(plain_model.state_dict())
        fused.load_state_dict(plain.state_dict())
        x = torch.randn(16, 40, generator=g)
        for model, opt in zip(models, opts):
            opt.zero_grad(set_to_none=True)
            ((model(x) - x.flip(1)) ** 2).mean().backward()
        weights = [m.weight for m in plain_model if isinstance(m, torch.nn.Linear)]
        before = {p: {k: v.clone() for k, v in plain.state[p].items()} for p in weights if p in plain.state}
        with _torch_backend():
            plain.step()
        with interpreted():
            fused.step()
        for p, q in zip(plain_model.parameters(), fused_model.parameters()):
            if p.dim() < 2:
                torch.testing.assert_close(q, p, rtol=0, atol=0)  # the same torch AdamW code
                continue
            after = plain.state[p]
            side = "left" if after["basis"].shape[0] == p.shape[0] else "right"
            grad_low = after["basis"].T @ p.grad if side == "left" else p.grad @ after["basis"]
            prev = before.get(p, {"exp_avg": torch.zeros_like(grad_low), "exp_avg_sq": torch.zeros_like(grad_low)})
            if policy == "reset" and float(after["proj_step"]) == float(after["step"]) - 1:
                prev = {k: torch.zeros_like(grad_low) for k in ("exp_avg", "exp_avg_sq")}
            w_tol, state_tol = _one_step_bounds(plain, prev, after, p, grad_low)
            _assert_within(q, p, w_tol, "weight")
            for key, tol in state_tol.items():
                _assert_within(fused.state[q][key], after[key], tol, key)
            assert torch.equal(fused.state[q]["basis"], after["basis"])
    assert used and all(used), "the fused Triton path was not taken"
    assert_interpreter_did_not_leak(monkeypatch)


def test_groups_the_fused_step_cannot_serve_take_the_shared_path(monkeypatch):
    model = _model(0)
    opt = GaLoreAdamW([{"params": [model[0].weight], "rank": 4, "optim_bits": 8}], lr=1e-2)
    model[0].weight.grad = torch.randn_like(model[0].weight)
    with interpreted():
        opt.step()  # 8-bit moments: must not reach the fp32-only kernel
        item = Work(model[0].weight, "left", model[0].weight.grad, opt.state[model[0].weight])
        assert not opt._fused_path_applies(opt.param_groups[0], [item])
    assert_interpreter_did_not_leak(monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused kernel compiled for the GPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_on_cuda_follows_the_torch_path(dtype, monkeypatch):
    def run(backend: str) -> list[torch.Tensor]:
        monkeypatch.setenv("GALOREX_BACKEND", backend)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.Tanh(), torch.nn.Linear(256, 512))
        model = model.to(device="cuda", dtype=dtype)
        weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
        biases = [m.bias for m in model if isinstance(m, torch.nn.Linear)]
        opt = GaLoreAdamW(
            [{"params": biases}, {"params": weights, "rank": 64, "update_proj_gap": 4, "scale": 0.25}],
            lr=1e-2,
            weight_decay=0.1,
        )
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(9):
            x = torch.randn(64, 512, generator=g, device="cuda", dtype=dtype)
            opt.zero_grad(set_to_none=True)
            ((model(x).float() - x.flip(1).float()) ** 2).mean().backward()
            opt.step()
        return [p.detach().float().cpu() for p in model.parameters()]

    fused, plain = run("triton"), run("torch")
    tol = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-3)}[dtype]
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1])
