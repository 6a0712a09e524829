"""Triton kernels for galorex, each beside a torch twin that is its reference.

For now this package holds the backend dispatch that every kernel will go through: galorex uses
Triton on CUDA when it is importable (or anywhere under ``TRITON_INTERPRET=1``) and torch otherwise;
``GALOREX_BACKEND=torch|triton`` overrides the choice.
"""

from .dispatch import BACKEND_ENV, select_backend, triton_available

__all__ = ["BACKEND_ENV", "select_backend", "triton_available"]
