"""The FSDP2 placement's pieces that need no second process (galorex.optim.sharded): how ranks split
rows, that block-coded state is grouped so that no block straddles a shard boundary and a rank's
rows quantise exactly as the whole tensor's, the round trip of every kind of state through the
sharded form, the sign convention of rotated bases, and which rules declare row-local maths.
tests/test_distributed.py runs the placement on 2 and 4 processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from galorex.optim import codec, state8bit
from galorex.optim.rules.adafactor import AdafactorRule
from galorex.optim.rules.adam import AdamRule
from galorex.optim.rules.apollo import ApolloRule
from galorex.optim.rules.fira import FiraRule
from galorex.optim.rules.gradnorm import GradNormRule
from galorex.optim.rules.natural import NaturalRule
from galorex.optim.sharded import layout
from galorex.optim.sharded.step import declares

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


@pytest.mark.parametrize("rows", [0, 1, 3, 9, 13, 48, 352])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_rows_per_rank_is_torch_chunk(rows, world):
    expected = [len(c) for c in torch.arange(rows).chunk(world)] if rows else []
    expected += [0] * (world - len(expected))
    assert layout.rows_per_rank(rows, world) == expected


def _blocked(kind: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A state holding one block-coded entry of ``kind`` as the codec stores it."""
    if kind == "moment-rows":  # 20 rows of 512: two whole blocks a row
        return state8bit.pack_moment(torch.randn(20, 512, generator=gen), state8bit.SIGNED)
    if kind == "moment-blocks":  # rows of 100 entries: blocks run across rows
        return state8bit.pack_moment(torch.randn(50, 100, generator=gen), state8bit.UNSIGNED_SQRT)
    bits, rotated = {"basis-4": (4, False), "basis-8-rotated": (8, True)}[kind]
    codes, scale = state8bit.encode_basis(torch.randn(37, 4, generator=gen), bits, rotated)
    suffix = state8bit.basis_code_suffix(bits, rotated)
    return {"basis" + suffix: codes, "basis_scale": scale}


