"""Build an optimizer for a model by name: what ``galorex-train`` and ``galorex.bench`` use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adafactor import GaLoreAdafactor
from .apollo import ApolloAdamW
from .fira import FiraAdamW
from .galore import GaLoreAdamW
from .gradnorm_lorp import GradNormLoRPAdamW
from .groups import galore_param_groups
from .natural_galore import NaturalGaLoreAdamW

AVAILABLE = ("adamw", "galore", "natural-galore", "gradnorm-lorp", "galore-adafactor", "fira", "apollo", "apollo-mini")
# Names of optimizers still to come, so that asking for one gives a clear answer.
PLANNED: tuple[str, ...] = ()


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float | None = None,
    proj_type: str = "std",
    refresh_method: str = "svd",
    moment_policy: str = "keep",
    target_modules: str | Sequence[str] = ("attn", "mlp"),
    natural_history: int = 8,
    natural_damping: float = 1e-3,
    optim_bits: int = 32,
    basis_bits: int = 32,
    basis_rotation: bool = False,
    layerwise: bool = False,
    accumulation_steps: int = 1,
    per_param_grad_clip: float | None = None,
    **extra: Any,
) -> torch.optim.Optimizer:
    """``adamw``: torch.optim.AdamW on every parameter. ``galore``: GaLoreAdamW with the attention
    and MLP weights projected (``galore_param_groups``) and the rest on AdamW. ``natural-galore``:
    the same groups on NaturalGaLoreAdamW; ``gradnorm-lorp`` on GradNormLoRPAdamW. ``optim_bits=8``
    keeps Adam's moments in 8 bits (for
    ``adamw`` too, through a galorex optimizer with no rank group). ``galore-adafactor``: the same
    groups on GaLoreAdafactor with the external ``lr`` (``relative_step=False``,
    ``scale_parameter=False``, as the GaLore paper's scripts run it), ``beta1`` = betas[0] (0 means
    no first moment) and ``weight_decay``; β₂ and ``eps`` are Adam's and do not apply (Adafactor's
    second moment follows its own 1 − t^−0.8 schedule). ``layerwise``, ``accumulation_steps`` and
    ``per_param_grad_clip`` are the layer-wise options every galorex optimizer takes (for ``adamw``
    too, the same way).

    ``fira``: FiraAdamW on the same groups, ``scale`` as its ``alpha``. ``apollo``: ApolloAdamW
    (random projection, channel-wise, ``scale`` as apollo-torch's). ``apollo-mini``:
    ``ApolloAdamW.mini`` (rank 1, tensor-wise, scale 128: ``rank`` does not apply and ``scale``
    must stay None). ``scale=None``: each optimizer's own default (:data:`DEFAULT_SCALE`)."""
    if name == "apollo-mini" and scale is not None:
        raise ValueError("apollo-mini sets its scale itself (128, a √128 multiplier); leave scale unset")
    if scale is None:
        scale = DEFAULT_SCALE.get(name, 0.25)
    if name == "galore-adafactor" and optim_bits != 32:
        raise ValueError(
            "optim_bits=8 is not available for galore-adafactor (its factored second "
            "moment is already a + b numbers per matrix); use optim_bits=32"
        )
    lw = dict(layerwise=layerwise, accumulation_steps=accumulation_steps, per_param_grad_clip=per_param_grad_clip)
    if name == "adamw" and (optim_bits == 8 or layerwise):
        # A galorex optimizer without a rank group is AdamW; it is the one with 8-bit moments
        # and with layer-wise updates.
        return GaLoreAdamW(
            model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=optim_bits, **lw
        )
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name in ("galore", "natural-galore", "gradnorm-lorp", "galore-adafactor", "fira", "apollo", "apollo-mini"):
        groups = galore_param_groups(
            model,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            target_modules=target_modules,
            refresh_method=refresh_method,
            moment_policy=moment_policy,
            basis_bits=basis_bits,
            basis_rotation=basis_rotation,
            **extra,
        )
        if name == "galore-adafactor":
            return GaLoreAdafactor(
                groups,
                lr=lr,
                beta1=betas[0] if betas[0] > 0 else None,
                weight_decay=weight_decay,
                relative_step=False,
                scale_parameter=False,
                **lw,
            )
        if name == "natural-galore":
            return NaturalGaLoreAdamW(
                groups,
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                natural_history=natural_history,
                natural_damping=natural_damping,
                optim_bits=optim_bits,
                **lw,
            )
        if name in ("fira", "apollo", "apollo-mini"):
            return _build_norm_scaled(name, groups, lr, betas, eps, weight_decay, optim_bits, lw)
        cls = GradNormLoRPAdamW if name == "gradnorm-lorp" else GaLoreAdamW
        return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=optim_bits, **lw)
    if name in PLANNED:
        raise ValueError(
            f"optimizer {name!r} is not available in this version of galorex yet; available: {', '.join(AVAILABLE)}"
        )
    raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(AVAILABLE)}")


# Defaults of the projected-back scale per optimizer: GaLore's and Fira's 0.25 (the papers'
# scripts), APOLLO's 1 (apollo-torch's Llama scripts; the update is multiplied by √scale).
DEFAULT_SCALE = {"galore": 0.25, "natural-galore": 0.25, "gradnorm-lorp": 0.25, "galore-adafactor": 0.25}
DEFAULT_SCALE.update({"fira": 0.25, "apollo": 1.0})


def _build_norm_scaled(name, groups, lr, betas, eps, weight_decay, optim_bits, lw) -> torch.optim.Optimizer:
    """FiraAdamW / ApolloAdamW / APOLLO-Mini on galore_param_groups' groups (whose ``scale`` key
    FiraAdamW takes as its ``alpha``: the same role, it multiplies project_back)."""
    common = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=optim_bits, **lw)
    if name == "fira":
        return FiraAdamW(groups, **common)
    if name == "apollo":
        return ApolloAdamW(groups, **common)
    return ApolloAdamW.mini(groups, **common)


# The learning rate galorex-train uses when --lr is not given, per optimizer. Meant to hold each
# optimizer's best on llama-tiny; the sweep that would choose them has not been run to the end
# (docs/benchmarks.md, "Quality on llama-tiny"), so every optimizer keeps the former shared 3e-3.
DEFAULT_LR = {name: 3e-3 for name in AVAILABLE}


def default_lr(name: str) -> float:
    """galorex-train's learning rate for ``name`` when none is given (:data:`DEFAULT_LR`)."""
    return DEFAULT_LR.get(name, 3e-3)
