"""Adam in the subspace (GaLore: Zhao et al., 2024, Algorithm 1), and AdamW for the rest (Kingma &
Ba, 2015, "Adam"; decoupled decay: Loshchilov & Hutter, 2019, "Decoupled Weight Decay
Regularization").

R = project(G, P),  M ← β₁M + (1−β₁)R,  V ← β₂V + (1−β₂)R²
W ← (1 − lr·wd)·W − lr·scale·project_back(M̂/(√V̂ + ε), P)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ... import projection as proj
from .. import dense
from ..adam_math import adam_directions
from ..config import (
    AMSGRAD,
    EPS_MODE,
    EPS_MODES,
    MAXIMIZE,
    RANK,
    SCALE,
    Bad,
    check_lr,
    check_weight_decay,
    compute_dtype,
    hyperparameter,
    is_real,
)
from .base import Rule, State, Step

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
ADAM_MOMENTS = (EXP_AVG, EXP_AVG_SQ)


def adam_coefficients(group: dict[str, Any]) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(decay, alpha) of W ← decay·W + alpha·back(D): (1 − lr·wd, −lr·scale), with galore-torch's
    decay placement (after the update: (W − lr·scale·back(D))·decay) folded into alpha, −lr·scale·decay,
    for ``eps_mode="galore_torch"``.

    Args:
        group: the group (``lr``, ``weight_decay``, ``scale``, ``eps_mode``); tensor
            hyperparameters stay tensors.
    """
    lr = hyperparameter(group["lr"])
    decay = 1.0 - lr * hyperparameter(group["weight_decay"])
    alpha = -lr * hyperparameter(group[SCALE])
    if group[EPS_MODE] == "galore_torch":
        alpha = alpha * decay  # galore-torch decays the already-updated weight
    return decay, alpha


