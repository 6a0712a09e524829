"""Hyperparameters as 0-dim tensors (lr, weight_decay, betas, eps; Adafactor's lr, weight_decay
and beta1), as ``torch.optim`` accepts ``lr=torch.tensor(...)``: a scheduler then updates them in
place, which a compiled step (``compile=``) reads as a graph input instead of recompiling. Eagerly
a tensor hyperparameter gives exactly the run its value as a Python float gives."""

from __future__ import annotations

import copy

import pytest
import torch
from problems import make_regression_model, regression_groups, train_regression

import galorex

pytestmark = pytest.mark.usefixtures("single_thread")


def f64(x: float) -> torch.Tensor:
    # float64, so that a scheduler's arithmetic on the tensor rounds as it does on a Python float
    return torch.tensor(x, dtype=torch.float64)


ADAM_LIKE = {
    "galore": (galorex.GaLoreAdamW, {}),
    "galore-8bit-galore-torch-eps": (galorex.GaLoreAdamW, {"optim_bits": 8, "eps_mode": "galore_torch"}),
    "galore-reset": (galorex.GaLoreAdamW, {"moment_policy": "reset"}),
    "natural-galore": (galorex.NaturalGaLoreAdamW, {"natural_history": 3}),
    "gradnorm-lorp": (galorex.GradNormLoRPAdamW, {}),
}


def _adam_hparams(tensor: bool) -> dict:
    values = {"lr": 3e-3, "weight_decay": 0.1, "eps": 1e-6}
    if tensor:
        return {**{k: f64(v) for k, v in values.items()}, "betas": (f64(0.8), f64(0.95))}
    return {**values, "betas": (0.8, 0.95)}


@pytest.mark.parametrize("name", list(ADAM_LIKE))
def test_tensor_hyperparameters_give_the_float_run_exactly(name):
    cls, kw = ADAM_LIKE[name]
    runs = []
    for tensor in (False, True):
        model = make_regression_model()
        opt = cls(regression_groups(model, rank=8, gap=3, **kw), **_adam_hparams(tensor))
        losses = train_regression(model, opt, 7)
        runs.append((model, losses))
    (float_model, float_losses), (tensor_model, tensor_losses) = runs
    assert tensor_losses == float_losses
    for a, b in zip(tensor_model.parameters(), float_model.parameters()):
        assert torch.equal(a, b)
    assert float_losses[-1] < float_losses[0]


def test_adafactor_tensor_hyperparameters_give_the_float_run_exactly():
    runs = []
    for make in (float, f64):
        model = make_regression_model()
        opt = galorex.GaLoreAdafactor(
            regression_groups(model, rank=8, gap=3),
            lr=make(1e-2),
            relative_step=False,
            weight_decay=make(0.1),
            beta1=make(0.9),
        )
        runs.append((model, train_regression(model, opt, 7)))
    assert runs[0][1] == runs[1][1]
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(a, b)


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "exponential": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("cls", [galorex.GaLoreAdamW, galorex.GradNormLoRPAdamW])
def test_scheduler_updates_a_tensor_lr_in_place(cls, sched):
    """The scheduler writes into the same tensor (what a compiled step holds on to), every group
    follows it, and the run equals the one with a float lr under the same scheduler."""
    base = make_regression_model()
    runs = []
    for lr in (4e-3, f64(4e-3)):
        model = copy.deepcopy(base)
        opt = cls(regression_groups(model, rank=8, gap=3), lr=lr)
        tensors = [g["lr"] for g in opt.param_groups]
        scheduler = SCHEDULERS[sched](opt)
        lrs = []
        for _ in range(6):
            train_regression(model, opt, 1)
            scheduler.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
        if isinstance(lr, torch.Tensor):
            assert all(g["lr"] is t for g, t in zip(opt.param_groups, tensors))
        runs.append((model, lrs))
    (float_model, float_lrs), (tensor_model, tensor_lrs) = runs
    assert tensor_lrs == float_lrs and tensor_lrs[-1] < 4e-3
    for a, b in zip(tensor_model.parameters(), float_model.parameters()):
        assert torch.equal(a, b)


def test_tensor_lr_zero_keeps_gradnorm_weights_in_a_compiled_step():
    """GradNormLoRP must not even round W at lr 0; with a tensor lr inside a compiled step that is
    decided on the device (torch.where), not by reading the lr."""
    torch._dynamo.reset()
    try:
        model = make_regression_model()
        opt = galorex.GradNormLoRPAdamW(
            regression_groups(model, rank=8, gap=3), lr=torch.tensor(0.0), compile={"backend": "eager"}
        )
        before = [p.detach().clone() for p in model.parameters()]
        train_regression(model, opt, 2)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
        opt.param_groups[0]["lr"].fill_(1e-2)
        train_regression(model, opt, 1)
        assert not torch.equal(model[0].weight, before[0])
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"lr": torch.tensor([1e-3, 1e-3])}, "lr"),
        ({"lr": torch.tensor(-1e-3)}, "lr"),
        ({"lr": torch.tensor(float("inf"))}, "lr"),
        ({"lr": torch.tensor(1e-3 + 0j)}, "lr"),
        ({"betas": (torch.tensor(0.9), torch.tensor(1.0))}, "betas"),
        ({"weight_decay": torch.tensor(-0.1)}, "weight_decay"),
        ({"eps": torch.tensor(-1.0)}, "eps"),
    ],
)
def test_bad_tensor_hyperparameters_raise_naming_the_key(bad, key):
    w = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: '{key}'"):
        galorex.GaLoreAdamW([{"params": [w], "rank": 2, **bad}])
