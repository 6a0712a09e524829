import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from galorex.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _names(d):
    return sorted(p.name for p in Path(d).iterdir())


def test_round_trip(tmp_path):
    obj = {
        "model": {"w": torch.randn(3, 4), "b": torch.arange(4)},
        "step": 7,
        "lr": 1e-3,
        "name": "run",
        "flags": [True, None, (1, 2)],
        "batcher": {"epoch": 1, "position": 2, "seed": 3},
    }
    path = save_checkpoint(obj, tmp_path / "ckpts", 7)
    assert path == tmp_path / "ckpts" / "ckpt-00000007.pt"
    out = load_checkpoint(path)
    assert torch.equal(out["model"]["w"], obj["model"]["w"])
    assert torch.equal(out["model"]["b"], obj["model"]["b"])
    assert {k: out[k] for k in ("step", "lr", "name", "batcher")} == {
        k: obj[k] for k in ("step", "lr", "name", "batcher")
    }
    assert list(out["flags"][:2]) == [True, None] and tuple(out["flags"][2]) == (1, 2)
    # Nothing but the checkpoint is left behind.
    assert _names(tmp_path / "ckpts") == ["ckpt-00000007.pt"]


def test_keep_last_pruning(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step}, tmp_path, step, keep_last=2)
    assert _names(tmp_path) == ["ckpt-00000004.pt", "ckpt-00000005.pt"]

    # The file just written survives even if it is not among the highest steps.
    save_checkpoint({"step": 3}, tmp_path, 3, keep_last=2)
    assert _names(tmp_path) == ["ckpt-00000003.pt", "ckpt-00000005.pt"]

    keep_all = tmp_path / "all"
    for step in range(5):
        save_checkpoint({"step": step}, keep_all, step, keep_last=None)
    assert len(_names(keep_all)) == 5

    with pytest.raises(ValueError):
        save_checkpoint({}, tmp_path, 9, keep_last=0)
    with pytest.raises(ValueError):
        save_checkpoint({}, tmp_path, -1)


def test_latest_checkpoint_ignores_temp_and_junk(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint({"step": 5}, tmp_path, 5)
    (tmp_path / ".ckpt-00000009.x1y2.tmp").write_bytes(b"partial")
    (tmp_path / "ckpt-00000010.pt.tmp").write_bytes(b"junk")
    (tmp_path / "ckpt-latest.pt").write_bytes(b"junk")
    (tmp_path / "ckpt-00000011.pt").mkdir()  # not a file
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000005.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 5

    # Steps are compared as numbers, not strings, past 8 digits.
    save_checkpoint({"step": 10**8}, tmp_path, 10**8, keep_last=None)
    save_checkpoint({"step": 99_999_999}, tmp_path, 99_999_999, keep_last=None)
    assert latest_checkpoint(tmp_path).name == "ckpt-100000000.pt"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 99_999_999, 10**8]

    # A later save cleans up the stale temp file left by a killed writer.
    assert not (tmp_path / ".ckpt-00000009.x1y2.tmp").exists()


def test_corrupt_or_unsafe_checkpoint_raises(tmp_path):
    good = save_checkpoint({"w": torch.randn(1000)}, tmp_path, 1)
    data = good.read_bytes()

    truncated = tmp_path / "ckpt-00000002.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "ckpt-00000003.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    empty = tmp_path / "ckpt-00000004.pt"
    empty.write_bytes(b"")
    missing = tmp_path / "ckpt-00000005.pt"

    for path in (truncated, garbage, empty, missing):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg

    # Objects weights_only refuses get a message saying what to store instead.
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"arr": np.arange(3)}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(unsafe)
    assert isinstance(CheckpointError("x"), ValueError)


def _draws():
    return (
        torch.rand(5).tolist(),
        torch.randint(0, 1000, (3,)).tolist(),
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
    )


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    # Leave cached Gaussians in both random and numpy, the awkward parts of their state.
    random.gauss(0.0, 1.0)
    np.random.standard_normal()

    state = rng_state()
    path = save_checkpoint({"rng": state}, tmp_path, 1)
    expected = _draws()

    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    assert _draws() != expected

    set_rng_state(load_checkpoint(path)["rng"])  # weights_only=True load
    assert _draws() == expected
    # Restoring twice from the same dict is idempotent.
    set_rng_state(state)
    assert _draws() == expected


_KILL_CHILD = textwrap.dedent(
    """
    import sys, torch
    from galorex.train.checkpoint import save_checkpoint
    directory = sys.argv[1]
    save_checkpoint({"step": 1, "w": torch.full((16,), 1.0)}, directory, 1, keep_last=2)
    big = torch.empty(25_000_000)  # ~100 MB: a save takes long enough to be caught mid-write
    step = 2
    while True:
        big.fill_(float(step))
        save_checkpoint({"step": step, "w": big}, directory, step, keep_last=2)
        step += 1
    """
)


def _kill_during_save(directory: Path, tmp_path: Path) -> Path | None:
    """Run the child, SIGKILL it while a big temp file is being written.

    Returns the leftover temp file, or None if the kill landed between saves.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    err_path = tmp_path / f"child-{directory.name}.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_CHILD, str(directory)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=str(REPO_ROOT),
        )
    try:
        deadline = time.monotonic() + 60.0
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"checkpoint writer exited early (rc={proc.returncode}): "
                    f"{err_path.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("timed out waiting for the writer to start a large checkpoint")
            try:
                # >1 MB means a big save (step >= 2) is under way, so step 1 is complete.
                if any(p.name.startswith(".ckpt-") and p.stat().st_size > 1 << 20 for p in directory.iterdir()):
                    break
            except (FileNotFoundError, OSError):
                pass  # the file was renamed or pruned between listing and stat
            time.sleep(0.001)
        proc.kill()  # SIGKILL on POSIX: no handlers, no cleanup
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    leftovers = [p for p in directory.iterdir() if p.name.startswith(".ckpt-")]
    assert len(leftovers) <= 1, leftovers
    return leftovers[0] if leftovers else None


def test_sigkill_during_save_leaves_loadable_latest(tmp_path):
    try:
        _check_sigkill(tmp_path)
    finally:
        # ~300 MB per attempt; pytest would otherwise keep it in its basetemp.
        for attempt in tmp_path.glob("run*"):
            shutil.rmtree(attempt, ignore_errors=True)


def _check_sigkill(tmp_path):
    leftover = None
    # The kill is essentially always mid-write (~0.2 s window vs ~1 ms reaction);
    # retrying bounds the rare unlucky scheduling instead of flaking.
    for attempt in range(3):
        directory = tmp_path / f"run{attempt}"
        directory.mkdir()
        leftover = _kill_during_save(directory, tmp_path)

        found = list_checkpoints(directory)
        assert found, "no complete checkpoint survived the kill"
        assert 1 <= len(found) <= 3
        for step, path in found:
            obj = load_checkpoint(path)  # weights_only=True; raises on any corruption
            assert obj["step"] == step
            w = obj["w"]
            assert float(w.min()) == float(w.max()) == float(step)
            if step >= 2:
                assert w.numel() == 25_000_000

        latest = latest_checkpoint(directory)
        assert latest == found[-1][1]
        assert load_checkpoint(latest)["step"] == found[-1][0]
        if leftover is not None:
            break
    assert leftover is not None, "the writer was never killed in the middle of a save"
    # The partial temp file would be rejected, and the next save removes it.
    assert not leftover.name.startswith("ckpt-")
    save_checkpoint({"step": 10**6}, directory, 10**6)
    assert not leftover.exists()
