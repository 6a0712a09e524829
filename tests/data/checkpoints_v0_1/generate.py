"""Writes the optimizer checkpoints that tests/test_old_checkpoints.py resumes.

Run once with galorex 0.1.0 as it stood before the optim/ restructuring (commit ad04993):
``python tests/data/checkpoints_v0_1/generate.py``. Each file holds a small float64 model's weights
and optimizer state after 3 steps (one refresh past), and the weights after 3 more steps, which a
later galorex must reproduce from the same state and gradients."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import galorex

HERE = Path(__file__).resolve().parent

CASES = {
    "galore": (galorex.GaLoreAdamW, {"weight_decay": 0.1}, {"moment_policy": "reproject"}),
    "galore_8bit_4bit": (galorex.GaLoreAdamW, {"optim_bits": 8, "basis_bits": 4}, {"proj_type": "left"}),
    "galore_torch_eps": (galorex.GaLoreAdamW, {"eps_mode": "galore_torch"}, {"proj_type": "full"}),
    "natural_galore": (galorex.NaturalGaLoreAdamW, {"natural_history": 3}, {"moment_policy": "keep"}),
    "gradnorm_lorp": (galorex.GradNormLoRPAdamW, {}, {"moment_policy": "reset"}),
    "adafactor": (galorex.GaLoreAdafactor, {"beta1": 0.9, "lr": 1e-2, "relative_step": False}, {}),
}


# 8-bit moments of float64 weights did not run in 0.1.0 (float32 moments met float64 gradients).
DTYPES = {"galore_8bit_4bit": torch.float32}


def model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    # 80 x 72: large enough for 8-bit moments (>= 4096 entries) and 4-bit bases.
    return nn.Sequential(nn.Linear(72, 80), nn.Tanh(), nn.Linear(80, 6)).to(dtype)


def groups(m: nn.Module, extra: dict) -> list[dict]:
    return [
        {"params": [m[0].weight, m[2].weight], "rank": 4, "update_proj_gap": 2, "scale": 0.5, **extra},
        {"params": [m[0].bias, m[2].bias]},
    ]


def batches(n: int, seed: int, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 72, generator=g, dtype=dtype), torch.randn(16, 6, generator=g, dtype=dtype)) for _ in range(n)
    ]


def train(m: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        (m(x) - y).square().mean().backward()
        opt.step()


def build(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    cls, kwargs, extra = CASES[name]
    m = model(DTYPES.get(name, torch.float64))
    kwargs = dict(kwargs)
    if cls is not galorex.GaLoreAdafactor:
        kwargs.setdefault("lr", 1e-2)
        kwargs.setdefault("weight_decay", 0.0)  # explicit: its default changed after 0.1.0
    return m, cls(groups(m, extra), **kwargs)


def made_with() -> dict[str, str]:
    return {"torch": str(torch.__version__), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    torch.set_num_threads(1)  # as the test runs (BLAS splits work, and so rounds, by thread count)
    for name in CASES:
        m, opt = build(name)
        dtype = DTYPES.get(name, torch.float64)
        train(m, opt, batches(3, seed=1, dtype=dtype))
        saved = {
            "model": {k: v.clone() for k, v in m.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict()),
        }
        train(m, opt, batches(3, seed=2, dtype=dtype))
        saved["expected"] = {k: v.clone() for k, v in m.state_dict().items()}
        # Where the same kernels run, a resume must match bit for bit; elsewhere BLAS may round differently.
        saved["made_with"] = {
            "torch": str(torch.__version__),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }
        torch.save(saved, HERE / f"{name}.pt")
        print(name, sorted(k for s in saved["optimizer"]["state"].values() for k in s)[:12])


if __name__ == "__main__":
    main()
