"""``python -m galorex.bench`` runs end to end at small sizes and its figures are consistent."""

from __future__ import annotations

import json
import math
import statistics

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


def test_step_rows_and_per_round_ratios(tmp_path):
    import statistics

    from galorex.bench.__main__ import FLOOR

    args = ["--out", str(tmp_path), "--device", "cpu", "step", "--model", "llama-tiny", "--rank", "8"]
    main([*args, "--repeats", "3", "--refresh-repeats", "0", "--natural-history", "0", "--rows", "galore-fused"])
    data = json.loads((tmp_path / "step.json").read_text())["results"]
    # the reference rows always run; of galorex's only the one asked for
    assert {n for n in data if n.startswith("galorex")} == {"galorex GaLoreAdamW (fused=True)"}
    assert FLOOR in data and "torch AdamW (foreach)" in data
    for r in data.values():
        per_round = [a / b for a, b in zip(r["all_s"], data[FLOOR]["all_s"])]
        assert r["vs_floor_paired"] == statistics.median(per_round)
    assert data[FLOOR]["vs_floor_paired"] == 1.0
    with pytest.raises(SystemExit):
        main([*args, "--rows", "no-such-row"])


def test_step_schedule_and_bf16_rows(tmp_path):
    args = ["--out", str(tmp_path), "--device", "cpu", "step", "--model", "llama-tiny", "--rank", "8"]
    args += ["--repeats", "2", "--refresh-repeats", "0", "--natural-history", "0", "--rows", "galore", "galore-bf16"]
    main([*args, "--schedule-periods", "2", "--schedule-gap", "3"])
    data = json.loads((tmp_path / "step.json").read_text())
    results = data["results"]
    assert data["bf16_vs_float32_paired"] == pytest.approx(
        statistics.median(
            a / b
            for a, b in zip(
                results["galorex GaLoreAdamW (proj_precision='bf16')"]["all_s"], results["galorex GaLoreAdamW"]["all_s"]
            )
        )
    )
    schedule = data["schedule"]
    together, staggered = (schedule["results"][f"galorex GaLoreAdamW, {k}"] for k in ("together", "staggered"))
    for r in schedule["results"].values():
        assert len(r["all_s"]) == 6  # two periods of three steps, after the first step
        assert r["slowest_s"] == max(r["all_s"]) and r["total_s"] == pytest.approx(sum(r["all_s"]))
    assert schedule["staggered_vs_together_total"] == pytest.approx(staggered["total_s"] / together["total_s"])
    assert "staggered / together" in (tmp_path / "step.md").read_text()


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
    assert by_spectrum["decaying"]["energy_randomized_bf16"] >= 0.99
    for r in results:  # re-orthonormalised in float32 either way
        assert r["orthonormality_randomized"] < 1e-4 and r["orthonormality_randomized_bf16"] < 1e-4
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
            "--extend",
            "0",
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
        assert r["seeds"]["0"] == r["sweep"][str(r["best_lr"])]  # the sweep's run is seed 0's
    assert (tmp_path / "convergence.png").exists()
    # Every run is recorded once: 2 optimizers x (2 rates + 1 more seed).
    assert len((tmp_path / "convergence_runs.jsonl").read_text().splitlines()) == 6
    table = (tmp_path / "convergence.md").read_text()
    assert "| galore | 0.003 |" in table or "| galore | 0.001 |" in table
    assert "vs galore" in table


def test_convergence_next_lr_continues_the_grid():
    from galorex.bench.convergence import next_lr

    grid = [1e-3, 3e-3, 1e-2, 3e-2]
    assert next_lr(grid, up=True) == 0.1 and next_lr(grid, up=False) == 3e-4
    assert next_lr([1e-2, 3e-2, 1e-1], up=True) == 0.3
    assert next_lr([1e-3, 1e-2], up=True) == 0.1 and next_lr([1e-3, 1e-2], up=False) == 1e-4
    with pytest.raises(ValueError, match="at least two rates"):
        next_lr([1e-3], up=True)


def _fake_runs(monkeypatch, best: dict[str, float]):
    """Replace the training run by a loss that is a parabola in log10(lr) with its minimum at
    ``best[optimizer]`` (offset by the seed), non-finite above 0.2: the sweep's bookkeeping alone,
    in no time. Returns the list of runs made."""
    import galorex.bench.convergence as convergence

    made = []

    def fake(settings):
        name, lr, seed = settings["optimizer"], settings["lr"], settings["seed"]
        made.append((name, lr, seed))
        loss = 2 + (math.log10(lr) - math.log10(best[name])) ** 2 + 0.01 * seed if lr <= 0.2 else math.nan
        return {"final_val_loss": loss, "curve": [(1, 3.0), (2, loss)], "unigram_entropy": 3.3, "seconds": 0.0}

    monkeypatch.setattr(convergence, "_train_one", fake)
    return made


