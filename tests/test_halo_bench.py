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
    # data sources x formats x (per tensor, per row, per tensor with save_quantized) x levels
    assert len(rows) == 3 * 2 * 3 * 3
    assert {r["data"] for r in rows} == {"gaussian", "outlier channels", "llama-tiny step"}
    for r in rows:
        for key in ("Y", "E_X", "G"):
            assert 0 < r[key] < 0.2, r
    by = {(r["data"], r["fmt"], r["granularity"], r["save_quantized"], r["level"]): r for r in rows}
    # Levels only change the GEMMs they rotate: E_X is the same at levels 0 and 1, G at every level.
    for (source, fmt, gran, saved, level), r in by.items():
        if saved:
            # Same forward as the default per tensor; at level 0 the same quantised values throughout.
            assert r["Y"] == by[source, fmt, gran, False, level]["Y"]
            if level == 0:
                assert all(r[c] == by[source, fmt, gran, False, 0][c] for c in ("E_X", "G"))
            continue
        assert r["G"] == by[source, fmt, gran, saved, 0]["G"]
        if level == 1:
            assert r["E_X"] == by[source, fmt, gran, saved, 0]["E_X"]
    # Gaussian data has no outlier channels: "normal" is everything.
    g = by["gaussian", "int8", "tensor", False, 0]
    assert g["Y"] == g["Y normal"]
    assert len(data["grad_format"]) == 3 * 2 * 2 and len(data["projection"]) == 3
    # 128 tokens x 64 -> 32: 8-bit X and W (8192 + 2048 bytes) against X in float32 or bfloat16.
    mem = {(r["what"], r["dtype"], r["level"]): r for r in data["saved_bytes"]}
    assert len(mem) == 2 * (3 + 2)
    layer = {key[1:]: r for key, r in mem.items() if key[0] == "one layer"}
    assert layer["float32", 1]["default"] == 128 * 64 * 4 and layer["bfloat16", 1]["default"] == 128 * 64 * 2
    assert layer["float32", 1]["save_quantized"] == 128 * 64 + 32 * 64 + 2 * 4
    assert layer["float32", 2]["save_quantized"] == 128 * 64 + 4  # level 2 keeps the master W, not Q(W R_K)
    assert mem["llama-tiny", "float32", 2]["ratio"] < 1
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
    # 12 default variants, 4 save_quantized, 4 with cuBLAS GEMMs behind the Triton quantisers
    assert len(halo) == 2 * 3 * 2 + 2 * 2 + 4 and all(r["rel_err_Y"] < 0.06 for r in halo)
    # 64 tokens x 32 -> 32, bf16 X: 4096 bytes; save_quantized keeps 2048 + 1024 bytes + two scales.
    mib = {r["what"]: r["saved_MiB"] * 2**20 for r in halo}
    assert mib["HaloLinear int8 level 1 tensor fwd+bwd"] == 64 * 32 * 2
    assert mib["HaloLinear int8 level 1 tensor save_quantized fwd+bwd"] == 64 * 32 + 32 * 32 + 8
