import pytest
import torch

from triton_kernels import BACKEND_ENV, select_backend, triton_available


def test_auto_uses_torch_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend("cpu", "hadamard") == "torch"


def test_auto_uses_triton_under_interpreter(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(torch.device("cpu"), "hadamard") == ("triton" if triton_available() else "torch")


def test_force_torch(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("cpu", "hadamard") == "torch"


def test_force_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_backend("cpu", "hadamard")


def test_bad_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        select_backend("cpu", "hadamard")
