"""Build an optimizer for a model by name: what ``galorex-train`` and ``galorex.bench`` use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import registry
from .galore import GaLoreAdamW
from .groups import galore_param_groups

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
    too, the same way)."""
    if name == "apollo-mini" and scale is not None:
        raise ValueError("apollo-mini sets its scale itself (128, a √128 multiplier); leave scale unset")
    if scale is None:
        scale = DEFAULT_SCALE.get(name, 0.25)
    lw = dict(layerwise=layerwise, accumulation_steps=accumulation_steps, per_param_grad_clip=per_param_grad_clip)
    adam = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        if optim_bits == 8 or layerwise:
            # A galorex optimizer without a rank group is AdamW; it is the one with 8-bit moments
            # and with layer-wise updates.
            return GaLoreAdamW(model.parameters(), **adam, optim_bits=optim_bits, **lw)
        return torch.optim.AdamW(model.parameters(), **adam)
    if name not in BUILDERS:
        if name in PLANNED:
            raise ValueError(
                f"optimizer {name!r} is not available in this version of galorex yet; available: {', '.join(AVAILABLE)}"
            )
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(AVAILABLE)}")
    build_kwargs = BUILDERS[name]
    options = build_kwargs(
        adam=adam, optim_bits=optim_bits, natural_history=natural_history, natural_damping=natural_damping
    )
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
    if name == "apollo-mini":
        return registry.optimizer_class("apollo").mini(groups, **options, **lw)
    return registry.optimizer_class(name)(groups, **options, **lw)


def _adam(*, adam, optim_bits, **_):
    return {**adam, "optim_bits": optim_bits}


def _natural(*, adam, optim_bits, natural_history, natural_damping, **_):
    return {**adam, "optim_bits": optim_bits, "natural_history": natural_history, "natural_damping": natural_damping}


def _adafactor(*, adam, optim_bits, **_):
    if optim_bits != 32:
        raise ValueError(
            "optim_bits=8 is not available for galore-adafactor (its factored second "
            "moment is already a + b numbers per matrix); use optim_bits=32"
        )
    beta1 = adam["betas"][0]
    return {
        "lr": adam["lr"],
        "beta1": beta1 if beta1 > 0 else None,
        "weight_decay": adam["weight_decay"],
        "relative_step": False,
        "scale_parameter": False,
    }


# How each registered name takes the command's settings (galorex.optim.registry holds the classes).
BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "galore": _adam,
    "natural-galore": _natural,
    "gradnorm-lorp": _adam,
    "galore-adafactor": _adafactor,
    "fira": _adam,  # galore_param_groups' "scale" is fira's alpha (FiraAdamW maps it)
    "apollo": _adam,
    "apollo-mini": _adam,  # ApolloAdamW.mini: rank 1, tensor-wise, random, scale 128
}

# Defaults of the projected-back scale per optimizer: GaLore's and Fira's 0.25 (the papers'
# scripts), APOLLO's 1 (apollo-torch's Llama scripts; the update is multiplied by √scale).
DEFAULT_SCALE = {"galore": 0.25, "natural-galore": 0.25, "gradnorm-lorp": 0.25, "galore-adafactor": 0.25}
DEFAULT_SCALE.update({"fira": 0.25, "apollo": 1.0})
AVAILABLE = ("adamw", *BUILDERS)

# The learning rate galorex-train uses when --lr is not given: each optimizer's best on llama-tiny
# (docs/benchmarks.md, "Default learning rates": 100 steps, grid 1e-3/3e-3/1e-2/3e-2, 2026-12-03);
# the ones not swept there (natural-galore, gradnorm-lorp, galore-adafactor) keep the former shared 3e-3.
DEFAULT_LR = {name: 3e-3 for name in AVAILABLE}
DEFAULT_LR.update({"adamw": 3e-3, "galore": 3e-2, "fira": 1e-2, "apollo": 3e-2, "apollo-mini": 3e-3})


def default_lr(name: str) -> float:
    """galorex-train's learning rate for ``name`` when none is given (:data:`DEFAULT_LR`)."""
    return DEFAULT_LR.get(name, 3e-3)
