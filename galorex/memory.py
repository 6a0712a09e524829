"""Optimizer-state memory: measured from a live optimizer, and predicted analytically.

The analytic count follows galorex's state layout exactly, so the two agree to the byte once every
parameter has taken a step: a projected (m×n) weight at rank r holds two Adam moments of the
low-rank shape and its basis (or two, for ``full``) in float32 (float64 for float64 weights), plus
two float32 scalars (``step``, ``proj_step``); every other parameter holds AdamW's two moments in its
own dtype and a float32 ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import projection as proj
from .optim import codec, registry
from .optim.config import compute_dtype

_SCALAR_BYTES = 4  # float32 step counters


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` (each storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
                if value.device.type != "meta" and key in seen:
                    continue
                seen.add(key)
                total += value.numel() * value.element_size()
    return total


def parameter_state_bytes(
    shape: Iterable[int],
    dtype: torch.dtype = torch.float32,
    rank: int | None = None,
    proj_type: str = "std",
    optimizer: str = "galore",
    natural_history: int = 0,
    optim_bits: int = 32,
    basis_bits: int = 32,
    first_moment: bool = False,
    **group: Any,
) -> int:
    """State bytes of one parameter under galorex's layout, as the optimizer's rule counts them
    (``Rule.state_bytes``), plus its stored bases (``basis_bits``: 32, or 4/8 with a float32 scale
    per 64 entries; none for a generated projection) and two float32 step counters; an unprojected
    parameter holds its rule's state and one counter. ``optimizer`` is a registered name
    (``galore``, ``natural-galore``, ``gradnorm-lorp``, ``galore-adafactor``, ``fira``, ``apollo``…)
    or ``adamw`` (torch's AdamW). ``natural_history`` is NaturalGaLoreAdamW's s; ``optim_bits=8``
    stores Adam moments of 4096 or more entries in one byte each plus a float32 scale per 256;
    ``first_moment`` says GaLoreAdafactor keeps one (``beta1`` set); other group keys (``proj``…)
    as keywords.
    """
    settings = {
        "rank": rank,
        "proj_type": proj_type,
        "natural_history": natural_history,
        "optim_bits": optim_bits,
        "basis_bits": basis_bits,
        "beta1": 0.9 if first_moment else None,
        **group,
    }
    return _parameter_bytes(optimizer, settings, tuple(int(s) for s in shape), dtype)


def _rule_and_settings(optimizer: str, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    if optimizer == "galore" and settings.get("natural_history", 0) > 0:
        optimizer = "natural-galore"  # GaLoreAdamW's groups with NaturalGaLoreAdamW's window
    rule = registry.rule_for(optimizer)
    return rule, {**rule.defaults, **{k: v for k, v in settings.items() if v is not None or k == "beta1"}}


def _parameter_bytes(optimizer: str, settings: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype) -> int:
    rule, group = _rule_and_settings(optimizer, settings)
    rank = settings.get("rank")
    if optimizer == "adamw" or rank is None or len(shape) < 2 or math.prod(shape) == 0:
        return rule.state_bytes(group, shape, dtype) + _SCALAR_BYTES
    m, n = proj.matrix_shape(shape)
    side = proj.projection_side(group.get("proj_type", "std"), m, n)
    low_shape = proj.lowrank_shape(side, m, n, rank)
    bases = 0
    if not rule.basis_is_generated(group):
        bases = codec.bases_nbytes(side, m, n, rank, group.get("basis_bits", 32), compute_dtype(dtype))
    return rule.state_bytes(group, shape, dtype, low_shape) + bases + 2 * _SCALAR_BYTES


def estimate_optimizer_state_bytes(
    model_or_groups: nn.Module | list[dict[str, Any]] | Iterable[Any],
    optimizer: str = "galore",
    **group_defaults: Any,
) -> int:
    """Analytic optimizer-state bytes for a model (every parameter on AdamW) or for param groups as
    given to ``GaLoreAdamW`` (``rank``/``proj_type`` read per group; ``group_defaults`` fill keys a
    group lacks, e.g. ``proj_type``). Works on the meta device: nothing is allocated.
    With ``optimizer="adamw"`` every parameter is counted as torch.optim.AdamW holds it. For
    NaturalGaLoreAdamW pass ``natural_history=s`` (or have the key in the groups): its window of s
    low-rank gradients per matrix is counted too. For GaLoreAdafactor pass
    ``optimizer="adafactor"`` (and ``beta1`` when it keeps a first moment). Any registered
    optimizer name works: its rule counts its own state.
    """
    if isinstance(model_or_groups, nn.Module):
        groups = [{"params": list(model_or_groups.parameters())}]
    else:
        groups = list(model_or_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
    total = 0
    for group in groups:
        settings = {**group_defaults, **{k: v for k, v in group.items() if k != "params"}}
        settings.setdefault("natural_history", 0)
        for p in group["params"]:
            if isinstance(p, tuple):
                p = p[1]
            if not p.requires_grad:
                continue
            total += _parameter_bytes(optimizer, settings, tuple(p.shape), p.dtype)
    return total
