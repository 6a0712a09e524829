"""HALO-style Hadamard low-precision linear layers (Ashkboos et al., 2025, "HALO: Hadamard-Assisted
Lower-Precision Optimization for LLMs").

- :mod:`.hadamard`: Sylvester matrices, block rotations with optional random signs, a torch FWHT;
- :mod:`.quant`: scaled FP8 (e4m3/e5m2) and INT8 quantisation, per tensor or per row;
- :mod:`.gemm`: the scaled GEMM (Triton, ``torch._scaled_mm`` / ``torch._int_mm``, or emulation);
- :mod:`.linear`: ``HaloLinear`` and ``convert_to_halo`` (rotation placement documented there);
- :mod:`.projection`: low-precision GaLore projections (the ``proj_precision`` group key).
"""

from .gemm import scaled_gemm, scaled_gemm_reference
from .hadamard import (
    block_hadamard_matrix,
    default_block_size,
    fwht,
    hadamard_transform,
    random_signs,
    rotate,
    sylvester,
    unrotate,
)
from .linear import HALO_FORMATS, HALO_LEVELS, HaloConfig, HaloLinear, convert_to_halo, halo_linear
from .quant import dequantize, format_max, grid_step, quantize

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
