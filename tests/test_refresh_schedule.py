"""``refresh_schedule="staggered"``: each projected matrix refreshes at its own phase, under every
optimizer whose basis comes from the gradient. The phase rule covers every matrix exactly once per
period and balances the cost; the schedule is the same after load_state_dict (bit for bit), a
pickle, in layer-wise mode and at any gap-1 run (= together); generated projections (APOLLO's
random ones) keep advancing together."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import galorex
from galorex import ApolloAdamW, GaLoreAdamW
from galorex.optim import schedule
from galorex.optim.config import PROJ_STEP, STEP

pytestmark = pytest.mark.usefixtures("single_thread")

# Six weights of six different shapes (16×10, 12×16, 20×12, 8×20, 14×8, 6×14).
SIZES = (10, 16, 12, 20, 8, 14, 6)


def _stack(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(SIZES, SIZES[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def _groups(model: nn.Module, gap: int, refresh_schedule: str, **extra) -> list[dict]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    group = {"params": weights, "rank": 3, "update_proj_gap": gap, "refresh_schedule": refresh_schedule}
    return [{**group, **extra}, {"params": biases}]


def _batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(12, SIZES[0], generator=g, dtype=dtype), torch.randn(12, SIZES[-1], generator=g, dtype=dtype))
        for _ in range(n)
    ]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, layerwise: bool = False) -> None:
    for x, y in batches:
        if not layerwise:
            opt.zero_grad(set_to_none=True)
        (model(x) - y).square().mean().backward()
        opt.step()


def _assert_same(a: nn.Module, b: nn.Module, opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        state_a, state_b = opt_a.state[p], opt_b.state[q]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key


# ----------------------------------------------------------------------------- the phase rule
@given(
    costs=st.lists(st.integers(1, 10**9), min_size=1, max_size=40),
    gap=st.integers(1, 12),
    start=st.integers(1, 60),
)
def test_every_matrix_refreshes_exactly_once_per_period_and_the_cost_is_balanced(costs, gap, start):
    phases = schedule.staggered_phases(costs, gap)
    assert len(phases) == len(costs) and all(0 <= f < gap for f in phases)
    for phase in phases:  # any gap consecutive steps after the first
        assert sum(schedule.refreshes_at(t, gap, phase) for t in range(start, start + gap)) == 1
    load = [sum(c for c, f in zip(costs, phases) if f == phase) for phase in range(gap)]
    # The longest-processing-time rule's guarantee: the busiest step exceeds the idlest by at most
    # one matrix (the last one it was given, when it was the idlest).
    assert max(load) - min(load) <= max(costs)


@given(n=st.integers(1, 60), gap=st.integers(1, 12))
def test_equal_costs_go_round_robin(n, gap):
    phases = schedule.staggered_phases([5] * n, gap)
    counts = [phases.count(f) for f in range(gap)]
    assert max(counts) - min(counts) <= 1
    assert phases == tuple(i % gap for i in range(n))


def test_a_bad_schedule_is_refused_naming_the_key_and_the_values():
    with pytest.raises(ValueError, match=r"'refresh_schedule' must be one of \('together', 'staggered'\).*'sometimes'"):
        GaLoreAdamW(_groups(_stack(), 4, "sometimes"))


# ----------------------------------------------------------------------------- the optimizer
def _refreshed_at(opt: GaLoreAdamW, params: list[torch.Tensor], step: int) -> list[bool]:
    """After the optimizer's step ``step`` (0-based): which parameters computed a basis in it."""
    out = []
    for p in params:
        state = opt.state[p]
        assert int(state[STEP]) == step + 1
        out.append(step == 0 or int(state[PROJ_STEP]) == step)
    return out


@pytest.mark.parametrize("refresh_schedule", ["together", "staggered"])
def test_the_schedule_each_matrix_follows(refresh_schedule):
    gap = 4
    model = _stack()
    opt = GaLoreAdamW(_groups(model, gap, refresh_schedule), lr=1e-2)
    weights = opt.param_groups[0]["params"]
    phases = schedule.group_phases(opt.param_groups[0], opt.is_projected)
    history = []
    for step, batch in enumerate(_batches(13)):
        _train(model, opt, [batch])
        history.append(_refreshed_at(opt, weights, step))
    assert all(history[0])  # the first step computes every basis
    for i in range(len(weights)):
        refreshed = [t for t in range(1, 13) if history[t][i]]
        if refresh_schedule == "together":
            assert refreshed == [4, 8, 12]
        else:
            assert refreshed == [t for t in range(1, 13) if t % gap == phases[i]]
    if refresh_schedule == "staggered":
        # Six matrices over four steps: no step after the first refreshes more than two, and
        # (from the cost balance) no step is left without one.
        per_step = [sum(h) for h in history[1:]]
        assert max(per_step) <= 2 and min(per_step) >= 1
        # The phases follow from the shapes: a bigger SVD is never put with more work than it.
        costs = [m * n * min(m, n) for m, n in (p.shape for p in weights)]
        assert sorted(set(phases.values())) == [0, 1, 2, 3]
        assert schedule.staggered_phases(costs, gap) == tuple(phases[i] for i in range(len(weights)))