class AdamRule(Rule):
    """Adam's moments on the low-rank gradient; torch's AdamW on unprojected parameters.

    Group keys: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``eps_mode`` (``torch``: m̂/(√v̂+ε) and
    decay before the update, as ``torch.optim.AdamW``; ``galore_torch``: galore-torch 1.0's ε
    placement and decay after the update), and torch's ``amsgrad``, ``maximize``, ``foreach``,
    ``fused`` (honoured for unprojected parameters; ``amsgrad``/``maximize`` refused with ``rank``).
    """

    name = "galore"
    defaults = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 1e-2,
        "eps_mode": "torch",
        AMSGRAD: False,
        MAXIMIZE: False,
        "foreach": None,
        "fused": None,
    }
    # AdamW on unprojected parameters is elementwise; Adam in the subspace reads the low-rank
    # gradients and states only, and the default gradient() and write() act row by row.
    shard_local = frozenset({"subspace", "dense"})
    # The fused Triton step (triton_kernels.fused_galore_adam_step) computes exactly this rule.
    fusable = True

    def validate(self, group: dict[str, Any], bad: Bad) -> None:
        check_lr(group, bad)
        eps = group["eps"]
        if not is_real(eps) or eps < 0:
            raise bad("eps", "must be a number >= 0")
        betas = group["betas"]
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(is_real(b) and 0.0 <= float(b) < 1.0 for b in betas)
        ):
            raise bad("betas", "must be two numbers in [0, 1)")
        check_weight_decay(group, bad)
        if group.get(EPS_MODE, "torch") not in EPS_MODES:
            raise bad(EPS_MODE, f"must be one of {EPS_MODES}")
        self._validate_torch_flags(group, bad)

    @staticmethod
    def _validate_torch_flags(group: dict[str, Any], bad: Bad) -> None:
        """``amsgrad``/``maximize``/``foreach``/``fused`` as torch.optim.AdamW takes them, refused
        where this group cannot honour them."""
        torch_kernels = not dense.eight_bit(group) and group.get(EPS_MODE, "torch") == "torch"
        for key in (AMSGRAD, MAXIMIZE):
            value = group.get(key, False)
            if not isinstance(value, bool):
                raise bad(key, "must be True or False")
            if not value:
                continue
            if group.get(RANK) is not None:
                raise bad(
                    key,
                    f"is not supported in a projected group (rank={group[RANK]}): Adam's moments live in "
                    "a basis that changes at every refresh; keep it for groups without 'rank'",
                )
            if not torch_kernels:
                raise bad(key, "needs torch's AdamW: not with optim_bits=8 or eps_mode='galore_torch'")
        for key in ("foreach", "fused"):
            if group.get(key) is not None and not isinstance(group.get(key), bool):
                raise bad(key, "must be True, False or None")
        if not group.get("fused"):
            return
        if group.get("foreach"):
            raise bad("fused", "cannot be True together with foreach=True")
        if not torch_kernels:
            raise bad(
                "fused",
                "cannot be served with optim_bits=8 or eps_mode='galore_torch' (torch's fused AdamW keeps "
                "32-bit moments and torch's epsilon); leave fused=None",
            )

    def check_params(self, group: dict[str, Any], index: int, label: Any) -> None:
        if not group.get("fused"):
            return
        devices = dense.fused_devices()
        for pi, p in enumerate(group["params"]):
            if not (p.is_floating_point() and p.device.type in devices and not p.is_sparse):
                raise ValueError(
                    f"param_groups[{index}]: fused=True needs floating point dense parameters on a device with "
                    f"torch's fused AdamW kernel ({', '.join(sorted(devices))}); {label(pi)} is "
                    f"{p.dtype} on {p.device.type}"
                )

    def moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ADAM_MOMENTS

    def init_state(self, group, p, state, shape, dtype) -> None:
        for key in ADAM_MOMENTS:
            state[key] = torch.zeros(shape, dtype=dtype, device=p.device)

    def reset(self, group: dict[str, Any], state: State) -> None:
        for key in ADAM_MOMENTS:
            state[key] = torch.zeros_like(state[key])

    def reproject(self, group: dict[str, Any], state: State, transitions: list[torch.Tensor], side: str) -> None:
        """m ← R m (R = P_newᵀ P_old; m Rᵀ on the right side); v ← (R∘R) v, the second moment
        of R g when g's coordinates are uncorrelated (exact for m, an approximation for v)."""
        squares = [t * t for t in transitions]
        state[EXP_AVG] = proj.reproject_lowrank(state[EXP_AVG], transitions, side)
        state[EXP_AVG_SQ] = proj.reproject_lowrank(state[EXP_AVG_SQ], squares, side)

    def directions(
        self,
        group: dict[str, Any],
        lows: list[torch.Tensor],
        states: list[State],
        out: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Adam's directions M̂/(√V̂+ε) of the low-rank gradients (moments updated in ``states``),
        through :func:`galorex.optim.adam_math.adam_directions`.

        Args:
            group: the group (``betas``, ``eps``, ``eps_mode``, ``moment_policy``).
            lows: the low-rank gradients.
            states: their states, holding ``exp_avg``/``exp_avg_sq`` as float tensors.
            out: where to write the directions (may be ``lows``, which are then overwritten), or
                None for new tensors.
        """
        beta1, beta2 = group["betas"]
        return adam_directions(
            lows,
            [s[EXP_AVG] for s in states],
            [s[EXP_AVG_SQ] for s in states],
            [self.bias_step(group, s) for s in states],
            hyperparameter(beta1),
            hyperparameter(beta2),
            hyperparameter(group["eps"]),
            group[EPS_MODE],
            out=out,
        )

    def steps(self, group, params, weights, lows, states) -> list[Step]:
        # The low-rank gradients are the loop's own temporaries and nothing reads them after this
        # rule's step, so the directions overwrite them instead of taking fresh buffers.
        decay, alpha = adam_coefficients(group)
        return [Step(d, decay, alpha) for d in self.directions(group, lows, states, out=list(lows))]

    def step_dense(self, group: dict[str, Any], params: list[torch.Tensor], state_of: Any, compiled: Any) -> None:
        dense.adamw(group, params, state_of)

    def state_bytes(self, group, shape, dtype, low_shape=None) -> int:
        if low_shape is None:
            return moment_bytes(group, shape, dtype)
        return moment_bytes(group, low_shape, compute_dtype(dtype))


def moment_bytes(group: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of two Adam moments (first and second) of ``shape``: 8-bit when the group asks
    (``state8bit``; tensors under 4096 entries stay float32), else in ``dtype``.

    Args:
        group: the group's settings (``optim_bits``).
        shape: the moments' shape.
        dtype: their dtype when not 8-bit.
    """
    from .. import state8bit

    numel = math.prod(shape)
    if dense.eight_bit(group):
        return sum(state8bit.packed_nbytes(numel, kind) for kind in (state8bit.SIGNED, state8bit.UNSIGNED_SQRT))
    return 2 * numel * torch.empty((), dtype=dtype).element_size()
