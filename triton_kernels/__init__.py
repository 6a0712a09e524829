"""Triton kernels for galorex, each beside a torch twin that is its reference.

This package knows nothing of galorex: galorex's low-precision operations (``galorex.lowp``) use
these twins as their torch path and reference. Every public function dispatches through
:func:`select_backend`, the one place that chooses: on CUDA the torch twin for every operation
until a GPU run has shown its kernel correct and faster (``dispatch.CUDA_DEFAULT``), on the CPU
the twin unless ``TRITON_INTERPRET=1``; ``GALOREX_BACKEND=torch|triton`` overrides the choice, and
``triton`` raises where it cannot run. Importing this package does not import triton: the kernel
modules are loaded when one of their names is first used (they import triton if it is installed
and work without it), and the kernels themselves are built (``triton.jit``) on first launch, for
the interpreter mode in force then.

- :mod:`.hadamard`: ``hadamard_transform`` (blockwise orthonormal Walsh–Hadamard)
- :mod:`.quant`: ``quantize_fp8``, ``hadamard_quantize_fp8``, ``quantize_int8``,
  ``hadamard_quantize_int8``; one twin for all, ``quantize_reference`` / ``hadamard_quantize_reference``
- :mod:`.gemm`: ``fp8_gemm``, ``int8_gemm``; one twin for both, ``scaled_gemm_reference``
- :mod:`.lowrank`: ``project``, ``fused_galore_adam_step``
- ``python -m triton_kernels.bench``: correctness, then the GPU speed table
"""

from __future__ import annotations

import importlib
from typing import Any

from .dispatch import BACKEND_ENV, select_backend, triton_available

_LAZY = {
    "hadamard": ("hadamard_matrix", "hadamard_transform", "hadamard_transform_reference"),
    "quant": (
        "quantize_fp8",
        "quantize_fp8_reference",
        "hadamard_quantize_fp8",
        "hadamard_quantize_fp8_reference",
        "hadamard_quantize_int8",
        "hadamard_quantize_int8_reference",
        "quantize_int8",
        "quantize_int8_reference",
        "quantize_reference",
        "hadamard_quantize_reference",
    ),
    "gemm": ("fp8_gemm", "fp8_gemm_reference", "int8_gemm", "int8_gemm_reference", "scaled_gemm_reference"),
    "lowrank": ("project", "project_reference", "fused_galore_adam_step", "fused_galore_adam_step_reference"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["BACKEND_ENV", "select_backend", "triton_available", *_WHERE]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'triton_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
