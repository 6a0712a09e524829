"""``galorex-train`` end to end: every optimizer through the command, outputs and their sanity,
bit-exact resumption, a real SIGKILL, one-line errors for bad input, and ``--help``.

Everything runs ``llama-tiny`` with tiny batches on one thread, in-process through
``galorex.train.cli.main`` where possible, with every ``--out`` under ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from problems import assert_same, tiny_train_args
from safetensors.torch import load_file

from galorex.train.checkpoint import list_checkpoints, load_checkpoint
from galorex.train.cli import main
from galorex.weights import codes as weight_codes

TINY = tiny_train_args()
ERROR_PREFIX = "galorex-train: error:"


pytestmark = pytest.mark.usefixtures("restore_torch_globals")


def run_quiet(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout/stderr captured, for module-scoped fixtures (which run outside
    the autouse fixture above, so this restores torch's threads and RNG itself)."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    return rc, out.getvalue(), err.getvalue()


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_unchanged(before: dict[str, bytes], folder: Path) -> None:
    for rel, data in before.items():
        p = folder / rel
        assert p.is_file(), f"{rel} was removed"
        assert p.read_bytes() == data, f"{rel} was overwritten"


def assert_one_line_error(rc: int, out: str, err: str, *needles: str) -> str:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert out == "", out
    return line


def model_json(path: Path, hidden: int) -> Path:
    path.write_text(
        json.dumps(
            {
                "vocab_size": 256,
                "hidden_size": hidden,
                "intermediate_size": 176,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "max_seq_len": 64,
            }
        )
    )
    return path


# ----------------------------------------------------------------------------- 1. every optimizer
LR, WARMUP, STEPS = 3e-3, 2, 4
SMOKE = {
    "adamw": ["--optimizer", "adamw"],
    "galore": ["--optimizer", "galore"],
    "galore-randomized": ["--optimizer", "galore", "--refresh-method", "randomized", "--update-proj-gap", "2"],
    "galore-reproject": ["--optimizer", "galore", "--moment-policy", "reproject", "--update-proj-gap", "2"],
    "galore-bf16": ["--optimizer", "galore", "--dtype", "bf16"],
    "adamw-accum2": ["--optimizer", "adamw", "--grad-accum", "2"],
    "natural-galore": ["--optimizer", "natural-galore", "--natural-history", "3", "--update-proj-gap", "2"],
    "galore-8bit": ["--optimizer", "galore", "--optim-bits", "8", "--rank", "64"],
    "adamw-8bit": ["--optimizer", "adamw", "--optim-bits", "8"],
    "gradnorm-lorp": ["--optimizer", "gradnorm-lorp"],
    "gradnorm-lorp-8bit": ["--optimizer", "gradnorm-lorp", "--optim-bits", "8", "--rank", "64"],
    "gradnorm-lorp-8bit-basis4": ["--optimizer", "gradnorm-lorp", "--optim-bits", "8", "--basis-bits", "4"],
    "galore-adafactor-8bit": ["--optimizer", "galore-adafactor", "--optim-bits", "8", "--beta1", "0.9", "--rank", "64"],
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    runs = {}
    for name, extra in SMOKE.items():
        out = tmp_path_factory.mktemp("smoke") / name
        argv = (
            TINY
            + extra
            + [
                "--steps",
                str(STEPS),
                "--eval-every",
                "2",
                "--log-every",
                "1",
                "--save-every",
                "2",
                "--warmup",
                str(WARMUP),
                "--lr",
                str(LR),
                "--out",
                str(out),
            ]
        )
        rc, stdout, stderr = run_quiet(argv)
        runs[name] = {"rc": rc, "stdout": stdout, "stderr": stderr, "out": out, "argv": argv}
    return runs


@pytest.mark.parametrize("name", list(SMOKE))
def test_optimizer_runs_and_writes_sane_outputs(smoke_runs, name):
    r = smoke_runs[name]
    assert r["rc"] == 0, r["stderr"]
    out: Path = r["out"]
    accum = 2 if "accum2" in name else 1

    rows = read_metrics(out)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    # Linear warm-up to LR over 2 steps, then the cosine to 0.1*LR at step STEPS; the logged lr
    # is the one the step used.
    expected_lr = [0.5 * LR, LR, LR, (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))) * LR]
    for row, lr in zip(rows, expected_lr):
        assert math.isfinite(row["train_loss"]) and 0 < row["train_loss"] < 10, row
        assert row["lr"] == pytest.approx(lr, rel=1e-12), row
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, row
        assert ("val_loss" in row) == (row["step"] % 2 == 0), row
        if "val_loss" in row:
            assert math.isfinite(row["val_loss"]) and 0 < row["val_loss"] < 10, row
    # A byte-level model starts near ln(256) and learns something in 4 steps.
    assert rows[0]["train_loss"] == pytest.approx(math.log(256), abs=0.5)
    assert rows[-1]["val_loss"] < rows[1]["val_loss"]

    s = read_summary(out)
    for key in (
        "final_val_loss",
        "val_perplexity",
        "steps",
        "tokens",
        "wall_s",
        "optimizer",
        "optimizer_state_bytes",
        "peak_memory_bytes",
    ):
        assert key in s, key
    assert s["steps"] == STEPS
    assert s["tokens"] == STEPS * 4 * 32 * accum
    assert s["optimizer"] == SMOKE[name][1]
    assert s["dtype"] == ("bf16" if "bf16" in name else "fp32")
    assert s["final_val_loss"] == rows[-1]["val_loss"]
    assert math.isfinite(s["final_val_loss"]) and 0 < s["final_val_loss"] < 10
    assert s["val_perplexity"] == pytest.approx(math.exp(s["final_val_loss"]), rel=1e-9)
    assert math.isfinite(s["wall_s"]) and s["wall_s"] > 0
    assert isinstance(s["optimizer_state_bytes"], int) and s["optimizer_state_bytes"] > 0
    assert isinstance(s["peak_memory_bytes"], int) and s["peak_memory_bytes"] > 0

    png = out / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    assert json.loads((out / "config.json").read_text())["train"]["optimizer"] == s["optimizer"]

    stdout = r["stdout"]
    assert f"validation loss {s['final_val_loss']:.4f}" in stdout
    assert f"perplexity {s['val_perplexity']:.2f}" in stdout
    assert str(out) in stdout
    assert "loss.png" in stdout


def test_galore_state_smaller_than_adamw(smoke_runs):
    adamw = read_summary(smoke_runs["adamw"]["out"])["optimizer_state_bytes"]
    galore = read_summary(smoke_runs["galore"]["out"])["optimizer_state_bytes"]
    assert galore < adamw


def test_bf16_parameters_are_bf16(smoke_runs):
    ckpt = load_checkpoint(smoke_runs["galore-bf16"]["out"] / "checkpoints" / "ckpt-00000004.pt")
    assert all(t.dtype == torch.bfloat16 for t in ckpt["model"].values())
    fp32 = load_checkpoint(smoke_runs["galore"]["out"] / "checkpoints" / "ckpt-00000004.pt")
    assert all(t.dtype == torch.float32 for t in fp32["model"].values())


def test_grad_accum_changes_the_trajectory(smoke_runs):
    # Two micro-batches per step must see other data than one: the losses differ from step 2 on.
    one = read_metrics(smoke_runs["adamw"]["out"])
    two = read_metrics(smoke_runs["adamw-accum2"]["out"])
    assert one[-1]["train_loss"] != two[-1]["train_loss"]


# ----------------------------------------------------------------------------- 2. optimizer names
def test_unknown_optimizer(tmp_path, capsys):
    rc = main(TINY + ["--optimizer", "nope", "--steps", "2", "--out", str(tmp_path / "o")])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, "nope", "unknown optimizer")


# ----------------------------------------------------------------------------- 3. bit-exact resume
RESUME = {
    # Basis refreshes every 4 steps, so the resumed half refreshes at 12, 16 and 20.
    "galore": ["--optimizer", "galore", "--update-proj-gap", "4"],
    # Randomized refreshes (sketches seeded per parameter and step) and moment reprojection.
    "galore-randomized-reproject": [
        "--optimizer",
        "galore",
        "--update-proj-gap",
        "4",
        "--refresh-method",
        "randomized",
        "--moment-policy",
        "reproject",
    ],
    "adamw": ["--optimizer", "adamw"],
    "natural-galore": [
        "--optimizer",
        "natural-galore",
        "--natural-history",
        "3",
        "--update-proj-gap",
        "4",
        "--moment-policy",
        "reproject",
    ],
    "gradnorm-lorp-8bit": [
        "--optimizer",
        "gradnorm-lorp",
        "--optim-bits",
        "8",
        "--rank",
        "64",
        "--update-proj-gap",
        "4",
    ],
    # INT8 weights written with stochastic rounding (draws seeded by parameter and step).
    "galore-int8-weights": ["--optimizer", "galore", "--update-proj-gap", "4", "--weight-bits", "8"],
    # bf16 weights with stochastic rounding, on AdamW (the unprojected write).
    "adamw-bf16-stochastic": ["--optimizer", "adamw", "--dtype", "bf16", "--weight-rounding", "stochastic"],
}
COMPARED = ("step", "tokens_seen", "model", "optimizer", "scheduler", "data", "rng")


def _resume_argv(extra: list[str], out: Path, steps: int = 20, save_every: int = 10, log_every: int = 1) -> list[str]:
    return (
        TINY
        + extra
        + [
            "--steps",
            str(steps),
            "--log-every",
            str(log_every),
            "--save-every",
            str(save_every),
            "--eval-every",
            "0",
            "--warmup",
            "3",
            "--out",
            str(out),
        ]
    )


@pytest.mark.parametrize("name", list(RESUME))
def test_resume_is_bit_for_bit(tmp_path, capsys, name):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_resume_argv(RESUME[name], a)) == 0  # --eval-every 0 is accepted
    assert main(_resume_argv(RESUME[name], b)) == 0
    capsys.readouterr()

    # Pretend B died between its step-10 and step-20 checkpoints.
    (b / "checkpoints" / "ckpt-00000020.pt").unlink()
    (b / "summary.json").unlink()
    assert [s for s, _ in list_checkpoints(b / "checkpoints")] == [10]
    assert main(_resume_argv(RESUME[name], b) + ["--resume"]) == 0
    cap = capsys.readouterr()
    assert "resumed from" in cap.out and "at step 10" in cap.out

    ca = load_checkpoint(a / "checkpoints" / "ckpt-00000020.pt")
    cb = load_checkpoint(b / "checkpoints" / "ckpt-00000020.pt")
    for key in COMPARED:
        assert_same(ca[key], cb[key], key)
    assert ca["optimizer"]["state"], "the optimizer has no state to compare"

    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ma] == list(range(1, 21))
    assert [r["step"] for r in mb] == list(range(1, 21))
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]
    assert [r["lr"] for r in ma] == [r["lr"] for r in mb]
    assert not any("val_loss" in r for r in ma + mb)  # --eval-every 0: only the final evaluation

    sa, sb = read_summary(a), read_summary(b)
    assert sa["steps"] == sb["steps"] == 20
    assert sa["tokens"] == sb["tokens"] == 20 * 4 * 32
    assert sa["final_val_loss"] == sb["final_val_loss"]
    assert sa["sample"] == sb["sample"]


def test_resume_between_log_lines_keeps_train_loss_exact(tmp_path, capsys):
    """--log-every 3 with checkpoints at 5 and 10: the line for step 12 averages steps 10-12.

    Resumed from step 10, the loss of step 10 (accumulated before the checkpoint) is not in the
    checkpoint, so the resumed line must still average the right steps to match the straight run.
    """
    extra = ["--optimizer", "adamw"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_resume_argv(extra, a, steps=12, save_every=5, log_every=3)) == 0
    assert main(_resume_argv(extra, b, steps=12, save_every=5, log_every=3)) == 0
    (b / "checkpoints" / "ckpt-00000012.pt").unlink()
    (b / "summary.json").unlink()
    assert main(_resume_argv(extra, b, steps=12, save_every=5, log_every=3) + ["--resume"]) == 0
    capsys.readouterr()
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [3, 6, 9, 12]
    # The parameters agree (the trajectory is exact) ...
    ca = load_checkpoint(a / "checkpoints" / "ckpt-00000012.pt")
    cb = load_checkpoint(b / "checkpoints" / "ckpt-00000012.pt")
    assert_same(ca["model"], cb["model"], "model")
    # ... so the logged mean train loss of steps 10-12 must agree too.
    assert [r["train_loss"] for r in mb] == [r["train_loss"] for r in ma]


def test_resume_tolerates_a_torn_last_metrics_line(tmp_path, capsys):
    """A run that died mid-write (disk full, power loss) leaves a partial last line in
    metrics.jsonl; resuming drops the killed run's tail and must not trip over it."""
    out = tmp_path / "run"
    argv = _resume_argv(["--optimizer", "adamw"], out, steps=4, save_every=2)
    assert main(argv) == 0
    (out / "checkpoints" / "ckpt-00000004.pt").unlink()
    (out / "summary.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_lo')
    rc = main(argv + ["--resume"])
    capsys.readouterr()
    assert rc == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 4. a real SIGKILL
def test_sigkill_then_resume(tmp_path, capsys):
    out = tmp_path / "killed"
    args = [
        "--out",
        str(out),
        "--save-every",
        "2",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--sample-tokens",
        "0",
        "--no-progress",
        "--threads",
        "1",
        "--seed",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "child.log", "wb")  # noqa: SIM115 - closed in the finally below, after the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "galorex.train", *args, "--steps", "100000"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list_checkpoints(out / "checkpoints")) < 2:
            if proc.poll() is not None:
                pytest.fail(f"trainer exited early ({proc.returncode}): {(tmp_path / 'child.log').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("no two checkpoints within 60 s")
            time.sleep(0.05)
        time.sleep(0.2)  # let it get somewhere in the middle of more work
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL

    found = list_checkpoints(out / "checkpoints")
    assert len(found) >= 2
    for step, path in found:
        ckpt = load_checkpoint(path)
        assert ckpt["step"] == step
    latest = found[-1][0]

    rc = main(args + ["--steps", str(latest + 2), "--resume"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"at step {latest}" in cap.out
    s = read_summary(out)
    assert s["steps"] == latest + 2
    assert s["tokens"] == (latest + 2) * 4 * 32
    # The killed run's log lines past the checkpoint were dropped: one line per step, in order.
    assert [r["step"] for r in read_metrics(out)] == list(range(1, latest + 3))
    assert list_checkpoints(out / "checkpoints")[-1][0] == latest + 2


# ----------------------------------------------------------------------------- 5. bad input
@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """A finished 4-step galore run on llama-tiny, copied into each test that needs one."""
    out = tmp_path_factory.mktemp("prev") / "run"
    rc, _, err = run_quiet(TINY + ["--steps", "4", "--save-every", "2", "--eval-every", "0", "--out", str(out)])
    assert rc == 0, err
    return out


@pytest.fixture
def existing_run(previous_run, tmp_path):
    out = tmp_path / "existing"
    shutil.copytree(previous_run, out)
    return out, snapshot(out)


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (extra argv, strings the one-line error must contain)."""
    missing = tmp / "missing.txt"
    empty = tmp / "empty.txt"
    empty.write_text("")
    no_txt = tmp / "no_txt"
    no_txt.mkdir()
    (no_txt / "notes.md").write_text("some text " * 100)
    short = tmp / "short.txt"
    short.write_text("0123456789")
    bad_json = tmp / "bad_model.json"
    bad_json.write_text("{not json")
    return {
        "missing-data": (["--data", str(missing)], [str(missing), "not found"]),
        "empty-data": (["--data", str(empty)], [str(empty), "empty"]),
        "folder-without-txt": (["--data", str(no_txt)], [str(no_txt), ".txt"]),
        "corpus-shorter-than-a-sequence": (["--data", str(short)], ["seq_len"]),
        "unknown-model": (["--model", "llama-nope"], ["llama-nope"]),
        "invalid-model-json": (["--model", str(bad_json)], [str(bad_json)]),
        "halo": (["--halo-format", "int8"], ["--halo-format", "needs --halo"]),
        "basis-rotation": (["--basis-rotation"], ["--basis-rotation", "--basis-bits 4 or 8"]),
        "dataset-without-datasets": (["--dataset", "c4"], ["datasets"]),
        "weight-bits-4": (["--weight-bits", "4"], ["--weight-bits must be one of (8,)", "got 4"]),
        "weight-group-size": (["--weight-bits", "8", "--weight-group-size", "48"], ["--weight-group-size", "32"]),
        "weight-group-size-alone": (["--weight-group-size", "64"], ["--weight-group-size needs --weight-bits 8"]),
        "halo-with-weight-bits": (["--halo", "1", "--weight-bits", "8"], ["--halo with --weight-bits"]),
        "fsdp2-with-weight-bits": (["--distributed", "fsdp2", "--weight-bits", "8"], ["--weight-bits", "fsdp2"]),
    }


BAD = [
    "missing-data",
    "empty-data",
    "folder-without-txt",
    "corpus-shorter-than-a-sequence",
    "unknown-model",
    "invalid-model-json",
    "halo",
    "basis-rotation",
    "dataset-without-datasets",
    "weight-bits-4",
    "weight-group-size",
    "weight-group-size-alone",
    "halo-with-weight-bits",
    "fsdp2-with-weight-bits",
]


def _skip_if_datasets(name: str) -> None:
    if name == "dataset-without-datasets":
        try:
            import datasets  # noqa: F401
        except ImportError:
            return
        pytest.skip("the `datasets` package is installed here; this checks the error without it")


@pytest.mark.parametrize("name", BAD)
def test_bad_input_fresh_out(tmp_path, capsys, name):
    _skip_if_datasets(name)
    extra, needles = _bad_inputs(tmp_path)[name]
    out = tmp_path / "out"
    rc = main(TINY + ["--steps", "2", "--out", str(out)] + extra)
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, *needles)
    assert not (out / "summary.json").exists()
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("name", BAD)
def test_bad_input_on_resume_overwrites_nothing(tmp_path, capsys, existing_run, name):
    _skip_if_datasets(name)
    extra, needles = _bad_inputs(tmp_path)[name]
    out, before = existing_run
    rc = main(TINY + ["--steps", "8", "--save-every", "2", "--eval-every", "0", "--out", str(out), "--resume"] + extra)
    cap = capsys.readouterr()
    # Model errors surface as the resume mismatch, naming the model; the rest as themselves.
    assert_one_line_error(rc, cap.out, cap.err, *needles)
    assert_unchanged(before, out)


def test_short_corpus_error_names_the_file(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("0123456789")
    rc = main(TINY + ["--steps", "2", "--data", str(short), "--out", str(tmp_path / "out")])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, "seq_len", str(short))


def test_out_holding_a_run_needs_resume(tmp_path, capsys, existing_run):
    out, before = existing_run
    rc = main(TINY + ["--steps", "4", "--out", str(out)])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, str(out), "--resume")
    assert_unchanged(before, out)


def test_resume_with_another_model_shape(tmp_path, capsys, existing_run):
    out, before = existing_run
    other = model_json(tmp_path / "other.json", hidden=64)
    rc = main(TINY + ["--steps", "8", "--out", str(out), "--resume", "--model", str(other)])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, "model", str(other), "llama-tiny")
    assert_unchanged(before, out)


def test_resume_with_an_edited_model_json(tmp_path, capsys):
    """Same --model path, but the file now describes another shape: caught when loading."""
    cfg = model_json(tmp_path / "model.json", hidden=64)
    out = tmp_path / "run"
    argv = TINY + ["--model", str(cfg), "--save-every", "2", "--eval-every", "0", "--out", str(out)]
    assert main(argv + ["--steps", "2"]) == 0
    before = snapshot(out)
    model_json(cfg, hidden=96)
    capsys.readouterr()
    rc = main(argv + ["--steps", "4", "--resume"])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, "--resume", "ckpt-00000002.pt", "another shape", "hidden_size")
    assert_unchanged(before, out)


def test_resume_with_another_optimizer(tmp_path, capsys, existing_run):
    out, before = existing_run
    rc = main(TINY + ["--steps", "8", "--out", str(out), "--resume", "--optimizer", "adamw"])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, "optimizer", "galore", "adamw")
    assert_unchanged(before, out)


def test_resume_on_an_empty_folder(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    rc = main(TINY + ["--steps", "4", "--out", str(out), "--resume"])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, str(out), "no run to resume")
    assert list(out.iterdir()) == []


def test_resume_on_a_missing_folder(tmp_path, capsys):
    out = tmp_path / "nowhere"
    rc = main(TINY + ["--steps", "4", "--out", str(out), "--resume"])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, str(out), "no run to resume")
    assert not out.exists()


@pytest.mark.parametrize("name", ["unknown-model", "unknown-optimizer", "short-corpus"])
def test_failed_start_leaves_out_reusable(tmp_path, capsys, name):
    """A run refused for bad input trained nothing: fixing the flag and rerunning into the same
    --out must work, not be refused as 'the folder already holds files (another run?)'."""
    short = tmp_path / "short.txt"
    short.write_text("0123456789")
    bad = {
        "unknown-model": ["--model", "llama-nope"],
        "unknown-optimizer": ["--optimizer", "nope"],
        "short-corpus": ["--data", str(short)],
    }[name]
    out = tmp_path / "out"
    base = TINY + ["--steps", "2", "--eval-every", "0", "--out", str(out)]
    assert main(base + bad) == 2
    capsys.readouterr()
    rc = main(base)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert read_summary(out)["steps"] == 2


# ----------------------------------------------------------------------------- 6. --help
def test_help_lists_the_flags():
    r = subprocess.run(
        [sys.executable, "-m", "galorex.train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert r.returncode == 0, r.stderr
    for flag in (
        "--model",
        "--optimizer",
        "--rank",
        "--update-proj-gap",
        "--scale",
        "--lr",
        "--warmup",
        "--grad-clip",
        "--batch-size",
        "--grad-accum",
        "--seq-len",
        "--dtype",
        "--steps",
        "--eval-every",
        "--save-every",
        "--out",
        "--resume",
        "--seed",
        "--device",
        "--data",
        "--dataset",
        "--tokenizer",
        "--halo",
    ):
        assert f"{flag} " in r.stdout or f"{flag}\n" in r.stdout or f"{flag}," in r.stdout, flag


# ----------------------------------------------------------------------------- resume guards
@pytest.fixture()
def short_run(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_quiet(
        TINY
        + [
            "--out",
            str(out),
            "--steps",
            "2",
            "--save-every",
            "2",
            "--eval-every",
            "0",
            "--optimizer",
            "galore",
            "--rank",
            "8",
        ]
    )
    assert rc == 0, err
    return out


@pytest.mark.parametrize(
    "flag, value, key",
    [
        ("--lr", "0.01", "lr"),
        ("--update-proj-gap", "7", "update_proj_gap"),
        ("--scale", "1.0", "scale"),
        ("--batch-size", "8", "batch_size"),
        ("--seed", "3", "seed"),
    ],
)
def test_resume_refuses_changed_training_settings(short_run, capsys, flag, value, key):
    before = snapshot(short_run)
    argv = TINY + [
        "--out",
        str(short_run),
        "--steps",
        "4",
        "--optimizer",
        "galore",
        "--rank",
        "8",
        "--resume",
        flag,
        value,
    ]
    # argparse keeps the last occurrence, so this overrides TINY's value too
    rc = main(argv)
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, "--resume", f"{key}=")
    assert_unchanged(before, short_run)


def test_resume_refuses_other_data(short_run, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("a different corpus, long enough for a few windows. " * 200)
    before = snapshot(short_run)
    rc = main(
        TINY
        + [
            "--out",
            str(short_run),
            "--steps",
            "4",
            "--optimizer",
            "galore",
            "--rank",
            "8",
            "--resume",
            "--data",
            str(other),
        ]
    )
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, "other data", str(other))
    assert_unchanged(before, short_run)


def test_resume_from_a_checkpoint_file_without_out_continues_that_run(short_run, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a default --out would land here
    ckpt = short_run / "checkpoints" / "ckpt-00000002.pt"
    rc = main(
        TINY
        + [
            "--steps",
            "4",
            "--save-every",
            "2",
            "--eval-every",
            "0",
            "--optimizer",
            "galore",
            "--rank",
            "8",
            "--resume",
            str(ckpt),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert read_summary(short_run)["steps"] == 4
    assert [r["step"] for r in read_metrics(short_run)] == [2, 4]  # logged at each run's end
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- --init-from
def test_init_from_an_earlier_runs_weights(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(TINY + ["--out", str(a), "--steps", "4", "--save-every", "0", "--eval-every", "0"]) == 0
    weights = a / "model.safetensors"
    assert weights.is_file() and "model.safetensors" in capsys.readouterr().out
    # zero steps from those weights: the written weights are the ones read
    assert (
        main(
            TINY
            + ["--out", str(b), "--steps", "0", "--save-every", "0", "--eval-every", "0", "--init-from", str(weights)]
        )
        == 0
    )
    first, second = load_file(str(weights)), load_file(str(b / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_init_from_a_checkpoint_file_and_bad_inputs(tmp_path, capsys):
    a = tmp_path / "a"
    assert main(TINY + ["--out", str(a), "--steps", "2", "--save-every", "2", "--eval-every", "0"]) == 0
    capsys.readouterr()
    ckpt = a / "checkpoints" / "ckpt-00000002.pt"
    assert main(TINY + ["--out", str(tmp_path / "b"), "--steps", "1", "--init-from", str(ckpt)]) == 0
    capsys.readouterr()
    rc = main(TINY + ["--out", str(tmp_path / "c"), "--steps", "1", "--init-from", str(tmp_path / "nope.safetensors")])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, "--init-from", "nope.safetensors", "no such file")
    assert not (tmp_path / "c").exists()
    other = model_json(tmp_path / "wide.json", hidden=64)
    rc = main(TINY + ["--out", str(tmp_path / "d"), "--steps", "1", "--model", str(other), "--init-from", str(ckpt)])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, "--init-from", "ckpt-00000002.pt", "do not match")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    rc = main(TINY + ["--out", str(tmp_path / "e"), "--steps", "1", "--init-from", str(garbage)])
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, "--init-from", "garbage.safetensors", "cannot read")


def test_the_loss_plot_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """A notebook that calls train() keeps its inline plots: the plot is drawn without pyplot."""
    matplotlib = pytest.importorskip("matplotlib")
    from galorex.train.trainer import _plot

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.5, "val_loss": 1.7}\n')
    before = matplotlib.get_backend()
    assert _plot(metrics, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert matplotlib.get_backend() == before


def test_init_from_converts_between_float_and_int8_weights(tmp_path, capsys):
    """--init-from a float run into --weight-bits 8 quantises each weight to nearest; a float run
    from an INT8 run's file dequantises them; both from safetensors and from a checkpoint."""
    float_run, int8_run, back = tmp_path / "f", tmp_path / "q", tmp_path / "b"
    assert main(TINY + ["--steps", "2", "--save-every", "2", "--eval-every", "0", "--out", str(float_run)]) == 0
    for i, source in enumerate((float_run / "model.safetensors", float_run / "checkpoints" / "ckpt-00000002.pt")):
        out = tmp_path / f"q{i}"
        argv = TINY + ["--steps", "0", "--weight-bits", "8", "--init-from", str(source), "--out", str(out)]
        assert main(argv) == 0
        saved = load_file(out / "model.safetensors")
        want = load_file(float_run / "model.safetensors")["layers.0.mlp.up_proj.weight"]
        codes, scales = weight_codes.quantize(want, 256)
        assert torch.equal(saved["layers.0.mlp.up_proj.weight_codes"], codes)
        assert torch.equal(saved["layers.0.mlp.up_proj.weight_scales"], scales)
    argv = TINY + [
        "--steps",
        "2",
        "--weight-bits",
        "8",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--out",
        str(int8_run),
    ]
    assert main(argv) == 0
    assert main(TINY + ["--steps", "0", "--init-from", str(int8_run / "model.safetensors"), "--out", str(back)]) == 0
    capsys.readouterr()
    q, b = load_file(int8_run / "model.safetensors"), load_file(back / "model.safetensors")
    deq = weight_codes.dequantize(
        q["layers.1.attn.v_proj.weight_codes"], q["layers.1.attn.v_proj.weight_scales"], 256, torch.float32
    )
    assert torch.equal(b["layers.1.attn.v_proj.weight"], deq)
