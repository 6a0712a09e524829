"""The rule protocol from a user's side: docs/rules.md's momentum-SGD rule, run exactly as written
there, through the public API — its maths against a float64 formula, a checkpoint round trip, 8-bit
state, layer-wise mode and the memory estimate."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

import galorex
from galorex.optim import registry

DOC = Path(__file__).resolve().parent.parent / "docs" / "rules.md"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def example():
    text = DOC.read_text()
    code = text.split("<!-- rule-example-start -->")[1].split("<!-- rule-example-end -->")[0]
    code = code.strip().removeprefix("```python").removesuffix("```")
    assert len(code.strip().splitlines()) < 60, "the example rule must stay under 60 lines"
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    yield namespace
    registry.OPTIMIZERS.pop("galore-sgd", None)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 80), nn.Tanh(), nn.Linear(80, 6)).to(dtype)


def _groups(model, **extra):
    return [
        {"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 3, "scale": 0.5, **extra},
        {"params": [model[0].bias, model[2].bias]},
    ]


def _batches(n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 96, generator=g, dtype=dtype), torch.randn(16, 6, generator=g, dtype=dtype)) for _ in range(n)
    ]


def _train(model, opt, batches, layerwise=False):
    losses = []
    for x, y in batches:
        if not layerwise:
            opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_the_example_rule_is_momentum_sgd_in_the_subspace(example):
    """Float64: two steps (one basis) of the rule equal B ← μB + PᵀG, W ← (1 − lr·wd)W − lr·scale·P B."""
    model = _model(torch.float64)
    opt = example["GaLoreSGD"](_groups(model, proj_type="left"), lr=0.1, momentum=0.8, weight_decay=0.01)
    w = model[0].weight
    weights, buffer = w.detach().clone(), torch.zeros(4, 96, dtype=torch.float64)
    for x, y in _batches(2, torch.float64):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        grad = w.grad.detach().clone()
        opt.step()
        basis = opt.state[w]["basis"]
        if buffer.abs().sum() == 0:  # the first step sets the basis: the top-4 left singular vectors
            u = torch.linalg.svd(grad, full_matrices=False)[0][:, :4]
            torch.testing.assert_close(basis.abs(), u.abs(), rtol=0, atol=1e-12)
        buffer = 0.8 * buffer + basis.T @ grad
        weights = (1 - 0.1 * 0.01) * weights - 0.1 * 0.5 * basis @ buffer
        torch.testing.assert_close(w.detach(), weights, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(opt.state[w]["momentum_buffer"], buffer, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("bits", [32, 8])
def test_the_example_rule_checkpoints_and_resumes_bit_for_bit(example, bits):
    model = _model()
    opt = example["GaLoreSGD"](_groups(model), lr=0.05, momentum=0.9, optim_bits=bits)
    batches = _batches(8)
    _train(model, opt, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = _model()
    twin.load_state_dict(saved["model"])
    twin_opt = example["GaLoreSGD"](_groups(twin), lr=0.05, momentum=0.9, optim_bits=bits)
    twin_opt.load_state_dict(saved["opt"])
    _train(model, opt, batches[4:])
    _train(twin, twin_opt, batches[4:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_the_example_rule_gets_8bit_state_from_the_codec(example):
    runs = {}
    for bits in (32, 8):
        model = _model()
        opt = example["GaLoreSGD"](_groups(model), lr=0.05, momentum=0.9, optim_bits=bits)
        losses = _train(model, opt, _batches(12))
        runs[bits] = (model, opt, losses)
    state8 = runs[8][1].state[runs[8][0][0].weight]
    assert "momentum_buffer_q" not in state8  # 4×96 = 384 entries: under 4096, kept float32
    wide = nn.Linear(4096, 8)
    opt = example["GaLoreSGD"]([{"params": [wide.weight], "rank": 2}], optim_bits=8)
    wide(torch.randn(3, 4096)).sum().backward()
    opt.step()
    assert opt.state[wide.weight]["momentum_buffer_q"].dtype == torch.uint8  # 2×4096: coded
    assert galorex.optimizer_state_bytes(opt) < 2 * 4096 * 4 + 4096 * 8 * 4
    assert runs[8][2][-1] < runs[8][2][0] and runs[32][2][-1] < runs[32][2][0]


def test_the_example_rule_runs_layerwise_as_in_the_normal_mode(example):
    normal, lw = _model(), _model()
    opts = [
        example["GaLoreSGD"](_groups(normal), lr=0.05),
        example["GaLoreSGD"](_groups(lw), lr=0.05, layerwise=True),
    ]
    batches = _batches(5)
    _train(normal, opts[0], batches)
    _train(lw, opts[1], batches, layerwise=True)
    for p, q in zip(normal.parameters(), lw.parameters()):
        assert torch.equal(p, q)


def test_the_example_rule_validates_and_registers(example):
    cls = example["GaLoreSGD"]
    with pytest.raises(ValueError, match=r"param_groups\[0\]: 'momentum' must be in \[0, 1\), got 1.5"):
        cls(_model().parameters(), momentum=1.5)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['betas'\\]"):
        cls(_model().parameters(), betas=(0.9, 0.99))
    assert registry.optimizer_class("galore-sgd") is cls
    model = _model()
    groups = _groups(model)
    opt = cls(_groups(model))
    _train(model, opt, _batches(1))
    assert galorex.estimate_optimizer_state_bytes(groups, optimizer="galore-sgd") == galorex.optimizer_state_bytes(opt)
