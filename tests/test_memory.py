"""Optimizer-state memory: the measured bytes of a live optimizer equal the analytic estimate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import galorex
from galorex import GaLoreAdamW, galore_param_groups
from galorex import projection as proj

pytestmark = pytest.mark.usefixtures("single_thread")

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.attn = nn.ModuleDict({"q": nn.Linear(6, 6), "up": nn.Linear(6, 14, bias=False), "down": nn.Linear(14, 6)})
        self.mlp = nn.ModuleDict({"conv": nn.Conv1d(6, 9, 3), "wide": nn.Linear(9, 4)})
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 11, bias=False)

    def forward(self, ids):
        x = self.embed(ids)  # B, T, 6
        x = self.attn["down"](torch.tanh(self.attn["up"](self.attn["q"](x))))
        x = self.mlp["conv"](x.transpose(1, 2)).transpose(1, 2)  # B, T-2, 9
        return self.lm_head(self.norm(self.mlp["wide"](torch.tanh(x))))


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Model().to(dtype)


def one_step(model, opt):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (2, 7), generator=g)
    opt.zero_grad()
    model(ids).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("rank", [2, 5, 100])
def test_measured_equals_estimate(proj_type, dtype, rank):
    model = make_model(dtype)
    groups = galore_param_groups(model, rank=rank, update_proj_gap=10, proj_type=proj_type)
    estimate_before = galorex.estimate_optimizer_state_bytes(groups)
    opt = GaLoreAdamW(groups, lr=1e-3)
    assert galorex.optimizer_state_bytes(opt) == 0
    one_step(model, opt)
    measured = galorex.optimizer_state_bytes(opt)
    assert measured == estimate_before
    assert measured == galorex.estimate_optimizer_state_bytes(opt.param_groups)
    # and the estimate really depends on the layout (not a tautology on the total parameter count)
    adamw = galorex.estimate_optimizer_state_bytes(model, optimizer="adamw")
    assert measured != adamw


def test_estimate_by_hand():
    """One tall weight (20×6, rank 2, std → right: basis 6×2, moments 20×2) and a bias (20,)."""
    w = nn.Parameter(torch.zeros(20, 6))
    b = nn.Parameter(torch.zeros(20))
    groups = [{"params": [b]}, {"params": [w], "rank": 2}]
    expected = (2 * 20 * 2 + 6 * 2) * 4 + 2 * 4 + (2 * 20 * 4 + 4)
    assert galorex.estimate_optimizer_state_bytes(groups) == expected
    full = (2 * 2 * 2 + 20 * 2 + 6 * 2) * 4 + 2 * 4 + (2 * 20 * 4 + 4)
    assert galorex.estimate_optimizer_state_bytes(groups, proj_type="full") == full
    opt = GaLoreAdamW(groups)
    w.grad, b.grad = torch.randn(20, 6), torch.randn(20)
    opt.step()
    assert galorex.optimizer_state_bytes(opt) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", [None, False, True])
def test_torch_adamw_matches_adamw_estimate(dtype, fused):
    model = make_model(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    one_step(model, opt)
    for p in model.parameters():
        # torch keeps `step` as a float32 scalar tensor (also for bf16 parameters)
        assert opt.state[p]["step"].dtype == torch.float32
        assert opt.state[p]["step"].numel() == 1
        assert opt.state[p]["exp_avg"].dtype == dtype
    assert galorex.optimizer_state_bytes(opt) == galorex.estimate_optimizer_state_bytes(model, optimizer="adamw")


@pytest.mark.parametrize(
    "variant", [dict(), dict(fused=False), dict(fused=False, foreach=False), dict(eps_mode="galore_torch")], ids=str
)
def test_galore_without_rank_is_counted_like_adamw(variant):
    model = make_model()
    opt = GaLoreAdamW(model.parameters(), **variant)
    one_step(model, opt)
    assert galorex.optimizer_state_bytes(opt) == galorex.estimate_optimizer_state_bytes(model, optimizer="adamw")
    assert galorex.optimizer_state_bytes(opt) == galorex.estimate_optimizer_state_bytes(model)


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_estimate_on_meta_device(proj_type):
    with torch.device("meta"):
        torch.manual_seed(0)
        meta = Model()
    assert all(p.is_meta for p in meta.parameters())
    real = make_model()
    for build in (lambda m: m, lambda m: galore_param_groups(m, rank=3, proj_type=proj_type)):
        assert galorex.estimate_optimizer_state_bytes(build(meta)) == galorex.estimate_optimizer_state_bytes(
            build(real)
        )
    assert galorex.estimate_optimizer_state_bytes(meta, optimizer="adamw") == galorex.estimate_optimizer_state_bytes(
        real, optimizer="adamw"
    )
    # and GaLore's estimate is well below AdamW's for a low rank on these shapes
    groups = galore_param_groups(meta, rank=1, proj_type=proj_type, target_modules="all-linear")
    assert galorex.estimate_optimizer_state_bytes(groups) < galorex.estimate_optimizer_state_bytes(
        meta, optimizer="adamw"
    )


def test_unknown_optimizer_name_raises():
    with pytest.raises(ValueError, match="optimizer"):
        galorex.estimate_optimizer_state_bytes(
            [{"params": [nn.Parameter(torch.zeros(3, 3))], "rank": 1}], optimizer="sgd"
        )


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("rank", [1, 2, 100])
def test_state_tensors_do_not_pin_larger_storages(proj_type, rank):
    """Every state tensor owns exactly its own bytes: a basis kept as a view into the full SVD
    factor would hold (and torch.save would write) the whole m×min(m, n) factor while
    optimizer_state_bytes, which counts numel·element_size, reports only the m×r slice."""
    model = make_model()
    opt = GaLoreAdamW(galore_param_groups(model, rank=rank, proj_type=proj_type, target_modules="all-linear"))
    one_step(model, opt)
    held = 0
    for p, st in opt.state.items():
        for k, v in st.items():
            held += v.untyped_storage().nbytes()
            assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), (
                f"{k} of a {tuple(p.shape)} weight (rank {rank}, {proj_type}): "
                f"storage {v.untyped_storage().nbytes()} bytes for {v.numel()} elements"
            )
    assert held == galorex.optimizer_state_bytes(opt)


@pytest.mark.parametrize("rank", [1, 3])
def test_compute_bases_returns_compact_tensors(rank):
    g = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    for side in proj.SIDES:
        for method in proj.REFRESH_METHODS:
            for b in proj.compute_bases(g, rank, side, method, generator=torch.Generator().manual_seed(1)):
                assert b.untyped_storage().nbytes() == b.numel() * b.element_size(), (side, method)
