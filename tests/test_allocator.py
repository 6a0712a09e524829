"""galorex-train sets glibc's mmap and trim thresholds itself (galorex.train.allocator), so the
command as printed reaches the peak its memory estimate counts; environment variables win."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
from problems import tiny_train_args

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def _configure(env: dict[str, str]) -> str:
    code = "from galorex.train import allocator; print(allocator.configure()); print(allocator.configure())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    first, second = done.stdout.split()
    assert first == second  # once per process
    return first


@glibc
def test_configure_uses_mallopt_unless_the_variables_are_set():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _configure(env) == "mallopt"
    both = {**env, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    assert _configure(both) == "environment"
    assert _configure({**env, "MALLOC_MMAP_THRESHOLD_": "131072"}) == "mallopt"  # the other one


@glibc
def test_the_command_records_it_and_a_call_with_arguments_leaves_the_process_alone(tmp_path):
    out = tmp_path / "run"
    argv = tiny_train_args(sample_tokens=0) + ["--steps", "1", "--eval-every", "0", "--save-every", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    subprocess.run([sys.executable, "-m", "galorex.train", *argv, "--out", str(out)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["allocator"] == "mallopt"

    from galorex.train import allocator
    from galorex.train.cli import main

    before = allocator.configured()
    assert main(argv + ["--out", str(tmp_path / "in-process")]) == 0
    assert allocator.configured() == before
