"""Build an optimizer for a model by name: what ``galorex-train`` and ``galorex.bench`` use.

The settings are taken by name, as :func:`galorex.optim.config.options` defines them, and routed
without naming any: ``optim_bits`` to every group, a rule's own option (``config.RuleOptions``)
to the optimizers whose rule has that key, every other one (projection, refresh, basis precision)
into the projected group. A new setting or a newly registered optimizer needs no change here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import config, registry
from .galore import GaLoreAdamW
from .groups import galore_param_groups
from .keys import near_misses

# Names of optimizers still to come, so that asking for one gives a clear answer.
PLANNED: tuple[str, ...] = ()


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float | None = None,
    target_modules: str | Sequence[str] = ("attn", "mlp"),
    layerwise: bool = False,
    accumulation_steps: int = 1,
    per_param_grad_clip: float | None = None,
    **settings: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``model``, its attention and MLP weights projected
    (``galore_param_groups``) and the rest stepped unprojected.

    ``adamw``: torch.optim.AdamW on every parameter (a galorex optimizer without a rank group, which
    is AdamW, when ``optim_bits=8`` or ``layerwise``). A registered name (``registry``): that
    optimizer with Adam's ``lr``, ``betas``, ``eps`` and ``weight_decay``. ``galore-adafactor``: the
    external ``lr`` (``relative_step=False``, ``scale_parameter=False``, as the GaLore paper's
    scripts run it), ``beta1`` = betas[0] (0 means no first moment) and ``weight_decay``; β₂ and
    ``eps`` do not apply (Adafactor's second moment follows its own 1 − t^−0.8 schedule).
    ``apollo-mini``: ``ApolloAdamW.mini`` (rank 1, tensor-wise, random projection, its own scale).

    Args:
        name: ``adamw``, a registered name, or ``apollo-mini``.
        model: the module whose parameters are optimised.
        lr: the learning rate; None takes ``galorex-train``'s default for ``name``
            (:data:`DEFAULT_LR`, the best of a sweep on llama-tiny).
        betas, eps, weight_decay: Adam's hyperparameters.
        rank, update_proj_gap: the projected group's rank and refresh period.
        scale: the projected-back scale; None takes the optimizer's own (:data:`DEFAULT_SCALE`).
        target_modules: which weights are projected (``select_galore_parameters``).
        layerwise, accumulation_steps, per_param_grad_clip: layer-wise updates (every galorex
            optimizer, and ``adamw`` the same way).
        settings: named options (``config.options()``: ``proj_type``, ``refresh_method``,
            ``optim_bits``, ``basis_bits``, ``natural_history``, ``weight_rounding`` …, the
            settings ``galorex-train`` takes as flags).

    Raises:
        ValueError: an unknown ``name`` or setting (the error lists what is allowed), or a bad value.
    """
    unknown = sorted(set(settings) - OPTION_NAMES)
    if unknown:
        allowed = sorted(OPTION_NAMES | set(_SIGNATURE_SETTINGS))
        hints = near_misses(unknown, allowed)
        raise ValueError(f"build_optimizer({name!r}): unknown setting(s) {unknown}{hints}; the settings are {allowed}")
    if lr is None:
        lr = default_lr(name)
    if name == "apollo-mini" and scale is not None:
        raise ValueError("apollo-mini sets its scale itself (128, a √128 multiplier); leave scale unset")
    if scale is None:
        scale = DEFAULT_SCALE.get(name, 0.25)
    lw = dict(layerwise=layerwise, accumulation_steps=accumulation_steps, per_param_grad_clip=per_param_grad_clip)
    adam = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    optim_bits = settings.pop(config.OPTIM_BITS, 32)
    rule_options = {k: settings.pop(k) for k in RULE_OPTIONS if k in settings}
    # How weights below the compute precision are written applies to every group, as optim_bits.
    adam.update({k: settings.pop(k) for k in WEIGHT_OPTIONS if k in settings})
    if name == "adamw":
        if optim_bits == 8 or layerwise or _needs_galorex_write(model, adam):
            # A galorex optimizer without a rank group is AdamW; it is the one with 8-bit moments,
            # with layer-wise updates, and that writes INT8 or stochastically rounded weights.
            return GaLoreAdamW(model.parameters(), **adam, optim_bits=optim_bits, **lw)
        return torch.optim.AdamW(model.parameters(), **{k: v for k, v in adam.items() if k not in WEIGHT_OPTIONS})
    build = builder(name)
    groups = galore_param_groups(
        model, rank=rank, update_proj_gap=update_proj_gap, scale=scale, target_modules=target_modules, **settings
    )
    return build(groups, adam=adam, optim_bits=optim_bits, rule_options=rule_options, layerwise=lw)


