"""State codecs: how moments and bases are stored, applied by the step loop around every rule.

A rule declares which of its state entries are moments (``Rule.moment_keys``); the loop hands it
those as float tensors (:func:`load_view`) and stores them back afterwards (:func:`store_view`):
as they are with ``optim_bits=32``, block-wise in 8 bits with ``optim_bits=8`` (``state8bit``:
first moments signed, second moments — keys ending in ``exp_avg_sq`` — as √v). Bases are stored
whole or as 4/8-bit codes with per-64 scales (``basis_bits``), optionally Hadamard-rotated first
(``basis_rotation``); the state keys say which, so a checkpoint decodes itself. A rule never sees
a code.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import projection as proj
from . import state8bit
from .config import compute_dtype

EXP_AVG_SQ = "exp_avg_sq"


def moment_kind(key: str) -> str:
    """How a moment is stored in 8 bits: first moments signed, second moments (keys ending in
    ``exp_avg_sq``) as √v."""
    return state8bit.UNSIGNED_SQRT if key.endswith(EXP_AVG_SQ) else state8bit.SIGNED


def load_moment(state: dict[str, Any], key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A moment as a float tensor: the state tensor itself (32-bit) or a dequantised copy (8-bit,
    in ``dtype`` when given, float32 otherwise)."""
    if key + "_q" in state:
        q = state[key + "_q"]
        value = state8bit.unpack_moment({"q": q, "absmax": state[key + "_absmax"]}, q.shape, moment_kind(key))
        return value if dtype is None else value.to(dtype)
    return state[key]


def store_moment(state: dict[str, Any], key: str, value: torch.Tensor, eight_bit: bool) -> None:
    """Write a moment back: as is (32-bit), or block-wise quantised when large enough (8-bit).
    Whatever the other format left under the key is removed (a group's ``optim_bits`` may have
    changed since; a stale code would otherwise be read instead of the new value)."""
    if not eight_bit:
        state.pop(key + "_q", None)
        state.pop(key + "_absmax", None)
        state[key] = value
        return
    packed = state8bit.pack_moment(value, moment_kind(key))
    if "value" in packed:
        state.pop(key + "_q", None)
        state.pop(key + "_absmax", None)
        state[key] = packed["value"]
    else:
        state.pop(key, None)
        state[key + "_q"], state[key + "_absmax"] = packed["q"], packed["absmax"]


def load_view(state: dict[str, Any], moment_keys: tuple[str, ...], dtype: torch.dtype) -> dict[str, Any]:
    """The state as a rule sees it: every moment a float tensor, the rest as stored."""
    coded = {k + suffix for k in moment_keys for suffix in ("_q", "_absmax")}
    view = {k: v for k, v in state.items() if k not in coded}
    for key in moment_keys:
        if key + "_q" in state:
            view[key] = load_moment(state, key, dtype)
        elif key in view and view[key].dtype != dtype:
            # A moment too small to code is kept in float32 under optim_bits=8; float64 weights
            # compute in float64 (store_view writes the copy back).
            view[key] = view[key].to(dtype)
    return view


def store_view(state: dict[str, Any], view: dict[str, Any], moment_keys: tuple[str, ...], eight_bit: bool) -> None:
    """Write back what a rule changed: moments through the codec, other entries as they are."""
    for key, value in view.items():
        if key in moment_keys:
            if eight_bit or state.get(key) is not value:
                store_moment(state, key, value, eight_bit)
        elif state.get(key) is not value:
            state[key] = value


def basis_keys(side: str) -> list[str]:
    return ["basis_left", "basis_right"] if side == "full" else ["basis"]


