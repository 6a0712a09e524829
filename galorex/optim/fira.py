"""FiraAdamW: GaLore plus the residual gradient, norm-scaled (Chen et al., 2024, "Fira: Can We
Achieve Full-rank Training of LLMs Under Low-rank Constraint?") — the step loop with the Fira rule
(``rules.fira``, where the maths and its pure functions live)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .config import SCALE
from .galore import GaLoreAdamW
from .rules.fira import (
    ALPHA,
    DISABLE_NL,
    LIMITER_NORM,
    FiraRule,
    channel_norm_ratio,
    fira_update,
    limit_norm_growth,
    tensor_norm_ratio,
)


class FiraAdamW(GaLoreAdamW):
    """Fira: GaLoreAdamW whose update also carries the residual gradient G − α·P Pᵀ G, scaled per
    channel by Adam's norm ratio in the subspace and held back by the norm-growth limiter (see the
    module docstring for the maths).

    Group keys are ``fira``'s: ``rank``, ``update_proj_gap`` (200), ``alpha`` (1.0; the reference
    scripts use 0.25) and ``proj_type`` (``std``, ``reverse_std``, ``left`` or ``right``; ``full``
    has no channels and raises). galorex adds ``disable_nl`` (False: True turns the limiter off) and
    takes every other GaLoreAdamW key and argument the same way: ``refresh_method``,
    ``moment_policy``, ``eps_mode`` (``"galore_torch"`` reproduces ``fira.FiraAdamW``'s arithmetic,
    ε on √v and decay after the update; the default ``"torch"`` is torch.optim.AdamW's), ``optim_bits``,
    ``basis_bits``, ``compile``, ``layerwise`` … A group's ``scale`` (GaLore's name, as
    ``galore_param_groups`` writes it) is taken as its ``alpha``; a group with both raises.
    Groups without ``rank`` and 1-D parameters are plain AdamW (``torch.optim.AdamW``).

    The α in the residual is the reference's: with α ≠ 1 the term keeps (1 − α) of the in-subspace
    gradient too. FSDP2 (DTensor) parameters and DDP work as for every galorex optimizer.
    """

    rule = FiraRule()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        alpha: float = 1.0,
        disable_nl: bool = False,
        **galore_options: Any,
    ) -> None:
        if SCALE in galore_options:
            raise TypeError("FiraAdamW takes alpha (fira's key) for the projected-back scale, not scale")
        super().__init__(params, lr, betas, eps, weight_decay, alpha=alpha, disable_nl=disable_nl, **galore_options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if SCALE in param_group:
            # GaLore's groups (galore_param_groups) name the same multiplier "scale".
            if ALPHA in param_group:
                raise ValueError(
                    f"param_groups[{len(self.param_groups)}]: give {ALPHA!r} (fira's key) or 'scale' (GaLore's, "
                    f"taken as alpha), not both; got alpha={param_group[ALPHA]!r}, scale={param_group[SCALE]!r}"
                )
            param_group = dict(param_group)
            param_group[ALPHA] = param_group.pop(SCALE)
        super().add_param_group(param_group)


__all__ = [
    "ALPHA",
    "DISABLE_NL",
    "LIMITER_NORM",
    "FiraAdamW",
    "channel_norm_ratio",
    "fira_update",
    "limit_norm_growth",
    "tensor_norm_ratio",
]
