"""Names of galorex's optimizers (``galorex-train --optimizer``, ``estimate_optimizer_state_bytes``)
and the binding each names. A new optimizer registers here with :func:`register`."""

from __future__ import annotations

from .adafactor import GaLoreAdafactor
from .apollo import ApolloAdamW
from .fira import FiraAdamW
from .galore import GaLoreAdamW
from .gradnorm_lorp import GradNormLoRPAdamW
from .lowrank import LowRankOptimizer
from .natural_galore import NaturalGaLoreAdamW
from .rules.adam import AdamRule
from .rules.base import Rule

OPTIMIZERS: dict[str, type[LowRankOptimizer]] = {}
# Older spellings accepted by galorex.memory.
ALIASES = {"gradnorm_lorp": "gradnorm-lorp", "adafactor": "galore-adafactor", "apollo-mini": "apollo"}


def register(name: str, cls: type[LowRankOptimizer]) -> type[LowRankOptimizer]:
    """Make ``cls`` (a binding of the step loop to a rule) available under ``name``.

    Args:
        name: the name (``galorex-train --optimizer``, ``estimate_optimizer_state_bytes``).
        cls: a ``LowRankOptimizer`` subclass with its ``rule``.

    Returns:
        ``cls``, so it can decorate the class.

    Raises:
        ValueError: ``name`` is taken by another class.
    """
    if name in OPTIMIZERS and OPTIMIZERS[name] is not cls:
        raise ValueError(f"optimizer name {name!r} is taken by {OPTIMIZERS[name].__name__}")
    OPTIMIZERS[name] = cls
    return cls


def optimizer_class(name: str) -> type[LowRankOptimizer]:
    """The class registered under ``name`` (or one of its :data:`ALIASES`); a ValueError listing
    the names for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(['adamw', *OPTIMIZERS])}")
    return OPTIMIZERS[name]


def rule_for(name: str) -> Rule:
    """The rule of a registered optimizer (``adamw``: the Adam rule, whose unprojected step is
    torch's AdamW)."""
    if name == "adamw":
        return AdamRule()
    return optimizer_class(name).rule


for _name, _cls in (
    ("galore", GaLoreAdamW),
    ("natural-galore", NaturalGaLoreAdamW),
    ("gradnorm-lorp", GradNormLoRPAdamW),
    ("galore-adafactor", GaLoreAdafactor),
    ("fira", FiraAdamW),
    ("apollo", ApolloAdamW),
):
    register(_name, _cls)
