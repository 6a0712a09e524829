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
from collections.abc import Iterable
from typing import Any

import torch

from .. import projection as proj
from .base import (
    MOMENT_POLICY,
    PROJ_STEP,
    RANK,
    SCALE,
    STEP,
    CompileOption,
    LowRankOptimizer,
    _is_real,
    compute_dtype,
    load_bases,
)

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


class RelativeStepGroup(dict):
    """A parameter group of GaLoreAdafactor with ``relative_step=True``: its ``lr`` is None (the
    step size is computed from the step count), and reading ``group["lr"]`` raises an error that
    says so. An LR scheduler reads exactly that, and would otherwise crash on ``None * float``.
    The optimizer itself reads the key with ``dict.get``."""

    def __getitem__(self, key: str) -> Any:
        if key == "lr" and dict.get(self, "lr") is None:
            raise TypeError(
                "GaLoreAdafactor with relative_step=True (lr=None) computes its own step size, so this group "
                "has no 'lr' for an LR scheduler (or anything else) to read or scale; to schedule the "
                "learning rate pass lr=<number> with relative_step=False (and warmup_init=False)"
            )
        return dict.__getitem__(self, key)


class GaLoreAdafactor(LowRankOptimizer):
    """Adafactor with GaLore's low-rank projection; a drop-in for transformers' ``Adafactor`` and
    galore-torch's ``GaLoreAdafactor`` (same arguments, group keys and defaults).

    Arguments (per group, as in transformers): ``lr`` (None: relative step sizes; required with
    ``relative_step=False``), ``eps`` = (ε₁ added to R², ε₂ floor of RMS(W)) = (1e-30, 1e-3),
    ``clip_threshold`` d (1.0), ``decay_rate`` (−0.8), ``beta1`` (None: no first moment),
    ``weight_decay`` (0.0, decoupled, scaled by α_t), ``scale_parameter`` (True),
    ``relative_step`` (True), ``warmup_init`` (False). Projection keys as in ``GaLoreAdamW``:
    ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``refresh_method``,
    ``moment_policy`` (``keep`` as galore-torch; ``reset`` zeroes the statistics and restarts β̂_t;
    ``reproject`` carries m by R = P_newᵀP_old and the factored V̂ by R∘R, then re-factors it),
    ``oversample``, ``power_iters``, ``refresh_seed``, ``basis_bits``, ``basis_rotation``.

    Statistics are float32 (float64 for float64 weights) whatever the weight's dtype, as
    galore-torch keeps them, and stay so through ``load_state_dict``. ``compile=True`` compiles
    the per-group update (see ``LowRankOptimizer``); ``lr`` and ``weight_decay`` may be 0-dim
    tensors.

    Differences from galore-torch 1.0 (the maths is the same with ``moment_policy="keep"``; tested
    to 1e-5 over 50 float32 steps with refreshes, every ``proj_type``): the schedule, RMS and
    clipping are tensor arithmetic rather than Python floats (rounding only); the state holds a
    tensor step counter instead of Python ``step``/``RMS`` entries and a pickled projector (so it
    loads with ``weights_only=True``); bases of bf16/float64 weights are float32/float64 rather than
    the weight's dtype/float32; and ``reverse_std`` projects back on the side it projected, as for
    ``GaLoreAdamW``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        refresh_method: str = "svd",
        moment_policy: str = "keep",
        oversample: int = 16,
        power_iters: int = 2,
        refresh_seed: int = 0,
        basis_bits: int = 32,
        basis_rotation: bool = False,
        compile: CompileOption = False,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        per_param_grad_clip: float | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": tuple(eps) if isinstance(eps, (list, tuple)) else eps,
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": proj_type,
            "refresh_method": refresh_method,
            "moment_policy": moment_policy,
            "oversample": oversample,
            "power_iters": power_iters,
            "refresh_seed": refresh_seed,
            "basis_bits": basis_bits,
            "basis_rotation": basis_rotation,
        }
        super().__init__(
            params,
            defaults,
            compile=compile,
            layerwise=layerwise,
            accumulation_steps=accumulation_steps,
            per_param_grad_clip=per_param_grad_clip,
        )

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._wrap_relative_step_groups()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # load_state_dict comes through here with new group dicts
        self._wrap_relative_step_groups()

    def _wrap_relative_step_groups(self) -> None:
        for i, group in enumerate(self.param_groups):
            if group.get(RELATIVE_STEP) and not isinstance(group, RelativeStepGroup):
                self.param_groups[i] = RelativeStepGroup(group)

    def __repr__(self) -> str:
        lines = [self.__class__.__name__ + " ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.extend(f"    {key}: {value}" for key, value in sorted(group.items()) if key != "params")
        return "\n".join(lines) + "\n)"

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        def bad(key: str, what: str) -> ValueError:
            return ValueError(f"param_groups[{index}]: {key!r} {what}, got {group.get(key)!r}")

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
        elif lr is None or not _is_real(lr) or not math.isfinite(float(lr)) or float(lr) < 0:
            raise bad("lr", "must be a finite number >= 0 with relative_step=False")
        if group[WARMUP_INIT] and not group[RELATIVE_STEP]:
            raise bad(WARMUP_INIT, "requires relative_step=True")
        eps = group["eps"]
        if (
            not isinstance(eps, (tuple, list))
            or len(eps) != 2
            or not all(_is_real(e) and math.isfinite(float(e)) and float(e) >= 0 for e in eps)
        ):
            raise bad("eps", "must be two finite numbers >= 0 (eps1 added to grad², eps2 floor of RMS(W))")
        clip = group[CLIP_THRESHOLD]
        if not _is_real(clip) or not math.isfinite(float(clip)) or float(clip) <= 0:
            raise bad(CLIP_THRESHOLD, "must be a finite number > 0")
        rate = group[DECAY_RATE]
        if not _is_real(rate) or not math.isfinite(float(rate)) or float(rate) > 0:
            raise bad(DECAY_RATE, "must be a finite number <= 0 (beta2_t = 1 - t**decay_rate)")
        beta1 = group[BETA1]
        if beta1 is not None and (not _is_real(beta1) or not 0.0 <= float(beta1) < 1.0):
            raise bad(BETA1, "must be None or a number in [0, 1)")
        wd = group["weight_decay"]
        if not _is_real(wd) or not math.isfinite(float(wd)) or float(wd) < 0:
            raise bad("weight_decay", "must be a finite number >= 0")
        for key in ("optim_bits", "eps_mode", "betas"):
            if key in group:
                raise bad(key, "is an Adam key that GaLoreAdafactor does not take")
        for key in ("amsgrad", "maximize", "fused", "foreach"):
            if group.get(key):
                raise bad(key, "is not supported by GaLoreAdafactor (minimisation only, one implementation)")
        # The projection keys are checked by the shared validation; the Adam keys it also checks
        # do not exist here, so it sees neutral values for them (the group itself is untouched).
        super()._validate_group({**group, "lr": 0.0, "eps": 0.0, "betas": (0.0, 0.0), "weight_decay": 0.0}, index)

    # ------------------------------------------------------------------ state
    def _init_lowrank_state(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        state: dict[str, Any],
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        self._init_statistics(group, state, tuple(shape), dtype, p.device)

    @staticmethod
    def _init_statistics(
        group: dict[str, Any],
        state: dict[str, Any],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if len(shape) >= 2:
            row, col = _factored_shapes(shape)
            state[EXP_AVG_SQ_ROW] = torch.zeros(row, dtype=dtype, device=device)
            state[EXP_AVG_SQ_COL] = torch.zeros(col, dtype=dtype, device=device)
        else:
            state[EXP_AVG_SQ] = torch.zeros(shape, dtype=dtype, device=device)
        if group[BETA1] is not None:
            state[EXP_AVG] = torch.zeros(shape, dtype=dtype, device=device)

    def _reset_state(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> None:
        for key in (EXP_AVG, EXP_AVG_SQ_ROW, EXP_AVG_SQ_COL):
            if key in state:
                state[key].zero_()

    def _reproject_state(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        state: dict[str, Any],
        transitions: list[torch.Tensor],
        side: str,
    ) -> None:
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
    def _moment_step(self, group: dict[str, Any], state: dict[str, Any]) -> torch.Tensor:
        # A reset refresh zeroes the statistics, so β̂_t restarts with them (β̂₁ = 0 overwrites).
        if group[MOMENT_POLICY] == "reset" and PROJ_STEP in state:
            return state[STEP] - state[PROJ_STEP]
        return state[STEP]

    def _direction(
        self, group: dict[str, Any], grad: torch.Tensor, weight: torch.Tensor, state: dict[str, Any]
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

    def _lowrank_update(self, group: dict[str, Any], items: list[dict[str, Any]]) -> None:
        wd = group["weight_decay"]
        scale = group[SCALE]
        for it in items:
            p, side = it["param"], it["side"]
            state = it["state"] if "state" in it else self.state[p]
            bases = load_bases(state, side, p, group[RANK])
            g = self._gradient_matrix(group, p, it.get("grad"))
            low = proj.project(g, bases, side)
            state[STEP] += 1
            # In place on the weight when it is already in the compute dtype; otherwise on a
            # compute-dtype copy, rounded once at the end (as galore-torch does for bf16).
            fast = p.dtype == low.dtype and p.is_contiguous()
            w = proj.as_matrix(p) if fast else proj.as_matrix(p).to(low.dtype, copy=True)
            update, alpha = self._direction(group, low, w, state)
            if isinstance(scale, torch.Tensor):
                update, back_alpha = update * scale, -1.0
            else:
                back_alpha = -float(scale)
            if not (isinstance(wd, (int, float)) and wd == 0):
                w.mul_(1.0 - wd * alpha)
            proj.add_projected_back_(w, update, bases, side, alpha=back_alpha)
            if not fast:
                p.copy_(w.view_as(p))

    def _dense_adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Unprojected parameters: plain Adafactor (factored for ≥ 2-D, as transformers does).

        The state is created here, on the host, and gradients and states are passed to the
        (possibly compiled) update as plain inputs, so that its graph is the same at every step."""
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state[STEP] = torch.zeros((), dtype=torch.float32)
                self._init_statistics(group, state, tuple(p.shape), compute_dtype(p.dtype), p.device)
            states.append(state)
        self._compiled("_dense_update")(group, params, [p.grad for p in params], states)

    def _dense_update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
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

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``LowRankOptimizer.load_state_dict``, but every statistic keeps the dtype it was saved
        with (float32 for bf16 weights, unprojected ones included) and step counters stay on the CPU."""
        super().load_state_dict(state_dict)
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        for saved, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                if pid not in saved_state:
                    continue
                for key, value in saved_state[pid].items():
                    if isinstance(value, torch.Tensor):
                        device = torch.device("cpu") if key in self._cpu_state_keys else p.device
                        self.state[p][key] = value.detach().to(device=device, dtype=value.dtype, copy=True)


__all__ = ["GaLoreAdafactor", "adafactor_direction", "adafactor_step_size"]
