"""Layer-wise updates (``layerwise=True``): parameters stepped from post-accumulate-grad hooks with
their gradients freed, against the normal mode's step() on the same data."""

from __future__ import annotations

import functools

import pytest
import torch
from problems import (
    REGRESSION_DATA,
    make_conv_net,
    make_regression_model,
    regression_groups,
)

from galorex.optim import GaLoreAdafactor, GaLoreAdamW, GradNormLoRPAdamW, NaturalGaLoreAdamW

pytestmark = pytest.mark.usefixtures("single_thread")

OPTIMIZERS = {
    "galore": GaLoreAdamW,
    "natural": NaturalGaLoreAdamW,
    "gradnorm": GradNormLoRPAdamW,
    "adafactor": functools.partial(GaLoreAdafactor, relative_step=False),
}


def _micro_batches(k: int):
    x, y = REGRESSION_DATA
    return list(zip(x.chunk(k), y.chunk(k)))


def _train(layerwise: bool, cls, *, steps: int, k: int, clip: float | None = None, sched: bool = False, **keys):
    model = make_regression_model(seed=0)
    opts = dict(lr=3e-3, weight_decay=0.01)
    if layerwise:
        opts.update(layerwise=True, accumulation_steps=k, per_param_grad_clip=clip)
    opt = cls(regression_groups(model, rank=16, gap=2, **keys), **opts)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if sched else None
    seen_grads = []
    for _ in range(steps):
        for x, y in _micro_batches(k):
            loss = (model(x) - y).square().mean() / k
            loss.backward()
            seen_grads.append(sum(p.grad is not None for p in model.parameters()))
        if not layerwise and clip is not None:
            for p in model.parameters():
                torch.nn.utils.clip_grad_norm_(p, clip)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, seen_grads


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("k", [1, 3])
def test_layerwise_matches_normal_mode(name, k):
    cls = OPTIMIZERS[name]
    # gap 2 over 5 steps: refreshes at steps 0, 2, 4 happen inside the hooks too.
    ref, _, _ = _train(False, cls, steps=5, k=k, moment_policy="reproject")
    lw, opt, seen = _train(True, cls, steps=5, k=k, moment_policy="reproject")
    for a, b in zip(ref.parameters(), lw.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    # Gradients are freed at every k-th backward, and only then.
    params = len(list(lw.parameters()))
    assert seen == ([params] * (k - 1) + [0]) * 5
    assert all(p.grad is None for p in lw.parameters())


def test_per_param_clip_and_scheduler_lr_are_used():
    ref, _, _ = _train(False, GaLoreAdamW, steps=4, k=2, clip=0.05, sched=True)
    lw, _, _ = _train(True, GaLoreAdamW, steps=4, k=2, clip=0.05, sched=True)
    for a, b in zip(ref.parameters(), lw.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    # The clip and the schedule change the result (so the comparison above tests them).
    plain, _, _ = _train(True, GaLoreAdamW, steps=4, k=2)
    assert not torch.allclose(plain[0].weight, lw[0].weight, atol=1e-6)


def test_scheduler_lr_is_the_one_used():
    """With the scheduler's lr at 0 after the first step, nothing moves any more."""
    model = make_regression_model(seed=0)
    opt = GaLoreAdamW(regression_groups(model, rank=16, gap=2), lr=1e-2, layerwise=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s == 0 else 0.0)
    x, y = REGRESSION_DATA
    snapshots = []
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        (model(x) - y).square().mean().backward()
        opt.step()
        scheduler.step()
        snapshots.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
    assert snapshots == [True, False, False]


def test_checkpoint_round_trip_layerwise():
    def fresh():
        model = make_conv_net(seed=0)
        groups = [
            {"params": [model.conv.weight, model.tall.weight, model.wide.weight], "rank": 3, "update_proj_gap": 2},
            {"params": [model.conv.bias, model.tall.bias, model.wide.bias]},
        ]
        return model, GaLoreAdamW(groups, lr=1e-2, layerwise=True, accumulation_steps=2)

    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 2, 6, 6, generator=gen) for _ in range(12)]

    def run(model, batches):
        for x in batches:
            model(x).square().mean().backward()

    model, opt = fresh()
    run(model, data)
    model2, opt2 = fresh()
    run(model2, data[:6])
    saved = {"model": model2.state_dict(), "opt": opt2.state_dict()}
    model3, opt3 = fresh()
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    run(model3, data[6:])
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)


