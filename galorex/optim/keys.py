"""Typo-safe group keys: a projected group holding a key close to a galorex key gets a warning, and
a setting close to a known one gets a suggestion in its error.

torch lets a parameter group carry any key, and galorex keeps that (schedulers, Hugging Face and
layer-wise learning-rate recipes store their own keys there). But ``update_proj_gpa=5`` would
otherwise run silently with the default gap: :func:`warn_near_miss_keys` names both keys.
"""

from __future__ import annotations

import difflib
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import RANK

# Keys other libraries give a meaning to: never taken for a typo of a galorex key.
FOREIGN_KEYS = frozenset({"name", "param_names", "lr_scale", "initial_lr", "max_lr", "min_lr", "layer_id"})
CUTOFF = 0.8  # difflib's similarity ratio from which a key counts as a near miss


def near_misses(keys: Iterable[str], known: Iterable[str]) -> str:
    """``" (did you mean 'a' → 'b'?)"`` for the keys close to a known one, or ``""``."""
    known = sorted(known)
    pairs = [(k, difflib.get_close_matches(k, known, n=1, cutoff=CUTOFF)) for k in keys]
    found = [f"{k!r} → {m[0]!r}" for k, m in pairs if m]
    return f" (did you mean {', '.join(found)}?)" if found else ""


def warn_near_miss_keys(group: dict[str, Any], index: int, known: Iterable[str]) -> None:
    """Warn (UserWarning, attributed to the caller's line) when a projected group (one with
    ``rank``) holds a key galorex does not know that is close to one it does; keys of other
    libraries (:data:`FOREIGN_KEYS`) pass quietly.

    Args:
        group: the parameter group.
        index: its index, for the message.
        known: every key the optimizer gives a meaning to.
    """
    if dict.get(group, RANK) is None:
        return
    known = sorted(set(known))
    for key in group:
        if key == "params" or key in known or key in FOREIGN_KEYS:
            continue
        match = difflib.get_close_matches(key, known, n=1, cutoff=CUTOFF)
        if match:
            warnings.warn(
                f"param_groups[{index}] has the key {key!r}, which galorex does not know; did you mean "
                f"{match[0]!r}? (the group runs with {match[0]}={dict.get(group, match[0])!r})",
                UserWarning,
                stacklevel=_caller_level(),
            )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside galorex and torch (the user's line)."""
    ours = (str(Path(__file__).resolve().parents[1]), str(Path(__import__("torch").__file__).resolve().parent))
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(ours):
        frame, level = frame.f_back, level + 1
    return level


__all__ = ["FOREIGN_KEYS", "near_misses", "warn_near_miss_keys"]
