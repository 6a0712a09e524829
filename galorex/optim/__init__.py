"""galorex optimizers: one step loop (``lowrank``) and the rules it runs (``rules``), bound as
``GaLoreAdamW`` & co. and registered by name (``registry``)."""

from .adafactor import GaLoreAdafactor
from .apollo import ApolloAdamW
from .fira import FiraAdamW
from .galore import GaLoreAdamW, adam_directions
from .gradnorm_lorp import GradNormLoRPAdamW, weight_norm_gradients
from .groups import galore_param_groups, select_galore_parameters
from .lowrank import LowRankOptimizer
from .natural_galore import NaturalGaLoreAdamW, woodbury_inverse_fisher
from .registry import register
from .rules import Rule, Step

__all__ = [
    "ApolloAdamW",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GradNormLoRPAdamW",
    "LowRankOptimizer",
    "NaturalGaLoreAdamW",
    "Rule",
    "Step",
    "adam_directions",
    "galore_param_groups",
    "register",
    "select_galore_parameters",
    "weight_norm_gradients",
    "woodbury_inverse_fisher",
]