# Every named option (config.options()), and the arguments of build_optimizer's own signature.
OPTION_NAMES = frozenset(o.name for o in config.options())
_SIGNATURE_SETTINGS = ("lr", "betas", "eps", "weight_decay", "target_modules", "layerwise")
_SIGNATURE_SETTINGS += ("accumulation_steps", "per_param_grad_clip")
# The rules' own options (natural_history …): each goes only to the optimizers whose rule has it.
RULE_OPTIONS = tuple(o.name for o in config.options() if o.owner is config.RuleOptions)
# The weight write's options (weight_rounding, rounding_seed): constructor defaults, every group.
WEIGHT_OPTIONS = tuple(o.name for o in config.options() if o.owner is config.WeightWrite)


def _needs_galorex_write(model: nn.Module, options: dict[str, Any]) -> bool:
    """Whether torch's AdamW cannot step ``model``: INT8 weights, or stochastic rounding asked for."""
    from ..weights import is_quantized

    stochastic = options.get(config.WEIGHT_ROUNDING) == "stochastic"
    return stochastic or any(is_quantized(p) for p in model.parameters())


Builder = Callable[..., torch.optim.Optimizer]


def binding(registered: str, preset: str | None = None) -> Builder:
    """How a registered optimizer is built from the shared settings: Adam's hyperparameters,
    ``optim_bits`` and the rule options its rule takes.

    Args:
        registered: the name in ``registry``.
        preset: a class method that builds a preset of it (``ApolloAdamW.mini``), or None.
    """

    def build(groups, *, adam, optim_bits, rule_options, layerwise):
        cls = registry.optimizer_class(registered)
        own = {k: v for k, v in rule_options.items() if k in cls.rule.defaults}
        make = getattr(cls, preset) if preset else cls
        return make(groups, **adam, optim_bits=optim_bits, **own, **layerwise)

    return build


def _adafactor(groups, *, adam, optim_bits, rule_options, layerwise):
    beta1 = adam["betas"][0]
    cls = registry.optimizer_class("galore-adafactor")
    own = {k: v for k, v in rule_options.items() if k in cls.rule.defaults}
    return cls(
        groups,
        lr=adam["lr"],
        beta1=beta1 if beta1 > 0 else None,
        weight_decay=adam["weight_decay"],
        **{k: adam[k] for k in WEIGHT_OPTIONS if k in adam},
        relative_step=False,
        scale_parameter=False,
        optim_bits=optim_bits,
        **own,
        **layerwise,
    )


# Names whose settings are taken otherwise than Adam's; every other registered name is a binding().
BUILDERS: dict[str, Builder] = {name: binding(name) for name in registry.OPTIMIZERS}
BUILDERS["galore-adafactor"] = _adafactor
BUILDERS["apollo-mini"] = binding("apollo", "mini")  # rank 1, tensor-wise, random, scale 128


def available() -> tuple[str, ...]:
    """Every name :func:`build_optimizer` takes now (optimizers registered after import included)."""
    return ("adamw", *BUILDERS, *(n for n in registry.OPTIMIZERS if n not in BUILDERS))


def builder(name: str) -> Builder:
    """How ``name`` (not ``adamw``) is built; a clear error for a name that is not available."""
    if name in BUILDERS:
        return BUILDERS[name]
    if name in registry.OPTIMIZERS:
        return binding(name)
    if name in PLANNED:
        raise ValueError(
            f"optimizer {name!r} is not available in this version of galorex yet; available: {', '.join(available())}"
        )
    raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(available())}")


# Defaults of the projected-back scale per optimizer: GaLore's and Fira's 0.25 (the papers'
# scripts), APOLLO's 1 (apollo-torch's Llama scripts; the update is multiplied by √scale).
DEFAULT_SCALE = {"galore": 0.25, "natural-galore": 0.25, "gradnorm-lorp": 0.25, "galore-adafactor": 0.25}
DEFAULT_SCALE.update({"fira": 0.25, "apollo": 1.0})
AVAILABLE = ("adamw", *BUILDERS)

# The learning rate galorex-train uses when --lr is not given: each optimizer's best on llama-tiny at
# galorex-train's own default length (docs/benchmarks.md, "Default learning rates at 1000 steps":
# grid 3e-3/1e-2/3e-2, extended at an edge, 2026-12-03); natural-galore and gradnorm-lorp from the
# 300-step sweep of the same day (the longest they were swept); galore-adafactor, never swept, keeps 3e-3.
DEFAULT_LR = {name: 3e-3 for name in AVAILABLE}
DEFAULT_LR.update({"adamw": 3e-3, "galore": 3e-2, "fira": 3e-3, "apollo": 1e-2, "apollo-mini": 3e-3})
DEFAULT_LR.update({"natural-galore": 1e-2, "gradnorm-lorp": 3e-2})


def default_lr(name: str) -> float:
    """galorex-train's learning rate for ``name`` when none is given (:data:`DEFAULT_LR`)."""
    return DEFAULT_LR.get(name, 3e-3)
