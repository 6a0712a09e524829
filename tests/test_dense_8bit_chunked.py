"""The 8-bit AdamW step of a large unprojected weight, taken slice by slice, is the unsliced step."""

from __future__ import annotations

import pytest
import torch

from galorex.optim import GaLoreAdamW
from galorex.optim import dense as optim_dense


def _run(chunk, monkeypatch, dtype, eps_mode, steps=3):
    monkeypatch.setattr(optim_dense, "DENSE_8BIT_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    # 41 × 1000 = 41000 elements: not a multiple of the 256-element block nor of the slice.
    w = torch.nn.Parameter((torch.randn(41, 1000, generator=gen) * 0.02).to(dtype))
    opt = GaLoreAdamW([w], lr=1e-2, weight_decay=0.1, optim_bits=8, eps_mode=eps_mode)
    for _ in range(steps):
        w.grad = (torch.randn(41, 1000, generator=gen) * 1e-3).to(dtype)
        opt.step()
    return w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps_mode", ["torch", "galore_torch"])
def test_sliced_8bit_dense_step_is_the_whole_step_bit_for_bit(monkeypatch, dtype, eps_mode, single_thread):
    # One intra-op thread: torch's CPU kernels compute an elementwise op's body with vector
    # instructions (fused multiply-add) and the tail of each thread's range with scalar code, so a
    # bf16 weight update may round differently where a thread boundary falls inside the unsliced
    # tensor but not inside a slice (one bf16 rounding at those few elements; the moments agree).
    whole_w, whole_state = _run(1 << 30, monkeypatch, dtype, eps_mode)  # never sliced
    sliced_w, sliced_state = _run(4096, monkeypatch, dtype, eps_mode)  # 11 slices, a short last one
    assert torch.equal(whole_w, sliced_w)
    assert sorted(whole_state) == sorted(sliced_state)
    assert "exp_avg_q" in sliced_state and sliced_state["exp_avg_q"].dtype == torch.uint8
    for key, value in whole_state.items():
        assert torch.equal(value, sliced_state[key]), key


def test_sliced_state_loads_into_an_unsliced_optimizer(monkeypatch):
    """Same layout: a checkpoint of a sliced run continues unsliced with the same result."""
    _, state = _run(4096, monkeypatch, torch.float32, "torch", steps=1)
    whole_w, whole_state = _run(1 << 30, monkeypatch, torch.float32, "torch", steps=1)
    for key in whole_state:
        assert whole_state[key].shape == state[key].shape and whole_state[key].dtype == state[key].dtype
