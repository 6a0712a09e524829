"""Small models and training problems shared by the optimizer tests (importable because
conftest.py puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """A 4-D conv weight (6×2×3×3 → a wide 6×18 matrix), a tall 20×6 and a wide 4×20 linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.tall = nn.Linear(6, 20)
        self.wide = nn.Linear(20, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return self.wide(torch.tanh(self.tall(h)))


def make_conv_net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return ConvNet().to(dtype)


def conv_net_groups(model, gap, policy="keep", proj_type="std", method="svd"):
    """The checkpoint tests' groups: biases on AdamW without decay, every weight projected at rank 3
    (scale 0.5, a fixed refresh seed)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [
        {"params": biases, "weight_decay": 0.0},
        {
            "params": weights,
            "rank": 3,
            "update_proj_gap": gap,
            "scale": 0.5,
            "proj_type": proj_type,
            "refresh_method": method,
            "moment_policy": policy,
            "refresh_seed": 17,
        },
    ]


# ---------------------------------------------------------------- a small regression problem
def make_regression_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 96)).to(dtype)


def regression_groups(model, rank=48, gap=50, **extra):
    """The two weights projected (with ``extra`` group keys), the biases on AdamW."""
    return [
        {"params": [model[0].weight, model[2].weight], "rank": rank, "update_proj_gap": gap, **extra},
        {"params": [model[0].bias, model[2].bias]},
    ]


REGRESSION_DATA = (
    torch.randn(256, 64, generator=torch.Generator().manual_seed(1)),
    torch.randn(256, 96, generator=torch.Generator().manual_seed(2)),
)


def train_regression(model, opt, steps):
    """``steps`` full-batch steps of mean squared error; returns the losses."""
    x, y = REGRESSION_DATA
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x.to(model[0].weight.dtype)).float() - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def tiny_train_args(sample_tokens: int = 8) -> list[str]:
    """galorex-train flags for a seconds-long llama-tiny run (one thread, fixed seed, no progress bar)."""
    return [
        "--model", "llama-tiny", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2",
        "--sample-tokens", str(sample_tokens), "--no-progress", "--threads", "1", "--seed", "0",
    ]  # fmt: skip
