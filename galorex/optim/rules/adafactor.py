"""GaLoreAdafactor: Adafactor (Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with
Sublinear Memory Cost") run inside GaLore's low-rank gradient subspace (Zhao et al., 2024, "GaLore:
Memory-Efficient LLM Training by Gradient Low-Rank Projection").

For the (low-rank) gradient R_t (a×b) at step t, with the schedule of transformers' and
galore-torch's Adafactor:

    ρ_t = min(10⁻², 1/√t)  (``warmup_init``: min(10⁻⁶·t, 1/√t); ``relative_step=False``: ρ_t = lr)
    α_t = max(ε₂, RMS(W)) · ρ_t  (``scale_parameter``; otherwise α_t = ρ_t),   β̂_t = 1 − t^decay_rate
    r ← β̂_t r + (1−β̂_t) rowmean(R² + ε₁),   c ← β̂_t c + (1−β̂_t) colmean(R² + ε₁)
    U = α_t · clip_d( R / √(r cᵀ / mean(r)) ),   clip_d(X) = X / max(1, RMS(X)/d)
    (beta1 given)  m ← β₁ m + (1−β₁) U,  U = m
    W ← (1 − wd·α_t)·W − scale·project_back(U, P)

The second moment is factored (a + b numbers instead of a·b) for every update of ≥ 2 dimensions —
the low-rank gradients and the unprojected matrices alike — and kept whole (v ← β̂_t v +
(1−β̂_t)(R² + ε₁), U = R/√v) for vectors. Everything is tensor arithmetic on the step counter (no
host synchronisation), so the update compiles as one graph (``compile=True``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ... import projection as proj
from .. import codec, state8bit
from ..config import MOMENT_POLICY, PROJ_STEP, SCALE, STEP, Bad, compute_dtype, is_real
from ..dense import eight_bit
from .base import Rule, State, Step

# Group keys, as transformers and galore-torch name them.
CLIP_THRESHOLD = "clip_threshold"
DECAY_RATE = "decay_rate"
BETA1 = "beta1"
SCALE_PARAMETER = "scale_parameter"
RELATIVE_STEP = "relative_step"
WARMUP_INIT = "warmup_init"

# State keys (as galore-torch names them).
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
EXP_AVG_SQ_ROW = "exp_avg_sq_row"
EXP_AVG_SQ_COL = "exp_avg_sq_col"


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / math.sqrt(t.numel())


def adafactor_step_size(
    step: torch.Tensor,
    weight: torch.Tensor,
    *,
    lr: float | torch.Tensor | None,
    eps2: float,
    relative_step: bool,
    warmup_init: bool,
    scale_parameter: bool,
) -> torch.Tensor:
    """α_t = max(ε₂, RMS(W))·ρ_t (or ρ_t without ``scale_parameter``), as a 0-dim tensor in
    ``weight``'s dtype; ρ_t = min(10⁻², 1/√t) (``warmup_init``: min(10⁻⁶·t, 1/√t)) or ``lr``."""
    t = step.to(device=weight.device, dtype=weight.dtype)
    if relative_step:
        cap = 1e-6 * t if warmup_init else torch.full_like(t, 1e-2)
        rho = torch.minimum(cap, t.rsqrt())
    else:
        rho = torch.as_tensor(lr, dtype=weight.dtype, device=weight.device)
    if scale_parameter:
        return _rms(weight).clamp(min=eps2) * rho
    return rho


