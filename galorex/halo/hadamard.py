"""The Hadamard rotations moved to :mod:`galorex.lowp.hadamard`. This module only keeps the two
names imported from here elsewhere (``galorex.optim.state8bit``, tests/test_basis_rotation.py)
until those imports name :mod:`galorex.lowp.hadamard`."""

from ..lowp.hadamard import block_hadamard_matrix, hadamard_transform

__all__ = ["block_hadamard_matrix", "hadamard_transform"]