def _as_state(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "q" in packed:
        return {"exp_avg_q": packed["q"], "exp_avg_absmax": packed["absmax"]}
    return packed


@pytest.mark.parametrize("kind", ["moment-rows", "moment-blocks", "basis-4", "basis-8-rotated"])
@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_no_block_straddles_a_shard_boundary(kind, world):
    """Codes and scales are grouped alike: whatever the world size, every rank holds whole blocks
    and exactly their scales (rank r's codes are the blocks whose scales rank r holds)."""
    state = _as_state(_blocked(kind, torch.Generator().manual_seed(0)))
    ((codes_key, scales_key, block, per_byte),) = codec.coded_entries(state)
    codes, scales = layout._groups(state[codes_key], state[scales_key], block, per_byte)
    assert codes.shape[0] == scales.shape[0]
    blocks_per_group = scales.shape[1]
    assert codes.shape[1] == blocks_per_group * block // per_byte  # whole blocks per group
    sizes = layout.rows_per_rank(codes.shape[0], world)
    flat = state[codes_key].reshape(-1)
    start = 0
    for size in sizes:  # each rank's groups are consecutive whole blocks of the flat codes
        mine = codes[start : start + size].reshape(-1)
        lo = start * codes.shape[1]
        n = min(mine.numel(), max(0, flat.numel() - lo))
        assert torch.equal(mine[:n], flat[lo : lo + n])
        assert torch.equal(
            scales[start : start + size].reshape(-1),
            state[scales_key][start * blocks_per_group :][: size * blocks_per_group],
        )
        start += size


def test_a_ranks_rows_quantise_as_the_whole_moment_does():
    """Rows that hold whole blocks: quantising any run of them alone gives exactly the codes and
    scales of those rows in the whole moment (what lets a rank step its rows of AdamW's 8-bit
    moments with no communication and stay bit for bit with one process)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 768, generator=gen) * torch.logspace(-4, 0, 24)[:, None]
    for kind in (state8bit.SIGNED, state8bit.UNSIGNED_SQRT):
        whole = state8bit.pack_moment(x.abs() if kind == state8bit.UNSIGNED_SQRT else x, kind)
        per_row = 768 // state8bit.BLOCK_SIZE
        for start, stop in ((0, 8), (8, 14), (14, 24)):
            part = x[start:stop].abs() if kind == state8bit.UNSIGNED_SQRT else x[start:stop]
            alone = state8bit.pack_moment(part, kind)
            assert torch.equal(alone["q"], whole["q"][start:stop])
            assert torch.equal(alone["absmax"], whole["absmax"][start * per_row : stop * per_row])


@pytest.fixture
def one_rank_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_every_kind_of_state_survives_the_sharded_form(one_rank_mesh):
    """to_sharded then to_full gives back every entry exactly, in its dtype and shape: 0-dim
    counters as they are, float tensors (split on their longest dimension), int64 seeds, and each
    block-coded kind with its padding dropped."""
    from torch.distributed.tensor import DTensor

    gen = torch.Generator().manual_seed(2)
    full = {"step": torch.tensor(3.0), "proj_seed": torch.tensor(7, dtype=torch.int64)}
    full["exp_avg_sq"] = torch.randn(1, 9, generator=gen, dtype=torch.float64)
    full["natural_gram"] = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    full.update(_as_state(_blocked("moment-rows", gen)))
    full.update({"mag_" + k: v for k, v in _as_state(_blocked("moment-blocks", gen)).items()})
    full.update(_blocked("basis-4", gen))
    for rows in (False, True):
        sharded = layout.to_sharded(full, one_rank_mesh, rows=rows)
        tensors = [k for k, v in sharded.items() if not k.endswith(layout.SHAPE) and v.dim() >= 1]
        assert tensors and all(isinstance(sharded[k], DTensor) for k in tensors)
        assert sharded["exp_avg_q_shape"].tolist() == [20, 512]
        (back,), extra = layout.to_full([sharded])
        assert extra == [] and back.keys() == full.keys()
        for key, value in full.items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_rotated_bases_take_a_sign_convention():
    """Flipping the sign of singular vectors (LAPACK's free choice) changes nothing stored: each
    column's largest entry is made positive before the rotation mixes the columns."""
    gen = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(64, 8, generator=gen))
    flipped = basis * torch.tensor([1.0, -1, -1, 1, -1, 1, 1, -1])
    a, codes_a = codec.encode_for_storage([basis], 8, rotated=True)
    b, codes_b = codec.encode_for_storage([flipped], 8, rotated=True)
    assert torch.equal(codes_a[0][0], codes_b[0][0]) and torch.equal(a[0], b[0])
    canonical = codec.canonical_signs(basis)
    assert torch.equal(canonical.abs(), basis.abs())
    assert (canonical.gather(0, canonical.abs().argmax(0, keepdim=True)) > 0).all()
    plain, _ = codec.encode_for_storage([flipped], 8, rotated=False)
    assert torch.equal(plain[0], codec.encode_for_storage([flipped], 8, False)[0][0])  # unrotated: untouched


def test_which_rules_declare_row_local_maths():
    """Adam's and Natural GaLore's subspace steps and AdamW's dense step are declared; rules that
    override gradient() or write() (Fira, APOLLO, GradNormLoRP) lose the subspace declaration
    without saying anything, and a subclass can repeat it."""
    for rule in (AdamRule(), NaturalRule()):
        assert declares(rule, "subspace") and declares(rule, "dense")
    for rule in (FiraRule(), ApolloRule(), GradNormRule()):
        assert not declares(rule, "subspace") and declares(rule, "dense")
    assert not declares(AdafactorRule(), "subspace") and not declares(AdafactorRule(), "dense")

    class Scaled(AdamRule):
        def write(self, group, p, state, step, bases, side, record):
            super().write(group, p, state, step, bases, side, record)

    assert not declares(Scaled(), "subspace")

    class Declared(Scaled):
        shard_local = AdamRule.shard_local

    assert declares(Declared(), "subspace")
