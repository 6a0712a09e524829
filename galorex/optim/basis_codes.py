"""4- and 8-bit projection bases: block-wise symmetric integer codes with one float32 scale per 64
entries (``basis_bits=4|8``; Q-GaLore keeps its projections in 4 bits), optionally after a block
Hadamard rotation of the rank dimension (``basis_rotation``). The state keys carry the format
(``basis_code_suffix``), so a checkpoint decodes itself. Block-wise scaling as in Dettmers et al.,
2022, "8-bit Optimizers via Block-wise Quantization"; 4-bit projections as in Q-GaLore (Zhang et al.,
2024, "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank Gradients").
"""

from __future__ import annotations

import torch

from .blocks import _blocks, _check_block_size, _num_blocks

# --------------------------------------------------------------------------- 4-bit bases
INT4_BLOCK_SIZE = 64


def _symmetric_codes(x: torch.Tensor, top: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise symmetric integer codes of x (flattened): s_b = max|x_b|/top, q = round(x/s_b) ∈
    [−top, top] as int16 (numel of them), float32 scales (1 per block; an all-zero block gets s = 0
    and codes 0, so it round-trips exactly)."""
    _check_block_size(block_size)
    flat = x.detach().reshape(-1).to(torch.float32)
    blocks = _blocks(flat, block_size)
    scale = blocks.abs().amax(dim=1) / float(top)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None]).clamp_(-top, top).to(torch.int16).reshape(-1)[: flat.numel()]
    return q, scale


def _apply_scales(codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size, block_size: int) -> torch.Tensor:
    """codes (float32, numel of ``shape``) times their block's scale, as a tensor of ``shape``."""
    n = shape.numel()
    pad = (-n) % block_size
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    return (codes.view(-1, block_size) * scale[:, None]).reshape(-1)[:n].reshape(shape)


def quantize_int4_blockwise(x: torch.Tensor, block_size: int = INT4_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit codes for a projection basis (Q-GaLore keeps its projections in 4 bits):
    s_b = max|x_b|/7, q = round(x/s_b) ∈ [−7, 7], two codes per byte. |x̂ − x| ≤ s_b/2 elementwise.

    Args:
        x: the basis (any shape; flattened in row-major order, computed in float32).
        block_size: entries per scale.

    Returns:
        (packed uint8 of ⌈numel/2⌉ bytes, code + 8 in each nibble, low nibble first; float32
        scales of ⌈numel/block_size⌉).
    """
    q, scale = _symmetric_codes(x, 7, block_size)
    q = q + 8
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), 8)])
    packed = (q[0::2] | (q[1::2] << 4)).to(torch.uint8)
    return packed, scale


def dequantize_int4_blockwise(
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    block_size: int = INT4_BLOCK_SIZE,
) -> torch.Tensor:
    """The float32 tensor of ``shape`` that :func:`quantize_int4_blockwise` stored (its packed
    codes, scales and block size)."""
    shape = torch.Size(shape)
    wide = packed.to(torch.int16)
    q = torch.stack([wide & 0xF, wide >> 4], dim=1).reshape(-1)[: shape.numel()].to(torch.float32) - 8.0
    return _apply_scales(q, scale, shape, block_size)


def int4_nbytes(numel: int, block_size: int = INT4_BLOCK_SIZE) -> int:
    """Bytes of a 4-bit basis: one byte per two entries plus a float32 scale per block."""
    return -(-numel // 2) + 4 * _num_blocks(numel, block_size)


# --------------------------------------------------------------------------- 8-bit bases
def quantize_int8_blockwise(x: torch.Tensor, block_size: int = INT4_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes for a projection basis: s_b = max|x_b|/127, q = round(x/s_b) ∈
    [−127, 127] (int8, one per entry); |x̂ − x| ≤ s_b/2 elementwise, a step 127/7 ≈ 18 times
    finer than the 4-bit codes' max/7.

    Args:
        x: the basis (any shape; flattened in row-major order, computed in float32).
        block_size: entries per scale.

    Returns:
        (int8 codes of numel, float32 scales of ⌈numel/block_size⌉).
    """
    q, scale = _symmetric_codes(x, 127, block_size)
    return q.to(torch.int8), scale


def dequantize_int8_blockwise(
    q: torch.Tensor,
    scale: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    block_size: int = INT4_BLOCK_SIZE,
) -> torch.Tensor:
    """The float32 tensor of ``shape`` that :func:`quantize_int8_blockwise` stored (its codes,
    scales and block size)."""
    return _apply_scales(q.reshape(-1).to(torch.float32), scale, torch.Size(shape), block_size)


def int8_nbytes(numel: int, block_size: int = INT4_BLOCK_SIZE) -> int:
    """Bytes of an 8-bit basis: one byte per entry plus a float32 scale per block."""
    return numel + 4 * _num_blocks(numel, block_size)


# Stored basis formats by ``basis_bits``: (state-key suffix of the codes, quantise, dequantise, bytes).
BASIS_CODECS = {
    4: ("_q4", quantize_int4_blockwise, dequantize_int4_blockwise, int4_nbytes),
    8: ("_q8", quantize_int8_blockwise, dequantize_int8_blockwise, int8_nbytes),
}


def basis_nbytes(numel: int, bits: int) -> int:
    """Bytes of one stored basis of ``numel`` entries at ``basis_bits`` = 4, 8 or 32 (a rotated
    basis costs the same: the rotation is fixed, nothing of it is stored)."""
    return 4 * numel if bits == 32 else BASIS_CODECS[bits][3](numel)


# --------------------------------------------------------------------------- rotated bases
# ``basis_rotation=True`` stores Q(B·H) instead of Q(B), B the basis as stored (rows × last dim,
# row-major, so the 64-entry code blocks run along the last dimension) and H = diag(H_b, …) a block
# Walsh–Hadamard rotation of the last dimension: a block whose entries are spiky (a few large, the
# rest small: the bases of attention projections are) is spread evenly before its absmax sets the
# code step. Decoding undoes it: B̂ = deq(Q(B·H))·H (H is symmetric and orthogonal), so
# ‖B̂ − B‖_F = ‖deq(Q(B·H)) − B·H‖_F, the error of quantising B·H. b = the largest power of two
# dividing the last dimension (the rank), at most the code block (64); b divides 64 and the blocks
# start at multiples of b, so each rotation block lies inside one code block. An odd rank has b = 1:
# nothing is rotated. No random signs, so the one symmetric H both encodes and decodes. Rotated
# codes are stored under their own state keys (suffix + "h"), so a checkpoint decodes itself.
ROTATED = "h"


def basis_rotation_block(dim: int) -> int:
    """The Hadamard block of a rotated basis whose last dimension is ``dim``."""
    return min(INT4_BLOCK_SIZE, dim & -dim)


def rotate_basis(x: torch.Tensor) -> torch.Tensor:
    """x·H along the last dimension, float32 (see the comment above :func:`basis_rotation_block`),
    H = blockdiag(H_b/√b) with b = :func:`basis_rotation_block` of x's last dimension (b = 1: x
    unchanged). H is symmetric and orthogonal, so this is also its own inverse."""
    from ..lowp.hadamard import hadamard_transform

    x = x.to(torch.float32)
    block = basis_rotation_block(x.shape[-1])
    return x if block == 1 else hadamard_transform(x, block)


unrotate_basis = rotate_basis


def basis_code_suffix(bits: int, rotated: bool) -> str:
    """State-key suffix of a basis stored at ``bits`` (4 or 8), rotated or not: "_q4", "_q8h", …"""
    return BASIS_CODECS[bits][0] + (ROTATED if rotated else "")


# Every suffix a basis may be stored under ("" is the float basis itself).
BASIS_SUFFIXES = ("",) + tuple(basis_code_suffix(b, r) for b in BASIS_CODECS for r in (False, True))


def encode_basis(basis: torch.Tensor, bits: int, rotated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float32 scales) of a basis at ``bits`` = 4 or 8, rotated first if asked.

    Args:
        basis: the float basis.
        bits: 4 or 8 (:data:`BASIS_CODECS`).
        rotated: quantise Q(B·H) instead of Q(B) (``basis_rotation``).
    """
    quantize = BASIS_CODECS[bits][1]
    return quantize(rotate_basis(basis) if rotated else basis)


def decode_basis(
    codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size | tuple[int, ...], bits: int, rotated: bool
) -> torch.Tensor:
    """The float32 basis of ``shape`` that :func:`encode_basis` stored with these ``bits`` and
    ``rotated`` (un-rotated after decoding)."""
    x = BASIS_CODECS[bits][2](codes, scale, shape)
    return unrotate_basis(x) if rotated else x


def roundtrip_basis(basis: torch.Tensor, bits: int, rotated: bool) -> torch.Tensor:
    """decode(encode(basis)) in the basis's dtype: the basis as the optimizer will see it."""
    return decode_basis(*encode_basis(basis, bits, rotated), basis.shape, bits, rotated).to(basis.dtype)
