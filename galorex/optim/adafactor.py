"""GaLoreAdafactor: Adafactor (Shazeer & Stern, 2018) in GaLore's low-rank subspace — the step loop
with the Adafactor rule (``rules.adafactor``, where the schedule and the factored moments are
written out)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .config import CompileOption
from .lowrank import LowRankOptimizer
from .rules.adafactor import (
    BETA1,
    CLIP_THRESHOLD,
    DECAY_RATE,
    EXP_AVG,
    EXP_AVG_SQ,
    EXP_AVG_SQ_COL,
    EXP_AVG_SQ_ROW,
    RELATIVE_STEP,
    SCALE_PARAMETER,
    WARMUP_INIT,
    AdafactorRule,
    adafactor_direction,
    adafactor_step_size,
)


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
    ``oversample``, ``power_iters``, ``refresh_seed``, ``refresh_schedule``, ``optim_bits``,
    ``basis_bits``, ``basis_rotation``, ``weight_rounding``, ``rounding_seed`` (INT8 and bf16
    weights).

    ``optim_bits=8`` stores the first moment ``exp_avg`` (and a vector's unfactored ``exp_avg_sq``)
    block-wise in 8 bits through the state codec, projected and unprojected parameters alike, when
    it has 4096 entries or more; the factored ``exp_avg_sq_row``/``exp_avg_sq_col`` stay float32
    (``AdafactorRule.moment_keys`` says why).

    Statistics are float32 (float64 for float64 weights) whatever the weight's dtype, as
    galore-torch keeps them (with ``optim_bits=8``, a moment under 4096 entries is float32, as for
    every rule), and stay so through ``load_state_dict``. ``compile=True`` compiles
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

    rule = AdafactorRule()

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
        refresh_schedule: str = "together",
        optim_bits: int = 32,
        basis_bits: int = 32,
        basis_rotation: bool = False,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
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
            "refresh_schedule": refresh_schedule,
            "optim_bits": optim_bits,
            "basis_bits": basis_bits,
            "basis_rotation": basis_rotation,
            "weight_rounding": weight_rounding,
            "rounding_seed": rounding_seed,
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


__all__ = [
    "BETA1",
    "CLIP_THRESHOLD",
    "DECAY_RATE",
    "EXP_AVG",
    "EXP_AVG_SQ",
    "EXP_AVG_SQ_COL",
    "EXP_AVG_SQ_ROW",
    "GaLoreAdafactor",
    "RELATIVE_STEP",
    "RelativeStepGroup",
    "SCALE_PARAMETER",
    "WARMUP_INIT",
    "adafactor_direction",
    "adafactor_step_size",
]
