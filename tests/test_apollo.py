"""ApolloAdamW and APOLLO-Mini: the same run as the reference package ``apollo-torch`` 1.0.3
(``apollo_torch.APOLLOAdamW``) with the SVD projection and with the random one (same seeds: the
same matrices), every scale type and flag; a plain float64 twin where apollo-torch cannot run; the
seed chain; bit-for-bit resume with the projection regenerated; layer-wise, compiled and 8-bit
steps; validation; the state on the Llama-60M shapes."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from norm_scaled_support import (
    Twin,
    apollo_random_basis,
    make_bias_free,
    quiet_import,
    rel_err,
    split_groups,
    svd_basis,
    twin_run,
)
from problems import assert_resume_is_bit_for_bit, make_regression_model, regression_groups, train_regression

import galorex
from galorex import ApolloAdamW, galore_param_groups
from galorex.models.llama import Llama, get_config
from galorex.optim.apollo import PROJ_SEED, apollo_multiplier, apollo_update, next_seed, random_projection
from galorex.optim.fira import LIMITER_NORM
from galorex.optim.rules.apollo import channel_norms

pytestmark = pytest.mark.usefixtures("single_thread")


def _reference_run(keys: dict, flags: dict, steps: int = 50, weight_decay: float = 0.1):
    """The regression model (tall 128×64 and wide 96×128 weights at rank 8, refreshes at 0, 20,
    40; biases on AdamW) trained by apollo-torch and by galorex with eps_mode="galore_torch"."""
    Ref = quiet_import("apollo_torch", "APOLLOAdamW")
    ref_model = make_regression_model()
    ours_model = copy.deepcopy(ref_model)
    init = [p.detach().clone() for p in ref_model.parameters()]
    keys = {"rank": 8, "update_proj_gap": 20, **keys}
    hyper = dict(lr=3e-3, eps=1e-6, weight_decay=weight_decay)
    ref = Ref(split_groups(ref_model, keys), **hyper, **flags)
    ours = ApolloAdamW(split_groups(ours_model, keys), eps_mode="galore_torch", **hyper, **flags)
    train_regression(ref_model, ref, steps)
    train_regression(ours_model, ours, steps)
    for (name, a), b, p0 in zip(ours_model.named_parameters(), ref_model.parameters(), init):
        assert rel_err(b, p0) > 1e-3, name  # it moved
        assert rel_err(a, b) < 1e-5, name
    return ref_model, ref, ours_model, ours


FLAGS = {
    "limiter": {},
    "no-limiter": {"disable_nl": True},
    "scale-front": {"scale_front": True},
}


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("proj", ["svd", "random"])
def test_matches_apollo_torch(proj, scale_type, flags):
    """std projection (the tall weight from the right, the wide one from the left), scale 4 (a ×2
    multiplier): within 1e-5 of apollo-torch after 50 steps. With proj="random" the projections are
    apollo-torch's very matrices (same seeds, same generator), so this is equivalence too."""
    keys = {"proj": proj, "scale_type": scale_type, "scale": 4.0, "proj_type": "std"}
    ref_model, ref, ours_model, ours = _reference_run(keys, FLAGS[flags])
    w, rw = ours_model[0].weight, ref_model[0].weight
    if flags != "no-limiter":
        torch.testing.assert_close(ours.state[w][LIMITER_NORM], ref.state[rw]["scaled_grad"], rtol=1e-5, atol=0)
    if proj == "random":  # apollo-torch keeps the seed of the next draw, galorex the current one
        assert next_seed(int(ours.state[w][PROJ_SEED])) == ref.state[rw]["projector"].seed


@pytest.mark.parametrize("proj_type", ["reverse_std", "left", "right"])
@pytest.mark.parametrize("proj", ["svd", "random"])
def test_other_projection_sides_match_apollo_torch_tensorwise(proj, proj_type):
    """apollo-torch runs the other one-sided proj_types with tensor-wise scaling (``full`` fails
    there — NotImplementedError for the random projection, a crash at the second SVD step — and
    galorex refuses it, see test_bad_group_keys_name_group_and_key)."""
    _reference_run({"proj": proj, "scale_type": "tensor", "scale": 1.0, "proj_type": proj_type}, {})


