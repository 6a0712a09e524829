"""The C allocator's behaviour for a training process on the CPU.

glibc's malloc serves blocks below its mmap threshold from heaps it keeps, and that threshold
grows with every large block freed (up to 32 MiB on 64-bit systems), so a training step's
temporaries of a few MiB to 32 MiB — each layer's activations, gradients and optimizer
temporaries — land in heaps whose freed space is kept and fragmented instead of returned. On the
Llama-7B recipe that was several GiB above the step's analytic peak (a run killed at 23 GiB on a
24 GiB machine; docs/benchmarks.md). Setting the mmap and trim thresholds to 64 KiB — what the
environment variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do at start-up —
makes every larger block its own mapping, returned to the system when freed. ``galorex-train``
does this itself (:func:`configure`) before it builds anything, through glibc's ``mallopt``; the
environment variables, when a user sets them, win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 64 * 1024
_ENV = {"MALLOC_MMAP_THRESHOLD_": M_MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": M_TRIM_THRESHOLD}

_configured: str | None = None


def configure(threshold: int = THRESHOLD_BYTES) -> str:
    """Set glibc's mmap and trim thresholds to ``threshold`` bytes (module docstring), once per
    process. Returns what was done, for the run's summary: ``"mallopt"``, ``"environment"`` (the
    user set both variables), or why nothing was (not glibc, or ``mallopt`` refused)."""
    global _configured
    if _configured is not None:
        return _configured
    if all(os.environ.get(name) for name in _ENV):
        _configured = "environment"
        return _configured
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        _configured = f"unchanged ({libc_name or 'not'} glibc)"
        return _configured
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = True
        for name, param in _ENV.items():
            if not os.environ.get(name):  # a variable the user set keeps its value
                ok = bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(int(threshold)))) and ok
    except (OSError, AttributeError) as e:
        _configured = f"unchanged (mallopt unavailable: {e})"
        return _configured
    _configured = "mallopt" if ok else "unchanged (mallopt refused)"
    return _configured


def configured() -> str | None:
    """What :func:`configure` did in this process, or None if it was not called."""
    return _configured
