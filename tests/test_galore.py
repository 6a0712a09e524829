"""GaLoreAdamW: exactness against a float64 reference, equivalence with galore-torch and torch's
AdamW, input validation, parameter-group selection and the moment policies."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import rounding
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference_galore import ReferenceGaLoreAdamW
from reference_galore import side_for as ref_side_for
from reference_galore import svd_bases as ref_svd_bases
from torch import nn

from galorex import GaLoreAdamW, galore_param_groups, select_galore_parameters
from galorex import projection as proj

pytestmark = pytest.mark.usefixtures("single_thread")

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
POLICIES = ("keep", "reset", "reproject")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (b the reference)."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close_rel(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


# ============================================================================ 1. float64 reference


def _reference_setup(proj_type: str, policy: str, eps_mode: str = "torch"):
    """Three groups: a rank group with tall, wide, 3-D and 4-D (conv) weights and a 1-D bias; a group
    without rank; a second rank group whose rank exceeds min(m, n) of a wide matrix."""
    g = torch.Generator().manual_seed(1234)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    rank_group = {
        "params": [t(12, 5), t(4, 9), t(6, 3, 2, 2), t(5, 2, 3), t(8)],
        "rank": 3,
        "update_proj_gap": 10,
        "scale": 0.5,
        "proj_type": proj_type,
        "moment_policy": policy,
        "weight_decay": 0.1,
        "eps_mode": eps_mode,
    }
    dense_group = {"params": [t(5, 4), t(5)], "weight_decay": 0.05, "lr": 3e-3, "eps_mode": eps_mode}
    clipped_group = {
        "params": [t(3, 7), t(7, 3)],
        "rank": 6,  # clipped to 3
        "update_proj_gap": 10,
        "scale": 1.0,
        "proj_type": proj_type,
        "moment_policy": policy,
        "weight_decay": 0.2,
        "betas": (0.8, 0.95),
        "eps_mode": eps_mode,
    }
    return [rank_group, dense_group, clipped_group]


def _run_against_reference(proj_type, policy, eps_mode="torch", steps=30, lr=1e-2):
    groups = _reference_setup(proj_type, policy, eps_mode)
    ref = ReferenceGaLoreAdamW(groups, lr=lr, eps=1e-8)
    params = [[nn.Parameter(p.clone()) for p in grp["params"]] for grp in groups]
    opt_groups = []
    for grp, ps in zip(groups, params):
        d = dict(grp)
        d["params"] = ps
        opt_groups.append(d)
    opt = GaLoreAdamW(opt_groups, lr=lr, eps=1e-8)

    gen = torch.Generator().manual_seed(99)
    # (group, param) -> steps at which that parameter has no gradient
    no_grad_at = {(0, 0): {3, 10, 11, 25}, (1, 1): {5}, (2, 1): {0, 9}}
    for step in range(steps):
        grads = []
        for gi, ps in enumerate(params):
            row = []
            for pi, p in enumerate(ps):
                grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                if step in no_grad_at.get((gi, pi), ()):
                    grad = None
                p.grad = None if grad is None else grad.clone()
                row.append(grad)
            grads.append(row)
        opt.step()
        ref.step(grads)
        for gi, ps in enumerate(params):
            for pi, p in enumerate(ps):
                assert_close_rel(p, ref.groups[gi]["params"][pi], 1e-10, f"step {step} group {gi} param {pi}")
    return opt, ref, params


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_float64_reference(proj_type, policy):
    opt, ref, params = _run_against_reference(proj_type, policy)
    # The reference and the optimizer saw the same number of steps per parameter; the tall weight
    # skipped 4 steps, so its refreshes happened at its own steps 0, 10, 20 (global 0, 13, 23).
    state = opt.state[params[0][0]]
    assert int(state["step"].item()) == 26 == ref.state[0][0]["step"]
    assert int(state["proj_step"].item()) == 20 == ref.state[0][0]["proj_step"]
    # The parameters actually moved (the comparison is not vacuous).
    for gi, grp in enumerate(_reference_setup(proj_type, policy)):
        for pi, p0 in enumerate(grp["params"]):
            assert rel_err(params[gi][pi], p0) > 1e-3


@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_matches_float64_reference_galore_torch_eps_mode(proj_type, policy):
    _run_against_reference(proj_type, policy, eps_mode="galore_torch", steps=22)


@given(
    shape=st.lists(st.integers(1, 12), min_size=0, max_size=4),
    rank=st.integers(1, 14),
    gap=st.integers(1, 4),
    proj_type=st.sampled_from(PROJ_TYPES),
    policy=st.sampled_from(POLICIES),
    eps_mode=st.sampled_from(["torch", "galore_torch"]),
    wd=st.sampled_from([0.0, 0.3]),
    skip=st.sets(st.integers(0, 8), max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_configurations_match_reference(shape, rank, gap, proj_type, policy, eps_mode, wd, skip, seed):
    g = torch.Generator().manual_seed(seed)
    opts = dict(
        rank=rank,
        update_proj_gap=gap,
        proj_type=proj_type,
        moment_policy=policy,
        eps_mode=eps_mode,
        weight_decay=wd,
        scale=0.7,
    )
    w = nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
    opt = GaLoreAdamW([{"params": [w], **opts}], lr=1e-2, betas=(0.8, 0.9), eps=1e-6)
    ref = ReferenceGaLoreAdamW([{"params": [w.detach()], **opts}], lr=1e-2, betas=(0.8, 0.9), eps=1e-6)
    for step in range(9):
        grad = None if step in skip else torch.randn(shape, generator=g, dtype=torch.float64)
        w.grad = None if grad is None else grad.clone()
        opt.step()
        ref.step([[grad]])
        assert_close_rel(w, ref.groups[0]["params"][0], 1e-10, f"step {step}")
    if w.dim() >= 2:
        m, n = proj.matrix_shape(w.shape)
        keys = ["basis_left", "basis_right"] if proj.projection_side(proj_type, m, n) == "full" else ["basis"]
        assert all(opt.state[w][k].shape[1] == min(rank, m, n) for k in keys)


def test_reference_bases_follow_projection_module():
    """The reference's own pieces agree with projection.py (side rule and SVD bases)."""
    g = torch.Generator().manual_seed(0)
    for m, n in [(7, 3), (3, 7), (5, 5)]:
        G = torch.randn(m, n, generator=g, dtype=torch.float64)
        for pt in PROJ_TYPES:
            side = ref_side_for(pt, m, n)
            assert side == proj.projection_side(pt, m, n)
            for a, b in zip(ref_svd_bases(G, 4, side), proj.compute_bases(G, 4, side)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_non_contiguous_parameters_match_reference():
    g = torch.Generator().manual_seed(8)
    base2 = torch.randn(9, 5, generator=g, dtype=torch.float64)
    base3 = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    w2 = nn.Parameter(base2.T)  # 5×9, column-major
    w3 = nn.Parameter(base3.permute(2, 0, 1))  # 6×3×4, permuted
    assert not w2.is_contiguous() and not w3.is_contiguous()
    opts = dict(rank=2, update_proj_gap=3, proj_type="full", weight_decay=0.1, scale=0.5)
    opt = GaLoreAdamW([{"params": [w2, w3], **opts}], lr=1e-2)
    ref = ReferenceGaLoreAdamW([{"params": [w2.detach(), w3.detach()], **opts}], lr=1e-2)
    for step in range(7):
        grads = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in (w2, w3)]
        for w, gr in zip((w2, w3), grads):
            w.grad = gr.clone()
        opt.step()
        ref.step([grads])
        for w, r in zip((w2, w3), ref.groups[0]["params"]):
            assert_close_rel(w, r, 1e-10, f"step {step}")


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (3, 0, 2)])
def test_zero_size_parameter_in_rank_group_is_skipped_like_adamw(shape):
    """torch.optim.AdamW steps a parameter with no elements (a no-op); GaLoreAdamW, a drop-in
    AdamW, should too instead of failing on the SVD/reshape of an empty matrix."""
    torch.manual_seed(0)
    empty = nn.Parameter(torch.zeros(shape))
    w = nn.Parameter(torch.randn(6, 4))
    opt = GaLoreAdamW([{"params": [empty, w], "rank": 2}], lr=1e-2)
    torch_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(shape))], lr=1e-2)
    torch_opt.param_groups[0]["params"][0].grad = torch.zeros(shape)
    torch_opt.step()  # fine in torch
    empty.grad = torch.zeros(shape)
    w.grad = torch.randn(6, 4)
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w, before)
    assert empty.shape == shape


