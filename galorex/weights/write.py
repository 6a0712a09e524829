"""The optimizer's write into a weight stored below the compute precision.

An optimizer rule computes its update on float tensors and never learns how W is kept: for a weight
whose storage cannot hold the updated value exactly (INT8 codes, or bf16 under stochastic
rounding), galorex's step loop hands the rule a float32 *working copy* of W (:func:`working_copy`),
lets it write its update there as it would into a float32 weight, then stores the copy back with
one rounding (:func:`store_`):

- a :class:`~galorex.weights.tensor.QuantizedWeight`: new group scales from the updated values,
  codes rounded to nearest or stochastically (:func:`galorex.weights.codes.quantize_`);
- a bf16 weight: rounded to nearest (torch's cast) or stochastically
  (:func:`galorex.weights.codes.round_to_bf16_`).

Stochastic draws come from the generator the caller passes, seeded from (seed, parameter, step), so
a resumed run draws the same numbers without any RNG state in a checkpoint.
"""

from __future__ import annotations

import torch

from . import codes as C
from .tensor import QuantizedWeight

WEIGHT_ROUNDINGS = C.ROUNDINGS
# bf16 weights default to round-to-nearest, what torch does: the bf16 quality comparison that should
# decide it has not run yet (docs/benchmarks.md, "INT8 weights, and the peak as printed").
BF16_DEFAULT_ROUNDING = "nearest"
QUANTIZED_DEFAULT_ROUNDING = "stochastic"


def is_quantized(p: torch.Tensor) -> bool:
    """Whether ``p`` is held as INT8 codes (a :class:`QuantizedWeight`)."""
    return isinstance(p, QuantizedWeight)


def rounding_for(p: torch.Tensor, weight_rounding: str | None) -> str:
    """The rounding a write into ``p`` uses: ``weight_rounding`` when given, else stochastic for INT8
    codes and :data:`BF16_DEFAULT_ROUNDING` for a bf16 weight."""
    if weight_rounding is not None:
        return weight_rounding
    return QUANTIZED_DEFAULT_ROUNDING if is_quantized(p) else BF16_DEFAULT_ROUNDING


def needs_working_copy(p: torch.Tensor, weight_rounding: str | None) -> bool:
    """Whether an update of ``p`` runs on a float32 working copy stored back by :func:`store_`:
    always for INT8 codes, and for a bf16 weight under stochastic rounding (round-to-nearest bf16
    weights are written by the rules themselves, each rounding once, as before)."""
    if is_quantized(p):
        return True
    return p.dtype == torch.bfloat16 and rounding_for(p, weight_rounding) == "stochastic"


def working_copy(p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new contiguous tensor of ``dtype`` (the compute dtype: float32, or float64 for float64
    weights) holding ``p``'s values (dequantised codes, or the bf16 weight), exactly."""
    if is_quantized(p):
        return p.dequantize(dtype)
    return p.detach().to(dtype, memory_format=torch.contiguous_format, copy=True)


def store_(p: torch.Tensor, w: torch.Tensor, weight_rounding: str | None, generator: torch.Generator | None) -> None:
    """Store the values ``w`` (a :func:`working_copy` after the update) into ``p`` with one
    rounding (:func:`rounding_for`), drawing from ``generator`` when stochastic.

    Raises:
        FloatingPointError: the update made a quantised weight non-finite (its codes keep the values
            of the groups before the first non-finite one; the caller names the parameter).
    """
    rounding = rounding_for(p, weight_rounding)
    if is_quantized(p):
        C.quantize_(w, p.codes, p.scales, p.group_size, rounding, generator)
    elif p.dtype == torch.bfloat16:
        C.round_to_bf16_(p.detach().view(p.shape), w.view(p.shape), rounding, generator)
    else:
        p.detach().copy_(w.view(p.shape))


def storage_bytes(p: torch.Tensor) -> int:
    """Bytes a weight holds: codes and scales for INT8 weights, numel × element size otherwise."""
    if is_quantized(p):
        return p.storage_bytes
    return p.numel() * p.element_size()


__all__ = [
    "BF16_DEFAULT_ROUNDING",
    "QUANTIZED_DEFAULT_ROUNDING",
    "WEIGHT_ROUNDINGS",
    "is_quantized",
    "needs_working_copy",
    "rounding_for",
    "storage_bytes",
    "store_",
    "working_copy",
]
