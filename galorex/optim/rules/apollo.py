"""ApolloAdamW: AdamW's update coarsened to channel- or tensor-wise learning rates, estimated in a
random low-rank space (Zhu et al., 2024, "APOLLO: SGD-like Memory, AdamW-level Performance").

With R = project(G) onto a rank-r space, Adam's moments kept on R only, and N Adam's direction there:

    s_c = ‖N_c‖ / (‖R_c‖ + 1e-8)  per channel c (``scale_type="channel"``)  or
    s   = ‖N‖   / (‖R‖   + 1e-8)  for the whole matrix (``scale_type="tensor"``)
    U   = limit(G ⊙ s)            (the raw full-rank gradient, rescaled; Fira's norm-growth limiter)
    W   ← W − lr·c_t·√scale·U,    decoupled weight decay

A channel is a row of G for a right projection (R is m×r) and a column for a left one (R is r×n):
the dimension the projection keeps. ``scale_front`` multiplies by √scale before the limiter rather
than after (the limiter then remembers the scaled norm; the update is the same up to rounding).
c_t is Adam's step factor (see :func:`galorex.optim.rules.fira.adam_step_factor`).

The projection (``proj``):

- ``"random"``: P has i.i.d. N(0, 1/r) entries drawn from a seeded generator — (r×n) for a right
  projection, used as G Pᵀ, (m×r) for a left one, used as Pᵀ G — so it is never stored: it is
  regenerated from its seed at every step, and a new seed is drawn every ``update_proj_gap`` steps.
  The seeds are apollo-torch's: parameter i (counted from 1 over all groups, in order) starts at
  ``refresh_seed + i``, and each refresh moves to :func:`next_seed` of the last one; the current
  seed is a 0-dim int64 tensor in the state, so a resumed run regenerates the same matrix.
- ``"svd"``: GaLore's basis, the top-r singular vectors of G, stored and refreshed like GaLore's.

APOLLO-Mini (:meth:`ApolloAdamW.mini`): rank 1, tensor-wise, random, scale 128 (a √128 multiplier).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ... import projection as proj
from ..config import (
    BASIS_BITS,
    EPS_MODE,
    MOMENT_POLICY,
    RANK,
    REFRESH_METHOD,
    REFRESH_SEED,
    SCALE,
    Bad,
    compute_dtype,
    hyperparameter,
)
from .adam import AdamRule
from .base import State, Step
from .fira import (
    DISABLE_NL,
    LIMITER_NORM,
    NORM_GROWTH_LIMIT,
    RATIO_EPS,
    _axpy_,
    channel_axis,
    channel_norm_ratio,
    limit_norm_growth,
    norm_scaled_inputs,
    tensor_norm_ratio,
    validate_norm_scaled,
)

# Group keys, as apollo-torch names them.
PROJ = "proj"
PROJS = ("random", "svd")
SCALE_TYPE = "scale_type"
SCALE_TYPES = ("channel", "tensor")
SCALE_FRONT = "scale_front"

# State key: the seed of the current random projection (0-dim int64, on the CPU).
PROJ_SEED = "proj_seed"

_NEXT_SEED_DRAWS = 0xF  # apollo-torch advances a seed by the last of 15 draws


def next_seed(seed: int) -> int:
    """The seed of the next random projection: the last of 15 integers in [0, 2⁶³−1) drawn by a CPU
    ``torch.Generator`` seeded with ``seed`` (apollo-torch's chain, so the same seeds give the same
    projections)."""
    generator = torch.Generator().manual_seed(int(seed))
    draws = torch.randint(0, torch.iinfo(torch.int64).max, (_NEXT_SEED_DRAWS,), generator=generator)
    return int(draws[-1])


def random_projection(
    m: int, n: int, rank: int, side: str, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """APOLLO's random basis for an (m×n) gradient, as galorex bases are laid out (columns):
    (m×r) for ``left`` (R = Pᵀ G), (n×r) for ``right`` (R = G P). Entries N(0, 1/r), drawn in float32
    from a generator on ``device`` seeded with ``seed`` (a right basis as the (r×n) draw,
    transposed), then cast to ``dtype``; r is ``rank`` clipped to min(m, n)."""
    r = proj.effective_rank(rank, m, n)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    if side == "left":
        basis = torch.randn((m, r), generator=generator, device=device, dtype=torch.float32).div_(math.sqrt(r))
    elif side == "right":
        basis = torch.randn((r, n), generator=generator, device=device, dtype=torch.float32).div_(math.sqrt(r)).mT
    else:
        raise ValueError(f"APOLLO's random projection is one-sided (left or right), got side {side!r}")
    return basis.to(dtype)


def apollo_update(
    grad: torch.Tensor,
    low: torch.Tensor,
    direction: torch.Tensor,
    side: str,
    scale_type: str,
    scale: float,
    scale_front: bool,
    previous_norm: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """APOLLO's update √scale·limit(G ⊙ s) and the limiter's new norm (None when ``previous_norm``
    is None: the limiter is off).

    ``grad`` is G (m×n), ``low`` R = project(G), ``direction`` N (Adam's direction on R, before any
    step factor); s per channel (:func:`galorex.optim.fira.channel_norm_ratio`) or for the tensor.
    The caller steps W ← W − lr·c_t·U.
    """
    if scale_type == "channel":
        ratio = channel_norm_ratio(direction, low, side)
    elif scale_type == "tensor":
        ratio = tensor_norm_ratio(direction, low)
    else:
        raise ValueError(f"unknown scale_type {scale_type!r}; expected one of {SCALE_TYPES}")
    update = grad * ratio
    root = math.sqrt(scale)
    if scale_front:
        update = update * root
    new_norm = None
    if previous_norm is not None:
        update, new_norm = limit_norm_growth(update, previous_norm)
    if not scale_front:
        update = update * root
    return update, new_norm


def channel_norms(x: torch.Tensor, axis: int) -> torch.Tensor:
    """‖x_c‖ along ``axis`` of a matrix: :func:`torch.linalg.vector_norm` (the plain form), except
    across rows (``axis=0``: one norm per column) on the CPU, where vector_norm walks the strided
    dimension ~8× slower than ``x.square().sum(0).sqrt()`` over a contiguous matrix. The two differ
    by summation rounding only (tests/test_apollo.py holds them together in float64)."""
    if axis == 0 and x.device.type == "cpu" and x.is_contiguous():
        return x.square().sum(0).sqrt_()
    return torch.linalg.vector_norm(x, dim=axis)


def apollo_multiplier(
    grad: torch.Tensor,
    low: torch.Tensor,
    direction: torch.Tensor,
    side: str,
    scale_type: str,
    scale: float,
    scale_front: bool,
    previous_norm: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same step as :func:`apollo_update` as a multiplier μ with U = G ⊙ μ — per channel
    ((m, 1) or (n,)) or one number — and the limiter's new norm, without forming G ⊙ s: the
    limiter needs only ‖G ⊙ s‖ = ‖(‖G_c‖·s_c)_c‖. The optimizer then writes W in one pass
    (``addcmul``) instead of five over full-size temporaries. Channel norms come from
    :func:`channel_norms` (apollo_update, the plain form, takes torch's vector_norm)."""
    if scale_type == "channel":
        axis = channel_axis(side)
        ratio = channel_norms(direction, axis) / (channel_norms(low, axis) + RATIO_EPS)
    elif scale_type == "tensor":
        ratio = tensor_norm_ratio(direction, low)
    else:
        raise ValueError(f"unknown scale_type {scale_type!r}; expected one of {SCALE_TYPES}")
    root = math.sqrt(scale)
    if previous_norm is None:
        multiplier = ratio * root
    else:
        if scale_type == "channel":
            norm = torch.linalg.vector_norm(channel_norms(grad, axis) * ratio)
        else:
            norm = torch.linalg.vector_norm(grad) * ratio
        if scale_front:
            norm = norm * root
        limiter = torch.clamp(norm / (previous_norm + RATIO_EPS), min=NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
        multiplier, previous_norm = ratio * (root / limiter), norm / limiter
    if scale_type == "channel" and axis == 1:
        multiplier = multiplier.unsqueeze(1)  # (m, 1): broadcast over a right projection's rows
    return multiplier, previous_norm


class ApolloRule(AdamRule):
    """Adam's moments on a (random or SVD) projection, used only to rescale the raw gradient
    channel- or tensor-wise (see the module docstring).

    Group keys: AdamRule's, ``proj`` (``random``|``svd``), ``scale_type`` (``channel``|``tensor``),
    ``scale_front`` and ``disable_nl``; GaLore's ``scale`` enters the update as √scale.
    """

    name = "apollo"
    defaults = {
        **AdamRule.defaults,
        "weight_decay": 0.0,
        PROJ: "random",
        SCALE_TYPE: "channel",
        SCALE_FRONT: False,
        DISABLE_NL: False,
    }
    fusable = False
    cpu_state_keys = (PROJ_SEED,)

    def validate(self, group: dict[str, Any], bad: Bad) -> None:
        super().validate(group, bad)
        if group[PROJ] not in PROJS:
            raise bad(PROJ, f"must be one of {PROJS}")
        if group[SCALE_TYPE] not in SCALE_TYPES:
            raise bad(SCALE_TYPE, f"must be one of {SCALE_TYPES}")
        if not isinstance(group[SCALE_FRONT], bool):
            raise bad(SCALE_FRONT, "must be True or False")
        validate_norm_scaled(
            group,
            bad,
            None,
            "'full' is not an APOLLO projection (the random one is one-sided, channels need an "
            "unprojected side, and apollo-torch fails on it); use std, reverse_std, left or right",
        )
        if group.get(RANK) is None:
            return
        if isinstance(group[SCALE], torch.Tensor):
            raise bad(SCALE, "must be a number (it enters the update as √scale)")
        if group[PROJ] == "random":
            if group.get(BASIS_BITS, 32) != 32:
                raise bad(BASIS_BITS, "applies to a stored basis; proj='random' stores none (use 32)")
            if group.get(REFRESH_METHOD, "svd") != "svd":
                raise bad(REFRESH_METHOD, "chooses how proj='svd' computes its basis; proj='random' draws one")
            if group[MOMENT_POLICY] == "reproject":
                raise bad(MOMENT_POLICY, "'reproject' needs orthonormal bases; with proj='random' use keep or reset")

    # ------------------------------------------------------------------ the random projection
    def basis_is_generated(self, group: dict[str, Any]) -> bool:
        return group[PROJ] == "random"

    def init_projection(self, group: dict[str, Any], p: torch.Tensor, state: State, index: int) -> None:
        # apollo-torch's seeds: parameter i (from 1, over all groups) starts at seed + i.
        state[PROJ_SEED] = torch.tensor(group[REFRESH_SEED] + index + 1, dtype=torch.int64)

    def advance_projection(self, group: dict[str, Any], p: torch.Tensor, state: State) -> None:
        state[PROJ_SEED].fill_(next_seed(int(state[PROJ_SEED])))

    def make_bases(self, group: dict[str, Any], p: torch.Tensor, state: State, side: str) -> list[torch.Tensor]:
        m, n = proj.matrix_shape(p.shape)
        seed = int(state[PROJ_SEED])
        return [random_projection(m, n, group[RANK], side, seed, p.device, compute_dtype(p.dtype))]

    # ------------------------------------------------------------------ the update
    def init_state(self, group, p, state, shape, dtype) -> None:
        super().init_state(group, p, state, shape, dtype)
        state[LIMITER_NORM] = torch.full((), math.inf, dtype=dtype, device=p.device)

    def gradient(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, Any]:
        g, _ = super().gradient(group, p, grad)
        return g, g  # write() rescales the raw gradient itself

    def steps(self, group, params, weights, lows, states) -> list[Step]:
        return [Step(d, None, None, low) for d, low in zip(self.directions(group, lows, states), lows)]

    def write(self, group, p, state: State, step: Step, bases, side, record) -> None:
        factor, raw, previous = norm_scaled_inputs(self, group, state, step)
        multiplier, norm = apollo_multiplier(
            record, step.extra, raw, side, group[SCALE_TYPE], float(group[SCALE]), group[SCALE_FRONT], previous
        )
        if norm is not None:
            state[LIMITER_NORM].copy_(norm)
        _write_scaled_gradient(
            p,
            record,
            multiplier,
            lr=hyperparameter(group["lr"]),
            step_factor=factor,
            weight_decay=hyperparameter(group["weight_decay"]),
            decay_after=group[EPS_MODE] == "galore_torch",
        )

    def state_bytes(self, group, shape, dtype, low_shape=None) -> int:
        if low_shape is None:
            return super().state_bytes(group, shape, dtype)
        limiter = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        seed = 8 if group.get(PROJ, "random") == "random" else 0
        return super().state_bytes(group, shape, dtype, low_shape) + limiter + seed


def _write_scaled_gradient(
    p: torch.Tensor,
    grad: torch.Tensor,
    multiplier: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    step_factor: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    decay_after: bool,
) -> None:
    """W ← W − lr·c_t·(G ⊙ μ) with decoupled decay before it (torch's AdamW) or after it
    (``decay_after``, the reference packages' order), as fira.write_update does with U = G ⊙ μ,
    but in one ``addcmul`` over G and W (μ is per channel or one number)."""
    shrink = lr * weight_decay
    in_place = p.dtype == grad.dtype and p.is_contiguous()
    w = proj.as_matrix(p) if in_place else proj.as_matrix(p).to(grad.dtype, copy=True)
    decays = isinstance(shrink, torch.Tensor) or shrink != 0.0
    if decays and not decay_after:
        _axpy_(w, w, -shrink)
    coef = lr * step_factor
    coef = coef.to(device=multiplier.device, dtype=multiplier.dtype) if isinstance(coef, torch.Tensor) else coef
    w.addcmul_(grad, multiplier * -coef)
    if decays and decay_after:
        _axpy_(w, w, -shrink)
    if not in_place:
        p.copy_(w.view_as(p))


__all__ = ["ApolloRule", "apollo_multiplier", "apollo_update", "channel_norms", "next_seed", "random_projection"]
