"""NaturalGaLoreAdamW (Das, 2024, "Natural GaLore: Accelerating GaLore for memory-efficient LLM
Training and Fine-tuning"): the step loop with the Natural GaLore rule (``rules.natural``, where the
Woodbury preconditioning is written out)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .galore import GaLoreAdamW
from .rules.natural import (
    FILLED,
    GRAM,
    HISTORY,
    NATURAL_DAMPING,
    NATURAL_HISTORY,
    NEXT_ROW,
    NaturalRule,
    woodbury_inverse_fisher,
)


class NaturalGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW whose Adam sees the inverse-empirical-Fisher-preconditioned low-rank gradient.

    Takes GaLoreAdamW's arguments and group keys plus, per group:

    - ``natural_history`` (s, default 8): how many recent low-rank gradients form the empirical
      Fisher (the current one included). 0 turns the preconditioning off.
    - ``natural_damping`` (λ, default 1e-3): Tikhonov damping of the Fisher, F = λI + H Hᵀ.

    At a basis refresh the window follows ``moment_policy``, except that it can never be kept
    as is (its vectors live in the old basis): ``reset`` empties it, ``keep`` and ``reproject``
    carry each vector into the new basis (h ← project(project_back(h))) and rebuild HᵀH.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad: as :class:`GaLoreAdamW`.
        natural_history: default of the group key ``natural_history`` (s).
        natural_damping: default of the group key ``natural_damping`` (λ).
        **galore_options: GaLoreAdamW's other keyword arguments.
    """

    rule = NaturalRule()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        natural_history: int = 8,
        natural_damping: float = 1e-3,
        **galore_options: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            natural_history=natural_history,
            natural_damping=natural_damping,
            **galore_options,
        )


__all__ = [
    "FILLED",
    "GRAM",
    "HISTORY",
    "NATURAL_DAMPING",
    "NATURAL_HISTORY",
    "NEXT_ROW",
    "NaturalGaLoreAdamW",
    "woodbury_inverse_fisher",
]
