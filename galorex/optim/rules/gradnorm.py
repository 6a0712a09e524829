"""GradNormLoRPAdamW: weight-normalised, low-rank-projected Adam ("Gradient Weight-normalized
Low-rank Projection for Efficient LLM Training").

Each projected weight is read row-wise as W_i = g_i · v_i/‖v_i‖. With G = ∂L/∂W the exact
weight-norm gradients are

    ∂L/∂g_i = ⟨G_i, v̂_i⟩,        ∂L/∂v_i = (g_i/‖v_i‖) (G_i − ⟨G_i, v̂_i⟩ v̂_i)          (v̂ = v/‖v‖)

(the weight-normalisation gradients of Salimans & Kingma, 2016, "Weight Normalization", §2.1)

The direction gradient ∂L/∂v is projected to rank r and stepped by Adam in the subspace exactly as
GaLoreAdamW steps G (same basis refresh, moment policies, ``scale``); the magnitudes g have their own
Adam state (two vectors of length m). Since only v/‖v‖ matters, no copy of v is kept: each step
reads g_i = ‖W_i‖ and v̂_i = W_i/‖W_i‖ from the weight itself (so ‖v‖ = 1 and ∂L/∂v_i = g_i (G_i −
⟨G_i, v̂_i⟩ v̂_i)), updates them and writes W_i = g_i' · v_i'/‖v_i'‖ back. Where this differs from
the reference code: the radial term is kept (the reference drops it), no second full-size weight is
stored, and ‖v‖ is renormalised to 1 every step rather than drifting (Adam's update is scale-free,
so this only fixes the direction's effective step size to lr·scale). Weight decay multiplies the
magnitudes by (1 − lr·wd), which is W ← (1 − lr·wd)W. A row with zero norm has no direction; it
stays zero (no NaN). A magnitude stepped below zero moves its sign into the direction (g is re-read
as ‖W_i‖), so that row's Adam moments then push it back towards zero rather than through it.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import projection as proj
from ..adam_math import adam_directions
from ..config import STEP, compute_dtype, hyperparameter
from .adam import ADAM_MOMENTS, AdamRule, moment_bytes
from .base import Step

MAG_EXP_AVG = "mag_exp_avg"
MAG_EXP_AVG_SQ = "mag_exp_avg_sq"


def weight_norm_gradients(g: torch.Tensor, v: torch.Tensor, grad_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂g, ∂L/∂v) for W = g ⊙ v/‖v‖ (row-wise), the module docstring's formulas.

    Rows with ‖v‖ below the dtype's smallest normal number get a zero ∂L/∂v (autograd divides by
    zero there), so the result stays finite.

    Args:
        g: the row magnitudes (m,).
        v: the row directions (m, n), of any norm.
        grad_w: ∂L/∂W (m, n).

    Returns:
        (∂L/∂g of shape (m,), ∂L/∂v of shape (m, n)).
    """
    tiny = torch.finfo(v.dtype).tiny
    raw = v.norm(dim=1)
    norms = raw.clamp_min(tiny)
    v_hat = v / norms[:, None]
    radial = (grad_w * v_hat).sum(dim=1)
    # A row without a norm has no direction to move: no gradient, rather than g/tiny overflowing.
    coef = torch.where(raw >= tiny, g / norms, torch.zeros_like(g))
    grad_v = coef[:, None] * (grad_w - radial[:, None] * v_hat)
    return radial, grad_v


def _unit_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = w.norm(dim=1)
    return norms, w / norms.clamp_min(torch.finfo(w.dtype).tiny)[:, None]


class GradNormRule(AdamRule):
    """AdamRule on the direction gradient of each projected weight's rows, with the row magnitudes
    on their own Adam (two vectors of length m, stored by the codec like every moment)."""

    name = "gradnorm-lorp"
    fusable = False

    def moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ADAM_MOMENTS + (MAG_EXP_AVG, MAG_EXP_AVG_SQ)

    def init_state(self, group, p, state, shape, dtype) -> None:
        super().init_state(group, p, state, shape, dtype)
        for key in (MAG_EXP_AVG, MAG_EXP_AVG_SQ):
            state[key] = torch.zeros(p.shape[0], dtype=dtype, device=p.device)

    def gradient(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(∂L/∂v, ∂L/∂g): the direction gradient is projected; the magnitude gradient is the
        record :meth:`write` steps the magnitudes with."""
        cdtype = compute_dtype(p.dtype)
        w = proj.as_matrix(p).to(cdtype)
        norms, v_hat = _unit_rows(w)
        radial, grad_v = weight_norm_gradients(norms, v_hat, proj.as_matrix(grad).to(cdtype))
        return grad_v, radial

    def write(self, group, p, state, step: Step, bases, side, record) -> None:
        """Step the magnitudes g (their own Adam on ``record``, ∂L/∂g, decayed by ``step.decay``)
        and the directions (v̂ + alpha·back(D), renormalised row-wise), then write
        W_i = g_i' · v_i'/‖v_i'‖; with lr = 0 nothing moves. Arguments as :meth:`Rule.write`."""
        d, decay, alpha = step.direction, step.decay, step.alpha
        w = proj.as_matrix(p).to(d.dtype)
        norms, v_hat = _unit_rows(w)
        radial = record
        beta1, beta2 = group["betas"]
        m, v = state[MAG_EXP_AVG], state[MAG_EXP_AVG_SQ]
        # Inside a compiled step the counter stays a tensor (reading it would break the graph).
        count = state[STEP] if torch.compiler.is_compiling() else int(state[STEP].item())
        (mag_direction,) = adam_directions(
            [radial],
            [m],
            [v],
            [count],
            hyperparameter(beta1),
            hyperparameter(beta2),
            hyperparameter(group["eps"]),
            group["eps_mode"],
        )
        lr = hyperparameter(group["lr"])
        if not isinstance(lr, torch.Tensor) and lr == 0.0:
            return  # nothing moves; rewriting g·v̂ would only round W
        magnitudes = norms * decay - lr * mag_direction
        # v ← v̂ + alpha·back(D), then renormalised: only the direction is kept.
        if isinstance(alpha, torch.Tensor):
            direction = proj.add_projected_back_(v_hat, d * alpha, bases, side, alpha=1.0)
        else:
            direction = proj.add_projected_back_(v_hat, d, bases, side, alpha=alpha)
        _, direction = _unit_rows(direction)
        new = (magnitudes[:, None] * direction).view_as(p)
        if isinstance(lr, torch.Tensor):
            # A tensor lr of 0 must leave W untouched too, decided without reading it on the host.
            new = torch.where(lr == 0, p, new.to(p.dtype))
        p.copy_(new)

    def state_bytes(self, group, shape, dtype, low_shape=None) -> int:
        total = super().state_bytes(group, shape, dtype, low_shape)
        if low_shape is not None:  # the row magnitudes' two Adam moments (m entries each)
            total += moment_bytes(group, (proj.matrix_shape(shape)[0],), compute_dtype(dtype))
        return total


__all__ = ["GradNormRule", "weight_norm_gradients"]