@pytest.mark.parametrize("limiter", [True, False])
@pytest.mark.parametrize("scale_front", [False, True])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_one_pass_multiplier_equals_the_plain_update(side, scale_type, scale_front, limiter):
    """The optimizer's path (a multiplier μ, G ⊙ μ written in one addcmul, ‖G ⊙ s‖ from channel
    norms) against apollo_update, which forms G ⊙ s and limits it as the paper writes it: float64
    rounding apart (a few ε), for the first step and a limited one."""
    g = torch.Generator().manual_seed(4)
    G = torch.randn(9, 7, generator=g, dtype=torch.float64)
    basis = (
        torch.randn(9, 3, generator=g, dtype=torch.float64)
        if side == "left"
        else torch.randn(7, 3, generator=g, dtype=torch.float64)
    )
    low = basis.T @ G if side == "left" else G @ basis
    direction = torch.randn(low.shape, generator=g, dtype=torch.float64)
    for previous in (torch.tensor(float("inf"), dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)):
        prev = previous if limiter else None
        u, n1 = apollo_update(G, low, direction, side, scale_type, 3.0, scale_front, prev)
        mu, n2 = apollo_multiplier(G, low, direction, side, scale_type, 3.0, scale_front, prev)
        torch.testing.assert_close(G * mu, u, rtol=1e-13, atol=0)
        if limiter:
            torch.testing.assert_close(n2, n1, rtol=1e-13, atol=0)
        else:
            assert n1 is None and n2 is None


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("axis", [0, 1])
def test_channel_norms_equal_vector_norm(axis, dtype, layout):
    """The multiplier's channel norms (a column's as square-sum-sqrt on the CPU) against torch's
    vector_norm in float64, on columns whose scales span 10⁻³…10³. Each norm sums k squares: a
    float64 sum is within k·u₆₄ relative, plus one rounding for each square and the root; a float32
    input adds its own rounding (2·u₃₂ on a square) and a k·u₃₂ float32 sum."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 170, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 170, dtype=torch.float64)
    if layout == "transposed":  # a strided matrix takes vector_norm itself
        x = x.T.contiguous().T
    reference = torch.linalg.vector_norm(x, dim=axis)
    k = x.shape[axis]
    u = torch.finfo(dtype).eps / 2
    rtol = (k + 3) * u + (k + 3) * torch.finfo(torch.float64).eps / 2
    fast = channel_norms(x.to(dtype), axis)
    assert fast.dtype == dtype and fast.shape == reference.shape
    torch.testing.assert_close(fast.double(), reference, rtol=rtol, atol=0)


def test_next_seed_and_projection_are_apollo_torchs():
    rp = pytest.importorskip("apollo_torch.random_projector")
    seed = 3
    for _ in range(4):
        assert next_seed(seed) == rp.next_seed(seed)
        seed = next_seed(seed)
    ref_right = rp.stable_randn((4, 9), seed=seed) / 2.0
    assert torch.equal(random_projection(7, 9, 4, "right", seed, torch.device("cpu"), torch.float32), ref_right.T)
    ref_left = rp.stable_randn((7, 4), seed=seed) / 2.0
    assert torch.equal(random_projection(7, 9, 4, "left", seed, torch.device("cpu"), torch.float32), ref_left)


@pytest.mark.parametrize("eps_mode", ["torch", "galore_torch"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("proj", ["svd", "random"])
def test_channelwise_matches_float64_twin(proj, proj_type, eps_mode):
    """float64, 30 steps, refreshes every 7, channel-wise: galorex against the plain twin, for the
    sides apollo-torch computes along the wrong axis too (its norm_dim follows G's shape, not the
    projected side). The random bases come from apollo-torch's own seed chain and generator.
    Float64 rounding only: 1e-10 leaves ~10⁵ ε for 30 steps of Adam's division by √v."""
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    ours_model = make_bias_free()
    twin_model = copy.deepcopy(ours_model)
    keys = {"rank": 3, "update_proj_gap": 7, "proj": proj, "scale_type": "channel", "scale": 2.0}
    opt = ApolloAdamW(
        [{"params": list(ours_model.parameters()), "proj_type": proj_type, **keys}],
        eps_mode=eps_mode,
        weight_decay=0.05,
        **hyper,
    )
    twins = [
        Twin(
            "apollo",
            proj_type=proj_type,
            gap=7,
            eps_mode=eps_mode,
            limiter=True,
            wd=0.05,
            basis=functools.partial(svd_basis, rank=3) if proj == "svd" else apollo_random_basis(i + 1, 3),
            scale_type="channel",
            scale=2.0,
            **hyper,
        )
        for i in range(2)
    ]
    twin_run(ours_model, opt, None, 30)
    twin_run(twin_model, None, twins, 30)
    for a, b in zip(ours_model.parameters(), twin_model.parameters()):
        assert rel_err(a, b) < 1e-10


