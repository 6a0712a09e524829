"""``python -m galorex.bench peak-memory``: a galorex-train configuration measured in a fresh
process, beside the analytic breakdown; and the memory figure's table and plot."""

from __future__ import annotations

import json

import pytest

from galorex.bench import peak_memory
from galorex.bench.__main__ import main

pytestmark = pytest.mark.usefixtures("restore_torch_globals")

FLAGS = ["--model", "llama-tiny", "--batch-size", "2", "--seq-len", "32", "--threads", "1"]


def test_peak_memory_reports_three_points_timings_and_the_estimate(tmp_path, capsys):
    flags = FLAGS + ["--optimizer", "galore", "--rank", "8", "--optim-bits", "8", "--layerwise"]
    assert main(["--out", str(tmp_path), "peak-memory", "--steps", "2", "--", *flags]) == 0
    table = capsys.readouterr().out
    data = json.loads((tmp_path / "peak_memory.json").read_text())
    assert data["train_args"] == flags and data["steps"] == 2
    points = list(data["peaks"])
    assert points == ["after_construction", "after_first_step", "after_last_step"]
    rss = [data["peaks"][p]["cpu_max_rss"] for p in points]
    assert 0 < rss[0] <= rss[1] <= rss[2] <= data["peak_bytes"]  # the end: evaluation, saving
    assert data["first_step_s"] > 0 and data["later_step_s"] > 0
    est = data["estimate"]
    parts = {"weights", "weight_scales", "gradients", "optimizer_state", "activations", "step_workspace", "runtime"}
    assert set(est) == parts | {"total"}
    # The estimate is the one galorex-train checks before building (the same function).
    assert est == peak_memory.estimate(flags)
    assert "after first step" in table and "| optimizer state |" in table


def test_figure_table_and_plot_from_estimates_and_a_separate_run(tmp_path, capsys):
    # A separate run's summary.json (made up: the figure only reads these keys) stands in for a
    # measured configuration; the rest are analytic only.
    peaks = {p: {"cpu_max_rss": 2**30 + i} for i, p in enumerate(("after_construction", "after_first_step"))}
    peaks["after_last_step"] = {"cpu_max_rss": 2**30 + 2}
    summary = tmp_path / "summary.json"
    fake_summary = {
        "memory": {**peaks, "first_step_s": 3.0},
        "steps": 3,
        "wall_s": 5.0,
        "peak_memory_bytes": 2**30 + 3,
        "peak_memory_kind": "cpu_max_rss",
        "memory_estimate": None,
        "device": "cpu",
        "parameters": 1,
    }
    summary.write_text(json.dumps(fake_summary))
    capsys.readouterr()
    args = ["--out", str(tmp_path / "fig"), "peak-memory", "--figure", "--models", "llama-60m"]
    args += ["--measured", f"llama-60m:+ 4-bit basis={summary}"]
    assert main(args) == 0
    table = (tmp_path / "fig" / "peak_memory_figure.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| llama-60m")]
    assert [r.split("|")[2].strip() for r in rows] == [label for label, _ in peak_memory.FIGURE_CONFIGS]
    data = json.loads((tmp_path / "fig" / "peak_memory_figure.json").read_text())
    totals = [r["estimate"]["total"] for r in data["models"]["llama-60m"]]
    # Each step of the recipe lowers the analytic peak (INT8 weights included), except AdamW ->
    # GaLore at this small size and rank (GaLore's bases outweigh what it saves on the 512-wide
    # projections).
    assert all(totals[i + 1] < totals[i] for i in range(1, 6))
    labels = [label for label, _ in peak_memory.FIGURE_CONFIGS]
    measured = data["models"]["llama-60m"][labels.index("+ 4-bit basis")]
    assert measured["peak_bytes"] == 2**30 + 3 and measured["first_step_s"] == 3.0 and measured["later_step_s"] == 1.0
    assert "| 1.00 | 3.0 | 1.0 |" in rows[labels.index("+ 4-bit basis")]
    assert (tmp_path / "fig" / "peak_memory_figure.png").stat().st_size > 0
