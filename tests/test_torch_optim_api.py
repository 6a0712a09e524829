"""galorex optimizers behave like torch.optim ones: schedulers, add_param_group, zero_grad and
per-group hyperparameters."""

from __future__ import annotations

import pytest
import torch

from galorex import GaLoreAdamW, GradNormLoRPAdamW, NaturalGaLoreAdamW

pytestmark = pytest.mark.usefixtures("single_thread")


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 6))


X = torch.randn(32, 12, generator=torch.Generator().manual_seed(1))
Y = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))


def loss_of(m):
    return (m(X) - Y).square().mean()


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    ],
    ids=["step", "cosine", "lambda"],
)
def test_schedulers_drive_the_learning_rate_like_torch_adamw(make_scheduler):
    ref_model, our_model = model(), model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    ours = GaLoreAdamW(our_model.parameters(), lr=1e-2, weight_decay=0.1)  # no rank: AdamW
    ref_sched, our_sched = make_scheduler(ref), make_scheduler(ours)
    for _ in range(12):
        for m, opt, sched in ((ref_model, ref, ref_sched), (our_model, ours, our_sched)):
            opt.zero_grad()
            loss_of(m).backward()
            opt.step()
            sched.step()
        assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    for a, b in zip(ref_model.parameters(), our_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLoreAdamW, GradNormLoRPAdamW])
def test_scheduled_lr_is_the_one_used_by_projected_weights(cls):
    """Zero learning rate from the scheduler: projected weights must not move (and do with lr > 0)."""
    m = model()
    opt = cls([{"params": [m[0].weight, m[2].weight], "rank": 4}, {"params": [m[0].bias, m[2].bias]}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s >= 2 else 1.0)
    for step in range(4):
        before = m[0].weight.detach().clone()
        opt.zero_grad()
        loss_of(m).backward()
        opt.step()
        sched.step()
        moved = not torch.equal(before, m[0].weight)
        assert moved == (step < 2), step


def test_add_param_group_later_and_per_group_hyperparameters():
    m = model()
    opt = GaLoreAdamW([{"params": [m[0].weight], "rank": 4, "lr": 1e-2}], lr=1e-3)
    opt.add_param_group({"params": [m[2].weight], "rank": 2, "proj_type": "left", "lr": 0.0})
    opt.add_param_group({"params": [m[0].bias, m[2].bias]})
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 0.0, 1e-3]
    assert opt.param_groups[2]["update_proj_gap"] == 200  # defaults fill what a group lacks
    with pytest.raises(ValueError, match=r"param_groups\[3\].*'rank'"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, 3))], "rank": -1})
    assert len(opt.param_groups) == 3
    w2 = m[2].weight.detach().clone()
    opt.zero_grad()
    loss_of(m).backward()
    opt.step()
    assert torch.equal(w2, m[2].weight)  # its group's lr is 0
    assert opt.state[m[2].weight]["basis"].shape == (6, 2)  # left side, its own rank
    assert opt.state[m[0].weight]["basis"].shape[-1] == 4


def test_zero_grad_set_to_none_false_and_true():
    m = model()
    opt = GaLoreAdamW([{"params": [m[0].weight, m[2].weight], "rank": 4}, {"params": [m[0].bias, m[2].bias]}])
    loss_of(m).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    opt.step()  # zero gradients: a valid step, finite results
    assert all(torch.isfinite(p).all() for p in m.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
