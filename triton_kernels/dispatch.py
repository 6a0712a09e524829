"""Choosing between a Triton kernel and its torch twin."""

from __future__ import annotations

import functools
import os

import torch

BACKEND_ENV = "GALOREX_BACKEND"
BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works here (it needs a driver, or ``TRITON_INTERPRET=1``, to run)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"`` for work on ``device``.

    ``auto`` (the default) takes Triton for CUDA tensors, or for any tensor when the Triton
    interpreter is on; ``torch``/``triton`` in ``GALOREX_BACKEND`` force a side.
    """
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r}: expected one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{BACKEND_ENV}=triton, but triton cannot be imported here")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"{BACKEND_ENV}=triton for a {device.type} tensor: Triton runs on CUDA, or on the "
                "CPU only under TRITON_INTERPRET=1"
            )
        return "triton"
    if triton_available() and (device.type == "cuda" or _interpreting()):
        return "triton"
    return "torch"