def test_resume_is_bit_for_bit_with_the_projection_regenerated():
    """Random projection: the checkpoint holds its seed, not the matrix; a resume after a refresh
    (at 0, 5; checkpoint at 7) continues bit for bit, and the next refresh (10) draws the same seed."""

    def fresh(model):
        return ApolloAdamW(regression_groups(model, rank=8, gap=5), lr=3e-3, weight_decay=0.01)

    def on_load(model, opt):
        state = opt.state[model[0].weight]
        assert not any(k.startswith("basis") for k in state)
        assert state[PROJ_SEED].dtype == torch.int64 and state[PROJ_SEED].device.type == "cpu"
        assert int(state[PROJ_SEED]) == next_seed(1)  # parameter 1's second seed

    assert_resume_is_bit_for_bit(fresh, before=7, after=6, on_load=on_load)


def test_bf16_weights_keep_float32_state_across_a_checkpoint():
    """The base class keeps subspace state in its dtype when it sees a basis; APOLLO's random
    projection has none, and ApolloAdamW.load_state_dict keeps it float32 all the same."""
    model = make_regression_model(dtype=torch.bfloat16)
    opt = ApolloAdamW(regression_groups(model, rank=8, gap=5), lr=3e-3)
    train_regression(model, opt, 3)
    opt2 = ApolloAdamW(regression_groups(model, rank=8, gap=5), lr=3e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    state = opt2.state[model[0].weight]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", LIMITER_NORM)} == {torch.float32}
    assert state["step"].device.type == "cpu" and state[PROJ_SEED].dtype == torch.int64


@pytest.mark.parametrize("proj", ["random", "svd"])
def test_layerwise_matches_normal_mode(proj):
    def run(layerwise):
        model = make_regression_model()
        opt = ApolloAdamW(regression_groups(model, rank=8, gap=2, proj=proj), lr=3e-3, layerwise=layerwise)
        train_regression(model, opt, 5)
        return model

    for a, b in zip(run(False).parameters(), run(True).parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_compiled_update_matches_eager():
    """compile=True (aot_eager) with a tensor lr, random projection regenerated outside the graph:
    one graph for refresh and ordinary steps, eager's weights to float32 rounding."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    models, opts = [], []
    for compile in (False, {"backend": backend}):
        model = make_regression_model()
        opts.append(ApolloAdamW(regression_groups(model, rank=8, gap=3), lr=torch.tensor(2e-3), compile=compile))
        models.append(model)
    for _ in range(5):
        for model, opt in zip(models, opts):
            train_regression(model, opt, 1)
    for a, b in zip(models[1].parameters(), models[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("proj", ["random", "svd"])
def test_eight_bit_moments_train_and_are_counted(proj):
    model = make_regression_model()
    groups = regression_groups(model, rank=48, gap=5, proj=proj)
    opt = ApolloAdamW(groups, lr=3e-3, optim_bits=8)
    losses = train_regression(model, opt, 15)
    assert losses[-1] < 0.9 * losses[0]
    assert opt.state[model[0].weight]["exp_avg_q"].dtype == torch.uint8
    assert galorex.optimizer_state_bytes(opt) == galorex.estimate_optimizer_state_bytes(
        groups, optimizer="apollo", optim_bits=8
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("proj", ["random", "svd"])
def test_measured_state_equals_estimate(proj, dtype):
    model = make_regression_model(dtype=dtype)
    groups = regression_groups(model, rank=8, gap=5, proj=proj)
    opt = ApolloAdamW(groups, lr=1e-3)
    train_regression(model, opt, 1)
    assert galorex.optimizer_state_bytes(opt) == galorex.estimate_optimizer_state_bytes(groups, optimizer="apollo")


def test_mini_preset():
    model = make_regression_model()
    opt = ApolloAdamW.mini(regression_groups(model, rank=48), lr=1e-3, update_proj_gap=7)
    projected = opt.param_groups[0]
    assert {k: projected[k] for k in ("rank", "scale_type", "proj", "scale", "update_proj_gap")} == {
        "rank": 1,
        "scale_type": "tensor",
        "proj": "random",
        "scale": 128.0,
        "update_proj_gap": 50,  # a group's own key wins over the constructor's, as everywhere
    }
    assert "rank" not in opt.param_groups[1]
    losses = train_regression(model, opt, 10)
    assert losses[-1] < losses[0]
    assert opt.state[model[0].weight]["exp_avg"].shape == (128, 1)
    with pytest.raises(TypeError, match="'rank'"):
        ApolloAdamW.mini(regression_groups(model), rank=2)
    with pytest.raises(ValueError, match="parameter groups"):
        ApolloAdamW.mini(model.parameters())


def test_llama60m_state():
    """Llama-60M on the meta device, measured on a model of the same shapes elsewhere
    (tests/test_bench.py runs the memory bench): APOLLO-Mini ≤ 2 % of AdamW's state, APOLLO at
    rank 128 ≤ GaLore's."""
    with torch.device("meta"):
        model = Llama(get_config("llama-60m"))
    adamw = galorex.estimate_optimizer_state_bytes(model, optimizer="adamw")
    galore = galorex.estimate_optimizer_state_bytes(galore_param_groups(model, rank=128))
    apollo = galorex.estimate_optimizer_state_bytes(galore_param_groups(model, rank=128), optimizer="apollo")
    mini_groups = galore_param_groups(model, rank=1, scale=128.0, scale_type="tensor", proj="random")
    mini = galorex.estimate_optimizer_state_bytes(mini_groups, optimizer="apollo")
    assert apollo <= galore
    # The embeddings and the head (2 × 32000 × 512) stay on AdamW: Mini's state is all theirs.
    projected_mini = galorex.estimate_optimizer_state_bytes([mini_groups[-1]], optimizer="apollo")
    projected_adamw = galorex.estimate_optimizer_state_bytes([mini_groups[-1]], optimizer="adamw")
    assert projected_mini <= 0.02 * projected_adamw
    assert mini < adamw


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"proj": "gaussian"}, r"param_groups\[0\]: 'proj' must be one of"),
        ({"scale_type": "row"}, r"param_groups\[0\]: 'scale_type' must be one of"),
        ({"scale_front": "yes"}, r"param_groups\[0\]: 'scale_front' must be True or False"),
        ({"disable_nl": 0}, r"param_groups\[0\]: 'disable_nl' must be True or False"),
        ({"proj_type": "full"}, r"param_groups\[0\]: 'proj_type' 'full' is not an APOLLO projection"),
        ({"proj": "svd", "scale_type": "tensor", "proj_type": "full"}, r"'proj_type' 'full' is not"),
        ({"basis_bits": 4}, r"param_groups\[0\]: 'basis_bits' applies to a stored basis"),
        ({"refresh_method": "randomized"}, r"param_groups\[0\]: 'refresh_method'"),
        ({"moment_policy": "reproject"}, r"param_groups\[0\]: 'moment_policy' 'reproject' needs orthonormal"),
        ({"scale": 0.0}, r"param_groups\[0\]: 'scale' must be a finite number > 0"),
    ],
)
def test_bad_group_keys_name_group_and_key(keys, match):
    model = make_regression_model()
    with pytest.raises(ValueError, match=match):
        ApolloAdamW(regression_groups(model, rank=8, **keys), lr=1e-3)


