"""Block layout shared by the 8-bit moment codes (``state8bit``) and the 4/8-bit basis codes
(``basis_codes``): a tensor flattened and zero-padded to whole blocks, one scale per block."""

from __future__ import annotations

import torch


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """flat (numel,) zero-padded to a whole number of blocks, as (blocks, block_size)."""
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)
