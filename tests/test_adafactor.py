"""GaLoreAdafactor: equivalence with galore-torch's GaLoreAdafactor, exactness against a plain
float64 reference written from the formulas, checkpoints, bad input and memory accounting."""

from __future__ import annotations

import copy
import io
import math
import warnings
from typing import Any

import problems
import pytest
import rounding
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference_galore import carry, project, project_back, side_for, svd_bases
from torch import nn

import galorex
from galorex import (
    GaLoreAdafactor,
    estimate_optimizer_state_bytes,
    optimizer_state_bytes,
)
from galorex.optim import codec, state8bit
from galorex.optim.factory import build_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
POLICIES = ("keep", "reset", "reproject")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (b the reference)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


# ============================================================================ plain float64 reference
ADAFACTOR_DEFAULTS: dict[str, Any] = {
    "lr": None,
    "eps": (1e-30, 1e-3),
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "beta1": None,
    "weight_decay": 0.0,
    "scale_parameter": True,
    "relative_step": True,
    "warmup_init": False,
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "moment_policy": "keep",
}


def _rms(t: torch.Tensor) -> float:
    return math.sqrt(float((t * t).sum()) / t.numel()) if t.numel() else 0.0


def _coded(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The state codec's round trip of a moment (``state8bit.pack_moment`` then ``unpack_moment``:
    block-wise 8 bits from 4096 entries, float32 below), back in float64."""
    return state8bit.unpack_moment(state8bit.pack_moment(x, kind), x.shape, kind).double()


class ReferenceAdafactor:
    """One parameter at a time, every formula written out (Shazeer & Stern 2018, Algorithm 4 with
    transformers' schedule; GaLore's projection with the exact SVD):

    ρ = min(1e-2 or 1e-6·t, 1/√t) or lr; α = max(ε₂, RMS(W))·ρ or ρ; β̂ = 1 − t^c;
    r = β̂r + (1−β̂)·rowmean(R²+ε₁), c = β̂c + (1−β̂)·colmean(R²+ε₁); V̂ = r cᵀ/mean(r) (vectors:
    v = β̂v + (1−β̂)(R²+ε₁)); U = R/√V̂; U = α·U/max(1, RMS(U)/d); m = β₁m + (1−β₁)U, U = m;
    W = (1 − wd·α)W − scale·back(U). Refresh at the parameter's own steps 0, T, 2T…; reset zeroes
    r, c, m and counts t of β̂ from the refresh; reproject: m ← carry(m, R), V̂ ← carry(V̂, R∘R),
    r, c = its row and column means. With ``optim_bits=8`` in the group, m and a vector's v are
    replaced by their codec round trip (:func:`_coded`) wherever the optimizer stores them: after
    each step and after a reprojection; r and c are never coded."""

    def __init__(self, groups: list[dict[str, Any]], **defaults: Any) -> None:
        self.groups = []
        for g in groups:
            full = {**ADAFACTOR_DEFAULTS, **defaults, **{k: v for k, v in g.items() if k != "params"}}
            full["params"] = [p.detach().double().clone() for p in g["params"]]
            self.groups.append(full)
        self.state: list[list[dict[str, Any]]] = [[{} for _ in g["params"]] for g in self.groups]

    def step(self, grads: list[list[torch.Tensor | None]]) -> None:
        for gi, group in enumerate(self.groups):
            for pi, p in enumerate(group["params"]):
                if grads[gi][pi] is not None:
                    group["params"][pi] = self._param_step(group, p, grads[gi][pi].double(), self.state[gi][pi])

    @staticmethod
    def _new_stats(shape: torch.Size, beta1: float | None) -> dict[str, torch.Tensor]:
        stats = {}
        if len(shape) >= 2:
            stats["r"] = torch.zeros(shape[:-1], dtype=torch.float64)
            stats["c"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float64)
        else:
            stats["v"] = torch.zeros(shape, dtype=torch.float64)
        if beta1 is not None:
            stats["m"] = torch.zeros(shape, dtype=torch.float64)
        return stats

    def _param_step(self, group, p, grad, state):
        projected = group.get("rank") is not None and p.dim() >= 2 and p.numel() > 0
        if projected:
            g = grad.reshape(p.shape[0], -1)
            side = side_for(group["proj_type"], *g.shape)
            if not state:
                state.update(step=0, proj_step=0, bases=svd_bases(g, group["rank"], side))
                state.update(self._new_stats(project(g, state["bases"], side).shape, group["beta1"]))
            elif state["step"] % group["update_proj_gap"] == 0:
                new = svd_bases(g, group["rank"], side)
                if group["moment_policy"] == "reset":
                    for k in ("r", "c", "m"):
                        if k in state:
                            state[k] = torch.zeros_like(state[k])
                elif group["moment_policy"] == "reproject":
                    trans = [pn.T @ po for po, pn in zip(state["bases"], new)]
                    if "m" in state:
                        state["m"] = carry(state["m"], trans, side)
                    mean_r = float(state["r"].mean())
                    v_hat = (
                        torch.outer(state["r"], state["c"]) / mean_r
                        if mean_r > 0
                        else torch.zeros(len(state["r"]), len(state["c"]), dtype=torch.float64)
                    )
                    v_hat = carry(v_hat, [t * t for t in trans], side)
                    state["r"], state["c"] = v_hat.mean(dim=1), v_hat.mean(dim=0)
                    self._code(group, state)
                state["bases"], state["proj_step"] = new, state["step"]
            low = project(g, state["bases"], side)
        else:
            if not state:
                state.update(step=0, **self._new_stats(p.shape, group["beta1"]))
            low = grad
        state["step"] += 1
        t = state["step"]
        t_moments = t - state["proj_step"] if projected and group["moment_policy"] == "reset" else t
        u, alpha = self._adafactor(group, low, state, t, t_moments, p)
        self._code(group, state)
        wd = group["weight_decay"]
        if projected:
            back = project_back(u, state["bases"], side).reshape(p.shape)
            return (1 - wd * alpha) * p - group["scale"] * back
        return (1 - wd * alpha) * p - u

    @staticmethod
    def _code(group, state):
        if group.get("optim_bits", 32) == 8:
            for key, kind in (("m", state8bit.SIGNED), ("v", state8bit.UNSIGNED_SQRT)):
                if key in state:
                    state[key] = _coded(state[key], kind)

    @staticmethod
    def _adafactor(group, low, state, t, t_moments, w):
        eps1, eps2 = group["eps"]
        if group["relative_step"]:
            rho = min(1e-6 * t if group["warmup_init"] else 1e-2, 1 / math.sqrt(t))
        else:
            rho = group["lr"]
        alpha = max(eps2, _rms(w)) * rho if group["scale_parameter"] else rho
        b = 1 - t_moments ** group["decay_rate"]
        sq = low * low + eps1
        if low.dim() >= 2:
            state["r"] = b * state["r"] + (1 - b) * sq.mean(dim=-1)
            state["c"] = b * state["c"] + (1 - b) * sq.mean(dim=-2)
            r_normalised = state["r"] / state["r"].mean(dim=-1, keepdim=True)
            v_hat = r_normalised.unsqueeze(-1) * state["c"].unsqueeze(-2)
        else:
            state["v"] = b * state["v"] + (1 - b) * sq
            v_hat = state["v"]
        u = low / torch.sqrt(v_hat)
        u = u / max(1.0, _rms(u) / group["clip_threshold"])
        u = alpha * u
        if group["beta1"] is not None:
            state["m"] = group["beta1"] * state["m"] + (1 - group["beta1"]) * u
            u = state["m"]
        return u, alpha


def _reference_params(seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tall = torch.randn(14, 6, generator=g, dtype=torch.float64)
    wide = torch.randn(5, 11, generator=g, dtype=torch.float64)
    conv = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)  # projected as 4×18
    dense = torch.randn(7, 5, generator=g, dtype=torch.float64)  # factored, unprojected
    bias = torch.randn(9, generator=g, dtype=torch.float64)
    return [[tall, wide, conv], [dense, bias]]


def _run_against_reference(proj_type, policy, steps=26, must_move=1e-3, **kw):
    init = _reference_params()
    params = [[nn.Parameter(t.clone()) for t in grp] for grp in init]
    opts = {"rank": 3, "update_proj_gap": 10, "proj_type": proj_type, "moment_policy": policy, "scale": 0.5}
    groups = [{"params": params[0], **opts}, {"params": params[1]}]
    opt = GaLoreAdafactor(groups, **kw)
    ref = ReferenceAdafactor([{"params": init[0], **opts}, {"params": init[1]}], **kw)
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        grads = []
        for gi, grp in enumerate(params):
            row = []
            for pi, p in enumerate(grp):
                # the tall weight skips 4 steps: its refreshes follow its own step count
                grad = (
                    None
                    if (gi, pi) == (0, 0) and step in (3, 4, 11, 12)
                    else torch.randn(p.shape, generator=g, dtype=torch.float64)
                )
                p.grad = None if grad is None else grad.clone()
                row.append(grad)
            grads.append(row)
        opt.step()
        ref.step(grads)
        for gi, grp in enumerate(params):
            for pi, p in enumerate(grp):
                err = rel_err(p, ref.groups[gi]["params"][pi])
                assert err < 1e-10, f"step {step} group {gi} param {pi}: {err:.3g}"
    for gi, grp in enumerate(params):
        for pi, p in enumerate(grp):
            assert rel_err(p, init[gi][pi]) > must_move  # it moved: the comparison is not vacuous
    return opt, params


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_float64_reference(proj_type, policy):
    opt, params = _run_against_reference(proj_type, policy, beta1=0.8, weight_decay=0.3)
    state = opt.state[params[0][0]]
    assert int(state["step"].item()) == 22 and int(state["proj_step"].item()) == 20


@pytest.mark.parametrize(
    "kw",
    [
        {},  # relative step with parameter scale, no first moment: transformers' defaults
        {"warmup_init": True, "clip_threshold": 0.5},
        {"lr": 3e-2, "relative_step": False, "scale_parameter": False, "decay_rate": -0.5},
    ],
    ids=["default", "warmup", "manual-lr"],
)
def test_matches_float64_reference_schedules(kw):
    # warmup_init's steps are 1e-6·t·RMS(W): 26 of them move a weight by ~1e-6 of its size
    _run_against_reference("std", "reproject", must_move=1e-7 if kw.get("warmup_init") else 1e-3, **kw)


@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    rank=st.integers(1, 10),
    gap=st.integers(1, 4),
    proj_type=st.sampled_from(PROJ_TYPES),
    policy=st.sampled_from(POLICIES),
    beta1=st.sampled_from([None, 0.5]),
    relative=st.booleans(),
    wd=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_configurations_match_reference(shape, rank, gap, proj_type, policy, beta1, relative, wd, seed):
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
    opts = {"rank": rank, "update_proj_gap": gap, "proj_type": proj_type, "moment_policy": policy, "scale": 0.7}
    hyper: dict[str, Any] = {"beta1": beta1, "weight_decay": wd, "clip_threshold": 0.3}
    if not relative:
        hyper.update(lr=5e-2, relative_step=False)
    opt = GaLoreAdafactor([{"params": [w], **opts}], **hyper)
    ref = ReferenceAdafactor([{"params": [w.detach()], **opts}], **hyper)
    for step in range(7):
        grad = torch.randn(shape, generator=g, dtype=torch.float64)
        w.grad = grad.clone()
        opt.step()
        ref.step([[grad]])
        assert rel_err(w, ref.groups[0]["params"][0]) < 1e-10, f"step {step}"


# ============================================================================ galore-torch


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 40)  # tall 40×16
        self.b = nn.Linear(40, 12)  # wide 12×40
        self.c = nn.Linear(12, 12)
        self.d = nn.Linear(12, 6)

    def forward(self, x):
        return self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def _split_groups(model, rank_opts):
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("bias")]},
        {"params": [p for n, p in named if n.endswith("weight")], **rank_opts},
    ]


def _train(model, opt, steps, seed=5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(24, 16, generator=g), torch.randn(24, 6, generator=g)
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"beta1": 0.9, "weight_decay": 0.1},
        {"lr": 1e-2, "relative_step": False, "scale_parameter": False},
    ],
    ids=["default", "beta1-wd", "manual-lr"],
)
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_galore_torch(proj_type, kw):
    """50 float32 steps, refreshes at 0, 20 and 40: the same maths as galore-torch 1.0's
    GaLoreAdafactor (moment_policy="keep"), to float32 rounding. Each step starts from
    galore-torch's weights and moments, so both take the same gradient bit for bit and their
    refreshes the same SVD (the bases must be equal), and lands within the rounding bound of one
    float32 step (``rounding.update_bounds``; the longest sum is the 640-entry RMS of the 40×16
    weight). Free-running trajectories would feed rounding differences into the SVDs, which
    amplify them by the singular-value gaps: a machine-dependent amount no tolerance bounds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdafactor as Ref
    torch.manual_seed(0)
    ref_model = SmallNet()
    ours_model = copy.deepcopy(ref_model)
    init = [p.detach().clone() for p in ref_model.parameters()]
    rank_opts = {"rank": 4, "update_proj_gap": 20, "scale": 0.25, "proj_type": proj_type}
    ref = Ref(_split_groups(ref_model, rank_opts), **kw)
    ours = GaLoreAdafactor(_split_groups(ours_model, rank_opts), **kw)
    pairs = list(zip(ours_model.parameters(), ref_model.parameters()))
    longest = max(p.numel() for p in ref_model.parameters())
    g = torch.Generator().manual_seed(5)
    for step in range(50):
        with torch.no_grad():
            for p, q in pairs:
                p.copy_(q)
                for key in MOMENT_KEYS:
                    if key in ref.state.get(q, {}):
                        ours.state[p][key].copy_(ref.state[q][key])
        x, y = torch.randn(24, 16, generator=g), torch.randn(24, 6, generator=g)
        for model, opt in ((ref_model, ref), (ours_model, ours)):
            opt.zero_grad(set_to_none=True)
            ((model(x) - y) ** 2).mean().backward()
        before = [q.detach().clone() for q in ref_model.parameters()]
        for p, q in pairs:
            assert torch.equal(p.grad, q.grad)  # same weights, same batch, same kernels
        ref.step()
        ours.step()
        for (p, q), q0 in zip(pairs, before):
            ratio = rounding.worst_ratio(p, q, rounding.update_bounds(q0, q, longest))
            assert ratio <= 1, f"step {step}: a weight differs by {ratio:.3g}× its rounding bound"
            for key in MOMENT_KEYS:
                if key in ref.state[q]:
                    theirs = ref.state[q][key]
                    ratio = rounding.worst_ratio(ours.state[p][key], theirs, rounding.state_bounds(theirs, longest))
                    assert ratio <= 1, f"step {step}: {key} differs by {ratio:.3g}× its rounding bound"
            if p.dim() >= 2:
                side = galorex.projection.projection_side(proj_type, *p.shape)
                theirs = ref.state[q]["projector"].ortho_matrix
                theirs = [theirs[0], theirs[1].mT] if side == "full" else [theirs.mT if side == "right" else theirs]
                keys = ["basis_left", "basis_right"] if side == "full" else ["basis"]
                assert all(torch.equal(ours.state[p][k], b) for k, b in zip(keys, theirs)), f"step {step}"
    for (name, a), p0 in zip(ref_model.named_parameters(), init):
        assert rel_err(a, p0) > 1e-3, name  # it moved: the comparison is not vacuous
    assert int(ours.state[ours_model.a.weight]["proj_step"].item()) == 40


