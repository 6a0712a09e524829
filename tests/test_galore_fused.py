"""GaLoreAdamW's fused Triton step (``triton_kernels.fused_galore_adam_step``) against the shared
torch path: same trajectory to fp32 rounding, across refreshes, both projection sides, every
moment policy. Run on the CPU under the Triton interpreter (switched on per test only)."""

from __future__ import annotations

import pytest
import torch
from triton_support import assert_interpreter_did_not_leak, interpreted, needs_triton

from galorex import GaLoreAdamW

pytestmark = needs_triton


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 24x40 and 40x24 weights: the projection goes on both sides (std picks the smaller one).
    return torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Tanh(), torch.nn.Linear(24, 40))


def _run(backend: str, policy: str, steps: int = 7) -> tuple[list[torch.Tensor], GaLoreAdamW, list[bool]]:
    model = _model(0)
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, torch.nn.Linear)]
    opt = GaLoreAdamW(
        [
            {"params": biases},
            {"params": weights, "rank": 8, "update_proj_gap": 3, "scale": 0.5, "moment_policy": policy},
        ],
        lr=2e-2,
        weight_decay=0.1,
    )
    used = []
    original = opt._fused_path_applies

    def spy(group, items):
        result = original(group, items)
        used.append(result)
        return result

    opt._fused_path_applies = spy
    g = torch.Generator().manual_seed(1)
    ctx = interpreted() if backend == "triton" else _torch_backend()
    with ctx:
        for _ in range(steps):
            x = torch.randn(16, 40, generator=g)
            opt.zero_grad(set_to_none=True)
            ((model(x) - x.flip(1)) ** 2).mean().backward()
            opt.step()
    return [p.detach().clone() for p in model.parameters()], opt, used


class _torch_backend:
    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        self.mp.setenv("GALOREX_BACKEND", "torch")

    def __exit__(self, *exc):
        self.mp.undo()


@pytest.mark.parametrize("policy", ["keep", "reset", "reproject"])
def test_fused_step_follows_the_torch_path(policy, monkeypatch):
    fused, opt_f, used_f = _run("triton", policy)
    plain, opt_p, used_p = _run("torch", policy)
    assert used_f and all(used_f), "the fused Triton path was not taken"
    assert not any(used_p)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    for pa, pb in zip(opt_f.state.values(), opt_p.state.values()):
        for key in pa:
            torch.testing.assert_close(pa[key], pb[key], rtol=2e-5, atol=2e-6)
    assert_interpreter_did_not_leak(monkeypatch)


def test_groups_the_fused_step_cannot_serve_take_the_shared_path(monkeypatch):
    model = _model(0)
    opt = GaLoreAdamW([{"params": [model[0].weight], "rank": 4, "optim_bits": 8}], lr=1e-2)
    model[0].weight.grad = torch.randn_like(model[0].weight)
    with interpreted():
        opt.step()  # 8-bit moments: must not reach the fp32-only kernel
        item = {"param": model[0].weight, "side": "left"}
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
