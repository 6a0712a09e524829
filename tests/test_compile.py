"""``compile=`` on every galorex optimizer: the numeric update after the (host-side) refresh
schedule is compiled as one graph — ``fullgraph=True``, so a graph break (a host synchronisation
such as ``.item()``) is an error — that is reused across refresh and ordinary steps and across
learning-rate changes of a tensor ``lr``, and gives eager's result to float32 rounding.

Compile time on a 2-core CPU is the cost here: the equivalence runs use the ``aot_eager`` backend
(dynamo and AOT autograd, no code generation) and one small test runs inductor itself.
"""

from __future__ import annotations

import copy

import pytest
import rounding
import torch
from problems import make_regression_model, regression_groups, train_regression

import galorex

pytestmark = pytest.mark.usefixtures("single_thread")

OPTIMIZERS = {
    # betas and eps as tensors too: inside the graph they stay tensors (no host read)
    "galore": (galorex.GaLoreAdamW, {"betas": (torch.tensor(0.9), torch.tensor(0.999)), "eps": torch.tensor(1e-8)}),
    "natural-galore": (galorex.NaturalGaLoreAdamW, {"natural_history": 3}),
    "gradnorm-lorp": (galorex.GradNormLoRPAdamW, {}),
    "galore-adafactor": (galorex.GaLoreAdafactor, {"relative_step": False, "beta1": 0.9}),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Compiled code is cached per function; each test starts from none so counts are its own.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """aot_eager, counting the graphs it is given (one per compilation)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _pair(name, compile, lr, **extra):
    cls, kw = OPTIMIZERS[name]
    kw = {**kw, **extra, "weight_decay": 0.1}
    eager_model = make_regression_model()
    compiled_model = copy.deepcopy(eager_model)
    # rank 8 of the 128×64 and 96×128 weights, refreshed every 3 steps; biases in a dense group
    eager = cls(regression_groups(eager_model, rank=8, gap=3), lr=lr() if callable(lr) else lr, **kw)
    compiled = cls(
        regression_groups(compiled_model, rank=8, gap=3), lr=lr() if callable(lr) else lr, compile=compile, **kw
    )
    return eager_model, eager, compiled_model, compiled


def _sync(eager_model, eager, compiled_model, compiled):
    """Give the compiled optimizer eager's weights and state (in place: the compiled graph's
    inputs stay the same tensors)."""
    with torch.no_grad():
        for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
            p.copy_(q)
            for key, value in eager.state[q].items():
                if isinstance(value, torch.Tensor):
                    compiled.state[p][key].copy_(value)


# The longest sum in the regression problem's steps: the 128-wide projections.
LONGEST_SUM = 128


def _step_in_sync(eager_model, eager, compiled_model, compiled):
    """One step of each from eager's weights and state on the same batch; assert the compiled step
    lands within the rounding bound of one float32 step (``rounding.update_bounds``). Free-running
    float32 trajectories would instead feed their rounding differences into the refreshes' SVDs,
    which amplify them by the singular-value gaps (a machine-dependent amount)."""
    _sync(eager_model, eager, compiled_model, compiled)
    before = [q.detach().clone() for q in eager_model.parameters()]
    eager_losses = train_regression(eager_model, eager, 1)
    compiled_losses = train_regression(compiled_model, compiled, 1)
    assert compiled_losses == eager_losses  # the same weights and batch
    for p, q, q0 in zip(compiled_model.parameters(), eager_model.parameters(), before):
        assert torch.equal(p.grad, q.grad)
        ratio = rounding.worst_ratio(p, q, rounding.update_bounds(q0, q, LONGEST_SUM))
        assert ratio <= 1, f"a weight differs from eager's by {ratio:.3g}× its rounding bound"
        for key, value in compiled.state[p].items():
            ref = eager.state[q][key]
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                assert torch.equal(value, ref) if isinstance(value, torch.Tensor) else value == ref, key
                continue
            ratio = rounding.worst_ratio(value, ref, rounding.state_bounds(ref, LONGEST_SUM))
            assert ratio <= 1, f"state {key!r} differs from eager's by {ratio:.3g}× its rounding bound"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_update_matches_eager_in_one_graph(name):
    """7 steps (refreshes at 0, 3, 6) with a StepLR halving a tensor lr, each from eager's weights
    and state: the same step as eager to float32 rounding, one graph per compiled method and no
    graph break."""
    backend = CountingBackend()
    eager_model, eager, compiled_model, compiled = _pair(name, {"backend": backend}, lambda: torch.tensor(2e-3))
    before = [p.detach().clone() for p in eager_model.parameters()]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (eager, compiled)]
    for _ in range(7):
        _step_in_sync(eager_model, eager, compiled_model, compiled)
        for s in scheds:
            s.step()
    for p, p0 in zip(eager_model.parameters(), before):
        assert (p - p0).abs().max() > 1e-4  # it moved: the comparison is not vacuous
    assert compiled.param_groups[0]["lr"].item() == pytest.approx(2e-3 / 8)
    # the projected update, plus Adafactor's own dense update (AdamW's dense step is torch's
    # fused kernel, left as it is): compiled once each, despite refreshes and lr changes
    assert backend.graphs == (2 if name == "galore-adafactor" else 1)
    assert not torch._dynamo.utils.counters["graph_break"]


def test_a_staggered_refresh_schedule_keeps_one_graph():
    """refresh_schedule="staggered" (the two weights refresh at different steps): the host decides
    which refresh, the compiled update is the same one graph, in step with eager."""
    backend = CountingBackend()
    pair = _pair("galore", {"backend": backend}, 2e-3, refresh_schedule="staggered")
    for _ in range(7):
        _step_in_sync(*pair)
    eager = pair[1]
    weights = eager.param_groups[0]["params"]
    assert sorted(int(eager.state[p]["proj_step"]) for p in weights) == [4, 6]  # phases 0 and 1 of gap 3
    assert backend.graphs == 1
    assert not torch._dynamo.utils.counters["graph_break"]


def test_float_lr_changes_are_seen_by_the_compiled_update():
    """A Python-float lr is read as a constant or a symbolic input; either way a scheduler's new
    value must reach the compiled update (each step follows eager's)."""
    eager_model, eager, compiled_model, compiled = _pair("galore", {"backend": "aot_eager"}, 4e-3)
    for o in (eager, compiled):
        o.param_groups[0]["lr"] = 4e-3
    for step in range(4):
        for o in (eager, compiled):
            o.param_groups[0]["lr"] = 4e-3 / (step + 1)
        _step_in_sync(eager_model, eager, compiled_model, compiled)


def test_inductor_compiled_adafactor_matches_eager():
    """The default backend (inductor, generating C++ on the CPU), on one projected weight."""
    torch.manual_seed(0)
    w_eager = torch.nn.Parameter(torch.randn(24, 10))
    w_compiled = torch.nn.Parameter(w_eager.detach().clone())
    opts = {"rank": 3, "update_proj_gap": 2}
    eager = galorex.GaLoreAdafactor([{"params": [w_eager], **opts}], beta1=0.9)
    compiled = galorex.GaLoreAdafactor([{"params": [w_compiled], **opts}], beta1=0.9, compile=True)
    w0 = w_eager.detach().clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        grad = torch.randn(24, 10, generator=g)
        w_eager.grad, w_compiled.grad = grad.clone(), grad.clone()
        eager.step()
        compiled.step()
    torch.testing.assert_close(w_compiled, w_eager, rtol=1e-5, atol=1e-6)
    assert (w_eager - w0).abs().max() > 1e-3  # it moved: the comparison is not vacuous
    assert not torch._dynamo.utils.counters["graph_break"]


def test_compile_option_is_validated():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="compile"):
        galorex.GaLoreAdamW([w], compile="inductor")


