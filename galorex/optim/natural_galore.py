"""NaturalGaLoreAdamW: GaLore with the low-rank gradient preconditioned by the inverse empirical
Fisher (Das, 2024, "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and
Fine-tuning").

    g  = vec(project(G_t, P))                         the current low-rank gradient (d = r·n entries)
    H  = [g_t, g_{t−1}, …, g_{t−k+1}]                 the last k ≤ s low-rank gradients, as columns
    g̃  = (λI + H Hᵀ)⁻¹ g = (g − H (λI + HᵀH)⁻¹ Hᵀ g) / λ          (Woodbury: a k×k solve, not d×d)

and Adam runs on g̃ exactly as in GaLoreAdamW. As in the paper, the window includes the current
gradient and the Fisher is not divided by the window length (a constant factor Adam's normalisation
removes anyway, up to ε). Where galorex differs: the window is a fixed-size ring buffer in the state
(a tensor, so checkpoints stay tensors-only), HᵀH is kept up to date one row per step instead of being
rebuilt, and the k×k system is solved in float64 by Cholesky with the damping raised by
δ = 10·ε·(trace HᵀH + kλ) (ε of the stored gradients' dtype), which keeps it positive definite
without any host synchronisation.
With s = 0 the optimizer is GaLoreAdamW.

The window costs s·r·n entries per projected (m×n) matrix (s times one Adam moment) plus an s×s
float64 Gram matrix; ``estimate_optimizer_state_bytes`` counts both.
"""

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
