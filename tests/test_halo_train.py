"""``galorex-train --halo``: the HALO layers inside the training command."""

from __future__ import annotations

import json

import pytest
from problems import tiny_train_args

from galorex.train.cli import main

TINY = tiny_train_args(sample_tokens=0) + ["--eval-every", "0"]


pytestmark = pytest.mark.usefixtures("restore_torch_globals")


@pytest.mark.parametrize("level,fmt", [(1, "fp8"), (2, "int8")])
def test_train_with_halo_runs_and_resumes(tmp_path, capsys, level, fmt):
    out = tmp_path / "run"
    halo = ["--halo", str(level), "--halo-format", fmt, "--optimizer", "galore", "--rank", "8"]
    assert main(TINY + halo + ["--steps", "2", "--save-every", "2", "--out", str(out)]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["steps"] == 2 and first["final_val_loss"] < 6.0
    # A resume must ask for the same HALO settings.
    rc = main(
        TINY
        + ["--halo", str(level), "--optimizer", "galore", "--rank", "8", "--steps", "3", "--out", str(out), "--resume"]
        + (["--halo-format", "fp8"] if fmt == "int8" else ["--halo-format", "int8"])
    )
    assert rc == 2 and "halo_format" in capsys.readouterr().err
    assert main(TINY + halo + ["--steps", "3", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_halo_changes_the_run(tmp_path):
    losses = {}
    for name, extra in (("plain", []), ("halo", ["--halo", "0", "--halo-format", "int8"])):
        out = tmp_path / name
        assert (
            main(TINY + extra + ["--steps", "2", "--optimizer", "adamw", "--save-every", "0", "--out", str(out)]) == 0
        )
        losses[name] = json.loads((out / "summary.json").read_text())["final_val_loss"]
    # Same seed and data: a different number shows the quantised layers were in the loop, a close
    # one that they compute the same function.
    assert losses["plain"] != losses["halo"] and abs(losses["plain"] - losses["halo"]) < 0.05, losses


def test_train_with_halo_save_quantized(tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    plain = ["--halo", "1", "--halo-format", "int8", "--optimizer", "adamw"]
    saving = plain + ["--halo-save-quantized"]
    assert main(TINY + saving + ["--steps", "2", "--save-every", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_val_loss"] < 6.0
    # It changes the gradients, so a resume must ask for it too.
    assert main(TINY + plain + ["--steps", "3", "--out", str(out), "--resume"]) == 2
    assert "halo_save_quantized" in capsys.readouterr().err
    assert main(TINY + saving + ["--steps", "3", "--out", str(out), "--resume"]) == 0
    assert main(TINY + ["--halo-save-quantized", "--steps", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "--halo-save-quantized needs --halo" in capsys.readouterr().err
    # A checkpoint written before the flag existed has no such key: it resumes as the default (off).
    old = tmp_path / "old"
    assert main(TINY + plain + ["--steps", "2", "--save-every", "2", "--out", str(old)]) == 0
    (ckpt,) = (old / "checkpoints").iterdir()
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["halo_save_quantized"]
    torch.save(state, ckpt)
    assert main(TINY + plain + ["--steps", "3", "--out", str(old), "--resume"]) == 0
