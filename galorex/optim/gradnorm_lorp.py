"""GradNormLoRPAdamW: weight-normalised, low-rank-projected Adam ("Gradient Weight-normalized
Low-rank Projection for Efficient LLM Training").

Each projected weight is read row-wise as W_i = g_i · v_i/‖v_i‖. With G = ∂L/∂W the exact
weight-norm gradients are

    ∂L/∂g_i = ⟨G_i, v̂_i⟩,        ∂L/∂v_i = (g_i/‖v_i‖) (G_i − ⟨G_i, v̂_i⟩ v̂_i)          (v̂ = v/‖v‖)

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

from .. import projection as proj
from .base import (
    STEP,
    _eight_bit,
    compute_dtype,
    hyperparameter,
    load_moment,
    store_moment,
)
from .galore import GaLoreAdamW, adam_directions

MAG_EXP_AVG = "mag_exp_avg"
MAG_EXP_AVG_SQ = "mag_exp_avg_sq"


def weight_norm_gradients(g: torch.Tensor, v: torch.Tensor, grad_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂g, ∂L/∂v) for W = g ⊙ v/‖v‖ (row-wise, g of shape (m,), v and ∂L/∂W of shape (m, n)).

    Rows with ‖v‖ below the dtype's smallest normal number get a zero ∂L/∂v (autograd divides by
    zero there), so the result stays finite."""
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


class GradNormLoRPAdamW(GaLoreAdamW):
    """GaLoreAdamW on the direction of each row of the projected weights, with the row norms on
    their own Adam. Same arguments and group keys as GaLoreAdamW (``optim_bits`` included)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._radial: dict[torch.Tensor, torch.Tensor] = {}
        super().__init__(*args, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_radial", {})  # per-step scratch, not state

    def _gradient_matrix(
        self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor | None = None
    ) -> torch.Tensor:
        cdtype = compute_dtype(p.dtype)
        w = proj.as_matrix(p).to(cdtype)
        norms, v_hat = _unit_rows(w)
        grad = p.grad if grad is None else grad
        radial, grad_v = weight_norm_gradients(norms, v_hat, proj.as_matrix(grad).to(cdtype))
        self._radial[p] = radial  # the magnitude gradient, used by this step's update
        return grad_v

    def _lowrank_step(self, group: dict[str, Any], items: list[dict[str, Any]]) -> None:
        # A refresh computed the magnitude gradients already; the update computes them again from
        # the same gradient, so drop those first: the (compiled) update then always starts from
        # an empty dict, and one graph serves refresh and ordinary steps alike.
        for it in items:
            self._radial.pop(it["param"], None)
        super()._lowrank_step(group, items)

    def _init_lowrank_state(self, group, p, state, shape, dtype) -> None:
        super()._init_lowrank_state(group, p, state, shape, dtype)
        rows = p.shape[0]
        for key in (MAG_EXP_AVG, MAG_EXP_AVG_SQ):
            zeros = torch.zeros(rows, dtype=dtype, device=p.device)
            store_moment(state, key, zeros, _eight_bit(group))

    def _apply_lowrank_update(self, group, p, state, d, bases, side, *, decay: float, alpha: float) -> None:
        w = proj.as_matrix(p).to(d.dtype)
        norms, v_hat = _unit_rows(w)
        radial = self._radial.pop(p)
        beta1, beta2 = group["betas"]
        m, v = load_moment(state, MAG_EXP_AVG), load_moment(state, MAG_EXP_AVG_SQ)
        # Inside a compiled step the counter stays a tensor (reading it would break the graph).
        step = state[STEP] if torch.compiler.is_compiling() else int(state[STEP].item())
        (mag_direction,) = adam_directions(
            [radial],
            [m],
            [v],
            [step],
            hyperparameter(beta1),
            hyperparameter(beta2),
            hyperparameter(group["eps"]),
            group["eps_mode"],
        )
        store_moment(state, MAG_EXP_AVG, m, _eight_bit(group))
        store_moment(state, MAG_EXP_AVG_SQ, v, _eight_bit(group))
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
