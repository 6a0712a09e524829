"""``python -m galorex.bench halo`` runs end to end at small sizes and its table is consistent."""

from __future__ import annotations

import json

import pytest
import torch

from galorex.bench.__main__ import main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_halo_bench_quick(tmp_path):
    main(["--out", str(tmp_path), "--device", "cpu", "--quick", "halo"])
    data = json.loads((tmp_path / "halo.json").read_text())
    rows = data["layer"]
    assert len(rows) == 3 * 2 * 2 * 3  # data sources x formats x scales x levels
    assert {r["data"] for r in rows} == {"gaussian", "outlier channels", "llama-tiny step"}
    for r in rows:
        for key in ("Y", "E_X", "G"):
            assert 0 < r[key] < 0.2, r
    by = {(r["data"], r["fmt"], r["granularity"], r["level"]): r for r in rows}
    # Levels only change the GEMMs they rotate: E_X is the same at levels 0 and 1, G at every level.
    for (source, fmt, gran, level), r in by.items():
        assert r["G"] == by[source, fmt, gran, 0]["G"]
        if level == 1:
            assert r["E_X"] == by[source, fmt, gran, 0]["E_X"]
    # Gaussian data has no outlier channels: "normal" is everything.
    g = by["gaussian", "int8", "tensor", 0]
    assert g["Y"] == g["Y normal"]
    assert len(data["grad_format"]) == 3 * 2 * 2 and len(data["projection"]) == 3
    assert (tmp_path / "halo.md").read_text().startswith("Relative error")


def test_halo_gpu_benchmark_smoke_and_no_cuda(tmp_path, capsys):
    from galorex.bench import halo_gpu

    if not torch.cuda.is_available():
        assert halo_gpu.main(["--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert (
        halo_gpu.main(
            [
                "--device",
                "cpu",
                "--tokens",
                "64",
                "--in-features",
                "32",
                "--out-features",
                "32",
                "--warmup",
                "0",
                "--iters",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "halo_gpu.json").read_text())["rows"]
    halo = [r for r in rows if r["what"].startswith("HaloLinear")]
    assert len(halo) == 12 and all(r["rel_err_Y"] < 0.06 for r in halo)
