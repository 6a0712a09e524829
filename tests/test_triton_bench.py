"""``python -m triton_kernels.bench``: the interpreter smoke run end to end, and the no-GPU message."""

from __future__ import annotations

import json

import pytest
import torch
from triton_support import assert_interpreter_did_not_leak, needs_triton

from triton_kernels import BACKEND_ENV, bench


@needs_triton
def test_interpret_smoke_checks_then_writes_tables(tmp_path, monkeypatch):
    # main() turns the interpreter on for itself; monkeypatch puts the variable back afterwards.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert bench.main(["--interpret-smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "triton_bench.json").read_text())
    assert report["meta"]["smoke"] is True
    assert report["correctness"] and all(c["ok"] for c in report["correctness"])
    names = {c["check"].split()[0] for c in report["correctness"]}
    assert {
        "hadamard_transform",
        "quantize_fp8",
        "hadamard_quantize_fp8",
        "hadamard_quantize_int8",
        "fp8_gemm",
        "int8_gemm",
        "project",
        "fused_galore_adam_step",
    } <= names
    tables = {row["table"] for row in report["rows"]}
    assert tables == {"hadamard", "fp8_gemm", "galore"}
    assert all(row.get("ms") or row.get("fused ms") for row in report["rows"])
    text = (tmp_path / "triton_bench.md").read_text()
    assert "interpreter smoke run" in text and "| fp8_gemm rowwise |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the real benchmark would run")
def test_no_gpu_exits_with_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    code = bench.main(["--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "CUDA" in err or "triton cannot be imported" in err
    assert not (tmp_path / "triton_bench.json").exists()


def test_interpreter_did_not_leak(monkeypatch):
    assert_interpreter_did_not_leak(monkeypatch)
