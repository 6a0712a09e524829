"""galorex optimizers."""

from .base import LowRankOptimizer
from .galore import GaLoreAdamW, adam_directions
from .natural_galore import NaturalGaLoreAdamW, woodbury_inverse_fisher
from .groups import galore_param_groups, select_galore_parameters

__all__ = [
    "GaLoreAdamW",
    "LowRankOptimizer",
    "NaturalGaLoreAdamW",
    "adam_directions",
    "galore_param_groups",
    "select_galore_parameters",
    "woodbury_inverse_fisher",
]
