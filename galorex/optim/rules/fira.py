"""FiraAdamW: GaLore plus the residual gradient, norm-scaled (Chen et al., 2024, "Fira: Can We
Achieve Full-rank Training of LLMs Under Low-rank Constraint?").

GaLore steps only the part of the gradient inside its subspace; Fira adds the rest, scaled so that
it moves like Adam would move it. With R = project(G), Adam's direction N in the subspace, and
channels c the rows (right projection, R is m×r) or columns (left projection, R is r×n) of G —
the dimension the projection keeps:

    φ_c = ‖N_c‖ / (‖R_c‖ + 1e-8)                                  (norm-based scaling)
    S   = (G − α·project_back(R)) ⊙ φ                              (the residual, scaled per channel)
    S   ← S / max(‖S‖ / (s_prev + 1e-8), γ) · γ,  s_prev ← ‖S‖      (norm-growth limiter, γ = 1.01)
    W   ← W − lr·c_t·(α·project_back(N) + S),  decoupled weight decay

The limiter lets the residual term's norm grow by at most γ per step (its first step is free).
c_t is Adam's step factor: with ``eps_mode="galore_torch"`` (the reference package's arithmetic)
N = m/(√v + ε) and c_t = √(1−β₂ᵗ)/(1−β₁ᵗ), so the limiter sees the term before the bias correction
as ``fira.FiraAdamW`` does; with ``eps_mode="torch"`` N = m̂/(√v̂ + ε) and c_t = 1. State: GaLore's
plus one scalar per matrix (s_prev).

The maths lives in the pure functions :func:`channel_norm_ratio`, :func:`limit_norm_growth` and
:func:`fira_update` (APOLLO uses the first two as well); :class:`FiraRule` only feeds them
(``galorex.optim.fira.FiraAdamW`` binds it).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ... import projection as proj
from ..config import EPS_MODE, PROJ_TYPE, RANK, Bad, compute_dtype, hyperparameter, is_real
from .adam import AdamRule
from .base import State, Step

# Group keys, as the reference packages name them.
ALPHA = "alpha"  # fira: multiplies project_back (GaLore's "scale")
DISABLE_NL = "disable_nl"  # apollo-torch's flag; galorex gives Fira the same switch

# State key: the norm of the last residual term after limiting (+inf before the first step).
LIMITER_NORM = "limiter_norm"

NORM_GROWTH_LIMIT = 1.01  # γ of both papers and both reference packages
RATIO_EPS = 1e-8  # the reference packages' guard in ‖N‖/(‖R‖ + 1e-8) and s_prev + 1e-8


def channel_axis(side: str) -> int:
    """The axis of the low-rank matrix along which a channel's norm is taken: a right projection
    keeps G's rows (R is m×r, one norm per row: axis 1), a left one its columns (R is r×n: axis 0).
    ``full`` keeps neither, so it has no channels."""
    if side == "right":
        return 1
    if side == "left":
        return 0
    raise ValueError(f"channel-wise scaling needs a one-sided projection (left or right), got side {side!r}")


def channel_norm_ratio(direction: torch.Tensor, low: torch.Tensor, side: str) -> torch.Tensor:
    """φ_c = ‖direction_c‖ / (‖low_c‖ + 1e-8) per channel c of the unprojected dimension, shaped to
    broadcast against the full (m×n) gradient: (m, 1) for a right projection, (n,) for a left one."""
    axis = channel_axis(side)
    ratio = torch.linalg.vector_norm(direction, dim=axis) / (torch.linalg.vector_norm(low, dim=axis) + RATIO_EPS)
    return ratio.unsqueeze(1) if axis == 1 else ratio


def tensor_norm_ratio(direction: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """‖direction‖ / (‖low‖ + 1e-8) over the whole matrix (a 0-dim tensor)."""
    return torch.linalg.vector_norm(direction) / (torch.linalg.vector_norm(low) + RATIO_EPS)


def limit_norm_growth(
    update: torch.Tensor, previous_norm: torch.Tensor, gamma: float = NORM_GROWTH_LIMIT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fira's norm-growth limiter: (update / ℓ, ‖update‖ / ℓ) with ℓ = max(‖update‖ / (prev + 1e-8), γ) / γ.

    The returned norm is the next step's ``previous_norm``. A ``previous_norm`` of +inf (the first
    step) gives ℓ = 1: the first update passes unchanged. No host synchronisation.
    """
    norm = torch.linalg.vector_norm(update)
    limiter = torch.clamp(norm / (previous_norm + RATIO_EPS), min=gamma) / gamma
    return update / limiter, norm / limiter


