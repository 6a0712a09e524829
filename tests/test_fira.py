"""FiraAdamW: the same run as the reference package ``fira`` 1.0.2 (``fira.FiraAdamW``), the same
run as a plain float64 twin (tests/norm_scaled_support.py) with the limiter on and off and both ε
placements, the pure functions, bit-for-bit resume, layer-wise and compiled steps, 8-bit moments,
validation and the state count."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from norm_scaled_support import (
    Twin,
    make_bias_free,
    quiet_import,
    rel_err,
    split_groups,
    svd_basis,
    twin_run,
)
from problems import assert_resume_is_bit_for_bit, make_regression_model, regression_groups, train_regression

import galorex
from galorex import FiraAdamW, GaLoreAdamW, galore_param_groups
from galorex.models.llama import Llama, get_config
from galorex.optim.fira import LIMITER_NORM, channel_norm_ratio, fira_update, limit_norm_growth

pytestmark = pytest.mark.usefixtures("single_thread")

PROJ_TYPES = ("std", "reverse_std", "left", "right")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_fira_reference(proj_type, weight_decay):
    """50 float32 steps of the regression model (a tall 128×64 and a wide 96×128 weight at rank 8,
    refreshes at 0, 20, 40; biases on the reference's AdamW), with eps_mode="galore_torch" — fira's
    arithmetic, ε on √v and decay after the step — agree to float32 rounding."""
    Ref = quiet_import("fira", "FiraAdamW")
    ref_model = make_regression_model()
    ours_model = copy.deepcopy(ref_model)
    init = [p.detach().clone() for p in ref_model.parameters()]
    keys = {"rank": 8, "update_proj_gap": 20, "alpha": 0.25, "proj_type": proj_type}
    hyper = dict(lr=3e-3, eps=1e-6, weight_decay=weight_decay)
    ref = Ref(split_groups(ref_model, keys), no_deprecation_warning=True, **hyper)
    ours = FiraAdamW(split_groups(ours_model, keys), eps_mode="galore_torch", **hyper)
    train_regression(ref_model, ref, 50)
    train_regression(ours_model, ours, 50)
    for (name, a), b, p0 in zip(ours_model.named_parameters(), ref_model.parameters(), init):
        assert rel_err(b, p0) > 1e-3, name  # it moved
        assert rel_err(a, b) < 1e-5, name
    # The limiter was active: its state is the reference's last (limited) residual norm.
    w = ours_model[0].weight
    torch.testing.assert_close(
        ours.state[w][LIMITER_NORM], ref.state[ref_model[0].weight]["scaling_grad"], rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("eps_mode", ["torch", "galore_torch"])
@pytest.mark.parametrize("limiter", [True, False], ids=["limiter", "no-limiter"])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_float64_twin(proj_type, limiter, eps_mode):
    """float64, 30 steps, refreshes every 7: galorex and the plain twin differ by float64 rounding
    only (the bases come from the same SVD of the same gradient); 1e-10 leaves a margin of ~10⁵ ε
    for 30 steps of Adam's division by √v."""
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours_model = make_bias_free()
    twin_model = copy.deepcopy(ours_model)
    keys = {"rank": 3, "update_proj_gap": 7, "alpha": 0.5, "proj_type": proj_type}
    opt = FiraAdamW(
        [{"params": list(ours_model.parameters()), **keys}], disable_nl=not limiter, eps_mode=eps_mode, **hyper
    )
    twins = [
        Twin(
            "fira",
            proj_type=proj_type,
            gap=7,
            eps_mode=eps_mode,
            limiter=limiter,
            basis=functools.partial(svd_basis, rank=3),
            alpha=0.5,
            wd=hyper["weight_decay"],
            **{k: v for k, v in hyper.items() if k != "weight_decay"},
        )
        for _ in range(2)
    ]
    twin_run(ours_model, opt, None, 30)
    twin_run(twin_model, None, twins, 30)
    for a, b in zip(ours_model.parameters(), twin_model.parameters()):
        assert rel_err(a, b) < 1e-10


def test_limiter_caps_growth_and_passes_the_first_step():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64)
    out, norm = limit_norm_growth(s, torch.tensor(math.inf, dtype=torch.float64))
    assert torch.equal(out, s) and norm == s.norm()
    out, norm = limit_norm_growth(10 * s, norm)  # grew 10×: brought back to 1.01× the last norm
    # ℓ = (10‖s‖ / (‖s‖ + 1e-8)) / 1.01, so the new norm is 10‖s‖ / ℓ = 1.01 (‖s‖ + 1e-8)
    assert norm.item() == pytest.approx(1.01 * (s.norm().item() + 1e-8), rel=1e-14)
    assert out.norm().item() == pytest.approx(norm.item(), rel=1e-12)
    small, n2 = limit_norm_growth(0.5 * s, norm)  # shrinking is never limited
    assert torch.equal(small, 0.5 * s) and n2.item() == pytest.approx(0.5 * s.norm().item(), rel=1e-15)


def test_fira_update_keeps_the_whole_gradient_at_alpha_one():
    """With α = 1 and Adam's direction equal to R (φ = 1), Fira's update is G itself: the subspace
    part and the residual add up to the full gradient."""
    g = torch.randn(9, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64)).Q
    low = g @ basis
    assert torch.allclose(channel_norm_ratio(low, low, "right"), torch.ones(9, 1, dtype=torch.float64), atol=1e-7)
    update, norm = fira_update(g, low, low, [basis], "right", 1.0, None)
    assert norm is None
    # φ_c = ‖R_c‖ / (‖R_c‖ + 1e-8) = 1 − δ_c, δ_c ≤ 1e-8 / ‖R_c‖: the residual comes back that much short
    residual = g - low @ basis.T
    bound = residual.abs().max().item() * 1e-8 / low.norm(dim=1).min().item() + 1e-14
    torch.testing.assert_close(update, g, rtol=0, atol=bound)


