"""optim_bits=8: GaLoreAdamW (and AdamW groups) with block-wise 8-bit Adam moments (state8bit)."""

from __future__ import annotations

import copy

import pytest
import torch

import galorex
from galorex import GaLoreAdamW, NaturalGaLoreAdamW
from galorex.optim.codec import load_moment

pytestmark = pytest.mark.usefixtures("single_thread")


from problems import assert_resume_is_bit_for_bit
from problems import make_regression_model as make_model
from problems import regression_groups as make_groups
from problems import train_regression as train


@pytest.mark.parametrize("bad", [16, 0, "8", True, 8.0])
def test_optim_bits_must_be_8_or_32(bad):
    model = make_model()
    with pytest.raises(ValueError, match=r"param_groups\[0\].*'optim_bits'"):
        GaLoreAdamW(make_groups(model, optim_bits=bad), lr=1e-3)
    with pytest.raises(ValueError, match=r"'optim_bits'"):
        GaLoreAdamW(model.parameters(), lr=1e-3, optim_bits=bad)


def test_large_moments_are_uint8_small_ones_float32():
    model = make_model()
    opt = GaLoreAdamW(make_groups(model, rank=48), lr=1e-3, optim_bits=8)
    train(model, opt, 1)
    big = opt.state[model[0].weight]  # 128×64 weight, right side: low-rank 128×48 = 6144 entries
    assert big["exp_avg_q"].dtype == torch.uint8 and big["exp_avg_sq_q"].dtype == torch.uint8
    assert big["exp_avg_absmax"].dtype == torch.float32 and "exp_avg" not in big
    small = opt.state[model[0].bias]  # 128 entries: below the 4096 threshold
    assert small["exp_avg"].dtype == torch.float32 and "exp_avg_q" not in small


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proj_type", ["std", "left", "full"])
def test_measured_bytes_equal_estimate(dtype, proj_type):
    model = make_model(dtype=dtype)
    groups = make_groups(model, rank=40, proj_type=proj_type)
    expected = galorex.estimate_optimizer_state_bytes(groups, optim_bits=8)
    opt = GaLoreAdamW(groups, lr=1e-3, optim_bits=8)
    train(model, opt, 1)
    assert galorex.optimizer_state_bytes(opt) == expected
    full_precision = galorex.estimate_optimizer_state_bytes(make_groups(model, rank=40, proj_type=proj_type))
    # full: 40×40 low-rank moments are under 4096 entries and stay float32 (for bf16 weights the
    # small unprojected moments are then float32 too, not bf16), so only the others must shrink
    if proj_type != "full":
        assert expected < full_precision


def test_eight_bit_follows_the_32_bit_trajectory():
    """Measured (this seed, 200 steps, lr 3e-3): 32-bit ends at 0.2430, 8-bit at 0.2283 (−6.1 %);
    8-bit rounding cannot follow Adam's slow second-moment EMA exactly (see state8bit), so the
    runs part, but both descend alike. Stated tolerance: final losses within 10 %, and the 8-bit
    loss at every 20th step within 15 % of the 32-bit one."""
    m32, m8 = make_model(), make_model()
    l32 = train(m32, GaLoreAdamW(make_groups(m32), lr=3e-3), 200)
    l8 = train(m8, GaLoreAdamW(make_groups(m8), lr=3e-3, optim_bits=8), 200)
    assert l32[-1] < 0.3 * l32[0]
    assert abs(l8[-1] - l32[-1]) / l32[-1] < 0.10
    for a, b in zip(l32[::20], l8[::20]):
        assert abs(a - b) / a < 0.15