def test_convergence_extends_an_edge_and_reuses_runs(tmp_path, monkeypatch):
    made = _fake_runs(monkeypatch, {"adamw": 3e-3, "galore": 0.1, "apollo-mini": 1e-4})
    argv = ["--out", str(tmp_path), "convergence", "--optimizers", "adamw", "galore", "apollo-mini"]
    argv += ["--lrs", "1e-3", "3e-3", "1e-2", "3e-2", "--seeds", "0", "1", "2", "--extend", "1"]
    main(argv)
    data = json.loads((tmp_path / "convergence.json").read_text())
    res = data["results"]
    # adamw: inside the grid, no extension; galore: one point up finds 0.1; apollo-mini: one point
    # down (3e-4) is still the edge, and --extend 1 stops there and says so.
    assert list(res["adamw"]["sweep"]) == ["0.001", "0.003", "0.01", "0.03"]
    assert res["adamw"]["best_lr"] == 3e-3 and not res["adamw"]["best_at_edge"]
    assert res["galore"]["best_lr"] == 0.1 and res["galore"]["best_at_edge"]
    assert res["apollo-mini"]["best_lr"] == 3e-4 and res["apollo-mini"]["best_at_edge"]
    assert res["adamw"]["mean"] == pytest.approx(2.01) and res["adamw"]["std"] == pytest.approx(0.01)
    assert res["galore"]["vs_adamw"] == pytest.approx(0.0)
    assert len(made) == 4 * 3 + 2 + 3 * 2 and len(set(made)) == len(made)
    table = (tmp_path / "convergence.md").read_text()
    assert "| galore | — | 6.0000 | 4.3192 | 3.0000 | 2.2734 | **2.0000** | 0.1 (edge) |" in table
    assert "| adamw | — | 2.2276 | **2.0000** | 2.2734 | 3.0000 | — | 0.003 |" in table

    # The same command again trains nothing; --rerun trains everything again.
    made.clear()
    main(argv)
    assert made == [] and json.loads((tmp_path / "convergence.json").read_text())["runs_reused"] == 20
    assert json.loads((tmp_path / "convergence.json").read_text())["results"]["galore"]["mean"] == res["galore"]["mean"]
    main([*argv, "--rerun"])
    assert len(made) == 20

    # --extend 2 goes on from the recorded runs: galore's 0.3 diverges (non-finite) and 0.1 stays.
    made.clear()
    main([*argv[:-1], "2"])
    assert sorted(made) == [("apollo-mini", 1e-4, 0), ("apollo-mini", 1e-4, 1), ("apollo-mini", 1e-4, 2)] + [
        ("galore", 0.3, 0)
    ]
    res = json.loads((tmp_path / "convergence.json").read_text())["results"]
    assert res["galore"]["best_lr"] == 0.1 and not res["galore"]["best_at_edge"]
    assert res["apollo-mini"]["best_lr"] == 1e-4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--lrs", "0", "1e-3"], "--lrs must be positive"),
        (["--seeds", "0", "0"], "--seeds has a repeated seed"),
        (["--lrs", "1e-3"], "--extend needs at least two rates"),
        (["--optimizers", "adamw", "adamx"], "--optimizers: unknown"),
    ],
)
def test_convergence_rejects_bad_flags(tmp_path, monkeypatch, flags, message):
    made = _fake_runs(monkeypatch, {"adamw": 3e-3})
    with pytest.raises(ValueError, match=message):
        main(["--out", str(tmp_path), "convergence", "--optimizers", "adamw", *flags])
    assert made == []


def test_convergence_runs_in_parallel_processes(tmp_path):
    # Two real (small) runs, each in its own spawned process with one thread.
    main(["--out", str(tmp_path), "--quick", "convergence", "--optimizers", "adamw", "--jobs", "2"])
    data = json.loads((tmp_path / "convergence.json").read_text())
    assert data["threads"] >= 1 and data["jobs"] == 2
    r = data["results"]["adamw"]
    assert set(r["seeds"]) == {"0", "1"} and r["seeds"]["0"] != r["seeds"]["1"]
    # Ten steps from the uniform guess over 256 bytes (ln 256 = 5.55) go down, and stay finite.
    assert all(math.isfinite(loss) and loss < math.log(256) for loss in r["seeds"].values())
    lines = [json.loads(line) for line in (tmp_path / "convergence_runs.jsonl").read_text().splitlines()]
    assert sorted(tuple(line["run"]) for line in lines) == [("adamw", 3e-3, 0), ("adamw", 3e-3, 1)]


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


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_int8_linear_times_both_layers_in_the_dtype_asked(tmp_path, dtype):
    main(["--out", str(tmp_path), "--device", "cpu", "--quick", "int8-linear", "--dtype", dtype])
    table = (tmp_path / "int8_linear.md").read_text()
    assert f"| {dtype} nn.Linear |" in table and f"{dtype} compute)" in table
    data = json.loads((tmp_path / "int8_linear.json").read_text())
    assert data["args"]["dtype"] == dtype
    assert len(data["ratios"]) == 3 and all(r > 0 for r in data["ratios"])
