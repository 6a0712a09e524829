"""``galorex-train`` at scale: --val-data, --report-to tensorboard, the gradient norm (also under
--layerwise), MFU's FLOP count, --compile against eager, and --recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from problems import tiny_train_args

from galorex.models.llama import Llama, get_config
from galorex.train import cli, trainer
from galorex.train.data import ByteTokenizer, prepare_tokens
from galorex.train.recipes import RECIPES, recipe_table
from galorex.train.tracking import TrackingError, check_report_to, flops_per_token

pytestmark = pytest.mark.usefixtures("restore_torch_globals")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _run(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    argv = tiny_train_args(0) + ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--save-every", "0"]
    assert cli.main(argv + list(extra)) == 0
    return out


def test_val_data_is_used_for_every_evaluation(tmp_path, monkeypatch):
    val = tmp_path / "val"
    val.mkdir()
    (val / "a.jsonl").write_text(json.dumps({"text": "To be, or not to be: that is the question. " * 20}) + "\n")
    seen = []
    evaluate = trainer.evaluate

    def spy(model, tokens, cfg, device):
        seen.append(np.array(tokens))
        return evaluate(model, tokens, cfg, device)

    monkeypatch.setattr(trainer, "evaluate", spy)
    out = _run(tmp_path, "run", "--steps", "4", "--eval-every", "2", "--val-data", str(val))
    expected = np.asarray(prepare_tokens(val, ByteTokenizer(), tmp_path / "cache"))
    assert len(seen) == 2 and all(np.array_equal(s, expected) for s in seen)
    rows = [r for r in _metrics(out) if "val_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_data"] == str(val) and summary["final_val_loss"] == rows[-1]["val_loss"]
    # All of the training corpus trains: no tail is held out when --val-data is given.
    assert summary["unigram_entropy"] > 0


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _run(tmp_path, "tb", "--steps", "4", "--eval-every", "2", "--log-every", "1", "--report-to", "tensorboard")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    names = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "val_loss": "val/loss"}
    names.update(val_perplexity="val/perplexity", tokens_per_s="perf/tokens_per_s", mfu="perf/mfu")
    names.update(memory_bytes="perf/memory_bytes", peak_memory_bytes="perf/peak_memory_bytes")
    assert set(names.values()) <= tags
    rows = _metrics(out)
    for key, tag in names.items():
        logged = [(r["step"], r[key]) for r in rows if key in r]
        events = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in events] == [s for s, _ in logged], tag
        # TensorBoard stores float32: equal to the float32 rounding of what metrics.jsonl holds.
        assert [v for _, v in events] == [float(np.float32(v)) for _, v in logged], tag
    assert all(r["grad_norm"] > 0 for r in rows if "train_loss" in r)


@pytest.mark.parametrize("accum", ["1", "2"])
def test_layerwise_logs_the_same_gradient_norm(tmp_path, accum):
    # float64 and no clipping: the layer-wise run takes the very steps of the normal one, so the
    # norms agree to float64 rounding (the sums are ordered differently).
    common = ["--steps", "3", "--log-every", "1", "--eval-every", "0", "--dtype", "fp64", "--grad-clip", "0"]
    common += ["--grad-accum", accum, "--optimizer", "galore", "--rank", "8"]
    normal = _metrics(_run(tmp_path, "normal", *common))
    layerwise = _metrics(_run(tmp_path, "layerwise", *common, "--layerwise"))
    for a, b in zip(normal, layerwise, strict=True):
        assert a["grad_norm"] > 0
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-12, abs=0)


def test_flops_per_token_counts_every_matmul_weight():
    cfg = get_config("llama-tiny")
    model = Llama(cfg)
    # The reference: every nn.Linear weight (the head included), 2 FLOPs a weight forward, 4 backward.
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    seq = 64
    assert flops_per_token(cfg, seq) == 6 * n + 12 * cfg.num_layers * cfg.hidden_size * seq


def test_report_to_names_the_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrackingError, match=r"--report-to wandb needs the `wandb` package \(pip install wandb"):
        check_report_to("wandb")
    check_report_to("tensorboard")  # installed with galorex[test] / [train]
    check_report_to("none")


@pytest.mark.slow
def test_compile_matches_eager(tmp_path):
    # A one-layer model keeps the inductor compilation short. In float64 the model still rounds
    # to float32 in RMSNorm and the loss (its choice for bf16), and inductor may keep those
    # intermediates in float64: the runs may differ by float32 roundings, nothing more.
    model = tmp_path / "one-layer.json"
    cfg = get_config("llama-tiny").to_dict() | {"num_layers": 1}
    model.write_text(json.dumps(cfg))
    # lr 3e-3 (GaLore's default until 2026-12-03): the bound below holds the drift of that training.
    common = ["--model", str(model), "--steps", "3", "--log-every", "1", "--eval-every", "0", "--dtype", "fp64"]
    common += ["--lr", "3e-3"]
    eager = _metrics(_run(tmp_path, "eager", *common))
    compiled = _metrics(_run(tmp_path, "compiled", *common, "--compile"))
    assert len(eager) == len(compiled) == 3
    # Step 1 starts from the same weights: its loss, logged through a float32 accumulator, may
    # differ by two float32 units in the last place at most.
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=2**-22, abs=0)
    for a, b in zip(eager[1:], compiled[1:]):
        # Later steps start from weights that Adam's normalised step moved apart by whole-step
        # amounts in a few entries (below): the same training, not the same roundings.
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=0)
    # Step 1 starts from the same weights: its gradient differs by the float32 roundings only.
    # (Later norms drift further: Adam's normalised step turns tiny gradient differences into
    # whole-step differences in a few weights.)
    assert compiled[0]["grad_norm"] == pytest.approx(eager[0]["grad_norm"], rel=1e-6, abs=0)


def test_recipes_set_defaults_that_flags_override(monkeypatch):
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        raise trainer.TrainError("stop here")

    monkeypatch.setattr(cli, "train", fake_train)
    assert cli.main(["--recipe", "galore-paper-60m", "--steps", "7"]) == 2
    cfg = seen["cfg"]
    # The authors' scripts/benchmark_c4/llama_60m.sh, with --steps overridden.
    assert (cfg.model, cfg.optimizer, cfg.rank, cfg.update_proj_gap, cfg.scale) == (
        "llama-60m",
        "galore",
        128,
        200,
        0.25,
    )
    assert (cfg.lr, cfg.warmup, cfg.batch_size, cfg.seq_len, cfg.steps) == (0.01, 1000, 512, 256, 7)
    assert (cfg.dataset, cfg.dataset_config, cfg.val_split) == ("allenai/c4", "en", "validation")
    for name, recipe in RECIPES.items():
        for key in recipe["settings"]:
            assert hasattr(cfg, key), (name, key)  # every setting is a TrainConfig field
    assert "| `galore-paper-7b` | llama-7b | 1024 | 500 | 0.005 | 150,000 |" in recipe_table()


def test_wandb_runs_offline_without_a_key_and_gets_every_record(tmp_path, monkeypatch):
    import sys
    import types

    from galorex.train.tracking import open_tracker

    calls = {"log": [], "finish": 0}

    class Run:
        def log(self, scalars, step):
            calls["log"].append((step, scalars))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    tracker = open_tracker("wandb", tmp_path / "run", {"lr": 0.01})
    tracker.log({"step": 3, "train_loss": 2.5, "lr": 0.01, "val_loss": 2.75})
    tracker.close()
    assert calls["init"]["mode"] == "offline" and calls["init"]["config"] == {"lr": 0.01}
    assert calls["log"] == [(3, {"train/loss": 2.5, "train/lr": 0.01, "val/loss": 2.75})]
    assert calls["finish"] == 1
    monkeypatch.setenv("WANDB_API_KEY", "x")
    open_tracker("wandb", tmp_path / "run2", {}).close()
    assert calls["init"]["mode"] == "online"
