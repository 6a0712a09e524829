"""Small models and training problems shared by the optimizer tests (importable because
conftest.py puts tests/ on sys.path)."""

from __future__ import annotations

import io
from collections.abc import Callable

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


def assert_resume_is_bit_for_bit(
    fresh: Callable[[nn.Module], torch.optim.Optimizer],
    before: int = 12,
    after: int = 8,
    dtype: torch.dtype = torch.float32,
    on_load: Callable[[nn.Module, torch.optim.Optimizer], None] | None = None,
) -> None:
    """Train the regression model ``before + after`` steps straight; and ``before`` steps, then a
    checkpoint (torch.save, torch.load(weights_only=True)) into a fresh model (another seed) and a
    fresh optimizer (``fresh(model)``), ``on_load(model, optimizer)`` to inspect the loaded state,
    then ``after`` more steps. The two runs' parameters must be equal bit for bit."""
    straight = make_regression_model(dtype=dtype)
    train_regression(straight, fresh(straight), before + after)
    first = make_regression_model(dtype=dtype)
    opt1 = fresh(first)
    train_regression(first, opt1, before)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make_regression_model(seed=5, dtype=dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = fresh(resumed)
    opt2.load_state_dict(ckpt["opt"])
    if on_load is not None:
        on_load(resumed, opt2)
    train_regression(resumed, opt2, after)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def tiny_train_args(sample_tokens: int = 8) -> list[str]:
    """galorex-train flags for a seconds-long llama-tiny run (one thread, fixed seed, no progress bar)."""
    return [
        "--model", "llama-tiny", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2",
        "--sample-tokens", str(sample_tokens), "--no-progress", "--threads", "1", "--seed", "0",
    ]  # fmt: skip


def assert_same(a, b, where: str = "") -> None:
    """Exact, recursive equality of checkpoint contents (tensors with torch.equal, dtypes too)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
