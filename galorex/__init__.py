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
    Rule,
    Step,
    galore_param_groups,
    register,
    select_galore_parameters,
)
from .optim.factory import build_optimizer
from .weights import QuantizedWeight, dequantize_weights, quantize_weights

__version__ = "0.1.0"

__all__ = [
    "ApolloAdamW",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GradNormLoRPAdamW",
    "LowRankOptimizer",
    "NaturalGaLoreAdamW",
    "QuantizedWeight",
    "Rule",
    "Step",
    "build_optimizer",
    "dequantize_weights",
    "estimate_optimizer_state_bytes",
    "galore_param_groups",
    "optimizer_state_bytes",
    "quantize_weights",
    "register",
    "select_galore_parameters",
]