def test_step_returns_closure_loss():
    torch.manual_seed(0)
    lin = nn.Linear(4, 6)
    opt = GaLoreAdamW([{"params": [lin.weight], "rank": 2}, {"params": [lin.bias]}], lr=1e-2)
    x = torch.randn(5, 4)
    before = lin.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = lin(x).pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert not torch.equal(lin.weight, before)


# ============================================================================ 2. galore-torch


def _galore_torch_cls():
    # a declared test dependency (setup.cfg [test]): a failing import is an error, not a skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation noise from its transformers import
        from galore_torch import GaLoreAdamW as Ref

    return Ref


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 40)  # weight 40×16: tall
        self.b = nn.Linear(40, 12)  # weight 12×40: wide
        self.c = nn.Linear(12, 12)  # square
        self.d = nn.Linear(12, 6)  # weight 6×12: wide

    def forward(self, x):
        return self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def _batches(n_steps, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(24, 16, generator=g), torch.randn(24, 6, generator=g)) for _ in range(n_steps)]


def _split_groups(model, rank_opts):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": biases}, {"params": weights, **rank_opts}]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()


def _galore_torch_pair(proj_type, eps_mode, eps, weight_decay):
    Ref = _galore_torch_cls()
    torch.manual_seed(0)
    model_ref = SmallNet()
    model_ours = copy.deepcopy(model_ref)
    rank_opts = dict(rank=4, update_proj_gap=20, scale=0.25, proj_type=proj_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_opt = Ref(
            _split_groups(model_ref, rank_opts),
            lr=2e-3,
            eps=eps,
            weight_decay=weight_decay,
            no_deprecation_warning=True,
        )
    ours = GaLoreAdamW(
        _split_groups(model_ours, dict(rank_opts, refresh_method="svd")),
        lr=2e-3,
        eps=eps,
        weight_decay=weight_decay,
        eps_mode=eps_mode,
    )
    return model_ref, ref_opt, model_ours, ours


def _galore_torch_error(proj_type, eps_mode, eps, weight_decay, steps=50):
    """Train SmallNet with galore-torch and with galorex from the same init on the same batches,
    each on its own gradients; return {parameter name: max |ours − theirs| / max |theirs|}. Used
    to show a real difference (far above rounding); agreement is checked by
    :func:`_galore_torch_step_ratio`, one step at a time."""
    model_ref, ref_opt, model_ours, ours = _galore_torch_pair(proj_type, eps_mode, eps, weight_decay)
    init = {n: p.detach().clone() for n, p in model_ref.named_parameters()}
    batches = _batches(steps)
    _train(model_ref, ref_opt, batches)
    _train(model_ours, ours, batches)
    errors = {}
    for (name, a), b in zip(model_ours.named_parameters(), model_ref.parameters()):
        assert rel_err(b, init[name]) > 1e-3, name
        errors[name] = rel_err(a, b)
    return errors


def _galore_torch_basis(projector, side):
    """galore-torch's ortho_matrix in galorex's layout (bases as columns): it keeps a right basis as
    the r×n rows of Vᵀ, a left one as the m×r columns of U, and [U_r, V_rᵀ] for full."""
    ortho = projector.ortho_matrix
    if side == "full":
        return [ortho[0], ortho[1].mT]
    return [ortho.mT] if side == "right" else [ortho]


def _galore_torch_step_ratio(proj_type, eps_mode, eps, weight_decay, steps=50):
    """Step galore-torch and galorex from the same weights and moments on the same gradient, 50
    times (refreshes at 0, 20, 40), and return the largest difference over its rounding bound
    (``rounding.adam_step_bounds``) of any weight or moment entry: ≤ 1 is agreement to float32
    rounding. Before each step galorex takes galore-torch's weights and moments, so both see the
    same gradient bit for bit and their refreshes take the same SVD: the bases must be equal. (Two
    free-running float32 trajectories would instead feed rounding differences into the SVDs, which
    amplify them by the singular-value gaps: a machine-dependent amount no tolerance bounds.)"""
    model_ref, ref_opt, model_ours, ours = _galore_torch_pair(proj_type, eps_mode, eps, weight_decay)
    init = [p.detach().clone() for p in model_ref.parameters()]
    pairs = list(zip(model_ours.parameters(), model_ref.parameters()))
    worst = 0.0
    for step, (x, y) in enumerate(_batches(steps)):
        with torch.no_grad():
            for p, q in pairs:
                p.copy_(q)
                if q in ref_opt.state and "exp_avg" in ref_opt.state[q]:
                    for key in ("exp_avg", "exp_avg_sq"):
                        ours.state[p][key].copy_(ref_opt.state[q][key])
        for model, opt in ((model_ref, ref_opt), (model_ours, ours)):
            opt.zero_grad(set_to_none=True)
            ((model(x) - y) ** 2).mean().backward()
        before = {}
        for p, q in pairs:
            assert torch.equal(p.grad, q.grad)  # same weights, same batch, same kernels
            st_q = ref_opt.state.get(q, {})
            before[p] = (q.detach().clone(), q.grad.clone(), {k: st_q[k].clone() for k in st_q if k.startswith("exp")})
        ref_opt.step()
        ours.step()
        for p, q in pairs:
            w0, grad, moments = before[p]
            if p.dim() >= 2:
                side = proj.projection_side(proj_type, *p.shape)
                keys = ["basis_left", "basis_right"] if side == "full" else ["basis"]
                bases = [ours.state[p][k] for k in keys]
                theirs = _galore_torch_basis(ref_opt.state[q]["projector"], side)
                assert all(torch.equal(a, b) for a, b in zip(bases, theirs)), f"step {step}: bases differ"
                scale = 0.25
            else:
                side, bases, scale = None, None, 1.0
            m_prev = moments.get("exp_avg", torch.zeros_like(ref_opt.state[q]["exp_avg"]))
            v_prev = moments.get("exp_avg_sq", torch.zeros_like(ref_opt.state[q]["exp_avg_sq"]))
            tol = rounding.adam_step_bounds(
                w=w0,
                grad=grad,
                m_prev=m_prev,
                v_prev=v_prev,
                bases=bases,
                side=side,
                step=step + 1,
                lr=2e-3,
                betas=(0.9, 0.999),
                eps=eps,
                weight_decay=weight_decay,
                scale=scale,
                eps_mode=eps_mode,
            )
            worst = max(worst, rounding.worst_ratio(p, q, tol["weight"]))
            for key in ("exp_avg", "exp_avg_sq"):
                worst = max(worst, rounding.worst_ratio(ours.state[p][key], ref_opt.state[q][key], tol[key]))
    # every weight went through refreshes at steps 0, 20, 40 in both optimizers
    for p in model_ours.parameters():
        if p.dim() == 2:
            assert int(ours.state[p]["proj_step"].item()) == 40
    # training moved the weights by much more than the rounding compared above
    for q, q0 in zip(model_ref.parameters(), init):
        assert rel_err(q, q0) > 1e-3
    return worst


def _assert_matches_galore_torch(*args):
    worst = _galore_torch_step_ratio(*args)
    assert worst <= 1, f"a weight or moment differs from galore-torch's by {worst:.3g}× its rounding bound"


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_galore_torch_in_galore_torch_eps_mode(proj_type):
    _assert_matches_galore_torch(proj_type, "galore_torch", 1e-8, 0.0)


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_matches_galore_torch_with_weight_decay(proj_type):
    _assert_matches_galore_torch(proj_type, "galore_torch", 1e-8, 0.1)


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_default_eps_mode_matches_galore_torch_when_eps_is_zero(proj_type):
    # With eps > 0 the default eps_mode="torch" differs from galore-torch by where eps enters:
    # galorex follows the GaLore paper's Algorithm 1 (and torch.optim.AdamW), m̂ / (√v̂ + ε), while
    # galore-torch's code computes (√(1-β₂ᵗ)/(1-β₁ᵗ)) · m / (√v + ε). With ε = 0 both are the same.
    _assert_matches_galore_torch(proj_type, "torch", 0.0, 0.0)


def test_default_eps_mode_differs_from_galore_torch_with_eps():
    """The eps placement really matters (so the eps = 0 test above is not trivially true)."""
    errors = _galore_torch_error("std", "torch", 1e-3, 0.0)
    assert max(errors.values()) > 1e-3, errors
    assert _galore_torch_step_ratio("std", "torch", 1e-3, 0.0) > 1e3
    assert _galore_torch_step_ratio("std", "galore_torch", 1e-3, 0.0) <= 1


@pytest.mark.parametrize("rank", [4, 6])
def test_reverse_std_on_wide_matrix_follows_the_paper(rank):
    """galore-torch's project_back chooses the side from the low-rank tensor's shape. For a wide
    weight (m < n) with reverse_std the basis is on the right (n×r) and the low-rank tensor is m×r;
    with r clipped to m it is square m×m, and galore-torch then multiplies P (r×n in its layout)
    on the left: a shape error. galorex projects back on the side it projected on."""
    Ref = _galore_torch_cls()
    m, n = 4, 10
    torch.manual_seed(3)
    lin = nn.Linear(n, m, bias=False)
    x = torch.randn(8, n)

    # galore-torch fails on this shape
    ref_lin = copy.deepcopy(lin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_opt = Ref(
            [
                {
                    "params": [ref_lin.weight],
                    "rank": rank,
                    "update_proj_gap": 5,
                    "scale": 1.0,
                    "proj_type": "reverse_std",
                }
            ],
            lr=1e-2,
            no_deprecation_warning=True,
        )
    ref_lin(x).pow(2).sum().backward()
    with pytest.raises(RuntimeError):
        ref_opt.step()

    # galorex: the first update equals project_back on the right side, checked in float64
    w = nn.Parameter(lin.weight.detach().to(torch.float64).clone())
    opt = GaLoreAdamW(
        [{"params": [w], "rank": rank, "update_proj_gap": 5, "proj_type": "reverse_std"}],
        lr=1e-2,
        eps=1e-8,
        weight_decay=0.0,
    )
    ref = ReferenceGaLoreAdamW(
        [{"params": [w.detach()], "rank": rank, "update_proj_gap": 5, "proj_type": "reverse_std"}], lr=1e-2, eps=1e-8
    )
    gen = torch.Generator().manual_seed(4)
    for step in range(12):
        grad = torch.randn(m, n, generator=gen, dtype=torch.float64)
        w0 = w.detach().clone()
        w.grad = grad.clone()
        opt.step()
        ref.step([[grad]])
        assert_close_rel(w, ref.groups[0]["params"][0], 1e-10, f"step {step}")
        if step == 0:
            # explicit: D = m̂/(√v̂+ε) with m̂ = R, v̂ = R², R = G P (P the top-m right vectors)
            P = opt.state[w]["basis"]
            assert P.shape == (n, m)
            R = grad @ P
            D = R / (R.abs() + 1e-8)
            expected = w0 - 1e-2 * (D @ P.T)
            assert_close_rel(w, expected, 1e-12, "first update")
            # galore-torch's projector itself: project works (G Pᵀ in its layout, m×m), and
            # project_back then takes the square low-rank tensor for the left case and fails
            from galore_torch.galore_projector import GaLoreProjector

            projector = GaLoreProjector(rank, update_proj_gap=5, proj_type="reverse_std")
            low = projector.project(grad.float(), 0)
            assert low.shape == (m, m)
            torch.testing.assert_close(low.abs(), R.float().abs(), rtol=1e-4, atol=1e-5)
            with pytest.raises(RuntimeError):
                projector.project_back(low)


# ============================================================================ 3. plain AdamW groups


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(fused=True), dict(fused=False), dict(fused=False, foreach=True), dict(fused=False, foreach=False)],
    ids=["default", "fused", "unfused", "foreach", "for-loop"],
)
def test_group_without_rank_matches_torch_adamw(variant):
    """50 steps, each from torch.optim.AdamW's weights and moments and on its gradient: the same step
    to float32 rounding (``rounding.adam_step_bounds``; the fused kernel orders its arithmetic
    differently, and which vector kernels run depends on the CPU)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    twin = copy.deepcopy(model)
    init = [p.detach().clone() for p in model.parameters()]
    hp = dict(lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.1)
    ours = GaLoreAdamW(model.parameters(), **hp, **variant)
    theirs = torch.optim.AdamW(twin.parameters(), **hp)
    pairs = list(zip(model.parameters(), twin.parameters()))
    g = torch.Generator().manual_seed(1)
    for step in range(50):
        with torch.no_grad():
            for p, q in pairs:
                p.copy_(q)
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in theirs.state[q]:
                        ours.state[p][key].copy_(theirs.state[q][key])
        x, y = torch.randn(16, 10, generator=g), torch.randn(16, 3, generator=g)
        for mdl, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            ((mdl(x) - y) ** 2).mean().backward()
        before = {}
        for p, q in pairs:
            assert torch.equal(p.grad, q.grad)
            st_q = theirs.state[q]
            zeros = torch.zeros_like(q)
            before[p] = (
                q.detach().clone(),
                q.grad.clone(),
                st_q.get("exp_avg", zeros).clone(),
                st_q.get("exp_avg_sq", zeros).clone(),
            )
        ours.step()
        theirs.step()
        for p, q in pairs:
            w0, grad, m0, v0 = before[p]
            tol = rounding.adam_step_bounds(
                w=w0, grad=grad, m_prev=m0, v_prev=v0, bases=None, side=None, step=step + 1, **hp
            )
            for what, a, b in [
                ("weight", p, q),
                ("exp_avg", ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"]),
                ("exp_avg_sq", ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"]),
            ]:
                ratio = rounding.worst_ratio(a, b, tol[what])
                assert ratio <= 1, f"step {step} {what}: a difference is {ratio:.3g}× its rounding bound"
    for p, p0 in zip(twin.parameters(), init):
        assert rel_err(p, p0) > 1e-2  # the weights did move
    for p in model.parameters():
        assert "basis" not in ours.state[p]


# ============================================================================ 6. bad input


def _two_groups(**bad):
    a = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(5, 6))
    return [{"params": [a]}, {"params": [b], **bad}]


BAD_GROUPS = [
    (dict(rank=0), "rank"),
    (dict(rank=-1), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(rank=True), "rank"),
    (dict(rank=2, update_proj_gap=0), "update_proj_gap"),
    (dict(rank=2, proj_type="diagonal"), "proj_type"),
    (dict(rank=2, refresh_method="qr"), "refresh_method"),
    (dict(rank=2, moment_policy="forget"), "moment_policy"),
    (dict(eps_mode="keras"), "eps_mode"),
    (dict(rank=2, eps_mode="keras"), "eps_mode"),
    (dict(lr=-1e-3), "lr"),
    (dict(rank=2, eps=-1e-8), "eps"),
    (dict(eps=-1e-8), "eps"),
    (dict(betas=(1.0, 0.9)), "betas"),
    (dict(rank=2, betas=(0.9, -0.1)), "betas"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(rank=2, scale=0.0), "scale"),
    (dict(rank=2, oversample=-1), "oversample"),
    (dict(rank=2, power_iters=-1), "power_iters"),
    (dict(rank=2, refresh_seed=1.5), "refresh_seed"),
    (dict(rank=2, update_proj_gap=2.0), "update_proj_gap"),
]


@pytest.mark.parametrize("bad,key", BAD_GROUPS, ids=[repr(b) for b, _ in BAD_GROUPS])
def test_bad_group_raises_value_error_naming_group_and_key(bad, key):
    with pytest.raises(ValueError) as info:
        GaLoreAdamW(_two_groups(**bad))
    msg = str(info.value)
    assert "param_groups[1]" in msg, msg
    assert repr(key) in msg, msg


@pytest.mark.parametrize("bad,key", BAD_GROUPS[:3], ids=[repr(b) for b, _ in BAD_GROUPS[:3]])
def test_bad_add_param_group_leaves_optimizer_unchanged(bad, key):
    groups = _two_groups(**bad)
    opt = GaLoreAdamW([groups[0]])
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.add_param_group(groups[1])
    assert len(opt.param_groups) == 1
    groups[1].update(rank=2, update_proj_gap=3)
    opt.add_param_group(groups[1])
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("with_rank", [False, True])
def test_sparse_gradient_raises(with_rank):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    lin = nn.Linear(4, 4)
    group = {"params": [emb.weight]}
    if with_rank:
        group.update(rank=2)
    opt = GaLoreAdamW([{"params": list(lin.parameters())}, group], lr=1e-2)
    before = [p.detach().clone() for p in lin.parameters()]
    lin(emb(torch.tensor([1, 2, 3]))).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for p, b in zip(lin.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("with_rank", [False, True])
def test_complex_parameter_raises(with_rank):
    torch.manual_seed(0)
    z = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    opt = GaLoreAdamW([{"params": [z], **({"rank": 2} if with_rank else {})}])
    (z.abs() ** 2).sum().backward()
    with pytest.raises((RuntimeError, TypeError, ValueError), match="complex"):
        opt.step()


class LlamaLike(nn.Module):
    """Module names like a Llama: embed, layers.i.{attn,mlp}.*_proj, norms, lm_head."""

    class Attn(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.q_proj = nn.Linear(d, d, bias=True)
            self.k_proj = nn.Linear(d, d // 2, bias=False)
            self.v_proj = nn.Linear(d, d // 2, bias=False)
            self.o_proj = nn.Linear(d, d, bias=False)

        def forward(self, x):
            return self.o_proj(
                torch.cat([self.q_proj(x)[..., : x.shape[-1] // 2] * self.k_proj(x), self.v_proj(x)], -1)
            )

    class MLP(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.up_proj = nn.Linear(d, h, bias=False)
            self.gate_proj = nn.Linear(d, h, bias=False)
            self.down_proj = nn.Linear(h, d, bias=False)

        def forward(self, x):
            return self.down_proj(torch.tanh(self.gate_proj(x)) * self.up_proj(x))

    class Norm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    class Block(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.attn_norm = LlamaLike.Norm(d)
            self.attn = LlamaLike.Attn(d)
            self.mlp_norm = LlamaLike.Norm(d)
            self.mlp = LlamaLike.MLP(d, h)

        def forward(self, x):
            x = x + self.attn(self.attn_norm(x))
            return x + self.mlp(self.mlp_norm(x))

    def __init__(self, vocab=20, d=8, h=12, layers=2, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([LlamaLike.Block(d, h) for _ in range(layers)])
        self.norm = LlamaLike.Norm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _lm_loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (3, 7), generator=g)
    logits = model(ids)
    return nn.functional.cross_entropy(logits.reshape(-1, 20), ids.roll(1, 1).reshape(-1))


def _snapshot_state(opt):
    return {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        for p, st in opt.state.items()
    }


def _assert_state_equal(opt, snap):
    assert set(snap) == {id(p) for p in opt.state}
    for p, state in opt.state.items():
        old = snap[id(p)]
        assert set(old) == set(state)
        for k, v in state.items():
            assert torch.equal(v, old[k]), k


@pytest.mark.parametrize("policy", POLICIES)
def test_non_finite_gradient_at_refresh_keeps_everything(policy):
    torch.manual_seed(0)
    model = LlamaLike()
    groups = galore_param_groups(model, rank=3, update_proj_gap=3, moment_policy=policy, weight_decay=0.1)
    opt = GaLoreAdamW(groups, lr=1e-2)
    for s in range(3):
        opt.zero_grad()
        _lm_loss(model, s).backward()
        opt.step()
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = _snapshot_state(opt)

    opt.zero_grad()
    _lm_loss(model, 3).backward()
    bad_name = "layers.1.mlp.up_proj.weight"
    dict(model.named_parameters())[bad_name].grad[2, 1] = float("nan")
    with pytest.raises(FloatingPointError) as info:
        opt.step()
    assert repr(bad_name) in str(info.value)
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]), n
    _assert_state_equal(opt, state_before)

    # a finite gradient next time: this is still the refresh step, and it works
    opt.zero_grad()
    _lm_loss(model, 3).backward()
    opt.step()
    bad = dict(model.named_parameters())[bad_name]
    assert torch.isfinite(bad).all()
    assert not torch.equal(bad, params_before[bad_name])
    assert not torch.equal(opt.state[bad]["basis"], state_before[id(bad)]["basis"])
    assert int(opt.state[bad]["step"].item()) == 4
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_non_finite_gradient_at_first_step_names_sequential_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    opt = GaLoreAdamW(galore_param_groups(model, rank=2, target_modules="all-linear"), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 6)).sum().backward()
    model[0].weight.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"'0\.weight'"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert all(not st for st in opt.state.values())
    model[0].weight.grad[0, 0] = 0.5
    opt.step()
    assert "basis" in opt.state[model[0].weight]


# ============================================================================ 7. galore_param_groups


def _matrix_names(model, predicate):
    return sorted(n for n, p in model.named_parameters() if p.dim() >= 2 and predicate(n))


def test_default_targets_attn_and_mlp_weights():
    model = LlamaLike()
    selected = sorted(select_galore_parameters(model))
    expected = _matrix_names(model, lambda n: ".attn." in n or ".mlp." in n)
    assert selected == expected
    assert len(expected) == 2 * 7
    groups = galore_param_groups(model, rank=4)
    assert len(groups) == 2
    assert "rank" not in groups[0] and groups[1]["rank"] == 4
    proj_names = sorted(n for n, _ in groups[1]["params"])
    assert proj_names == expected
    all_names = sorted(n for n, _ in groups[0]["params"]) + proj_names
    assert sorted(all_names) == sorted(n for n, _ in model.named_parameters())
    rest = {n for n, _ in groups[0]["params"]}
    for n in (
        "embed.weight",
        "lm_head.weight",
        "norm.weight",
        "layers.0.attn_norm.weight",
        "layers.1.attn.q_proj.bias",
    ):
        assert n in rest


def test_regex_target():
    model = LlamaLike()
    selected = sorted(select_galore_parameters(model, r"\.(q|v)_proj$"))
    assert selected == _matrix_names(model, lambda n: n.endswith(("q_proj.weight", "v_proj.weight")))
    assert len(selected) == 4
    with pytest.raises(ValueError):
        select_galore_parameters(model, r"(unclosed")


@pytest.mark.parametrize("tie", [False, True])
def test_all_linear_excludes_head_embeddings_and_norms(tie):
    model = LlamaLike(tie=tie)
    selected = sorted(select_galore_parameters(model, "all-linear"))
    linear_weights = sorted(
        f"{mn}.weight" for mn, m in model.named_modules() if isinstance(m, nn.Linear) and mn != "lm_head"
    )
    assert selected == linear_weights
    for target in ("all-linear", r".*", ("embed", "lm_head", "norm", "attn", "mlp", "")):
        sel = select_galore_parameters(model, target)
        assert "embed.weight" not in sel and "lm_head.weight" not in sel
        assert not any("norm" in n for n in sel), sel


def test_no_match_raises():
    model = LlamaLike()
    with pytest.raises(ValueError, match="matches no weight"):
        galore_param_groups(model, target_modules=("transformer_block",))
    with pytest.raises(ValueError):
        galore_param_groups(model, target_modules=r"^nothing$")


def test_param_names_reach_the_optimizer():
    model = LlamaLike()
    groups = galore_param_groups(model, rank=2)
    expected = [list(g["params"]) for g in groups]  # (name, tensor) pairs
    opt = GaLoreAdamW(groups)
    assert len(opt.param_groups) == len(expected) == 2
    for pairs, gopt in zip(expected, opt.param_groups):
        assert gopt["param_names"] == [n for n, _ in pairs]
        assert all(a is b for (_, a), b in zip(pairs, gopt["params"]))
    named = dict(model.named_parameters())
    assert all(named[n] is p for g in opt.param_groups for n, p in zip(g["param_names"], g["params"]))


def test_galore_param_groups_train_and_project_only_selected():
    torch.manual_seed(0)
    model = LlamaLike()
    opt = GaLoreAdamW(galore_param_groups(model, rank=2, update_proj_gap=5), lr=1e-2)
    for s in range(3):
        opt.zero_grad()
        _lm_loss(model, s).backward()
        opt.step()
    selected = set(select_galore_parameters(model))
    for n, p in model.named_parameters():
        st = opt.state[p]
        assert ("basis" in st) == (n in selected), n
        if n in selected:
            assert st["exp_avg"].shape != p.shape


def test_one_dimensional_params_in_rank_group_are_adamw():
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(7, generator=g)), nn.Parameter(torch.randn(3, generator=g))]
    twins = [nn.Parameter(p.detach().clone()) for p in ps]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    ours = GaLoreAdamW([{"params": ps, "rank": 2, "update_proj_gap": 3, "scale": 0.25}], **hp)
    theirs = torch.optim.AdamW(twins, **hp)
    for _ in range(20):
        for p, q in zip(ps, twins):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(ps, twins):
        assert_close_rel(p, q, 1e-6)
        assert "basis" not in ours.state[p]
        assert ours.state[p]["exp_avg"].shape == p.shape


# ============================================================================ 9. moment policies


def _structured_grads(m, n, r, steps, seed, flip_at=()):
    """Gradients U diag(s_t) Vᵀ with fixed U (m×r), V (n×r) and decreasing, step-varying s_t: the
    top-r singular subspaces never change, so every refresh finds the same bases up to sign."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    out = []
    for t in range(steps):
        s = torch.tensor([4.0, 2.0, 1.0][:r], dtype=torch.float64) * (1 + 0.3 * math.sin(t))
        G = U @ torch.diag(s) @ V.T
        if t in flip_at:
            G = -G
        out.append(G)
    return out