def test_with_gap_1_staggered_is_together():
    runs = []
    for refresh_schedule in ("together", "staggered"):
        model = _stack()
        opt = GaLoreAdamW(_groups(model, 1, refresh_schedule), lr=1e-2)
        _train(model, opt, _batches(4))
        runs.append((model, opt))
    _assert_same(runs[0][0], runs[1][0], runs[0][1], runs[1][1])


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_the_schedule_survives_load_state_dict_bit_for_bit(method):
    batches = _batches(12)
    extra = {"refresh_method": method, "moment_policy": "reproject"}
    model = _stack()
    opt = GaLoreAdamW(_groups(model, 4, "staggered", **extra), lr=1e-2)
    _train(model, opt, batches[:5])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin = copy.deepcopy(model)
    twin_opt = GaLoreAdamW(_groups(twin, 4, "staggered", **extra), lr=1e-2)
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer, weights_only=True))
    _train(model, opt, batches[5:])
    _train(twin, twin_opt, batches[5:])
    _assert_same(model, twin, opt, twin_opt)


def test_a_pickled_optimizer_keeps_the_schedule():
    batches = _batches(10)
    model = _stack()
    opt = GaLoreAdamW(_groups(model, 4, "staggered"), lr=1e-2)
    _train(model, opt, batches[:3])
    twin, twin_opt = pickle.loads(pickle.dumps((model, opt)))
    _train(model, opt, batches[3:])
    _train(twin, twin_opt, batches[3:])
    _assert_same(model, twin, opt, twin_opt)


def test_layerwise_equals_normal():
    batches = _batches(9)
    model, twin = _stack(), _stack()
    opt = GaLoreAdamW(_groups(model, 3, "staggered"), lr=1e-2)
    layerwise = GaLoreAdamW(_groups(twin, 3, "staggered"), lr=1e-2, layerwise=True)
    _train(model, opt, batches)
    _train(twin, layerwise, batches, layerwise=True)
    _assert_same(model, twin, opt, layerwise)


def test_staggered_changes_the_run_at_a_gap_above_1():
    """The comparisons above are not vacuous: the schedules part after the first step."""
    runs = []
    for refresh_schedule in ("together", "staggered"):
        model = _stack()
        opt = GaLoreAdamW(_groups(model, 4, refresh_schedule), lr=1e-2)
        _train(model, opt, _batches(3))
        runs.append(model)
    assert not all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), runs[1].parameters()))


def test_generated_projections_keep_their_own_schedule():
    """APOLLO's random projection moves to its next seed at steps 0, T, 2T … under either
    schedule (a seed costs nothing to spread); its SVD projection is staggered like GaLore's."""
    batches = _batches(9)
    for proj, same in (("random", True), ("svd", False)):
        runs = []
        for refresh_schedule in ("together", "staggered"):
            model = _stack()
            opt = ApolloAdamW(_groups(model, 3, refresh_schedule, proj=proj), lr=1e-2)
            _train(model, opt, batches)
            runs.append(model)
        assert all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), runs[1].parameters())) == same, proj


OPTIMIZERS = {
    "GaLoreAdamW": (galorex.GaLoreAdamW, {}),
    "NaturalGaLoreAdamW": (galorex.NaturalGaLoreAdamW, {"natural_history": 2}),
    "GradNormLoRPAdamW": (galorex.GradNormLoRPAdamW, {}),
    "GaLoreAdafactor": (galorex.GaLoreAdafactor, {"relative_step": False}),
    "FiraAdamW": (galorex.FiraAdamW, {}),
    "ApolloAdamW (svd)": (galorex.ApolloAdamW, {"proj": "svd"}),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_refreshes_each_matrix_at_its_phase(name):
    cls, extra = OPTIMIZERS[name]
    gap = 3
    model = _stack()
    groups = _groups(model, gap, "staggered")
    groups[0].update({k: v for k, v in extra.items() if k == "proj"})
    opt = cls(groups, lr=1e-2, **{k: v for k, v in extra.items() if k != "proj"})
    weights = opt.param_groups[0]["params"]
    phases = schedule.group_phases(opt.param_groups[0], opt.is_projected)
    assert len(set(phases.values())) == gap
    for step, batch in enumerate(_batches(7)):
        _train(model, opt, [batch])
        refreshed = _refreshed_at(opt, weights, step)
        assert refreshed == [step == 0 or step % gap == phases[i] for i in range(len(weights))], step