def store_bases(
    state: dict[str, Any],
    side: str,
    bases: list[torch.Tensor],
    bits: int,
    rotated: bool = False,
    encoded: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Keep the bases as they are (32 bits) or as 4- or 8-bit codes with per-64 scales
    (``state8bit.BASIS_CODECS``), Hadamard-rotated first when ``rotated``. ``encoded``: the
    (codes, scales) of ``bases`` already computed. Whatever another format left under these keys is
    removed (the group's settings may have changed since)."""
    for i, (key, basis) in enumerate(zip(basis_keys(side), bases)):
        coded = bits in state8bit.BASIS_CODECS
        keep = key + state8bit.basis_code_suffix(bits, rotated) if coded else key
        for suffix in state8bit.BASIS_SUFFIXES:
            if key + suffix != keep:
                state.pop(key + suffix, None)
        if coded:
            codes, scale = encoded[i] if encoded is not None else state8bit.encode_basis(basis, bits, rotated)
            state[keep], state[key + "_scale"] = codes, scale
        else:
            state.pop(key + "_scale", None)
            state[key] = basis


def canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """The basis with each column's sign chosen so that its largest-magnitude entry is positive.

    A singular vector's sign is arbitrary, and LAPACK's choice can flip under a 1e-16 change of the
    matrix. Plain and block-coded bases do not care (the codes of −b are the negated codes of b,
    and the moment policies carry signs), but Hadamard-rotated codes mix a column's sign into its
    neighbours' codes, so the stored basis — and the run — would depend on that choice. With this
    convention it depends continuously on the gradient: one process and FSDP2's ranks, whose
    gradients differ by rounding, store the same codes."""
    index = basis.abs().argmax(dim=0, keepdim=True)
    signs = torch.where(basis.gather(0, index) < 0, -1.0, 1.0).to(basis.dtype)
    return basis * signs


def encode_for_storage(
    new: list[torch.Tensor], bits: int, rotated: bool
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """The bases as they will be stored (decoded again when coded, so moments carried into them
    match them exactly) and their codes; rotated ones with :func:`canonical_signs`."""
    if bits not in state8bit.BASIS_CODECS:
        return new, None
    if rotated:
        new = [canonical_signs(b) for b in new]
    encoded = [state8bit.encode_basis(b, bits, rotated) for b in new]
    return [state8bit.decode_basis(*e, b.shape, bits, rotated).to(b.dtype) for e, b in zip(encoded, new)], encoded


def _stored_format(state: dict[str, Any], key: str, p: torch.Tensor) -> tuple[int, bool]:
    for bits in state8bit.BASIS_CODECS:
        for rotated in (False, True):
            if key + state8bit.basis_code_suffix(bits, rotated) in state:
                return bits, rotated
    raise KeyError(
        f"the optimizer state of a parameter of shape {tuple(p.shape)} holds no basis {key!r} in any stored "
        f"format (state keys: {sorted(state)}): the state dict does not belong to this parameter"
    )


def coded_entries(state: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    """Every block-coded entry of a state, as (codes key, scales key, entries per block, codes per
    byte): 8-bit moments (``<key>_q`` with ``<key>_absmax``: 256 entries a block, one byte each)
    and 4/8-bit bases (``<key>_q4[h]``/``_q8[h]`` with ``<key>_scale``: 64 entries a block, two or
    one a byte). A block's codes and its scale belong together: the FSDP2 placement
    (``galorex.optim.sharded``) keeps them on one rank."""
    found = []
    for key in state:
        if key.endswith("_q") and key[:-2] + "_absmax" in state:
            found.append((key, key[:-2] + "_absmax", state8bit.BLOCK_SIZE, 1))
            continue
        for bits in state8bit.BASIS_CODECS:
            for rotated in (False, True):
                suffix = state8bit.basis_code_suffix(bits, rotated)
                if key.endswith(suffix) and key[: -len(suffix)] + "_scale" in state:
                    found.append((key, key[: -len(suffix)] + "_scale", state8bit.INT4_BLOCK_SIZE, 8 // bits))
    return found


def has_basis(state: dict[str, Any]) -> bool:
    """Whether a parameter's state is subspace state (it holds a basis in some format)."""
    return any(k + suffix in state for k in ("basis", "basis_left") for suffix in state8bit.BASIS_SUFFIXES)


def load_bases(state: dict[str, Any], side: str, p: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """The bases as float tensors (4- and 8-bit ones decoded, and un-rotated if they were stored
    rotated; their shapes follow from p and the rank)."""
    keys = basis_keys(side)
    if keys[0] in state:
        return [state[k] for k in keys]
    m, n = proj.matrix_shape(p.shape)
    dtype = compute_dtype(p.dtype)
    bits, rotated = _stored_format(state, keys[0], p)
    suffix = state8bit.basis_code_suffix(bits, rotated)
    return [
        state8bit.decode_basis(state[k + suffix], state[k + "_scale"], shape, bits, rotated).to(dtype)
        for k, shape in zip(keys, proj.basis_shapes(side, m, n, rank))
    ]


def bases_nbytes(side: str, m: int, n: int, rank: int, bits: int, dtype: torch.dtype) -> int:
    """Bytes of the stored bases of an (m×n) weight: whole in ``dtype``, or 4/8-bit codes."""
    shapes = proj.basis_shapes(side, m, n, rank)
    if bits in state8bit.BASIS_CODECS:
        return sum(state8bit.basis_nbytes(a * b, bits) for a, b in shapes)
    return sum(a * b for a, b in shapes) * torch.empty((), dtype=dtype).element_size()
