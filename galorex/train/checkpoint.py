"""Crash-safe checkpoints.

A checkpoint is ``<directory>/ckpt-<step:08d>.pt``. It is written to a hidden
temporary file in the same directory (``.ckpt-<step>.<random>.tmp``), fsynced,
and renamed into place, so at any instant -- including after ``SIGKILL`` or a
power loss -- every file matching ``ckpt-*.pt`` is complete. The latest
checkpoint is simply the complete one with the highest step; there is no
"latest" pointer that could disagree with the files.

Checkpoints are loaded with ``torch.load(weights_only=True)``, which refuses
arbitrary pickled objects. Callers must therefore store only tensors, Python
numbers, strings, bools, ``None`` and (nested) lists, tuples and dicts of
those -- e.g. ``model.state_dict()``, ``optimizer.state_dict()``,
:func:`rng_state` and ``TokenBatcher.state_dict()``. Numpy arrays and scalars
are *not* allowed: convert them to tensors or plain Python values first.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write, fsync_dir

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
]

_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
_TMP_RE = re.compile(r"^\.ckpt-\d+\..*\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not weights_only-safe."""


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as ``(step, path)``, by increasing step."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    found.sort(key=lambda sp: sp[0])
    return found


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(
    obj: Any,
    directory: str | os.PathLike[str],
    step: int,
    keep_last: int | None = 3,
) -> Path:
    """Atomically write ``obj`` to ``directory/ckpt-{step:08d}.pt`` and prune.

    After the new file is in place, older checkpoints are deleted so that
    ``keep_last`` remain (``None`` keeps everything): the file just written
    plus the highest-step others. Normally that is simply the ``keep_last``
    highest steps. Leftover temp files from killed runs are removed too,
    which assumes one writer per directory.
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and int(keep_last) < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"ckpt-{step:08d}.pt"

    # The leading dot and .tmp suffix keep partial files out of the ckpt-*.pt glob.
    atomic_write(final, lambda f: torch.save(obj, f), tmp_prefix=f".ckpt-{step:08d}.")

    for p in d.iterdir():
        if _TMP_RE.match(p.name):
            with contextlib.suppress(OSError):
                p.unlink()
    if keep_last is not None:
        others = [p for _, p in list_checkpoints(d) if p != final]
        n_old = len(others) - (int(keep_last) - 1)
        old = others[:n_old] if n_old > 0 else []
        for p in old:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if old:
            fsync_dir(d)
    return final


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``.

    Raises :class:`CheckpointError` (one line, naming the file) if it is
    missing, empty, truncated, corrupt or holds objects weights_only refuses.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: checkpoint file is empty")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
            raise CheckpointError(
                f"{p}: checkpoint holds objects that weights_only loading refuses "
                "(store only tensors, numbers, strings, lists and dicts)"
            ) from None
        raise CheckpointError(f"{p}: corrupt or truncated checkpoint ({_one_line(exc)})") from None


# --------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global RNG's state, in a form ``torch.load(weights_only=True)`` accepts.

    Keys: ``torch`` (CPU generator, uint8 tensor), ``cuda`` (one tensor per
    visible device, empty list without CUDA), ``python`` (``random`` module
    as ``[version, [ints], gauss_next]``), ``numpy`` (legacy global
    ``np.random`` MT19937 state as plain ints/floats).
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available():
        cuda = [t.cpu() for t in torch.cuda.get_rng_state_all()]
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "python": [int(py_version), [int(v) for v in py_internal], py_gauss],
        "numpy": {
            "kind": str(np_kind),
            # np.uint32 scalars are not weights_only-safe; plain ints are.
            "keys": [int(v) for v in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNGs from :func:`rng_state`'s dict; absent keys are left alone.

    CUDA states are restored for as many devices as both the saved state and
    this machine have, so a checkpoint moves between machines.
    """
    if "torch" in state:
        t = state["torch"]
        t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        # map_location may have put it on a GPU; the CPU generator needs a CPU ByteTensor.
        torch.set_rng_state(t.detach().to("cpu", torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[i].detach().to("cpu", torch.uint8), i)
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(
            (
                s["kind"],
                np.asarray(s["keys"], dtype=np.uint32),
                int(s["pos"]),
                int(s["has_gauss"]),
                float(s["cached_gaussian"]),
            )
        )