@pytest.mark.parametrize(
    "cls,rotation", [(galorex.GaLoreAdamW, False), (galorex.GradNormLoRPAdamW, False), (galorex.GaLoreAdamW, True)]
)
def test_8bit_moments_and_4bit_bases_compile_without_graph_breaks(cls, rotation):
    """optim_bits=8 and basis_bits=4 (rotated or not) trace into the same single graph. Against eager
    the match is to the quantisation step, not to float32 rounding: a rounding difference can move a
    value to the next 8-bit code (1/256 of its block's range), as a 1e-7 perturbation does in eager."""
    backend = CountingBackend()
    eager_model = make_regression_model()
    compiled_model = copy.deepcopy(eager_model)
    # rank 48: the 128×48 low-rank moments (6144 entries) are past the 4096 that stay float32
    opts = {"rank": 48, "gap": 3, "basis_bits": 4, "basis_rotation": rotation}
    eager = cls(regression_groups(eager_model, **opts), lr=torch.tensor(1e-3), optim_bits=8)
    compiled = cls(
        regression_groups(compiled_model, **opts), lr=torch.tensor(1e-3), optim_bits=8, compile={"backend": backend}
    )
    before = [p.detach().clone() for p in eager_model.parameters()]
    for _ in range(5):
        train_regression(eager_model, eager, 1)
        train_regression(compiled_model, compiled, 1)
    assert "exp_avg_q" in compiled.state[compiled_model[0].weight]
    assert ("basis_q4h" if rotation else "basis_q4") in compiled.state[compiled_model[0].weight]
    for a, b, b0 in zip(compiled_model.parameters(), eager_model.parameters(), before):
        moved = (b - b0).abs().max().item()
        assert moved > 1e-4
        assert (a - b).abs().max().item() < 0.05 * moved  # within a few percent of the step taken
    assert backend.graphs == 1
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("name", ["galore", "galore-adafactor"])
def test_torch_compile_of_step_runs_the_host_schedule_eagerly(name):
    """``torch.compile(opt.step)``: the step is excluded from tracing (its refresh schedule reads
    counters and runs an SVD on the host), so it gives the eager result rather than failing in
    dynamo, and a ``compile=`` optimizer still compiles its update inside it."""
    backend = CountingBackend()
    eager_model, eager, compiled_model, compiled = _pair(name, {"backend": backend}, lambda: torch.tensor(2e-3))
    compiled.step = torch.compile(compiled.step, backend="eager")
    for _ in range(4):
        _step_in_sync(eager_model, eager, compiled_model, compiled)
    assert backend.graphs >= 1
