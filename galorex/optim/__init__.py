"""galorex optimizers."""

from .adafactor import GaLoreAdafactor
from .apollo import ApolloAdamW
from .base import LowRankOptimizer
from .fira import FiraAdamW
from .galore import GaLoreAdamW, adam_directions
from .gradnorm_lorp import GradNormLoRPAdamW, weight_norm_gradients
from .groups import galore_param_groups, select_galore_parameters
from .natural_galore import NaturalGaLoreAdamW, woodbury_inverse_fisher

__all__ = [
    "ApolloAdamW",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GradNormLoRPAdamW",
    "LowRankOptimizer",
    "NaturalGaLoreAdamW",
    "adam_directions",
    "galore_param_groups",
    "select_galore_parameters",
    "weight_norm_gradients",
    "woodbury_inverse_fisher",
]
