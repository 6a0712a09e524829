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
from .optim import state8bit
from .optim.base import compute_dtype

_SCALAR_BYTES = 4  # float32 step counters
_SEED_BYTES = 8  # ApolloAdamW's int64 projection seed


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


def _bytes_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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
    apollo_proj: str = "random",
) -> int:
    # optimizer: "galore" (also NaturalGaLoreAdamW with natural_history), "gradnorm_lorp", "adamw",
    # "adafactor" (GaLoreAdafactor; ``first_moment`` when its beta1 is set), "fira", "apollo"
    """State bytes of one parameter under galorex's layout (``optimizer="adamw"``: torch's AdamW).

    ``optimizer="gradnorm_lorp"`` adds the row magnitudes' Adam moments (2·m entries).
    ``natural_history`` (NaturalGaLoreAdamW's s) adds its window, s·(low-rank size) entries, an
    s×s float64 Gram matrix and two float32 counters. ``basis_bits=4`` (8) stores bases in half a byte (one byte)
    per entry plus a float32 scale per 64. ``optim_bits=8`` stores each Adam moment of
    4096 or more entries as one byte per entry plus a float32 scale per 256 (smaller ones float32).
    ``optimizer="adafactor"`` (GaLoreAdafactor): a factored second moment — for an (a×b) update
    a + b numbers, for ≥ 2-D shapes prod(shape[:-1]) + prod(shape[:-2])·shape[-1], for vectors one
    per entry — in float32 (float64 for float64 weights), plus a first moment with ``first_moment``.
    ``optimizer="fira"`` (FiraAdamW): GaLore's state plus the limiter's norm (one compute-dtype
    scalar). ``optimizer="apollo"`` (ApolloAdamW): with ``apollo_proj="svd"`` the same as Fira; with
    ``apollo_proj="random"`` (its group key ``proj``) no basis — the two moments, the two step
    counters, the projection's int64 seed and the limiter's norm.
    """
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s

    def moments(n: int, float_bytes: int) -> int:
        if optim_bits == 8:
            return sum(state8bit.packed_nbytes(n, kind) for kind in (state8bit.SIGNED, state8bit.UNSIGNED_SQRT))
        return 2 * n * float_bytes

    if optimizer == "adafactor":
        return _adafactor_bytes(shape, dtype, rank, proj_type, first_moment, basis_bits)
    if optimizer == "adamw" or rank is None or len(shape) < 2 or numel == 0:
        return moments(numel, _bytes_of(dtype)) + _SCALAR_BYTES
    if optimizer not in ("galore", "gradnorm_lorp", "fira", "apollo"):
        raise ValueError(
            f"unknown optimizer {optimizer!r}; expected 'galore', 'gradnorm_lorp', 'fira', 'apollo', "
            "'adafactor' or 'adamw'"
        )
    m, n = proj.matrix_shape(shape)
    side = proj.projection_side(proj_type, m, n)
    lm, ln = proj.lowrank_shape(side, m, n, rank)
    basis = sum(a * b for a, b in proj.basis_shapes(side, m, n, rank))
    cbytes = _bytes_of(compute_dtype(dtype))
    if basis_bits in state8bit.BASIS_CODECS:
        basis_bytes = sum(state8bit.basis_nbytes(a * b, basis_bits) for a, b in proj.basis_shapes(side, m, n, rank))
    else:
        basis_bytes = basis * cbytes
    if optimizer == "apollo" and apollo_proj == "random":
        basis_bytes = _SEED_BYTES  # regenerated from its seed at every step
    total = moments(lm * ln, cbytes) + basis_bytes + 2 * _SCALAR_BYTES
    if optimizer in ("fira", "apollo"):  # the norm-growth limiter's last norm
        total += cbytes
    if optimizer == "gradnorm_lorp":  # the row magnitudes' two Adam moments (m entries each)
        total += moments(m, cbytes)
    if natural_history > 0:
        total += natural_history * lm * ln * cbytes + natural_history**2 * 8 + 2 * _SCALAR_BYTES
    return total


def _adafactor_bytes(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    rank: int | None,
    proj_type: str,
    first_moment: bool,
    basis_bits: int,
) -> int:
    cbytes = _bytes_of(compute_dtype(dtype))

    def statistics(stat_shape: tuple[int, ...]) -> int:
        numel = math.prod(stat_shape)
        if len(stat_shape) >= 2:
            second = math.prod(stat_shape[:-1]) + math.prod(stat_shape[:-2]) * stat_shape[-1]
        else:
            second = numel
        return (second + (numel if first_moment else 0)) * cbytes

    if rank is None or len(shape) < 2 or math.prod(shape) == 0:
        return statistics(shape) + _SCALAR_BYTES
    m, n = proj.matrix_shape(shape)
    side = proj.projection_side(proj_type, m, n)
    shapes = proj.basis_shapes(side, m, n, rank)
    if basis_bits in state8bit.BASIS_CODECS:
        basis_bytes = sum(state8bit.basis_nbytes(a * b, basis_bits) for a, b in shapes)
    else:
        basis_bytes = sum(a * b for a, b in shapes) * cbytes
    return statistics(proj.lowrank_shape(side, m, n, rank)) + basis_bytes + 2 * _SCALAR_BYTES


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
    ``optimizer="adafactor"`` (and ``beta1`` when it keeps a first moment). For FiraAdamW pass
    ``optimizer="fira"``; for ApolloAdamW ``optimizer="apollo"`` (its ``proj`` read per group, default
    ``"random"``; ApolloAdamW.mini's groups carry it).
    """
    if isinstance(model_or_groups, nn.Module):
        groups = [{"params": list(model_or_groups.parameters())}]
    else:
        groups = list(model_or_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
    total = 0
    for group in groups:
        rank = group.get("rank", group_defaults.get("rank"))
        proj_type = group.get("proj_type", group_defaults.get("proj_type", "std"))
        history = group.get("natural_history", group_defaults.get("natural_history", 0))
        bits = group.get("optim_bits", group_defaults.get("optim_bits", 32))
        basis_bits = group.get("basis_bits", group_defaults.get("basis_bits", 32))
        first_moment = group.get("beta1", group_defaults.get("beta1")) is not None
        apollo_proj = group.get("proj", group_defaults.get("proj", "random"))
        for p in group["params"]:
            if isinstance(p, tuple):
                p = p[1]
            if not p.requires_grad:
                continue
            total += parameter_state_bytes(
                p.shape, p.dtype, rank, proj_type, optimizer, history, bits, basis_bits, first_moment, apollo_proj
            )
    return total
