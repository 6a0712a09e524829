"""The one place that chooses between a Triton kernel and its torch twin.

Every caller asks :func:`select_backend` — the public functions of this package, and galorex's
low-precision operations (``galorex.lowp``) and fused optimizer step above them — so the choice is
made the same way everywhere, and a Triton path that was asked for but cannot run raises instead
of falling back.

``auto`` (the default) takes, per operation, the path measured on that device: on CUDA the entry
of :data:`CUDA_DEFAULT`, which stays ``"torch"`` for an operation until a GPU run has shown its
Triton kernel correct and faster there (docs/benchmarks.md); on other devices torch, except under
``TRITON_INTERPRET=1``, a switch that exists only to run the kernels on the CPU. ``GALOREX_BACKEND``
(``auto``, ``torch`` or ``triton``) overrides it for the process, an explicit ``choice`` argument
for one call.
"""

from __future__ import annotations

import functools
import os

import torch

BACKEND_ENV = "GALOREX_BACKEND"
BACKENDS = ("auto", "torch", "triton")
# The operations that have a Triton kernel beside a torch twin.
OPS = ("hadamard", "quantize", "scaled_gemm", "project", "galore_adam_step")
# What ``auto`` takes on CUDA. No Triton path has yet completed a GPU run that showed it correct
# and faster than torch (docs/low-precision.md), so every entry is torch; a GPU run flips them
# one by one, by measurement, with GALOREX_BACKEND=triton the switch that runs them until then.
CUDA_DEFAULT = dict.fromkeys(OPS, "torch")


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


def select_backend(device: torch.device | str, op: str, choice: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for operation ``op`` (one of :data:`OPS`) on ``device``.

    Args:
        device: where the operation's tensors live.
        op: the operation, which picks its entry of :data:`CUDA_DEFAULT` under ``auto``.
        choice: ``"auto"``, ``"torch"`` or ``"triton"`` for this call; None reads
            ``GALOREX_BACKEND`` (unset: ``auto``).

    Raises:
        ValueError: an unknown ``op`` or backend name (naming where the name came from).
        RuntimeError: ``triton`` was asked for and cannot run here: triton is not importable, or
            the tensors are not on CUDA and the interpreter (``TRITON_INTERPRET=1``) is off.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    source = "backend" if choice is not None else BACKEND_ENV
    if choice is None:
        choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{source}={choice!r}: expected one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{source}=triton, but triton cannot be imported here (pip install 'galorex[triton]', "
                f"or {BACKEND_ENV}=torch for the torch path)"
            )
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"{source}=triton for a {device.type} tensor ({op}): Triton runs on CUDA, or on the "
                "CPU only under TRITON_INTERPRET=1"
            )
        return "triton"
    if device.type == "cuda":
        return "triton" if CUDA_DEFAULT[op] == "triton" and triton_available() else "torch"
    return "triton" if _interpreting() and triton_available() else "torch"
