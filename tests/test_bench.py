"""``python -m galorex.bench`` runs end to end at small sizes and its figures are consistent."""

from __future__ import annotations

import json

import pytest
import torch

from galorex.bench.__main__ import main, synthetic_gradient

pytestmark = pytest.mark.usefixtures("single_thread")


def test_step_on_tiny_model(tmp_path):
    main(
        [
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "step",
            "--model",
            "llama-tiny",
            "--rank",
            "8",
            "--repeats",
            "2",
            "--refresh-repeats",
            "1",
            "--gap",
            "10",
        ]
    )
    data = json.loads((tmp_path / "step.json").read_text())["results"]
    for r in data.values():
        if r["refresh_step_s"] is None:
            assert r["amortised_step_s"] == r["median_step_s"]
        else:
            assert r["amortised_step_s"] == pytest.approx(
                r["median_step_s"] + (r["refresh_step_s"] - r["median_step_s"]) / 10
            )
    galorex_run = data["galorex GaLoreAdamW"]
    assert galorex_run["state_bytes"] == galorex_run["analytic_state_bytes"]
    adamw = data["torch AdamW (foreach)"]
    assert adamw["state_bytes"] == adamw["analytic_state_bytes"]
    assert galorex_run["state_bytes"] < adamw["state_bytes"]
    if "galore-torch GaLoreAdamW" in data:
        # the same moments and bases; galorex also counts its float32 step scalars (galore-torch
        # keeps Python ints), at most 8 bytes per parameter
        diff = galorex_run["state_bytes"] - data["galore-torch GaLoreAdamW"]["state_bytes"]
        assert 0 <= diff <= 8 * 64
    assert (tmp_path / "step.md").read_text().startswith("optimizer.step()")


def test_refresh_small(tmp_path):
    main(
        [
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "refresh",
            "--m",
            "96",
            "--n",
            "200",
            "--rank",
            "16",
            "--repeats",
            "1",
        ]
    )
    results = json.loads((tmp_path / "refresh.json").read_text())["results"]
    by_spectrum = {r["spectrum"]: r for r in results}
    assert by_spectrum["decaying"]["energy_svd"] == pytest.approx(1.0, abs=1e-6)
    assert by_spectrum["decaying"]["energy_randomized"] >= 0.99
    assert 0 < by_spectrum["flat"]["energy_randomized"] <= 1.0 + 1e-6


def test_memory_small(tmp_path):
    main(["--out", str(tmp_path), "memory", "--models", "llama-tiny", "--rank", "16"])
    (row,) = json.loads((tmp_path / "memory.json").read_text())["results"]
    for label in (
        "GaLore 32-bit",
        "GaLore 8-bit",
        "GradNormLoRP 8-bit",
        "GradNormLoRP 8-bit, 4-bit basis",
        "Natural GaLore 32-bit (s=8)",
    ):
        assert row["measured"][label] == row[label]
    assert row["GaLore 8-bit"] < row["GaLore 32-bit"] < row["Natural GaLore 32-bit (s=8)"]


def test_train_reference_runs_all_three(tmp_path, monkeypatch):
    import galorex.train.trainer as trainer

    # a few steps of the same recipe; the point is that every optimizer goes through the loop
    original = trainer.TrainConfig

    def small(**kw):
        return original(**{**kw, "batch_size": 4, "seq_len": 32, "eval_batches": 2, "threads": 1})

    monkeypatch.setattr(trainer, "TrainConfig", small)
    main(["--out", str(tmp_path), "--device", "cpu", "train-reference", "--steps", "3"])
    results = json.loads((tmp_path / "train_reference.json").read_text())["results"]
    assert {"adamw", "galore"} <= set(results)
    for r in results.values():
        assert r["final_val_loss"] < r["unigram_entropy"] + 3  # finite and sane after 3 steps


def test_synthetic_gradient_spectrum_decays():
    g = synthetic_gradient(64, 128, spectrum="decaying", seed=0, device="cpu")
    s = torch.linalg.svdvals(g)
    assert s[0] > 10 * s[32]


def test_convergence_quick(tmp_path, monkeypatch):
    import galorex.train.trainer as trainer

    original = trainer.TrainConfig

    def small(**kw):
        return original(**{**kw, "batch_size": 4, "seq_len": 32, "eval_batches": 2, "threads": 1})

    monkeypatch.setattr(trainer, "TrainConfig", small)
    main(
        [
            "--out",
            str(tmp_path),
            "convergence",
            "--steps",
            "4",
            "--lrs",
            "1e-3",
            "3e-3",
            "--seeds",
            "0",
            "1",
            "--optimizers",
            "galore",
            "natural-galore",
            "--natural-history",
            "2",
        ]
    )
    results = json.loads((tmp_path / "convergence.json").read_text())["results"]
    for r in results.values():
        assert set(r["sweep"]) == {"0.001", "0.003"}
        assert r["best_lr"] == min((float(k) for k in r["sweep"]), key=lambda lr: r["sweep"][str(lr)])
        assert len(r["seeds"]) == 2 and r["std"] >= 0
        assert r["mean"] == pytest.approx(sum(r["seeds"].values()) / 2)
    assert (tmp_path / "convergence.png").exists()


def test_all_quick_writes_every_table(tmp_path):
    main(["--out", str(tmp_path), "--device", "cpu", "--quick", "all"])
    for name in ("step", "refresh", "memory", "convergence", "train_reference"):
        assert (tmp_path / f"{name}.md").read_text().strip()
        assert json.loads((tmp_path / f"{name}.json").read_text())["results"]
    basis = json.loads((tmp_path / "basis.json").read_text())
    assert [r["data"] for r in basis["summary"]][:2] == ["gaussian", "gaussian, 8 rows ×100"]
    for row in basis["summary"]:
        # 8-bit codes are far finer than 4-bit ones, rotated or not; a Gaussian basis sits near 3.
        assert row["basis_8"] < row["basis_4"] / 10 and row["basis_8h"] < row["basis_4h"] / 10
    assert basis["summary"][0]["kurtosis"] == pytest.approx(3.0, abs=0.5)


@pytest.mark.parametrize(
    "argv",
    [
        ["memory", "--quick", "--out", "OUT"],
        ["--quick", "--out", "OUT", "memory"],
        ["--out", "X", "memory", "--out", "OUT", "--quick"],
    ],
    ids=["after", "before", "after-overrides"],
)
def test_common_options_go_before_or_after_the_subcommand(argv, monkeypatch, tmp_path):
    import galorex.bench.__main__ as bench_main

    seen = []
    monkeypatch.setitem(bench_main.COMMANDS, "memory", lambda args: seen.append((args.out, args.quick)))
    argv = [str(tmp_path) if a == "OUT" else a for a in argv]
    assert bench_main.main(argv) == 0
    assert seen == [(str(tmp_path), True)]
