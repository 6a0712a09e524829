"""What the HaloLinear test modules share: relative errors, the fp32-vs-float64 closeness check, and
one forward+backward compared with a float64 emulation and with the unquantised float64 layer."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Relative (Frobenius) error against the unquantised float64 layer on Gaussian data, 64 → 32, 96
# tokens; measured worst case over levels, granularities, signs and the three outputs: FP8 0.038
# (E_X, G with e4m3's three mantissa bits), INT8 0.013. The stated bounds leave about 2× room.
STATED_BOUND = {"fp8": 0.06, "int8": 0.03}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def assert_pipeline_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 agreement with the float64 emulation: 1e-5 relative in norm, and no element off by more
    than 1e-3 of the largest. (An element whose fp32 value sits on a rounding boundary of the
    format may round to the neighbouring grid point in one of the two: that is one grid step in
    one element, well inside these bounds; a wrong rotation, sign, scale, transpose or format is
    far outside.)"""
    assert rel(actual, expected) < 1e-5, rel(actual, expected)
    actual, expected = actual.double(), expected.double()
    worst = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))
    assert worst < 1e-3, worst


def check_against_float64(layer: torch.nn.Module, emulate: Callable, fmt: str, seed: int) -> None:
    """One forward+backward of a 64 → 32 ``layer`` on (4, 24, 64) Gaussian input: Y, E_X and G equal
    ``emulate(x64, w64, b64, ey64)`` (its float64 pipeline) to fp32 tolerance, the bias gradient is
    exact, and all three stay within ``STATED_BOUND[fmt]`` of the unquantised float64 layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 24, 64, generator=g, requires_grad=True)
    ey = torch.randn(4, 24, 32, generator=g)
    y = layer(x)
    assert y.shape == (4, 24, 32) and y.dtype == torch.float32
    y.backward(ey)
    x64, w64, b64 = x.detach().double().reshape(-1, 64), layer.weight.detach().double(), layer.bias.detach().double()
    e64 = ey.double().reshape(-1, 32)
    ry, rex, rg = emulate(x64, w64, b64, e64)
    assert_pipeline_close(y.detach().reshape(-1, 32), ry)
    assert_pipeline_close(x.grad.reshape(-1, 64), rex)
    assert_pipeline_close(layer.weight.grad, rg)
    torch.testing.assert_close(layer.bias.grad.double(), e64.sum(0), rtol=1e-5, atol=1e-5)
    bound = STATED_BOUND[fmt]
    assert rel(y.detach().reshape(-1, 32), x64 @ w64.T + b64) < bound
    assert rel(x.grad.reshape(-1, 64), e64 @ w64) < bound
    assert rel(layer.weight.grad, e64.T @ x64) < bound


def train_converted_llama(steps: int = 8, **convert: object) -> list[float]:
    """llama-tiny with every linear layer but the head converted (``convert_to_halo(**convert)``; it
    must swap 4 × 7 of them), trained ``steps`` GaLore steps on one seeded batch: the losses."""
    import galorex
    from galorex.halo import convert_to_halo
    from galorex.models.llama import Llama, get_config

    torch.manual_seed(0)
    model = Llama(get_config("llama-tiny"))
    assert convert_to_halo(model, **convert) == 4 * 7  # q, k, v, o, gate, up, down in 4 blocks
    opt = galorex.GaLoreAdamW(galorex.galore_param_groups(model, rank=8, update_proj_gap=50), lr=3e-3)
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        _, loss = model(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
