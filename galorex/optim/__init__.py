"""galorex optimizers."""

from .base import LowRankOptimizer
from .galore import GaLoreAdamW, adam_directions
from .groups import galore_param_groups, select_galore_parameters

__all__ = [
    "GaLoreAdamW",
    "LowRankOptimizer",
    "adam_directions",
    "galore_param_groups",
    "select_galore_parameters",
]