def test_resume_is_bit_for_bit():
    def fresh(model):
        return FiraAdamW(regression_groups(model, rank=8, gap=5, alpha=0.25), lr=3e-3, weight_decay=0.01)

    def on_load(model, opt):
        assert opt.state[model[0].weight][LIMITER_NORM].dtype == torch.float32

    assert_resume_is_bit_for_bit(fresh, before=7, after=6, on_load=on_load)


def test_bf16_weights_keep_float32_state_across_a_checkpoint():
    model = make_regression_model(dtype=torch.bfloat16)
    opt = FiraAdamW(regression_groups(model, rank=8, gap=5), lr=3e-3)
    train_regression(model, opt, 3)
    opt2 = FiraAdamW(regression_groups(model, rank=8, gap=5), lr=3e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    state = opt2.state[model[0].weight]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", LIMITER_NORM, "basis")} == {torch.float32}


def test_layerwise_matches_normal_mode():
    def run(layerwise):
        model = make_regression_model()
        opt = FiraAdamW(regression_groups(model, rank=8, gap=2, alpha=0.25), lr=3e-3, layerwise=layerwise)
        train_regression(model, opt, 5)
        return model

    for a, b in zip(run(False).parameters(), run(True).parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_compiled_update_matches_eager():
    """compile=True (aot_eager: dynamo's graph, no code generation) with a tensor lr: one graph
    across refresh and ordinary steps, eager's weights to float32 rounding."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    models, opts = [], []
    for compile in (False, {"backend": backend}):
        model = make_regression_model()
        groups = regression_groups(model, rank=8, gap=3, alpha=0.25)
        opts.append(FiraAdamW(groups, lr=torch.tensor(2e-3), weight_decay=0.1, compile=compile))
        models.append(model)
    for _ in range(5):
        for model, opt in zip(models, opts):
            train_regression(model, opt, 1)
    for a, b in zip(models[1].parameters(), models[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1
    torch._dynamo.reset()


def test_eight_bit_moments_train_and_are_counted():
    model = make_regression_model()
    groups = regression_groups(model, rank=48, gap=5, alpha=0.25)
    opt = FiraAdamW(groups, lr=3e-3, optim_bits=8)
    losses = train_regression(model, opt, 15)
    assert losses[-1] < 0.9 * losses[0]
    assert opt.state[model[0].weight]["exp_avg_q"].dtype == torch.uint8
    assert galorex.optimizer_state_bytes(opt) == galorex.estimate_optimizer_state_bytes(
        groups, optimizer="fira", optim_bits=8
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_is_galores_plus_one_scalar_per_matrix(dtype):
    """Measured after one step = the analytic count = GaLore's + one compute-dtype scalar per matrix."""
    model = make_regression_model(dtype=dtype)
    fira = FiraAdamW(regression_groups(model, rank=8, gap=5), lr=1e-3)
    galore = GaLoreAdamW(regression_groups(model, rank=8, gap=5), lr=1e-3)
    train_regression(model, fira, 1)
    train_regression(model, galore, 1)
    scalar = torch.empty((), dtype=dtype).element_size()
    measured = galorex.optimizer_state_bytes(fira)
    assert measured == galorex.estimate_optimizer_state_bytes(regression_groups(model, rank=8), optimizer="fira")
    assert measured == galorex.optimizer_state_bytes(galore) + 2 * scalar


def test_llama60m_state_equals_galores_on_meta():
    """Llama-60M (meta device): Fira's state is GaLore's plus 4 bytes for each of its 56 projected
    matrices (312.32 MiB either way)."""
    with torch.device("meta"):
        model = Llama(get_config("llama-60m"))
    groups = galore_param_groups(model, rank=128)
    fira = galorex.estimate_optimizer_state_bytes(groups, optimizer="fira")
    galore = galorex.estimate_optimizer_state_bytes(groups, optimizer="galore")
    assert fira - galore == 4 * len(groups[-1]["params"]) == 4 * 56


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"proj_type": "full"}, r"param_groups\[0\]: 'proj_type' 'full'"),
        ({"scale": 0.25, "alpha": 0.5}, r"param_groups\[0\]: give 'alpha' .* or 'scale' .*not both"),
        ({"alpha": -1.0}, r"param_groups\[0\]: 'alpha' must be a finite number > 0"),
        ({"alpha": float("nan")}, r"'alpha' must be a finite number > 0"),
        ({"disable_nl": 1}, r"param_groups\[0\]: 'disable_nl' must be True or False"),
    ],
)
def test_bad_group_keys_name_group_and_key(keys, match):
    model = make_regression_model()
    with pytest.raises(ValueError, match=match):
        FiraAdamW(regression_groups(model, rank=8, **keys), lr=1e-3)


def test_galore_groups_scale_is_alpha():
    model = make_regression_model()
    opt = FiraAdamW(galore_param_groups(model, rank=8, scale=0.3, target_modules="all-linear"), lr=1e-3)
    assert opt.param_groups[1]["alpha"] == 0.3 and "scale" in opt.param_groups[1]
    assert opt.param_groups[1]["scale"] == 1.0  # GaLore's key itself is unused (its default)


def test_scale_argument_is_refused():
    with pytest.raises(TypeError, match="alpha"):
        FiraAdamW(make_regression_model().parameters(), lr=1e-3, scale=0.25)


def test_unprojected_groups_are_torch_adamw():
    model = make_regression_model()
    ref = copy.deepcopy(model)
    opt = FiraAdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, fused=True)  # the default's kernel
    train_regression(model, opt, 5)
    train_regression(ref, torch_opt, 5)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
