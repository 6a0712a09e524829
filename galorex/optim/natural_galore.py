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

import math
from collections.abc import Iterable
from typing import Any

import torch

from .. import projection as proj
from .base import MOMENT_POLICY, _is_int, _is_real, hyperparameter
from .galore import GaLoreAdamW

NATURAL_HISTORY = "natural_history"
NATURAL_DAMPING = "natural_damping"

HISTORY = "natural_history"  # state: (s, *lowrank shape) ring buffer of low-rank gradients
GRAM = "natural_gram"  # state: (s, s) float64, HᵀH of the buffer's rows
FILLED = "natural_filled"  # state: CPU scalar, rows of the buffer holding gradients
NEXT_ROW = "natural_next_row"  # state: CPU scalar, the row the next gradient overwrites


def woodbury_inverse_fisher(
    g: torch.Tensor,
    rows: torch.Tensor,
    damping: float,
    *,
    gram: torch.Tensor | None = None,
    dots: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """(λI + H Hᵀ)⁻¹ g with H = rowsᵀ, through the k×k system (λI + HᵀH) of the Woodbury identity.

    ``g`` is (d,), ``rows`` (k, d). ``gram`` = rows·rowsᵀ and ``dots`` = rows·g may be passed when
    already known. The k×k solve runs in float64 by Cholesky and never synchronises with the host.
    ``count`` (a 0-dim tensor) says how many of the rows are gradients when the others are zero
    rows (the compiled step passes the whole window): the result is then the same as for the
    non-zero rows alone, the zero ones adding a decoupled λ block.
    The damping used is λ + δ with δ = 10·ε·(trace(HᵀH) + kλ), ε of ``rows``' dtype: the rounding of
    the stored dot products, which would otherwise make the system indefinite when λ is below what
    they resolve. In float64 δ is negligible; with float32 gradients of norm ~1 it is ~1e-6·k.
    """
    k = rows.shape[0] if count is None else count.to(device=rows.device, dtype=torch.float64)
    if dots is None:
        dots = rows @ g
    dots = dots.to(torch.float64)
    if gram is None:
        r64 = rows.to(torch.float64)
        gram = r64 @ r64.mT
    gram = gram.to(torch.float64)
    # The jitter joins the damping (on both sides of the identity), so the result is exactly
    # ((λ+δ)I + H Hᵀ)⁻¹ g: a slightly larger damping, never a rescaled answer.
    damping = damping + 10 * torch.finfo(rows.dtype).eps * (gram.diagonal().sum() + k * damping)
    eye = torch.eye(rows.shape[0], dtype=torch.float64, device=rows.device)
    chol, _ = torch.linalg.cholesky_ex(gram + damping * eye)
    coeffs = torch.cholesky_solve(dots.unsqueeze(-1), chol).squeeze(-1)
    return (g - coeffs.to(g.dtype) @ rows) / damping.to(g.dtype)


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

    _cpu_state_keys = GaLoreAdamW._cpu_state_keys + (FILLED, NEXT_ROW)

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
        self._extra_defaults = {NATURAL_HISTORY: natural_history, NATURAL_DAMPING: natural_damping}
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **galore_options)

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        super()._validate_group(group, index)
        s, lam = group[NATURAL_HISTORY], group[NATURAL_DAMPING]
        if not _is_int(s) or s < 0:
            raise ValueError(f"param_groups[{index}]: {NATURAL_HISTORY!r} must be an integer >= 0, got {s!r}")
        if not _is_real(lam) or not math.isfinite(float(lam)) or float(lam) <= 0:
            raise ValueError(f"param_groups[{index}]: {NATURAL_DAMPING!r} must be a finite number > 0, got {lam!r}")

    # ------------------------------------------------------------------ state
    def _init_lowrank_state(self, group, p, state, shape, dtype) -> None:
        super()._init_lowrank_state(group, p, state, shape, dtype)
        s = group[NATURAL_HISTORY]
        if s > 0:
            state[HISTORY] = torch.zeros((s, *shape), dtype=dtype, device=p.device)
            state[GRAM] = torch.zeros((s, s), dtype=torch.float64, device=p.device)
            state[FILLED] = torch.zeros((), dtype=torch.float32)
            state[NEXT_ROW] = torch.zeros((), dtype=torch.float32)

    def _on_refresh(self, group, p, state, old_bases, new_bases, side) -> None:
        super()._on_refresh(group, p, state, old_bases, new_bases, side)
        if HISTORY not in state:
            return
        if group[MOMENT_POLICY] == "reset":
            state[HISTORY].zero_()
            state[GRAM].zero_()
            state[FILLED].zero_()
            state[NEXT_ROW].zero_()
            return
        transitions = proj.transition_matrices(old_bases, new_bases)
        history = torch.stack([proj.reproject_lowrank(h, transitions, side) for h in state[HISTORY]])
        state[HISTORY] = history
        flat = history.reshape(history.shape[0], -1).to(torch.float64)
        state[GRAM] = flat @ flat.mT

    # ------------------------------------------------------------------ the inner rule
    def _precondition(self, group: dict[str, Any], low: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        history = state[HISTORY]
        s = history.shape[0]
        rows = history.view(s, -1)
        g = low.reshape(-1)
        row = int(state[NEXT_ROW].item())
        rows[row].copy_(g)
        # The row index itself, not a running count: a float32 count would stall at 2^24 steps.
        state[NEXT_ROW].fill_((row + 1) % s)
        filled = min(int(state[FILLED].item()) + 1, s)
        state[FILLED].fill_(filled)
        valid = rows[:filled]
        # One new row of HᵀH per step: the new gradient against every stored one.
        dots = (valid @ g).to(torch.float64)
        gram = state[GRAM]
        gram[row, :filled] = dots
        gram[:filled, row] = dots
        # The right-hand side Hᵀg is the same dots: no second pass over the buffer for it.
        lam = float(group[NATURAL_DAMPING])
        out = woodbury_inverse_fisher(g, valid, lam, gram=gram[:filled, :filled], dots=dots)
        return out.view_as(low)

    def _precondition_compiled(self, group: dict[str, Any], low: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """:meth:`_precondition` without host reads, for a compiled step: the ring position and
        fill count stay tensors, and the whole window enters the solve (rows not yet written are
        zero, so they add nothing; ``count`` keeps the jitter as for the filled rows alone)."""
        history = state[HISTORY]
        s = history.shape[0]
        rows = history.view(s, -1)
        g = low.reshape(-1)
        row = state[NEXT_ROW].to(torch.long)
        index = row.reshape(1).to(rows.device)
        rows.index_copy_(0, index, g.unsqueeze(0))
        state[NEXT_ROW].copy_((row + 1) % s)
        state[FILLED].copy_((state[FILLED] + 1).clamp(max=s))
        dots = (rows @ g).to(torch.float64)
        gram = state[GRAM]
        gram.index_copy_(0, index, dots.unsqueeze(0))
        gram.index_copy_(1, index, dots.unsqueeze(1))
        lam = hyperparameter(group[NATURAL_DAMPING])
        out = woodbury_inverse_fisher(g, rows, lam, gram=gram, dots=dots, count=state[FILLED])
        return out.view_as(low)

    def _lowrank_directions(self, group, params, lows, states):
        if group[NATURAL_HISTORY] > 0:
            precondition = self._precondition_compiled if torch.compiler.is_compiling() else self._precondition
            lows = [precondition(group, low, s) if HISTORY in s else low for low, s in zip(lows, states)]
        return super()._lowrank_directions(group, params, lows, states)


__all__ = ["NaturalGaLoreAdamW", "woodbury_inverse_fisher"]
