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
from typing import Any

import torch

from ... import projection as proj
from ..config import MOMENT_POLICY, Bad, hyperparameter, is_int, is_real
from .adam import AdamRule
from .base import State

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

    Args:
        g: the gradient (d,).
        rows: the k window gradients as rows (k, d), Hᵀ.
        damping: λ > 0 (a number, or a 0-dim tensor in a compiled step).
        gram: rows·rowsᵀ (k×k) if already known.
        dots: rows·g (k,) if already known.
        count: a 0-dim tensor, the number of rows that are gradients (the others zero).

    Returns:
        ((λ+δ)I + H Hᵀ)⁻¹ g, (d,) in g's dtype.
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


class NaturalRule(AdamRule):
    """Adam on the inverse-empirical-Fisher-preconditioned low-rank gradient.

    Group keys: AdamRule's, plus ``natural_history`` (s, 8; 0 turns the preconditioning off) and
    ``natural_damping`` (λ, 1e-3). At a refresh the window follows ``moment_policy``, except that
    it is never kept as is (its vectors live in the old basis): ``reset`` empties it, ``keep`` and
    ``reproject`` carry each vector into the new basis and rebuild HᵀH.
    """

    name = "natural-galore"
    defaults = {**AdamRule.defaults, NATURAL_HISTORY: 8, NATURAL_DAMPING: 1e-3}
    fusable = False
    cpu_state_keys = (FILLED, NEXT_ROW)

    def validate(self, group: dict[str, Any], bad: Bad) -> None:
        super().validate(group, bad)
        s, lam = group[NATURAL_HISTORY], group[NATURAL_DAMPING]
        if not is_int(s) or s < 0:
            raise bad(NATURAL_HISTORY, "must be an integer >= 0")
        if not is_real(lam) or not math.isfinite(float(lam)) or float(lam) <= 0:
            raise bad(NATURAL_DAMPING, "must be a finite number > 0")

    def init_state(self, group, p, state, shape, dtype) -> None:
        super().init_state(group, p, state, shape, dtype)
        device = p.device
        s = group[NATURAL_HISTORY]
        if s > 0:
            state[HISTORY] = torch.zeros((s, *shape), dtype=dtype, device=device)
            state[GRAM] = torch.zeros((s, s), dtype=torch.float64, device=device)
            state[FILLED] = torch.zeros((), dtype=torch.float32)
            state[NEXT_ROW] = torch.zeros((), dtype=torch.float32)

    def on_refresh(self, group, state, old_bases, new_bases, side) -> None:
        super().on_refresh(group, state, old_bases, new_bases, side)
        if HISTORY not in state:
            return
        if group[MOMENT_POLICY] == "reset":
            for key in (HISTORY, GRAM, FILLED, NEXT_ROW):
                state[key].zero_()
            return
        transitions = proj.transition_matrices(old_bases, new_bases)
        history = torch.stack([proj.reproject_lowrank(h, transitions, side) for h in state[HISTORY]])
        state[HISTORY] = history
        flat = history.reshape(history.shape[0], -1).to(torch.float64)
        state[GRAM] = flat @ flat.mT

    def precondition(self, group: dict[str, Any], low: torch.Tensor, state: State) -> torch.Tensor:
        """g̃ = (λI + H Hᵀ)⁻¹ g of one low-rank gradient: g is written into the ring buffer's next
        row, one row and column of HᵀH are updated from its dots with the filled rows, and
        :func:`woodbury_inverse_fisher` solves over the filled rows (the current one included).

        Args:
            group: the group (``natural_damping``).
            low: the low-rank gradient R.
            state: its state (``natural_history``, ``natural_gram`` and the ring's counters).

        Returns:
            g̃ in R's shape.
        """
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

    def precondition_compiled(self, group: dict[str, Any], low: torch.Tensor, state: State) -> torch.Tensor:
        """:meth:`precondition` without host reads, for a compiled step: the ring position and
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

    def directions(
        self,
        group: dict[str, Any],
        lows: list[torch.Tensor],
        states: list[State],
        out: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        if group[NATURAL_HISTORY] > 0:
            precondition = self.precondition_compiled if torch.compiler.is_compiling() else self.precondition
            lows = [precondition(group, low, s) if HISTORY in s else low for low, s in zip(lows, states)]
        return super().directions(group, lows, states, out=out)

    def state_bytes(self, group, shape, dtype, low_shape=None) -> int:
        total = super().state_bytes(group, shape, dtype, low_shape)
        s = group.get(NATURAL_HISTORY, 0)
        if low_shape is not None and s > 0:
            from ..config import compute_dtype

            cbytes = torch.empty((), dtype=compute_dtype(dtype)).element_size()
            total += s * math.prod(low_shape) * cbytes + s * s * 8 + 2 * 4
        return total


__all__ = ["NaturalRule", "woodbury_inverse_fisher"]
