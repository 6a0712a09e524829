"""galorex: low-rank gradient optimizers for PyTorch."""

from .memory import estimate_optimizer_state_bytes, optimizer_state_bytes
from .optim import (
    ApolloAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GradNormLoRPAdamW,
    LowRankOptimizer,
    NaturalGaLoreAdamW,
    galore_param_groups,
    select_galore_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "ApolloAdamW",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GradNormLoRPAdamW",
    "LowRankOptimizer",
    "NaturalGaLoreAdamW",
    "estimate_optimizer_state_bytes",
    "galore_param_groups",
    "optimizer_state_bytes",
    "select_galore_parameters",
]
