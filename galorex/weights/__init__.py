"""Weights stored below the compute precision: INT8 codes with group scales, and stochastic rounding.

Q-GaLore (Zhang et al., 2024) and Q-APOLLO keep a model's linear weights as group-wise INT8 codes,
dequantise them for each matmul and write each update back with stochastic rounding, with no
high-precision copy. galorex does the same for every optimizer:

    forward / backward:  W = q·s dequantised to the compute dtype per call; dense gradient ∂L/∂W
    the write:           W' = dequantise(q, s) in float32;  the rule's update applied to W';
                         s' = max|W'_g|/127 per group;  q' = ⌊W'/s'⌋ + 𝟙[u < W'/s' − ⌊W'/s'⌋]

with u drawn from a generator seeded by (seed, parameter, step), so a resumed run is bit for bit
the same. bf16 weights can take the same stochastic write (``weight_rounding="stochastic"``),
since updates smaller than half a bf16 step vanish under round-to-nearest.

**Design.** Two places could own "dequantise → update → requantise": a tensor subclass whose
in-place operations round (torchao's INT8 quantized-training prototype works that way), or the
optimizer's write. A subclass is needed either way — autograd only gives gradients to floating
point leaves, so the INT8 weight must look like one (:class:`QuantizedWeight`). But rounding in its
in-place operations would round once per operation (a rule that decays, then adds its update,
would round twice), could not know the step and parameter the draws must be seeded with, and would
have to cover every in-place kernel any rule uses (``addmm_``, ``addcmul_``, foreach and fused
AdamW kernels …). So the subclass only stores and dequantises, refuses in-place updates, and the
step loop (``galorex.optim.lowrank``) gives every rule a float32 working copy to update as it would
a float32 weight, then stores it with one rounding (:mod:`.write`). Rules never learn how W is kept.

- :mod:`.codes`: the INT8 group codes, the rounding rules (INT8 and bf16), chunked.
- :mod:`.tensor`: :class:`QuantizedWeight` and its linear function.
- :mod:`.write`: the optimizer's write.
- :mod:`.convert`: :func:`quantize_weights`, :func:`dequantize_weights`, state-dict hooks.
"""

from .convert import (
    DEFAULT_GROUP_SIZE,
    WEIGHT_BITS,
    dequantize_weights,
    has_quantized_weights,
    quantize_linear_,
    quantize_weights,
    quantized_linear_names,
)
from .tensor import QuantizedLinearFunction, QuantizedWeight
from .write import WEIGHT_ROUNDINGS, is_quantized, needs_working_copy, rounding_for, storage_bytes, store_

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "WEIGHT_BITS",
    "WEIGHT_ROUNDINGS",
    "QuantizedLinearFunction",
    "QuantizedWeight",
    "dequantize_weights",
    "has_quantized_weights",
    "is_quantized",
    "needs_working_copy",
    "quantize_linear_",
    "quantize_weights",
    "quantized_linear_names",
    "rounding_for",
    "storage_bytes",
    "store_",
]