def test_reset_and_reproject_differ_from_keep():
    """The policies galore-torch lacks actually change the run (the reference checks their maths)."""
    finals = {}
    for policy in POLICIES:
        torch.manual_seed(0)
        model = SmallNet()
        opt = GaLoreAdafactor(
            _split_groups(model, {"rank": 4, "update_proj_gap": 5, "moment_policy": policy}), beta1=0.9
        )
        _train(model, opt, 12)
        finals[policy] = model.a.weight.detach().clone()
    assert rel_err(finals["reset"], finals["keep"]) > 1e-4
    assert rel_err(finals["reproject"], finals["keep"]) > 1e-4


# ============================================================================ training, dtypes, checkpoints


def test_trains_and_keeps_float32_statistics_for_bf16():
    torch.manual_seed(0)
    model = SmallNet().to(torch.bfloat16)
    opt = GaLoreAdafactor(
        _split_groups(model, {"rank": 4, "update_proj_gap": 10}),
        lr=3e-2,
        relative_step=False,
        scale_parameter=False,
        beta1=0.9,
    )
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    y = x[:, :6] * 0.5  # a target the net can fit
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((model(x.bfloat16()).float() - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        for key, value in opt.state[p].items():
            assert value.dtype == torch.float32, key


def _round_trip_run(dtype, policy, split):
    """Train 12 steps straight, or 6 + save (torch.save / weights_only load) + fresh objects + 6."""

    def make():
        torch.manual_seed(0)
        model = SmallNet().to(dtype)
        groups = _split_groups(model, {"rank": 4, "update_proj_gap": 4, "moment_policy": policy})
        groups[0]["params"].append(model.c.weight)  # an unprojected matrix: factored dense state
        groups[1]["params"] = [p for p in groups[1]["params"] if p is not model.c.weight]
        return model, GaLoreAdafactor(groups, beta1=0.9, weight_decay=0.1)

    def run(model, opt, steps, start):
        for i in range(start, start + steps):
            g = torch.Generator().manual_seed(100 + i)
            x, y = torch.randn(8, 16, generator=g).to(dtype), torch.randn(8, 6, generator=g).to(dtype)
            opt.zero_grad()
            ((model(x) - y) ** 2).float().mean().backward()
            opt.step()

    model, opt = make()
    if not split:
        run(model, opt, 12, 0)
        return model, opt
    run(model, opt, 6, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt = make()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    run(model, opt, 6, 6)
    return model, opt


@pytest.mark.parametrize(
    "dtype,policy", [(torch.float32, "keep"), (torch.bfloat16, "reproject"), (torch.float32, "reset")]
)
def test_state_round_trip_continues_bit_for_bit(dtype, policy):
    straight, straight_opt = _round_trip_run(dtype, policy, split=False)
    resumed, resumed_opt = _round_trip_run(dtype, policy, split=True)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for p, q in zip(straight.parameters(), resumed.parameters()):
        s, r = straight_opt.state[p], resumed_opt.state[q]
        assert s.keys() == r.keys()
        for key in s:
            assert torch.equal(s[key], r[key]) and s[key].dtype == r[key].dtype, key
            assert r[key].dtype == torch.float32  # bf16 weights keep float32 statistics after load
        assert r["step"].device.type == "cpu"


def test_state_is_factored_for_matrices_and_full_for_vectors():
    torch.manual_seed(0)
    model = SmallNet()
    opt = GaLoreAdafactor(_split_groups(model, {"rank": 4, "proj_type": "std"}))
    _train(model, opt, 1)
    tall = opt.state[model.a.weight]  # 40×16, std → right: low-rank 40×4
    assert tall["exp_avg_sq_row"].shape == (40,) and tall["exp_avg_sq_col"].shape == (4,)
    assert "exp_avg" not in tall and "exp_avg_sq" not in tall
    assert opt.state[model.a.bias]["exp_avg_sq"].shape == (40,)


# ============================================================================ 8-bit state (optim_bits=8)


def _eight_bit_params(dtype=torch.float64, seed=0):
    """Shapes whose coded moments all pass the codec's 4096-entry threshold: a 128×96 weight
    (projected: 128×48 or 48×128 at rank 48, 64×64 for ``full`` at rank 64), an unprojected 80×64
    matrix (factored r and c, m coded) and a 4100-vector (v and m coded)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [[(128, 96)], [(80, 64), (4100,)]]
    return [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in grp] for grp in shapes]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("proj_type,rank", [("std", 48), ("reverse_std", 48), ("full", 64)])
def test_eight_bit_matches_float64_reference_with_the_same_coding(proj_type, rank, policy):
    """12 float64 steps, refreshes at 0, 5, 10: the optimizer with ``optim_bits=8`` against the
    float64 reference that replaces m and v by the codec's round trip wherever they are stored.
    The coded moments are equal bit for bit (the same codes and scales), the weights to float64
    rounding; the factored r and c stay in the compute dtype."""
    init = _eight_bit_params()
    params = [[nn.Parameter(t.clone()) for t in grp] for grp in init]
    opts = {"rank": rank, "update_proj_gap": 5, "proj_type": proj_type, "moment_policy": policy, "scale": 0.5}
    kw = {"beta1": 0.8, "weight_decay": 0.3, "optim_bits": 8}
    opt = GaLoreAdafactor([{"params": params[0], **opts}, {"params": params[1]}], **kw)
    ref = ReferenceAdafactor([{"params": init[0], **opts}, {"params": init[1]}], **kw)
    g = torch.Generator().manual_seed(3)
    for step in range(12):
        grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in grp] for grp in params]
        for grp, row in zip(params, grads):
            for p, grad in zip(grp, row):
                p.grad = grad.clone()
        opt.step()
        ref.step(grads)
        for gi, grp in enumerate(params):
            for pi, p in enumerate(grp):
                state, expected = opt.state[p], ref.state[gi][pi]
                assert state["exp_avg_q"].dtype == torch.uint8 and "exp_avg" not in state
                m = codec.load_moment(state, "exp_avg", torch.float64)
                assert torch.equal(m, expected["m"]), f"step {step} group {gi} param {pi}: exp_avg"
                if "v" in expected:
                    v = codec.load_moment(state, "exp_avg_sq", torch.float64)
                    assert torch.equal(v, expected["v"]), f"step {step}: exp_avg_sq"
                else:
                    assert state["exp_avg_sq_row"].dtype == state["exp_avg_sq_col"].dtype == torch.float64
                err = rel_err(p, ref.groups[gi]["params"][pi])
                assert err < 1e-10, f"step {step} group {gi} param {pi}: {err:.3g}"
    for gi, grp in enumerate(params):
        for pi, p in enumerate(grp):
            assert rel_err(p, init[gi][pi]) > 1e-3  # it moved: the comparison is not vacuous


def _clone_optimizer(source, params, **kw):
    """A GaLoreAdafactor on ``params`` (one list per group of ``source``, whose projection keys it
    takes) holding a copy of the state ``source`` keeps for the corresponding parameters."""
    keys = ("rank", "update_proj_gap", "scale", "proj_type", "moment_policy")
    groups = [{"params": ps, **{k: g[k] for k in keys if k in g}} for ps, g in zip(params, source.param_groups)]
    opt = GaLoreAdafactor(groups, **kw)
    for ps, g in zip(params, source.param_groups):
        for p, q in zip(ps, g["params"]):
            if source.state[q]:
                opt.state[p] = {k: v.clone() for k, v in source.state[q].items()}
    return opt


def test_eight_bit_steps_within_the_code_error_of_the_32_bit_steps():
    """From the same weights and state (four points of a float32 32-bit trajectory), an 8-bit and a
    32-bit GaLoreAdafactor take two steps on the same gradients. The first is the same step — the
    rule sees the float moments, the codec codes only what it stores — so the weights are equal and
    the 8-bit optimizer stores exactly the codec's round trip of m₁ (and of the vector's v₁). The
    second starts from those; with clipping off (its RMS rescaling would spread one element's error
    over the tensor) its weights differ from the 32-bit ones by at most the code's error carried
    through the step,

        matrices:  β₁·scale·|P|·e_m   (unprojected: P = I and no scale)
        vector:    β₁·e_m + (1 − β₁)·α·|g|·β̂·e_v / (2·v_lo^{3/2})

    with e_m = state8bit.blockwise_error_bound(m₁) (+ the decode's ½ ulp), e_v ≥ |v̂₁ − v₁| from
    the unsigned code's bound e_s on s = √v₁ (e_s·(2s + e_s) + float32 roundings), β̂ = 1 − t^c and
    α = max(ε₂, RMS(W))·min(10⁻², 1/√t) of the second step, v_lo = β̂·max(v₁ − e_v, 0) + (1 − β̂)(g² + ε₁)
    the smaller of the two second moments (|a^{-½} − b^{-½}| ≤ |a − b| / (2 min(a, b)^{3/2})),
    plus the float32 rounding of two evaluations of one step (``rounding.update_bounds``)."""
    beta1, eps1, eps2, decay_rate = 0.9, 1e-30, 1e-3, -0.8
    kw = {"beta1": beta1, "weight_decay": 0.1, "clip_threshold": 1e30}
    opts = {"rank": 48, "update_proj_gap": 50, "scale": 0.5}
    init = _eight_bit_params(torch.float32)
    params = [nn.Parameter(t.clone()) for grp in init for t in grp]
    groups = [{"params": params[:1], **opts}, {"params": params[1:]}]
    opt = GaLoreAdafactor(groups, **kw)
    longest = 128 * 96  # the longest sum: RMS(W) of the projected weight
    signed, unsigned = state8bit.signed_code(), state8bit.unsigned_code()
    u = rounding.U32
    g = torch.Generator().manual_seed(7)
    differs = 0
    for start in range(9):
        if start in (0, 1, 4, 8):
            pair = []
            for bits in (32, 8):
                copies = [nn.Parameter(p.detach().clone()) for p in params]
                opt_copy = _clone_optimizer(opt, [copies[:1], copies[1:]], optim_bits=bits, **kw)
                assert opt_copy.param_groups[0]["optim_bits"] == bits
                pair.append((copies, opt_copy))
            (w32, opt32), (w8, opt8) = pair
            pair_g = torch.Generator().manual_seed(100 + start)
            for second in (False, True):
                grads = [torch.randn(p.shape, generator=pair_g) for p in params]
                before = [p.detach().clone() for p in w32]
                moments = [{k: v.clone() for k, v in opt32.state[p].items()} for p in w32]  # m₁, v₁
                for ws in (w32, w8):
                    for p, grad in zip(ws, grads):
                        p.grad = grad.clone()
                opt32.step()
                opt8.step()
                for i, (a, b) in enumerate(zip(w8, w32)):
                    s8, s32 = opt8.state[a], opt32.state[b]
                    if not second:
                        assert torch.equal(a, b), f"start {start}: the first step differs ({i})"
                        for key, kind in (("exp_avg", state8bit.SIGNED), ("exp_avg_sq", state8bit.UNSIGNED_SQRT)):
                            if key in s32:
                                coded = codec.load_moment(s8, key)
                                assert torch.equal(coded, _coded(s32[key], kind).float()), key
                        continue
                    # |m̂₁ − m₁|: the code's bound, and the ½ ulp of the decode's product code·a
                    e_m = state8bit.blockwise_error_bound(moments[i]["exp_avg"], signed)
                    e_m = e_m + u * (moments[i]["exp_avg"].double().abs() + e_m)
                    if i == 0:
                        bases = codec.load_bases(s32, "right", b, 48)
                        bound = opts["scale"] * beta1 * rounding.back(e_m, bases, "right")
                    elif b.dim() == 2:
                        bound = beta1 * e_m
                    else:
                        t = float(s32["step"].item())
                        v1 = moments[i]["exp_avg_sq"].double()
                        s = moments[i]["exp_avg_sq"].clamp_min(0).sqrt()
                        e_s = state8bit.blockwise_error_bound(s, unsigned, keep_positive=True)
                        s = s.double()
                        e_s = e_s + u * (s + e_s)
                        e_v = e_s * (2 * s + e_s) + 4 * u * (v1 + (s + e_s).square())
                        beta2t = 1 - t**decay_rate
                        gd = grads[i].double()
                        v_lo = beta2t * (v1 - e_v).clamp_min(0) + (1 - beta2t) * (gd.square() + eps1)
                        w0 = before[i].double()
                        alpha = max(eps2, w0.square().mean().sqrt().item()) * min(1e-2, 1 / math.sqrt(t))
                        bound = beta1 * e_m + (1 - beta1) * alpha * gd.abs() * beta2t * e_v / (2 * v_lo.pow(1.5))
                    bound = bound + rounding.update_bounds(before[i], b, longest)
                    ratio = rounding.worst_ratio(a, b, bound)
                    assert ratio <= 1, f"start {start} param {i}: {ratio:.3g}× the bound"
                    differs += not torch.equal(a, b)
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
    assert differs == 4 * 3  # the coding changed every second step: the comparison is not vacuous


def _eight_bit_regression_groups(model, gap=7, policy="keep"):
    """The regression model's first weight projected at rank 48 (128×48 low-rank moments, coded),
    its second weight (96×128) and the biases unprojected: the weight's m coded, its r and c and
    the biases' small statistics float32."""
    return [
        {"params": [model[0].weight], "rank": 48, "update_proj_gap": gap, "moment_policy": policy},
        {"params": [model[2].weight, model[0].bias, model[2].bias]},
    ]


@pytest.mark.parametrize("dtype,policy", [(torch.float32, "reproject"), (torch.bfloat16, "reset")])
def test_eight_bit_checkpoint_round_trip_continues_bit_for_bit(dtype, policy):
    def fresh(model):
        groups = _eight_bit_regression_groups(model, policy=policy)
        return GaLoreAdafactor(groups, beta1=0.9, weight_decay=0.1, optim_bits=8)

    def check(model, opt):
        for p in (model[0].weight, model[2].weight):
            state = opt.state[p]
            assert state["exp_avg_q"].dtype == torch.uint8 and state["exp_avg_absmax"].dtype == torch.float32
            assert state["exp_avg_sq_row"].dtype == torch.float32 and "exp_avg" not in state
        assert opt.state[model[0].bias]["exp_avg"].dtype == torch.float32  # 128 entries: float32, even for bf16

    # refreshes at 0, 7 and 14 (reproject / reset carry the coded moment), the checkpoint at 12
    problems.assert_resume_is_bit_for_bit(fresh, dtype=dtype, on_load=check)


def test_eight_bit_layerwise_matches_the_normal_step_bit_for_bit():
    """Layer-wise updates run the same per-parameter arithmetic and codec as step()."""
    runs = []
    for layerwise in (False, True):
        model = problems.make_regression_model()
        groups = _eight_bit_regression_groups(model, gap=3, policy="reproject")
        opt = GaLoreAdafactor(groups, beta1=0.9, optim_bits=8, layerwise=layerwise)
        x, y = problems.REGRESSION_DATA
        for _ in range(5):
            (model(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append((model, opt))
    (ref, ref_opt), (lw, lw_opt) = runs
    for a, b in zip(ref.parameters(), lw.parameters()):
        assert torch.equal(a, b)
        sa, sb = ref_opt.state[a], lw_opt.state[b]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "exp_avg_q" in lw_opt.state[lw[2].weight]


def test_eight_bit_compiles_without_graph_breaks():
    """compile=True with optim_bits=8: the projected update traces with the codec inside it, the
    unprojected one per parameter between its decode and its code (one frame per distinct shape).
    Against eager the match is to the quantisation step (a rounding difference may move a value to
    the next code), as for GaLoreAdamW in tests/test_compile.py."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter()
    runs = []
    for options in (False, {"backend": counter}):
        model = problems.make_regression_model()
        groups = _eight_bit_regression_groups(model, gap=3, policy="reproject")
        opt = GaLoreAdafactor(groups, beta1=0.9, optim_bits=8, compile=options)
        runs.append((model, opt, [p.detach().clone() for p in model.parameters()]))
        problems.train_regression(model, opt, 5)
    (eager, _, before), (compiled, opt, _) = runs
    for a, b, b0 in zip(compiled.parameters(), eager.parameters(), before):
        moved = (b - b0).abs().max().item()
        assert moved > 1e-4 and (a - b).abs().max().item() < 0.05 * moved
    assert "exp_avg_q" in opt.state[compiled[0].weight] and "exp_avg_q" in opt.state[compiled[2].weight]
    # the projected update, and the dense one for 96×128, (128,) and (96,) (or fewer, with dynamic shapes)
    assert 2 <= counter.frame_count <= 4
    assert not torch._dynamo.utils.counters["graph_break"]


def test_eight_bit_trains_like_32_bit():
    """Both descend on the regression problem (60 steps, lr 1e-2): the 8-bit run's final loss is
    below a third of its first, as the 32-bit run's is (measured on 2026-12-03: 1.0764 → 0.2729 at
    32 bits, → 0.2722 at 8 bits; the step-by-step bound is the test above)."""
    losses = {}
    for bits in (32, 8):
        model = problems.make_regression_model()
        opt = GaLoreAdafactor(
            _eight_bit_regression_groups(model, gap=50),
            lr=1e-2,
            relative_step=False,
            scale_parameter=False,
            beta1=0.9,
            optim_bits=bits,
        )
        losses[bits] = problems.train_regression(model, opt, 60)
    for bits, curve in losses.items():
        assert curve[-1] < curve[0] / 3, (bits, curve[0], curve[-1])


def test_changing_optim_bits_mid_run_drops_the_other_format():
    """A group switched from 32 to 8 bits and back stores each moment in one format only, so the
    next step reads the value just stored, never a stale one."""
    model = problems.make_regression_model()
    opt = GaLoreAdafactor(_eight_bit_regression_groups(model), beta1=0.9)
    w = model[0].weight
    problems.train_regression(model, opt, 2)
    coded, whole = {"exp_avg_q", "exp_avg_absmax"}, {"exp_avg"}
    for bits, present, absent in ((8, coded, whole), (32, whole, coded)):
        for group in opt.param_groups:
            group["optim_bits"] = bits
        problems.train_regression(model, opt, 1)
        for p in (w, model[2].weight):
            assert present <= opt.state[p].keys() and not absent & opt.state[p].keys(), bits
    m = opt.state[w]["exp_avg"].clone()
    problems.train_regression(model, opt, 1)
    assert not torch.equal(opt.state[w]["exp_avg"], m)  # the moment follows the new gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_eight_bit_memory_estimate_matches_measured_state(proj_type, beta1, dtype):
    torch.manual_seed(0)
    init = _eight_bit_params(dtype)
    small = [torch.randn(40, 16, dtype=dtype), torch.randn(9, dtype=dtype)]  # under 4096: float32
    params = [nn.Parameter(t) for grp in init for t in grp] + [nn.Parameter(t) for t in small]
    rank = 64 if proj_type == "full" else 48
    groups = [{"params": params[:1], "rank": rank, "proj_type": proj_type}, {"params": params[1:]}]
    predicted = estimate_optimizer_state_bytes(groups, optimizer="adafactor", optim_bits=8, beta1=beta1)
    # (before the optimizer is built: torch writes every default, optim_bits=8 too, into the groups)
    full = estimate_optimizer_state_bytes(groups, optimizer="adafactor", beta1=beta1)
    opt = GaLoreAdafactor(groups, beta1=beta1, optim_bits=8)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == predicted
    assert predicted < full  # the vector's v is coded even without a first moment


# ============================================================================ bad input


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"lr": 1e-3}, "lr"),  # manual lr with relative_step=True
        ({"relative_step": False}, "lr"),  # relative_step=False needs an lr
        ({"relative_step": False, "lr": -1.0}, "lr"),
        ({"relative_step": False, "lr": float("nan")}, "lr"),
        ({"relative_step": False, "lr": 1e-3, "warmup_init": True}, "warmup_init"),
        ({"eps": 1e-30}, "eps"),
        ({"eps": (1e-30, -1.0)}, "eps"),
        ({"clip_threshold": 0.0}, "clip_threshold"),
        ({"decay_rate": 0.5}, "decay_rate"),
        ({"beta1": 1.0}, "beta1"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"scale_parameter": "yes"}, "scale_parameter"),
        ({"rank": 0}, "rank"),
        ({"rank": 2, "update_proj_gap": 0}, "update_proj_gap"),
        ({"rank": 2, "proj_type": "diagonal"}, "proj_type"),
        ({"rank": 2, "moment_policy": "forget"}, "moment_policy"),
        ({"optim_bits": 16}, "optim_bits"),
        ({"betas": (0.9, 0.99)}, "betas"),
    ],
)
def test_bad_group_raises_value_error_naming_group_and_key(bad, key):
    w = nn.Parameter(torch.zeros(4, 4))
    opt = GaLoreAdafactor([w])
    with pytest.raises(ValueError, match=rf"param_groups\[1\]: '{key}'"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, 3))], **bad})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: '{key}'"):
        GaLoreAdafactor([{"params": [w], **bad}])


def test_bad_compile_option_raises_type_error():
    with pytest.raises(TypeError, match="compile"):
        GaLoreAdafactor([nn.Parameter(torch.zeros(2, 2))], compile="yes")


# ============================================================================ factory and memory


def test_factory_builds_galore_adafactor_like_the_paper_scripts():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.Linear(8, 8), "mlp": nn.Linear(8, 16), "head": nn.Linear(16, 4)})
    opt = build_optimizer("galore-adafactor", model, lr=1e-2, rank=4, betas=(0.0, 0.999), weight_decay=0.1)
    assert isinstance(opt, galorex.GaLoreAdafactor)
    projected = [g for g in opt.param_groups if g.get("rank")]
    assert projected and all(g["relative_step"] is False and g["scale_parameter"] is False for g in opt.param_groups)
    assert all(g["lr"] == 1e-2 and g["beta1"] is None and g["weight_decay"] == 0.1 for g in opt.param_groups)
    assert build_optimizer("galore-adafactor", model, lr=1e-2, betas=(0.9, 0.999)).defaults["beta1"] == 0.9
    eight = build_optimizer("galore-adafactor", model, lr=1e-2, rank=4, optim_bits=8)
    assert all(g["optim_bits"] == 8 for g in eight.param_groups)


@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_memory_estimate_matches_measured_state(beta1, proj_type):
    torch.manual_seed(0)
    model = SmallNet()
    conv = nn.Conv2d(2, 6, 3)  # a 4-D weight projected as 6×18, and a 4-D one left dense
    dense4d = nn.Conv2d(3, 5, 2)
    groups = _split_groups(model, {"rank": 4, "proj_type": proj_type})
    groups[1]["params"].append(conv.weight)
    groups[0]["params"] += [conv.bias, dense4d.weight]
    opt = GaLoreAdafactor(groups, beta1=beta1)
    predicted = estimate_optimizer_state_bytes(groups, optimizer="adafactor")
    for p in [p for g in groups for p in g["params"]]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == predicted
    # the factored second moment is what saves memory: a + b per matrix instead of a·b
    adam_like = estimate_optimizer_state_bytes(groups, optimizer="galore")
    assert predicted < adam_like