def test_layerwise_refuses_what_it_cannot_do():
    model = make_regression_model(seed=0)
    opt = GaLoreAdamW(regression_groups(model, rank=16), layerwise=True, accumulation_steps=2)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: 0.0)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    with pytest.raises(RuntimeError, match="no backward"):
        opt.step()
    model[0].weight.grad = None
    x, y = REGRESSION_DATA
    (model(x) - y).square().mean().backward()  # 1 of 2 backward passes
    with pytest.raises(RuntimeError, match="accumulation"):
        opt.state_dict()
    with pytest.raises(ValueError, match="accumulation_steps"):
        GaLoreAdamW(model.parameters(), accumulation_steps=2)
    with pytest.raises(ValueError, match="accumulation_steps"):
        GaLoreAdamW(model.parameters(), layerwise=True, accumulation_steps=0)
    with pytest.raises(ValueError, match="per_param_grad_clip"):
        GaLoreAdamW(model.parameters(), per_param_grad_clip=1.0)
    with pytest.raises(ValueError, match="per_param_grad_clip"):
        GaLoreAdamW(model.parameters(), layerwise=True, per_param_grad_clip=-1.0)
    with pytest.raises(TypeError, match="layerwise"):
        GaLoreAdamW(model.parameters(), layerwise="yes")


def test_sparse_gradient_is_refused_in_the_hook():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = GaLoreAdamW([{"params": [emb.weight], "rank": 2}], layerwise=True)
    with pytest.raises(RuntimeError, match="sparse gradient"):
        emb(torch.tensor([1, 2])).sum().backward()
    del opt


def test_hooks_can_be_removed():
    model = make_regression_model(seed=0)
    opt = GaLoreAdamW(regression_groups(model, rank=16), layerwise=True)
    opt.remove_layerwise_hooks()
    x, y = REGRESSION_DATA
    (model(x) - y).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_galorex_train_layerwise_matches_normal_mode(tmp_path):
    """--layerwise through the command, with --grad-accum 2: the same weights as the normal loop."""
    from safetensors.torch import load_file

    from galorex.train.cli import main

    common = [
        "--model",
        "llama-tiny",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-batches",
        "1",
        "--sample-tokens",
        "0",
        "--no-progress",
        "--threads",
        "1",
        "--steps",
        "3",
        "--grad-accum",
        "2",
        "--update-proj-gap",
        "2",
        "--grad-clip",
        "0",
        "--save-every",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        assert main(common + ["--out", str(tmp_path / "normal")]) == 0
        assert main(common + ["--out", str(tmp_path / "lw"), "--layerwise"]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    a, b = (
        load_file(str(tmp_path / "normal" / "model.safetensors")),
        load_file(str(tmp_path / "lw" / "model.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)


def test_layerwise_memory_bench_runs(tmp_path):
    import json

    from galorex.bench.__main__ import main

    assert main(["--quick", "--out", str(tmp_path), "--device", "cpu", "layerwise-memory"]) == 0
    data = json.loads((tmp_path / "layerwise_memory.json").read_text())
    rows = data["rows"]
    assert set(rows) == {"normal", "layerwise"}
    for r in rows.values():
        assert r["gradient_bytes"] == 4 * r["parameters"]  # float32, no tied weights in llama-tiny
        assert r["peak_bytes"] >= r["before_steps_bytes"] > 0
    assert data["saving_bytes"] == rows["normal"]["peak_bytes"] - rows["layerwise"]["peak_bytes"]