def test_adamw_group_in_eight_bits_tracks_torch_adamw():
    m_ref, m8 = make_model(), make_model()
    ref = train(m_ref, torch.optim.AdamW(m_ref.parameters(), lr=3e-3, weight_decay=0.1), 100)
    got = train(m8, GaLoreAdamW(m8.parameters(), lr=3e-3, weight_decay=0.1, optim_bits=8), 100)
    assert abs(got[-1] - ref[-1]) / ref[-1] < 0.10


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLoreAdamW])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_round_trip_continues_bit_for_bit(cls, dtype):
    def fresh(model):
        return cls(make_groups(model, gap=7, moment_policy="reproject"), lr=3e-3, optim_bits=8)

    def check(resumed, opt2):
        st = opt2.state[resumed[0].weight]
        assert st["exp_avg_q"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32
        assert opt2.state[resumed[0].bias]["exp_avg"].dtype == torch.float32  # small: float32, even for bf16

    assert_resume_is_bit_for_bit(fresh, dtype=dtype, on_load=check)


def test_reset_policy_with_eight_bits_zeroes_the_moments():
    model = make_model()
    opt = GaLoreAdamW(make_groups(model, gap=3, moment_policy="reset"), lr=3e-3, optim_bits=8)
    train(model, opt, 3)
    before = copy.deepcopy(opt.state[model[0].weight]["exp_avg_q"])
    train(model, opt, 1)  # the refresh at step 3 resets, then one update: |m| = (1-β1)|g| everywhere
    m = load_moment(opt.state[model[0].weight], "exp_avg")
    assert not torch.equal(before, opt.state[model[0].weight]["exp_avg_q"])
    assert torch.isfinite(m).all() and m.abs().max() > 0


# ----------------------------------------------------------------------------- 4- and 8-bit bases
@pytest.mark.parametrize("bad", [2, 16, 0, "4", True])
def test_basis_bits_must_be_4_8_or_32(bad):
    model = make_model()
    with pytest.raises(ValueError, match=r"param_groups\[0\].*'basis_bits'"):
        GaLoreAdamW(make_groups(model, basis_bits=bad), lr=1e-3)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("proj_type", ["std", "left", "full"])
@pytest.mark.parametrize("cls_name", ["GaLoreAdamW", "GradNormLoRPAdamW", "NaturalGaLoreAdamW"])
def test_compact_basis_is_stored_compactly_and_counted_exactly(proj_type, cls_name, bits):
    cls = getattr(galorex, cls_name)
    kind = "gradnorm_lorp" if cls_name == "GradNormLoRPAdamW" else "galore"
    model = make_model()
    groups = make_groups(model, rank=40, proj_type=proj_type)
    extra = {"natural_history": 3} if cls_name == "NaturalGaLoreAdamW" else {}
    expected = galorex.estimate_optimizer_state_bytes(groups, optimizer=kind, optim_bits=8, basis_bits=bits, **extra)
    opt = cls(groups, lr=1e-3, optim_bits=8, basis_bits=bits, **extra)
    train(model, opt, 3)
    state = opt.state[model[0].weight]
    key = "basis_left" if proj_type == "full" else "basis"
    codes = state[key + f"_q{bits}"]
    assert key not in state and codes.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert galorex.optimizer_state_bytes(opt) == expected


@pytest.mark.parametrize("bits,gram_tol,loss_tol", [(4, 0.1, 0.05), (8, 0.01, 0.01)])
def test_compact_bases_stay_nearly_orthonormal_and_training_holds(bits, gram_tol, loss_tol):
    """Measured (this problem, 200 steps, lr 3e-3): 32-bit basis 0.2430, 4-bit basis 0.2443 (+0.5 %);
    max |PᵀP − I| of the 4-bit basis 0.080. Stated tolerances: 5 % and 0.1 (4-bit), 1 % and 0.01
    (8-bit, whose code step is 18× finer)."""
    from galorex.optim.base import load_bases

    m32, mq = make_model(), make_model()
    l32 = train(m32, GaLoreAdamW(make_groups(m32), lr=3e-3), 200)
    optq = GaLoreAdamW(make_groups(mq, basis_bits=bits), lr=3e-3)
    lq = train(mq, optq, 200)
    (basis,) = load_bases(optq.state[mq[0].weight], "right", mq[0].weight, 48)
    gram = basis.mT @ basis
    assert (gram - torch.eye(gram.shape[0])).abs().max() < gram_tol
    assert abs(lq[-1] - l32[-1]) / l32[-1] < loss_tol


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("policy", ["keep", "reproject", "reset"])
def test_compact_basis_checkpoint_continues_bit_for_bit(policy, bits):
    def fresh(model):
        return GaLoreAdamW(make_groups(model, gap=7, moment_policy=policy), lr=3e-3, optim_bits=8, basis_bits=bits)

    assert_resume_is_bit_for_bit(fresh)
