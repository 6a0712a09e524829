"""Which projected matrices of a group refresh their basis at a step: ``refresh_schedule``.

``together`` (the default; the GaLore paper's and galore-torch's schedule): every matrix refreshes
at its steps 0, T, 2T, … (T = ``update_proj_gap``), so one step in T computes every basis at once.

``staggered``: matrix i of a group has a phase φᵢ ∈ {0, …, T−1} and refreshes at its first step
(there is no basis before it) and at every step t ≡ φᵢ (mod T) after it. Each matrix still
refreshes exactly once in every T consecutive steps; each step computes about N/T of the N bases.
The phases balance the refresh *cost*, not only the count, by the longest-processing-time rule
(Graham, 1969): matrices in order of decreasing cost (ties: the earlier parameter first), each to the
phase whose cost so far is least (ties: fewer matrices, then the lower phase). Equal costs thus go
round-robin (⌊N/T⌋ or ⌈N/T⌉ a step). The cost of one refresh of an m×n matrix is m·n·min(m, n)
for the exact SVD, m·n·k for the range finder (k = min(rank + oversample, m, n), doubled for
``full``): the flops up to a factor that is the same for every matrix of a group.

The phases are a pure function of the group's projected shapes and settings — no state and no
host-side counter — so a resumed run, a copy, layer-wise mode and every FSDP2 rank (global shapes)
compute the same ones, and the step t is the parameter's own ``step`` count, a tensor in the
checkpoint. Generated projections (APOLLO's random ones) keep the ``together`` schedule: their
refresh draws the next seed, which costs nothing worth spreading, and they advance as the
reference implementation does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import projection as proj
from . import config
from .config import REFRESH_SCHEDULES


def refresh_cost(m: int, n: int, side: str, method: str, rank: int, oversample: int) -> int:
    """The relative cost of one refresh of an (m×n) matrix (module docstring).

    Args:
        m, n: the matrix's shape.
        side: "left", "right" or "full".
        method: ``svd`` or ``randomized``.
        rank, oversample: the group's rank and the range finder's oversampling.
    """
    if method == "svd":
        return m * n * min(m, n)
    k = min(rank + oversample, m, n)
    return m * n * k * (2 if side == "full" else 1)


def staggered_phases(costs: Sequence[int], gap: int) -> tuple[int, ...]:
    """The phase of each matrix, from its refresh cost (the longest-processing-time rule of the
    module docstring).

    Args:
        costs: each matrix's refresh cost, in the group's order.
        gap: ``update_proj_gap`` (T ≥ 1).

    Returns:
        φᵢ ∈ {0, …, gap − 1} for each matrix, in the same order.
    """
    load, count = [0] * gap, [0] * gap
    phases = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        phase = min(range(gap), key=lambda f: (load[f], count[f], f))
        phases[i] = phase
        load[phase] += costs[i]
        count[phase] += 1
    return tuple(phases)


@functools.lru_cache(maxsize=64)
def _phases(shapes: tuple[tuple[int, int], ...], gap: int, proj_type: str, method: str, rank: int, oversample: int):
    costs = [refresh_cost(m, n, proj.projection_side(proj_type, m, n), method, rank, oversample) for m, n in shapes]
    return staggered_phases(costs, gap)


def group_phases(group: dict[str, Any], is_projected: Callable[[dict[str, Any], torch.Tensor], bool]) -> dict[int, int]:
    """Each projected parameter's phase, by its index in ``group["params"]`` (all 0 when the
    group's ``refresh_schedule`` is ``together``).

    Args:
        group: the parameter group (its params, rank, gap, proj_type and refresh settings).
        is_projected: which of its parameters are projected (``LowRankOptimizer.is_projected``).
    """
    params = group["params"]
    indices = [i for i, p in enumerate(params) if is_projected(group, p)]
    refresh = config.refresh_config(group)
    if refresh.refresh_schedule == "together":
        return dict.fromkeys(indices, 0)
    shapes = tuple(proj.matrix_shape(params[i].shape) for i in indices)
    phases = _phases(
        shapes,
        group[config.UPDATE_PROJ_GAP],
        group[config.PROJ_TYPE],
        refresh.refresh_method,
        group[config.RANK],
        refresh.oversample,
    )
    return dict(zip(indices, phases))


def refreshes_at(step: int, gap: int, phase: int) -> bool:
    """Whether a matrix with a basis already refreshes at its step ``step``: t ≡ φ (mod T)."""
    return step % gap == phase


__all__ = ["REFRESH_SCHEDULES", "group_phases", "refresh_cost", "refreshes_at", "staggered_phases"]
