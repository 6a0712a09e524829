"""Where a DTensor parameter's optimizer state lives under FSDP2, and how it moves between the
form one process keeps and the form each rank stores.

**Full form**: a parameter's state exactly as one process keeps it — what the step loop, the codec
and the rules read and write. **Sharded form**: what ``optimizer.state[p]`` holds for a DTensor
parameter ``p`` (sharded ``Shard(0)`` on a 1-D mesh), about 1/N of it on each of N ranks:

- a 0-dim tensor (step counters, seeds, limiter norms): as it is, the same on every rank;
- a block-coded entry (``codec.coded_entries``: 8-bit moments, 4/8-bit bases) and its per-block
  scales: the codes as a (G, C) tensor and the scales as a (G, S) tensor, both ``Shard(0)``, so
  that every block's codes and its scale sit on the same rank and **no block straddles a shard
  boundary**, whatever the world size. One group is one block (G blocks of C bytes, S = 1), or —
  for an 8-bit moment of ≥ 2 dimensions whose rows hold whole blocks, such as the moments of an
  embedding with 768 columns — one row of the moment (G rows, S blocks each), which is then split
  exactly like the parameter's own rows, so that each rank can step its rows without communication
  and quantise exactly the blocks one process would. The codes' own shape is recorded beside them
  (``<codes key>_shape``, a CPU int64 tensor): whole blocks may pad the last one.
- any other tensor: a DTensor split on its longest dimension (the first of equals), so that even a
  rank-1 moment (1×n) divides evenly — or, for an unprojected parameter, on its rows like the
  parameter, so that an elementwise rule steps each rank's rows alone.

The layout depends only on the state's shapes, never on the world size, so a checkpoint written by
N ranks loads on M (``torch.distributed.checkpoint`` reshards each DTensor by its global shape).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from .. import codec

SHAPE = "_shape"  # suffix of the key that records a coded entry's own shape


def rows_per_rank(rows: int, world: int) -> list[int]:
    """How many rows of dim 0 each rank holds: torch.chunk's split (ceil(rows/N) each, the last
    ones short or empty), which is how FSDP2 and DTensor place ``Shard(0)``."""
    chunk = -(-rows // world) if rows else 0
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def row_range(p: DTensor) -> tuple[int, int]:
    """Rows [start, stop) of ``p``'s dim 0 that this rank holds.

    Raises:
        RuntimeError: the local shard is not torch.chunk's (a placement this module does not know).
    """
    mesh = p.device_mesh
    sizes = rows_per_rank(p.shape[0], mesh.size())
    rank = mesh.get_local_rank()
    start = sum(sizes[:rank])
    if p.to_local().shape[0] != sizes[rank]:
        raise RuntimeError(
            f"a DTensor of shape {tuple(p.shape)} holds {p.to_local().shape[0]} rows on rank {rank}, "
            f"not torch.chunk's {sizes[rank]}: an uneven placement galorex does not know"
        )
    return start, start + sizes[rank]


def shard(full: torch.Tensor, mesh, dim: int = 0) -> DTensor:
    """This rank's part of a tensor every rank holds whole, split on ``dim`` as ``Shard(dim)``
    (torch.chunk's split; a copy, no communication)."""
    sizes = rows_per_rank(full.shape[dim], mesh.size())
    rank = mesh.get_local_rank()
    mine = full.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous().clone()
    return DTensor.from_local(
        mine, mesh, [Shard(dim)], run_check=False, shape=full.shape, stride=full.contiguous().stride()
    )


def longest(shape: torch.Size | tuple[int, ...]) -> int:
    """The dimension a state tensor of a projected parameter is split on: its longest."""
    return max(range(len(shape)), key=lambda d: (shape[d], -d))


def _placed_dim(t: DTensor) -> int:
    (placement,) = t.placements
    if not isinstance(placement, Shard):
        raise RuntimeError(f"a DTensor placed {placement} where galorex expects Shard(d)")
    return placement.dim


def gather(tensors: list[DTensor]) -> list[torch.Tensor]:
    """The whole tensors of DTensors split on one 1-D mesh (any dims, dtypes, uneven parts), with
    ONE collective: every rank's local parts as bytes, padded to the longest rank's, all-gathered,
    and cut back into each tensor's parts (each rank's sizes follow from the global shapes)."""
    if not tensors:
        return []
    mesh = tensors[0].device_mesh
    world, device = mesh.size(), tensors[0].to_local().device
    parts = []  # per tensor: (dim, per-rank sizes, bytes per unit of that dim)
    for t in tensors:
        d = _placed_dim(t)
        unit = math.prod(t.shape) // t.shape[d] * t.element_size() if t.shape[d] else 0
        parts.append((d, rows_per_rank(t.shape[d], world), unit))
    length = max(sum(_aligned(sizes[r] * unit) for _, sizes, unit in parts) for r in range(world))
    buffer = torch.zeros(length, dtype=torch.uint8, device=device)
    at = 0
    for t in tensors:  # each part starts 8-byte aligned, so that it can be viewed as its dtype
        local = t.to_local().contiguous().reshape(-1).view(torch.uint8)
        buffer[at : at + local.numel()] = local
        at += _aligned(local.numel())
    out = [torch.empty_like(buffer) for _ in range(world)]
    torch.distributed.all_gather(out, buffer, group=mesh.get_group())
    offsets = [0] * world
    whole = []
    for t, (d, sizes, unit) in zip(tensors, parts):
        pieces = []
        for r in range(world):
            n = sizes[r] * unit
            shape = list(t.shape)
            shape[d] = sizes[r]
            pieces.append(out[r][offsets[r] : offsets[r] + n].view(t.dtype).view(shape))
            offsets[r] += _aligned(n)
        whole.append(torch.cat(pieces, dim=d))
    return whole


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


def from_rows(local: torch.Tensor, rows: int, mesh) -> DTensor:
    """A ``Shard(0)`` DTensor of ``rows`` global rows from this rank's rows (no copy)."""
    shape = torch.Size((rows, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def row_layout(shape: tuple[int, ...] | torch.Size, block: int, per_byte: int) -> bool:
    """Whether a coded entry of ``shape`` is grouped by rows: one code a byte, ≥ 2 dimensions, and
    each row a whole number of blocks (else it is grouped block by block)."""
    return per_byte == 1 and len(shape) >= 2 and shape[0] > 0 and math.prod(shape[1:]) % block == 0


def _groups(codes: torch.Tensor, scales: torch.Tensor, block: int, per_byte: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of the full form as (G, C) and (G, S) groups (see the module docstring)."""
    if row_layout(codes.shape, block, per_byte):
        return codes.reshape(codes.shape[0], -1), scales.reshape(codes.shape[0], -1)
    blocks, width = scales.numel(), block // per_byte
    flat = codes.reshape(-1)
    pad = blocks * width - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(blocks, width), scales.reshape(blocks, 1)


def _record(key: str, state: dict[str, Any]) -> torch.Size:
    """The codes' own shape, from their record (kept on the CPU: reading it never syncs a GPU)."""
    record = state[key + SHAPE]
    if record.device.type != "cpu":  # load_state_dict moved it to the parameter's device
        record = state[key + SHAPE] = record.cpu()
    return torch.Size(record.tolist())


def to_sharded(full: dict[str, Any], mesh, rows: bool = False) -> dict[str, Any]:
    """The sharded form of a full-form state that every rank holds identically (no communication:
    each rank keeps its own groups and parts). ``rows``: the state of an unprojected parameter,
    whose tensors are split on their rows like the parameter."""
    out: dict[str, Any] = {}
    coded = set()
    for codes_key, scales_key, block, per_byte in codec.coded_entries(full):
        codes, scales = full[codes_key], full[scales_key]
        grouped_codes, grouped_scales = _groups(codes, scales, block, per_byte)
        out[codes_key], out[scales_key] = shard(grouped_codes, mesh), shard(grouped_scales, mesh)
        out[codes_key + SHAPE] = torch.tensor(tuple(codes.shape), dtype=torch.int64)
        coded |= {codes_key, scales_key}
    for key, value in full.items():
        if key in coded:
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            out[key] = shard(value, mesh, 0 if rows else longest(value.shape))
        else:
            out[key] = value
    return out


def to_full(states: list[dict[str, Any]], extra: list[DTensor] = ()) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """The full forms of sharded states, and the whole tensors of ``extra`` DTensors (weights and
    gradients), all in one collective (:func:`gather`; every rank calls it)."""
    keys = [[k for k, v in state.items() if isinstance(v, DTensor)] for state in states]
    flat = gather([state[k] for state, ks in zip(states, keys) for k in ks] + list(extra))
    at, fulls = 0, []
    for state, ks in zip(states, keys):
        out: dict[str, Any] = {k: v for k, v in state.items() if not isinstance(v, DTensor)}
        out.update(zip(ks, flat[at : at + len(ks)]))
        at += len(ks)
        for codes_key, scales_key, _, _ in codec.coded_entries(state):
            shape = _record(codes_key, state)
            out[codes_key] = out[codes_key].reshape(-1)[: math.prod(shape)].view(shape)
            out[scales_key] = out[scales_key].reshape(-1)
            del out[codes_key + SHAPE]
        fulls.append(out)
    return fulls, flat[at:]


def to_local(sharded: dict[str, Any], p: DTensor) -> dict[str, Any]:
    """The full form of this rank's rows alone, for a parameter whose every state tensor is split
    like its rows (an elementwise rule; coded entries grouped by rows): views of the local shards,
    so that updates in place land in the sharded state."""
    local_shape = p.to_local().shape
    out: dict[str, Any] = {}
    coded = set()
    for codes_key, scales_key, block, per_byte in codec.coded_entries(sharded):
        shape = _record(codes_key, sharded)
        if not row_layout(shape, block, per_byte) or shape[0] != p.shape[0]:
            raise RuntimeError(f"state entry {codes_key!r} of shape {tuple(shape)} is not split like its parameter")
        out[codes_key] = sharded[codes_key].to_local().view(local_shape)
        out[scales_key] = sharded[scales_key].to_local().reshape(-1)
        coded |= {codes_key, scales_key, codes_key + SHAPE}
    for key, value in sharded.items():
        if key not in coded:
            out[key] = value.to_local() if isinstance(value, DTensor) else value
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


def from_local(sharded: dict[str, Any], local: dict[str, Any], p: DTensor) -> None:
    """Write back into ``sharded`` (in place) what a step on :func:`to_local`'s view changed:
    tensors it replaced are copied into the shards, new ones become DTensors split like ``p``'s
    rows, entries it dropped are dropped."""
    rows, mesh = p.shape[0], p.device_mesh
    fresh: dict[str, Any] = {}
    coded = set()
    for codes_key, scales_key, _, _ in codec.coded_entries(local):
        codes, scales = local[codes_key], local[scales_key]
        fresh[codes_key] = codes.reshape(codes.shape[0], -1)
        fresh[scales_key] = scales.reshape(codes.shape[0], -1)
        fresh[codes_key + SHAPE] = torch.tensor((rows, *codes.shape[1:]), dtype=torch.int64)
        coded |= {codes_key, scales_key}
    for key, value in local.items():
        if key not in coded:
            fresh[key] = value
    for key in [k for k in sharded if k not in fresh]:
        del sharded[key]
    for key, value in fresh.items():
        held = sharded.get(key)
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or key.endswith(SHAPE):
            if not (key.endswith(SHAPE) and isinstance(held, torch.Tensor)):
                sharded[key] = value
        elif isinstance(held, DTensor) and held.shape[1:] == value.shape[1:] and held.dtype == value.dtype:
            target = held.to_local()
            if not _same(target, value):
                target.copy_(value.reshape(target.shape))
        else:
            sharded[key] = from_rows(value.contiguous(), rows, mesh)


def local_bytes(state: dict[str, Any]) -> int:
    """Bytes of one parameter's state held by this rank (a DTensor counts its local shard)."""
    total = 0
    for value in state.values():
        if isinstance(value, DTensor):
            value = value.to_local()
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total
