"""The typed records the step loop passes around: what a step plans for a parameter, and what
crosses into the (possibly compiled) numeric update."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch


@dataclasses.dataclass
class Plan:
    """A projected parameter in this step: where it sits, its side, and the bases a refresh
    computed for it (``new_bases``, committed only once every refresh has succeeded).

    Attributes:
        param: the parameter.
        group_index, param_index: its group and its index there.
        index: its index over all groups (seeds the randomized refresh).
        side: "left", "right" or "full".
        step: the parameter's step count when planned (a refresh stores it as ``proj_step``).
        new_bases: the refreshed bases, or None when this step does not refresh.
        draw: a generated projection moves to its next seed at this step.
    """

    param: torch.Tensor
    group_index: int
    param_index: int
    index: int  # over all groups: seeds the randomized refresh
    side: str
    step: int = 0
    new_bases: list[torch.Tensor] | None = None
    draw: bool = False  # a generated projection moves to its next seed at this step


class Work(NamedTuple):
    """One parameter's inputs to the numeric update. The gradient and state travel as plain
    inputs: reached through ``p.grad`` or ``optimizer.state`` inside a compiled function they would
    be guarded by identity, and a freed gradient or a new state entry would recompile every step."""

    param: torch.Tensor
    side: str
    grad: torch.Tensor
    state: dict[str, Any]
    bases: list[torch.Tensor] | None = None  # generated on the host (None: stored in the state)
    target: torch.Tensor | None = None  # a float32 working copy the rule writes instead of param


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False where torch has none)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)