def test_reset_policy_restarts_the_moments_at_a_new_seed():
    model = make_regression_model()
    opt = ApolloAdamW(regression_groups(model, rank=8, gap=3, moment_policy="reset"), lr=1e-3)
    train_regression(model, opt, 3)
    state = opt.state[model[0].weight]
    train_regression(model, opt, 1)  # step 3 draws a new projection and resets the moments
    assert int(state["proj_step"]) == 3 and int(state[PROJ_SEED]) == next_seed(1)
    assert int(state["step"]) == 4
    # One step from zero: m = (1 − β₁)R and v = (1 − β₂)R², so m²/v = (1 − β₁)²/(1 − β₂) everywhere.
    m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
    torch.testing.assert_close(m * m / v, torch.full_like(v, 0.1**2 / 0.001), rtol=1e-5, atol=0)


def test_unprojected_groups_are_torch_adamw():
    model = make_regression_model()
    ref = copy.deepcopy(model)
    opt = ApolloAdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, fused=True)  # the default's kernel
    train_regression(model, opt, 5)
    train_regression(ref, torch_opt, 5)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fira", "apollo", "apollo-mini"])
def test_galorex_train_runs_them_with_their_own_defaults(tmp_path, name):
    """`galorex-train --optimizer fira|apollo|apollo-mini`: without --lr/--scale each gets its own
    defaults (factory.DEFAULT_LR, DEFAULT_SCALE; APOLLO-Mini its preset), recorded in the run's
    config, and the checkpoint loads with weights_only=True."""
    from problems import tiny_train_args

    from galorex.optim.factory import DEFAULT_LR
    from galorex.train.cli import main

    out = tmp_path / "run"
    assert main(tiny_train_args(sample_tokens=0) + ["--optimizer", name, "--steps", "2", "--out", str(out)]) == 0
    ckpt = torch.load(sorted(out.glob("**/ckpt-*.pt"))[-1], weights_only=True)
    assert ckpt["config"]["lr"] == DEFAULT_LR[name]
    projected = [g for g in ckpt["optimizer"]["param_groups"] if g.get("rank")]
    expected = {
        "fira": {"alpha": 0.25, "rank": 32},
        "apollo": {"scale": 1.0, "proj": "random", "scale_type": "channel", "rank": 32},
        "apollo-mini": {"scale": 128.0, "proj": "random", "scale_type": "tensor", "rank": 1},
    }[name]
    assert projected and all({k: g[k] for k in expected} == expected for g in projected)


def test_factory_refuses_a_scale_for_apollo_mini():
    from galorex.optim.factory import build_optimizer

    with pytest.raises(ValueError, match="apollo-mini sets its scale"):
        build_optimizer("apollo-mini", Llama(get_config("llama-tiny")), lr=1e-3, scale=2.0)


def test_fsdp2_parameters_are_accepted():
    """A DTensor (FSDP2-sharded) parameter is taken by both (the FSDP2 placement steps every rule;
    tests/test_distributed.py compares them with one process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from galorex import FiraAdamW

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        for cls in (FiraAdamW, ApolloAdamW):
            opt = cls([{"params": [w], "rank": 2}], lr=1e-3)
            w.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
            before = w.full_tensor().clone()
            opt.step()
            assert not torch.equal(before, w.full_tensor())
    finally:
        dist.destroy_process_group()