def fira_update(
    grad: torch.Tensor,
    low: torch.Tensor,
    direction: torch.Tensor,
    bases: list[torch.Tensor],
    side: str,
    alpha: float,
    previous_norm: torch.Tensor | None,
    gamma: float = NORM_GROWTH_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fira's update U = α·project_back(N) + limit((G − α·project_back(R)) ⊙ φ) and the limiter's
    new norm (None when ``previous_norm`` is None: the limiter is off).

    ``grad`` is G (m×n), ``low`` R = project(G), ``direction`` N (Adam's direction in the subspace,
    before any step factor), φ from :func:`channel_norm_ratio`. The caller steps W ← W − lr·c_t·U.
    """
    scaling = channel_norm_ratio(direction, low, side)
    residual = proj.add_projected_back_(grad.clone(), low, bases, side, alpha=-alpha)
    residual.mul_(scaling)
    new_norm = None
    if previous_norm is not None:
        residual, new_norm = limit_norm_growth(residual, previous_norm, gamma)
    return proj.add_projected_back_(residual, direction, bases, side, alpha=alpha), new_norm


def adam_step_factor(group: dict[str, Any], bias_step: int | torch.Tensor) -> float | torch.Tensor:
    """c_t: what multiplies Adam's direction N as the caller sees it. 1 with ``eps_mode="torch"``
    (N is m̂/(√v̂+ε) already); √(1−β₂ᵗ)/(1−β₁ᵗ) with ``eps_mode="galore_torch"`` (N = m/(√v+ε))."""
    if group[EPS_MODE] != "galore_torch":
        return 1.0
    beta1, beta2 = (hyperparameter(b) for b in group["betas"])
    if isinstance(bias_step, torch.Tensor) or isinstance(beta1, torch.Tensor) or isinstance(beta2, torch.Tensor):
        t = torch.as_tensor(bias_step, dtype=torch.float64)
        b1 = torch.as_tensor(beta1, dtype=torch.float64)
        b2 = torch.as_tensor(beta2, dtype=torch.float64)
        return (1.0 - b2**t).sqrt() / (1.0 - b1**t)
    return math.sqrt(1.0 - beta2**bias_step) / (1.0 - beta1**bias_step)


def write_update(
    p: torch.Tensor,
    update: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    step_factor: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    decay_after: bool,
) -> None:
    """W ← (1 − lr·wd)·W − lr·c_t·U (decay first, as torch's AdamW), or (1 − lr·wd)·(W − lr·c_t·U)
    (``decay_after``: the reference packages' order, ``eps_mode="galore_torch"``). ``update`` is an
    (m×n) matrix in the compute dtype; low-precision weights are accumulated there and rounded once."""
    coef = lr * step_factor
    shrink = lr * weight_decay  # W ← W − lr·wd·W
    in_place = p.dtype == update.dtype and p.is_contiguous()
    w = proj.as_matrix(p) if in_place else proj.as_matrix(p).to(update.dtype, copy=True)
    decays = isinstance(shrink, torch.Tensor) or shrink != 0.0
    if decays and not decay_after:
        _axpy_(w, w, -shrink)
    _axpy_(w, update, -coef)
    if decays and decay_after:
        _axpy_(w, w, -shrink)  # as the reference packages write it: p.add_(p, alpha=−lr·wd)
    if not in_place:
        p.copy_(w.view_as(p))


def _axpy_(y: torch.Tensor, x: torch.Tensor, a: float | torch.Tensor) -> None:
    """y ← y + a·x in place; a tensor ``a`` (a compiled step's lr) is applied as a multiplication."""
    if isinstance(a, torch.Tensor):
        y.add_(x * a.to(device=x.device, dtype=x.dtype))
    else:
        y.add_(x, alpha=a)


class FiraRule(AdamRule):
    """Adam in the subspace plus the norm-scaled, limited residual (see the module docstring).

    Group keys: AdamRule's, ``alpha`` (1.0; fira's multiplier of project_back) and ``disable_nl``
    (False; True turns the limiter off). ``full`` projection has no channels and is refused.
    """

    name = "fira"
    defaults = {**AdamRule.defaults, "weight_decay": 0.0, ALPHA: 1.0, DISABLE_NL: False}
    fusable = False

    def validate(self, group: dict[str, Any], bad: Bad) -> None:
        super().validate(group, bad)
        validate_norm_scaled(group, bad, ALPHA)

    def init_state(self, group, p, state, shape, dtype) -> None:
        super().init_state(group, p, state, shape, dtype)
        state[LIMITER_NORM] = torch.full((), math.inf, dtype=dtype, device=p.device)

    def gradient(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, Any]:
        g, _ = super().gradient(group, p, grad)
        return g, g  # the whole gradient is the record: write() needs its residual

    def steps(self, group, params, weights, lows, states) -> list[Step]:
        return [Step(d, None, None, low) for d, low in zip(self.directions(group, lows, states), lows)]

    def write(self, group, p, state: State, step: Step, bases, side, record) -> None:
        factor, raw, previous = norm_scaled_inputs(self, group, state, step)
        update, norm = fira_update(record, step.extra, raw, bases, side, float(group[ALPHA]), previous)
        if norm is not None:
            state[LIMITER_NORM].copy_(norm)
        write_update(
            p,
            update,
            lr=hyperparameter(group["lr"]),
            step_factor=factor,
            weight_decay=hyperparameter(group["weight_decay"]),
            decay_after=group[EPS_MODE] == "galore_torch",
        )

    def state_bytes(self, group, shape, dtype, low_shape=None) -> int:
        limiter = 0 if low_shape is None else torch.empty((), dtype=compute_dtype(dtype)).element_size()
        return super().state_bytes(group, shape, dtype, low_shape) + limiter


FULL_HAS_NO_CHANNELS = (
    "'full' projects both sides, which leaves no channel for Fira's column-wise scaling; "
    "use std, reverse_std, left or right"
)


def norm_scaled_inputs(rule: AdamRule, group: dict[str, Any], state: State, step: Step):
    """(c_t, N, s_prev) for Fira's and APOLLO's write: Adam's step factor, the direction before it,
    and the limiter's last norm (None with ``disable_nl``)."""
    factor = adam_step_factor(group, rule.bias_step(group, state))
    d = step.direction
    raw = d if isinstance(factor, float) and factor == 1.0 else d / _as(factor, d)
    return factor, raw, None if group[DISABLE_NL] else state[LIMITER_NORM]


def validate_norm_scaled(
    group: dict[str, Any], bad: Bad, multiplier: str | None, full: str = FULL_HAS_NO_CHANNELS
) -> None:
    """What Fira and APOLLO check alike: the limiter switch, their multiplier, one-sided projections
    (``full``: the error's wording for a two-sided one)."""
    if multiplier is not None:
        value = group[multiplier]
        if not is_real(value) or isinstance(value, torch.Tensor) or not math.isfinite(value) or value <= 0:
            raise bad(multiplier, "must be a finite number > 0")
    if not isinstance(group[DISABLE_NL], bool):
        raise bad(DISABLE_NL, "must be True or False")
    if group.get(RANK) is not None and group[PROJ_TYPE] == "full":
        raise bad(PROJ_TYPE, full)


def _as(x: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return x.to(device=like.device, dtype=like.dtype) if isinstance(x, torch.Tensor) else x


__all__ = [
    "FiraRule",
    "adam_step_factor",
    "channel_norm_ratio",
    "fira_update",
    "limit_norm_growth",
    "tensor_norm_ratio",
    "write_update",
]