def adafactor_direction(
    grad: torch.Tensor,
    state: dict[str, Any],
    moment_step: torch.Tensor,
    step_size: torch.Tensor,
    *,
    eps1: float,
    clip_threshold: float,
    decay_rate: float,
    beta1: float | torch.Tensor | None,
) -> torch.Tensor:
    """Update Adafactor's statistics in ``state`` (in place) with ``grad`` and return the step
    U = α·clip_d(R/√V̂) (or its first-moment average when ``beta1`` is given), V̂ = r cᵀ/mean(r)
    for ≥ 2-D ``grad`` (factored), the full second moment for vectors.

    ``moment_step`` is t in β̂_t = 1 − t^decay_rate (the steps the statistics have seen)."""
    t = moment_step.to(device=grad.device, dtype=grad.dtype)
    beta2t = 1.0 - t.pow(decay_rate)
    sq = grad * grad + eps1
    if grad.dim() >= 2:
        row, col = state[EXP_AVG_SQ_ROW], state[EXP_AVG_SQ_COL]
        row.mul_(beta2t).add_(sq.mean(dim=-1) * (1.0 - beta2t))
        col.mul_(beta2t).add_(sq.mean(dim=-2) * (1.0 - beta2t))
        # V̂ = r cᵀ / mean(r): the rank-1 fit of the second moment (Shazeer & Stern, eq. 4-5).
        row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
        update = row_factor * col.unsqueeze(-2).rsqrt() * grad
    else:
        v = state[EXP_AVG_SQ]
        v.mul_(beta2t).add_(sq * (1.0 - beta2t))
        update = v.rsqrt() * grad
    update = update / (_rms(update) / clip_threshold).clamp(min=1.0)
    update = update * step_size
    if beta1 is not None:
        m = state[EXP_AVG]
        m.mul_(beta1).add_(update * (1.0 - beta1))
        return m
    return update


def _factored_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return shape[:-1], shape[:-2] + shape[-1:]


