"""``python -m galorex.bench hf-trainer --quick``: a tiny transformers Llama through the Trainer with
torch AdamW and GaLoreAdamW, end to end; and the clear exit without transformers."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from galorex.bench import hf_trainer
from galorex.bench.__main__ import main


def test_hf_trainer_without_transformers_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hf_trainer, "_import_hf", lambda: (None, "hf-trainer needs transformers"))
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--quick", "hf-trainer"])
    assert exc.value.code == 2
    assert "needs transformers" in capsys.readouterr().err
    assert not (tmp_path / "hf_trainer.json").exists()
    assert hf_trainer.bench_hf_trainer(argparse.Namespace(in_all=True)) == {}  # `all` skips it instead


def test_hf_trainer_bench_quick(tmp_path):
    pytest.importorskip("transformers", reason="install the [hf] extra (transformers, accelerate)")
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate: install the [hf] extra")
    main(["--out", str(tmp_path), "--device", "cpu", "--quick", "hf-trainer"])
    assert (tmp_path / "hf_trainer.md").read_text().startswith("transformers.LlamaForCausalLM")
    data = json.loads((tmp_path / "hf_trainer.json").read_text())
    assert set(data["results"]) == {"adamw", "galore"}
    assert data["env"]["transformers"]
    first = {name: r["initial_train_loss"] for name, r in data["results"].items()}
    assert first["adamw"] == first["galore"]  # same initial weights and first batch
    for name, r in data["results"].items():
        assert len(r["train_losses"]) == hf_trainer.QUICK["steps"], name
        for key in ("final_train_loss", "final_val_loss", "initial_val_loss"):
            assert math.isfinite(r[key]), (name, key)
        assert r["final_train_loss"] < r["initial_train_loss"], name
        assert r["final_val_loss"] < r["initial_val_loss"], name
    assert data["results"]["galore"]["projected"] > 0  # GaLore really projected some weights
