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
import json
import math
import os
import pickle
import random
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write, fsync_dir

__all__ = [
    "CheckpointError",
    "save_safetensors",
    "read_safetensors_header",
    "load_safetensors_into",
    "read_safetensors_tensor",
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


# --------------------------------------------------------------------------
# Streaming safetensors
# --------------------------------------------------------------------------

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_READ_BYTES = 64 * 2**20  # a tensor read for another dtype or device goes through this much at a time


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` as a safetensors file, one tensor at a time, atomically.

    The header (names, dtypes, shapes, offsets) is computed from the tensors' metadata alone;
    each tensor's bytes are then written straight from its storage (a tensor on another device,
    or a non-contiguous one, is copied to a contiguous CPU tensor first, one at a time). So saving
    needs at most one tensor's bytes more than the tensors themselves, never a copy of them all,
    unlike ``safetensors.torch.save`` (which builds the whole file in memory). The file goes
    through :func:`atomic_write`: a reader sees the previous file or the complete new one. Tensors
    sharing storage (a tied head) are written once per name, as independent entries.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = list(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"save_safetensors: {name} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces

    def write(f) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = tensors[name].detach()
            if t.numel() == 0:
                continue
            if t.device.type != "cpu" or not t.is_contiguous():
                t = t.to("cpu").contiguous()
            f.write(_byte_view(t))

    path = Path(path)
    atomic_write(path, write)
    return path


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], int]:
    """The entries of a safetensors file (name → dtype, shape, data_offsets) and where its data
    starts. Raises :class:`CheckpointError` naming the file for anything that is not one."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = p.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{p}: cannot read it, not a safetensors file (shorter than its 8-byte header size)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{p}: cannot read it, not a safetensors file (header of {n} bytes in a {size}-byte file)"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read it ({_one_line(e)})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{p}: cannot read it, not a safetensors file (header is not JSON: {_one_line(e)})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: cannot read it, not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype = _ST_NAMES[entry["dtype"]]
            numel = math.prod(entry["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{p}: entry {name!r} is malformed ({_one_line(e)})") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * itemsize or data_start + end > size or begin < 0:
            raise CheckpointError(f"{p}: entry {name!r} does not fit the file (truncated?)")
    return header, data_start


def read_safetensors_tensor(path: str | os.PathLike[str], name: str) -> torch.Tensor:
    """One entry of a safetensors file as a new CPU tensor of its own dtype (read, no memory map)."""
    p = Path(path)
    header, data_start = read_safetensors_header(p)
    if name not in header:
        raise CheckpointError(f"{p}: holds no tensor {name!r}")
    entry = header[name]
    t = torch.empty(entry["shape"], dtype=_ST_NAMES[entry["dtype"]])
    if t.numel():
        with open(p, "rb", buffering=0) as f:
            f.seek(data_start + entry["data_offsets"][0])
            _readinto_exactly(f, _byte_view(t), p, name)
    return t


@torch.no_grad()
def load_safetensors_into(
    targets: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    what: str = "the model",
    skip: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Read a safetensors file straight into ``targets`` (e.g. ``model.state_dict()``, whose
    tensors share the parameters' storage), one tensor at a time.

    A contiguous CPU target of the file's dtype is filled by ``readinto`` with no copy at all;
    any other (another dtype, a GPU) through a buffer of at most 64 MiB. Plain reads, no memory
    map: the file's pages never count as this process's memory. Names and shapes must match
    exactly (entries named in ``skip`` may be in the file: the caller reads them itself); a
    mismatch raises :class:`CheckpointError` naming the file and the tensor, before anything is
    written.
    """
    p = Path(path)
    header, data_start = read_safetensors_header(p)
    missing = sorted(set(targets) - set(header))
    unexpected = sorted(set(header) - set(targets) - set(skip))
    if missing or unexpected:
        raise CheckpointError(f"{p}: keys do not match {what} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, t in targets.items():
        if tuple(header[name]["shape"]) != tuple(t.shape):
            raise CheckpointError(
                f"{p}: {name} has shape {tuple(header[name]['shape'])}, {what} needs {tuple(t.shape)}"
            )
    with open(p, "rb", buffering=0) as f:
        for name, t in targets.items():
            entry = header[name]
            begin, end = entry["data_offsets"]
            dtype = _ST_NAMES[entry["dtype"]]
            f.seek(data_start + begin)
            if t.numel() == 0:
                continue
            if t.device.type == "cpu" and t.is_contiguous() and t.dtype == dtype:
                _readinto_exactly(f, _byte_view(t), p, name)
                continue
            if not t.is_contiguous():  # no flat view to fill piecewise: one tensor-sized buffer
                buf = torch.empty(t.shape, dtype=dtype)
                _readinto_exactly(f, _byte_view(buf), p, name)
                t.copy_(buf)
                continue
            flat = t.view(-1)
            step = max(1, _READ_BYTES // torch.empty((), dtype=dtype).element_size())
            for a in range(0, t.numel(), step):
                b = min(t.numel(), a + step)
                buf = torch.empty(b - a, dtype=dtype)
                _readinto_exactly(f, _byte_view(buf), p, name)
                flat[a:b].copy_(buf)


def _readinto_exactly(f, view: memoryview, path: Path, name: str) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: ends inside {name} (truncated)")
        done += n
