"""Properties of galorex.projection (hypothesis) and of the bases the optimizer keeps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from galorex import GaLoreAdamW
from galorex import projection as proj

pytestmark = pytest.mark.usefixtures("single_thread")

dims = st.integers(1, 40)
ranks = st.integers(1, 50)
seeds = st.integers(0, 2**31 - 1)
sides = st.sampled_from(proj.SIDES)
methods = st.sampled_from(proj.REFRESH_METHODS)
# fp32 matrices, and bf16 gradients upcast to float32 as the optimizer does (compute_dtype)
dtypes = st.sampled_from(["fp32", "bf16"])


def _matrix(m, n, seed, kind, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g, dtype=torch.float64)
    if kind == "bf16":
        return a.to(torch.bfloat16).to(torch.float32)
    return a.to(dtype)


def _orth_err(b):
    k = b.shape[1]
    eye = torch.eye(k, dtype=b.dtype)
    return (b.mT @ b - eye).abs().max().item()


def _generator(seed):
    return torch.Generator().manual_seed(seed)


@given(m=dims, n=dims, rank=ranks, side=sides, method=methods, kind=dtypes, seed=seeds)
def test_bases_are_orthonormal_with_clipped_rank(m, n, rank, side, method, kind, seed):
    g = _matrix(m, n, seed, kind)
    bases = proj.compute_bases(g, rank, side, method, generator=_generator(seed))
    r = min(rank, m, n)
    expected_shapes = proj.basis_shapes(side, m, n, rank)
    assert [tuple(b.shape) for b in bases] == expected_shapes
    assert all(s[1] == r for s in expected_shapes)
    for b in bases:
        assert b.dtype == torch.float32
        assert _orth_err(b) < 1e-5 * max(1, r) ** 0.5 + 1e-5


@given(m=dims, n=dims, rank=ranks, side=sides, method=methods, kind=dtypes, seed=seeds)
def test_projection_is_idempotent_and_contractive(m, n, rank, side, method, kind, seed):
    g = _matrix(m, n, seed, kind)
    # the bases come from another matrix than the one projected: the properties hold for any G
    other = _matrix(m, n, seed + 1, kind)
    bases = proj.compute_bases(other, rank, side, method, generator=_generator(seed))
    once = proj.project_back(proj.project(g, bases, side), bases, side)
    twice = proj.project_back(proj.project(once, bases, side), bases, side)
    scale = g.norm().item()
    assert (twice - once).norm().item() <= 1e-5 * scale + 1e-6
    assert once.norm().item() <= scale * (1 + 1e-5)
    low = proj.project(g, bases, side)
    assert tuple(low.shape) == proj.lowrank_shape(side, m, n, rank)
    # project_back is the adjoint of project: <P(G), L> = <G, back(L)>
    lo = torch.randn(low.shape, generator=_generator(seed + 2))
    lhs = (low * lo).sum().item()
    rhs = (g * proj.project_back(lo, bases, side)).sum().item()
    assert abs(lhs - rhs) <= 1e-4 * (g.norm() * lo.norm()).item() + 1e-6


@given(m=dims, n=dims, inner=st.integers(1, 50), extra=st.integers(0, 10), side=sides, method=methods, seed=seeds)
def test_low_rank_gradient_is_recovered_exactly(m, n, inner, extra, side, method, seed):
    r = min(inner, m, n)
    rank = r + extra
    g = _generator(seed)
    a = torch.randn(m, r, generator=g)
    b = torch.randn(n, r, generator=g)
    G = a @ b.mT
    bases = proj.compute_bases(G, rank, side, method, generator=_generator(seed))
    rec = proj.project_back(proj.project(G, bases, side), bases, side)
    assert (rec - G).norm().item() <= 2e-4 * G.norm().item() + 1e-6


@given(m=dims, n=dims)
def test_std_and_reverse_std_follow_the_shape(m, n):
    std = proj.projection_side("std", m, n)
    rev = proj.projection_side("reverse_std", m, n)
    assert std == ("right" if m >= n else "left")
    assert rev == ("left" if m >= n else "right")
    for literal in proj.SIDES:
        assert proj.projection_side(literal, m, n) == literal
    # std keeps the smaller dimension's basis: low-rank state has the larger dimension
    lm, ln = proj.lowrank_shape(std, m, n, 1)
    assert max(lm, ln) == max(m, n)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="proj_type"):
        proj.projection_side("diag", 3, 4)
    with pytest.raises(ValueError, match="refresh_method"):
        proj.compute_bases(torch.randn(3, 4), 2, "left", "qr")


@given(
    m=st.integers(8, 40),
    n=st.integers(8, 40),
    rank=st.integers(1, 8),
    decay=st.floats(0.3, 0.8),
    side=sides,
    seed=seeds,
)
def test_randomized_refresh_captures_top_energy(m, n, rank, decay, side, seed):
    g = _generator(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(k, dtype=torch.float64)
    G = (u * s) @ v.mT + 1e-6 * torch.randn(m, n, generator=g, dtype=torch.float64)
    G = G.to(torch.float32)
    # the defaults of GaLoreAdamW: oversample=16, power_iters=2
    bases = proj.compute_bases(
        G, rank, side, "randomized", oversample=16, power_iters=2, generator=_generator(seed + 1)
    )
    # for "full", the energy of the two-sided projection Pₗᵀ G Pᵣ against the top-r energy
    energy = proj.captured_energy(G, bases, side)
    assert 0.99 <= energy <= 1 + 1e-4


def test_captured_energy_of_exact_svd_is_one_and_of_a_bad_basis_is_low():
    g = _generator(0)
    u = torch.linalg.qr(torch.randn(30, 10, generator=g)).Q
    v = torch.linalg.qr(torch.randn(20, 10, generator=g)).Q
    G = (u * 0.5 ** torch.arange(10.0)) @ v.mT
    for side in proj.SIDES:
        exact = proj.compute_bases(G, 3, side, "svd")
        assert abs(proj.captured_energy(G, exact, side) - 1) < 1e-4
    # the bottom singular directions capture almost nothing: the check can fail
    bottom = [torch.linalg.svd(G, full_matrices=False).U[:, -3:]]
    assert proj.captured_energy(G, bottom, "left") < 0.01


def test_randomized_is_deterministic_given_the_generator():
    G = torch.randn(20, 30, generator=_generator(1))
    a = proj.compute_bases(G, 4, "full", "randomized", generator=_generator(5))
    b = proj.compute_bases(G, 4, "full", "randomized", generator=_generator(5))
    c = proj.compute_bases(G, 4, "full", "randomized", power_iters=0, oversample=0, generator=_generator(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@given(
    m=dims,
    n=dims,
    rank=ranks,
    side=sides,
    seed=seeds,
)
def test_reproject_lowrank_equals_project_of_project_back(m, n, rank, side, seed):
    G1 = _matrix(m, n, seed, "fp32", torch.float64)
    G2 = _matrix(m, n, seed + 1, "fp32", torch.float64)
    old = proj.compute_bases(G1, rank, side)
    new = proj.compute_bases(G2, rank, side)
    low = proj.project(G1, old, side)
    direct = proj.project(proj.project_back(low, old, side), new, side)
    via = proj.reproject_lowrank(low, proj.transition_matrices(old, new), side)
    torch.testing.assert_close(via, direct, rtol=1e-10, atol=1e-10)


@given(
    m=dims, n=dims, rank=ranks, side=sides, seed=seeds, beta=st.sampled_from([0.0, 0.7, 1.0]), alpha=st.floats(-2, 2)
)
def test_add_projected_back_matches_explicit_formula(m, n, rank, side, seed, beta, alpha):
    G = _matrix(m, n, seed, "fp32", torch.float64)
    W = _matrix(m, n, seed + 3, "fp32", torch.float64)
    bases = proj.compute_bases(G, rank, side)
    low = proj.project(G, bases, side)
    expected = beta * W + alpha * proj.project_back(low, bases, side)
    out = W.clone()
    ret = proj.add_projected_back_(out, low, bases, side, alpha=alpha, beta=beta)
    assert ret.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------- bases inside the optimizer


@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    shape3=st.booleans(),
    rank=ranks,
    gap=st.integers(2, 5),
    proj_type=st.sampled_from(proj.PROJ_TYPES),
    method=methods,
    bf16=st.booleans(),
    seed=seeds,
)
def test_basis_is_constant_between_refreshes(m, n, shape3, rank, gap, proj_type, method, bf16, seed):
    g = _generator(seed)
    shape = (m, n, 2) if shape3 else (m, n)
    dtype = torch.bfloat16 if bf16 else torch.float32
    w = nn.Parameter(torch.randn(shape, generator=g).to(dtype))
    opt = GaLoreAdamW(
        [{"params": [w], "rank": rank, "update_proj_gap": gap, "proj_type": proj_type, "refresh_method": method}],
        lr=1e-3,
    )
    mm, nn_ = proj.matrix_shape(shape)
    side = proj.projection_side(proj_type, mm, nn_)
    keys = ["basis_left", "basis_right"] if side == "full" else ["basis"]
    r = min(rank, mm, nn_)
    history = []
    for _ in range(2 * gap + 1):
        w.grad = torch.randn(shape, generator=g).to(dtype)
        opt.step()
        st_ = opt.state[w]
        history.append([st_[k].clone() for k in keys])
        for b in history[-1]:
            assert b.dtype == torch.float32
            assert b.shape[1] == r
            assert _orth_err(b) < 1e-4
        assert set(st_) == {"step", "proj_step", "exp_avg", "exp_avg_sq", *keys}
        assert tuple(st_["exp_avg"].shape) == proj.lowrank_shape(side, mm, nn_, rank)
    for step in range(1, 2 * gap + 1):
        same = all(torch.equal(a, b) for a, b in zip(history[step], history[step - 1]))
        if step % gap == 0:
            # a fresh random gradient gives a new basis (unless the basis is the whole space, 1-D)
            if all(b.shape[0] > 1 for b in history[step]):
                assert not same, f"basis unchanged at refresh step {step}"
        else:
            assert same, f"basis changed at step {step}, between refreshes"