class AdafactorRule(Rule):
    """Adafactor's factored second moment (and optional first moment) on the low-rank gradient,
    and plain Adafactor on unprojected parameters. Statistics keep their dtype through a
    checkpoint (float32 for bf16 weights, unprojected ones included)."""

    name = "galore-adafactor"
    defaults = {
        "lr": None,
        "eps": (1e-30, 1e-3),
        CLIP_THRESHOLD: 1.0,
        DECAY_RATE: -0.8,
        BETA1: None,
        "weight_decay": 0.0,
        SCALE_PARAMETER: True,
        RELATIVE_STEP: True,
        WARMUP_INIT: False,
    }
    keeps_dense_state_dtype = True

    def validate(self, group: dict[str, Any], bad: Bad) -> None:
        for key in (SCALE_PARAMETER, RELATIVE_STEP, WARMUP_INIT):
            if not isinstance(group[key], bool):
                raise bad(key, "must be True or False")
        lr = group.get("lr")
        if group[RELATIVE_STEP]:
            if lr is not None:
                raise bad(
                    "lr",
                    "must be None with relative_step=True (the step size is then relative); "
                    "pass relative_step=False to use a manual lr",
                )
        elif lr is None or not is_real(lr) or not math.isfinite(float(lr)) or float(lr) < 0:
            raise bad("lr", "must be a finite number >= 0 with relative_step=False")
        if group[WARMUP_INIT] and not group[RELATIVE_STEP]:
            raise bad(WARMUP_INIT, "requires relative_step=True")
        eps = group["eps"]
        if (
            not isinstance(eps, (tuple, list))
            or len(eps) != 2
            or not all(is_real(e) and math.isfinite(float(e)) and float(e) >= 0 for e in eps)
        ):
            raise bad("eps", "must be two finite numbers >= 0 (eps1 added to grad², eps2 floor of RMS(W))")
        clip = group[CLIP_THRESHOLD]
        if not is_real(clip) or not math.isfinite(float(clip)) or float(clip) <= 0:
            raise bad(CLIP_THRESHOLD, "must be a finite number > 0")
        rate = group[DECAY_RATE]
        if not is_real(rate) or not math.isfinite(float(rate)) or float(rate) > 0:
            raise bad(DECAY_RATE, "must be a finite number <= 0 (beta2_t = 1 - t**decay_rate)")
        beta1 = group[BETA1]
        if beta1 is not None and (not is_real(beta1) or not 0.0 <= float(beta1) < 1.0):
            raise bad(BETA1, "must be None or a number in [0, 1)")
        wd = group["weight_decay"]
        if not is_real(wd) or not math.isfinite(float(wd)) or float(wd) < 0:
            raise bad("weight_decay", "must be a finite number >= 0")
        for key in ("eps_mode", "betas"):
            if key in group:
                raise bad(key, "is an Adam key that GaLoreAdafactor does not take")
        for key in ("amsgrad", "maximize", "fused", "foreach"):
            if group.get(key):
                raise bad(key, "is not supported by GaLoreAdafactor (minimisation only, one implementation)")

    # ------------------------------------------------------------------ state
    def moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The entries stored in 8 bits with ``optim_bits=8`` (when they hold 4096 entries or more,
        as for every rule): the first moment ``exp_avg`` (signed code, as Adam's m) and a vector's
        unfactored ``exp_avg_sq`` (√v in the unsigned code, as Adam's v). The factored statistics
        ``exp_avg_sq_row``/``exp_avg_sq_col`` stay in the compute dtype: they are a + b numbers
        for an a×b matrix (2.5 KiB in float32 for a 128×512 low-rank gradient, whose 8-bit first
        moment takes 64 KiB), V̂ = r cᵀ/mean(r) would multiply their coding errors, and their EMA
        moves by 1 − β̂_t = t^decay_rate a step (0.4 % at t = 1000), under half a gap of the
        unsigned code for most values, where nearest rounding would freeze them."""
        return (EXP_AVG, EXP_AVG_SQ)

    def init_state(self, group, p, state, shape, dtype) -> None:
        init_statistics(group, state, tuple(shape), dtype, p.device)

    def reset(self, group: dict[str, Any], state: State) -> None:
        for key in (EXP_AVG, EXP_AVG_SQ_ROW, EXP_AVG_SQ_COL):
            if key in state:
                state[key].zero_()

    def reproject(self, group: dict[str, Any], state: State, transitions: list[torch.Tensor], side: str) -> None:
        """m ← R m; the factored second moment is expanded to V̂ = r cᵀ/mean(r), carried by R∘R
        (exact when the coordinates are uncorrelated) and factored again by its row and column means."""
        if EXP_AVG in state:
            state[EXP_AVG] = proj.reproject_lowrank(state[EXP_AVG], transitions, side)
        row, col = state[EXP_AVG_SQ_ROW], state[EXP_AVG_SQ_COL]
        # All-zero statistics (a reset, or no step yet) stay zero rather than 0/0.
        full = torch.outer(row, col) / row.mean().clamp(min=torch.finfo(row.dtype).tiny)
        full = proj.reproject_lowrank(full, [t * t for t in transitions], side)
        state[EXP_AVG_SQ_ROW] = full.mean(dim=-1)
        state[EXP_AVG_SQ_COL] = full.mean(dim=-2)

    # ------------------------------------------------------------------ the updates
    def _moment_step(self, group: dict[str, Any], state: State) -> torch.Tensor:
        # A reset refresh zeroes the statistics, so β̂_t restarts with them (β̂₁ = 0 overwrites).
        if group[MOMENT_POLICY] == "reset" and PROJ_STEP in state:
            return state[STEP] - state[PROJ_STEP]
        return state[STEP]

    def _direction(
        self, group: dict[str, Any], grad: torch.Tensor, weight: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eps1, eps2 = group["eps"]
        alpha = adafactor_step_size(
            state[STEP],
            weight,
            lr=group.get("lr"),
            eps2=eps2,
            relative_step=group[RELATIVE_STEP],
            warmup_init=group[WARMUP_INIT],
            scale_parameter=group[SCALE_PARAMETER],
        )
        update = adafactor_direction(
            grad,
            state,
            self._moment_step(group, state),
            alpha,
            eps1=eps1,
            clip_threshold=group[CLIP_THRESHOLD],
            decay_rate=group[DECAY_RATE],
            beta1=group[BETA1],
        )
        return update, alpha

    def steps(self, group, params, weights, lows, states) -> list[Step]:
        wd, scale = group["weight_decay"], group[SCALE]
        out = []
        for w, low, state in zip(weights, lows, states):
            update, alpha = self._direction(group, low, w.to(low.dtype), state)
            if isinstance(scale, torch.Tensor):
                update, back_alpha = update * scale, -1.0
            else:
                back_alpha = -float(scale)
            decay = None if isinstance(wd, (int, float)) and wd == 0 else 1.0 - wd * alpha
            out.append(Step(update, decay, back_alpha))
        return out

    def write(self, group, p, state, step: Step, bases, side, record) -> None:
        # In place on the weight when it is already in the compute dtype; otherwise on a
        # compute-dtype copy, rounded once at the end (as galore-torch does for bf16).
        update, decay, back_alpha = step.direction, step.decay, step.alpha
        fast = p.dtype == update.dtype and p.is_contiguous()
        w = proj.as_matrix(p) if fast else proj.as_matrix(p).to(update.dtype, copy=True)
        if decay is not None:
            w.mul_(decay)
        proj.add_projected_back_(w, update, bases, side, alpha=back_alpha)
        if not fast:
            p.copy_(w.view_as(p))

    def step_dense(self, group: dict[str, Any], params: list[torch.Tensor], state_of: Any, compiled: Any) -> None:
        """Unprojected parameters: plain Adafactor (factored for ≥ 2-D, as transformers does). The
        state is created here, on the host, and gradients and states are passed to the (possibly
        compiled) update as plain inputs, so that its graph is the same at every step.

        With ``optim_bits=8`` the state goes through the codec as the loop's does for projected
        parameters (:meth:`moment_keys`): one parameter at a time, its moments decoded into a float
        view, updated, and coded again, so the float moments of only one parameter exist at once."""
        update = compiled("adafactor_dense", self.dense_update)
        keys, eight = self.moment_keys(group), eight_bit(group)

        def view_of(p: torch.Tensor) -> State:
            state = state_of[p]
            if state:
                return codec.load_view(state, keys, compute_dtype(p.dtype))
            view = {STEP: torch.zeros((), dtype=torch.float32)}
            init_statistics(group, view, tuple(p.shape), compute_dtype(p.dtype), p.device)
            return view

        if eight:
            for p in params:
                view = view_of(p)
                update(group, [p], [p.grad], [view])
                codec.store_view(state_of[p], view, keys, True)
            return
        # 32 bits: the views hold the state's own tensors (updated in place), unless a moment was
        # coded before the group's optim_bits changed.
        views = [view_of(p) for p in params]
        update(group, params, [p.grad for p in params], views)
        for p, view in zip(params, views):
            codec.store_view(state_of[p], view, keys, False)

    def dense_update(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], states: list[State]
    ) -> None:
        wd = group["weight_decay"]
        for p, grad, state in zip(params, grads, states):
            cdtype = compute_dtype(p.dtype)
            state[STEP] += 1
            w = p if p.dtype == cdtype else p.to(cdtype)
            update, alpha = self._direction(group, grad.to(cdtype), w, state)
            if w is p:
                if not (isinstance(wd, (int, float)) and wd == 0):
                    p.mul_(1.0 - wd * alpha)
                p.sub_(update)
            else:
                if not (isinstance(wd, (int, float)) and wd == 0):
                    w = w * (1.0 - wd * alpha)
                p.copy_(w - update)

    def state_bytes(self, group, shape, dtype, low_shape=None) -> int:
        """The factored r and c (a + b numbers) or a vector's v, and m when ``beta1`` is set, in the
        compute dtype; with ``optim_bits=8``, m and v as the codec stores them
        (``state8bit.packed_nbytes``: 8-bit from 4096 entries, float32 below), r and c as above."""
        stat_shape = tuple(low_shape if low_shape is not None else shape)
        numel = math.prod(stat_shape)
        size = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        eight = eight_bit(group)

        def moment(key: str) -> int:
            return state8bit.packed_nbytes(numel, codec.moment_kind(key)) if eight else numel * size

        if len(stat_shape) >= 2:
            total = (math.prod(stat_shape[:-1]) + math.prod(stat_shape[:-2]) * stat_shape[-1]) * size
        else:
            total = moment(EXP_AVG_SQ)
        if group.get(BETA1) is not None:
            total += moment(EXP_AVG)
        return total


def init_statistics(
    group: dict[str, Any], state: State, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    if len(shape) >= 2:
        row, col = _factored_shapes(shape)
        state[EXP_AVG_SQ_ROW] = torch.zeros(row, dtype=dtype, device=device)
        state[EXP_AVG_SQ_COL] = torch.zeros(col, dtype=dtype, device=device)
    else:
        state[EXP_AVG_SQ] = torch.zeros(shape, dtype=dtype, device=device)
    if group[BETA1] is not None:
        state[EXP_AVG] = torch.zeros(shape, dtype=dtype, device=device)


__all__ = ["AdafactorRule", "adafactor_direction", "adafactor_step_size"]
