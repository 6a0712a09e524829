"""HALO-style Hadamard low-precision linear layers (Ashkboos et al., 2025, "HALO: Hadamard-Assisted
Lower-Precision Optimization for LLMs").

- :mod:`.linear`: ``HaloLinear`` and ``convert_to_halo`` (rotation placement documented there).

The operations they are built from live in :mod:`galorex.lowp`, which the optimizers use too, and
are re-exported here: Sylvester matrices, block rotations with optional random signs and the
FWHT (:mod:`galorex.lowp.hadamard`); scaled FP8 (e4m3/e5m2) and INT8 quantisation, per tensor or
per row (:mod:`galorex.lowp.quant`); the scaled GEMM (:mod:`galorex.lowp.gemm`).
"""

from ..lowp.gemm import scaled_gemm, scaled_gemm_reference
from ..lowp.hadamard import (
    block_hadamard_matrix,
    default_block_size,
    fwht,
    hadamard_transform,
    random_signs,
    rotate,
    sylvester,
    unrotate,
)
from ..lowp.quant import dequantize, format_max, grid_step, quantize
from .linear import HALO_FORMATS, HALO_LEVELS, HaloConfig, HaloLinear, convert_to_halo, halo_linear

__all__ = [
    "HALO_FORMATS",
    "HALO_LEVELS",
    "HaloConfig",
    "HaloLinear",
    "block_hadamard_matrix",
    "convert_to_halo",
    "default_block_size",
    "dequantize",
    "format_max",
    "fwht",
    "grid_step",
    "hadamard_transform",
    "halo_linear",
    "quantize",
    "random_signs",
    "rotate",
    "scaled_gemm",
    "scaled_gemm_reference",
    "sylvester",
    "unrotate",
]