def _run_policy(policy, proj_type, grads, gap, lr=1e-2):
    m, n = grads[0].shape
    g = torch.Generator().manual_seed(7)
    w = nn.Parameter(torch.randn(m, n, generator=g, dtype=torch.float64))
    opt = GaLoreAdamW(
        [{"params": [w], "rank": 3, "update_proj_gap": gap, "proj_type": proj_type, "moment_policy": policy}],
        lr=lr,
        betas=(0.8, 0.9),
    )
    snaps = []
    for G in grads:
        before = {k: v.clone() for k, v in opt.state[w].items()}
        w_before = w.detach().clone()
        w.grad = G.clone()
        opt.step()
        snaps.append((before, w_before, {k: v.clone() for k, v in opt.state[w].items()}))
    return w, opt, snaps


def _low(G, st, side):
    keys = ["basis_left", "basis_right"] if side == "full" else ["basis"]
    return proj.project(G, [st[k] for k in keys], side)


def _transitions(old, new, side):
    keys = ["basis_left", "basis_right"] if side == "full" else ["basis"]
    return [new[k].T @ old[k] for k in keys]


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_reproject_carries_first_moment_when_subspace_is_unchanged(proj_type):
    gap = 4
    grads = _structured_grads(9, 6, 3, 13, seed=1, flip_at={4, 12})
    _, _, snaps = _run_policy("reproject", proj_type, grads, gap)
    side = proj_type
    beta1, beta2 = 0.8, 0.9
    any_flip = False
    for t in (4, 8, 12):
        old, _, new = snaps[t]
        trans = _transitions(old, new, side)
        for R in trans:
            # same subspace: R is a signed permutation-free diagonal (±1)
            torch.testing.assert_close(R.abs(), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
            any_flip = any_flip or bool((torch.diagonal(R) < 0).any())
        low = _low(grads[t], new, side)
        carried = proj.reproject_lowrank(old["exp_avg"], trans, side)
        torch.testing.assert_close(new["exp_avg"], beta1 * carried + (1 - beta1) * low, rtol=1e-12, atol=1e-12)
        # the second moment is unchanged by a ±1 change of coordinates
        torch.testing.assert_close(
            new["exp_avg_sq"], beta2 * old["exp_avg_sq"] + (1 - beta2) * low**2, rtol=1e-12, atol=1e-12
        )
        # equivalently: the full-space first moment is carried exactly
        keys = ["basis_left", "basis_right"] if side == "full" else ["basis"]
        full_old = proj.project_back(old["exp_avg"], [old[k] for k in keys], side)
        full_carried = proj.project_back(carried, [new[k] for k in keys], side)
        torch.testing.assert_close(full_carried, full_old, rtol=1e-10, atol=1e-12)
    if proj_type == "full":
        # negating G flips the sign of the left or the right singular vectors, so at least one
        # refresh really exercised a sign change
        assert any_flip


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_keep_leaves_moments_as_they_are(proj_type):
    gap = 4
    grads = _structured_grads(9, 6, 3, 9, seed=2, flip_at={4})
    _, _, snaps = _run_policy("keep", proj_type, grads, gap)
    beta1, beta2 = 0.8, 0.9
    for t in (4, 8):
        old, _, new = snaps[t]
        low = _low(grads[t], new, proj_type)
        torch.testing.assert_close(new["exp_avg"], beta1 * old["exp_avg"] + (1 - beta1) * low, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            new["exp_avg_sq"], beta2 * old["exp_avg_sq"] + (1 - beta2) * low**2, rtol=1e-12, atol=1e-12
        )
        assert int(new["step"].item()) == t + 1


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_reset_restarts_like_a_fresh_optimizer(proj_type):
    gap = 5
    g = torch.Generator().manual_seed(11)
    grads = [torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(11)]
    w, opt, snaps = _run_policy("reset", proj_type, grads, gap)
    for t in (5, 10):
        old, w_before, new = snaps[t]
        side = proj.projection_side(proj_type, 8, 5)
        low = _low(grads[t], new, side)
        torch.testing.assert_close(new["exp_avg"], (1 - 0.8) * low, rtol=1e-14, atol=0)
        torch.testing.assert_close(new["exp_avg_sq"], (1 - 0.9) * low**2, rtol=1e-14, atol=0)
        # a fresh optimizer from the same weights and gradient does exactly the same update
        fresh_w = nn.Parameter(w_before.clone())
        fresh = GaLoreAdamW(
            [
                {
                    "params": [fresh_w],
                    "rank": 3,
                    "update_proj_gap": gap,
                    "proj_type": proj_type,
                    "moment_policy": "reset",
                }
            ],
            lr=1e-2,
            betas=(0.8, 0.9),
        )
        fresh_w.grad = grads[t].clone()
        fresh.step()
        for k in new:
            if k not in ("step", "proj_step"):
                torch.testing.assert_close(fresh.state[fresh_w][k], new[k], rtol=1e-14, atol=1e-15)
    # and the final weights follow the fresh optimizer's first step at t=10
    torch.testing.assert_close(w.detach(), fresh_w.detach(), rtol=1e-13, atol=1e-15)


def test_policies_actually_differ():
    """keep / reset / reproject give different trajectories once a refresh changes the basis."""
    g = torch.Generator().manual_seed(12)
    grads = [torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(8)]
    finals = [_run_policy(pol, "std", grads, 4)[0].detach() for pol in POLICIES]
    for i in range(3):
        for j in range(i + 1, 3):
            assert rel_err(finals[i], finals[j]) > 1e-6
