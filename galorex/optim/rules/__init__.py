"""Rules: what runs inside the subspace (see ``rules.base`` for the protocol)."""

from .adafactor import AdafactorRule
from .adam import AdamRule
from .base import Rule, State, Step, apply_lowrank_update
from .gradnorm import GradNormRule
from .natural import NaturalRule

__all__ = ["AdafactorRule", "AdamRule", "GradNormRule", "NaturalRule", "Rule", "State", "Step", "apply_lowrank_update"]
