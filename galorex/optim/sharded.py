"""The GaLore step on FSDP2 parameters (DTensors sharded row-wise on a 1-D device mesh).

FSDP2 (``torch.distributed.fsdp.fully_shard``) leaves each rank the rows W_i of every weight and
the matching rows G_i of its reduce-scattered gradient. GaLore's maths is unchanged; only placement
differs (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"):

    refresh (every update_proj_gap steps):  G = all_gather(G_i);  P ← the same SVD / range finder as
                                            one process would run, on every rank (identical input,
                                            identical bases: no broadcast needed)
    right side (m ≥ n, R = G Q):   R_i = G_i Q,            W_i ← decay·W_i + alpha·D_i Qᵀ
    left side  (m < n, R = Pᵀ G):  R = Σ_i P_iᵀ G_i (all-reduce), each rank keeps the columns of R
                                   it owns;  W_i ← decay·W_i + alpha·P_i D (D all-gathered)

Why gather the whole gradient at a refresh rather than a shard-wise randomized range finder: the
refresh then is *the same* computation as in a single process (an exact SVD included, so
``refresh_method`` keeps its meaning and a sharded run matches a single-process one to rounding),
and its cost — one all-gather of G every ``update_proj_gap`` steps (200 in the paper) — is
amortised to less than one reduce-scatter per step, which FSDP2 already pays every step. A
range finder would need 2·(power_iters+1) collectives per refresh and still could not give the SVD.

Optimizer state is a DTensor on the parameter's mesh, so ``torch.distributed.checkpoint`` saves
and loads it: the basis is sharded on its rows (Q: n×r, P: m×r — P's rows are W's rows), the
moments on the rows (right, m×r, placed exactly like W's rows) or on the columns (left, r×n, so
that a reprojection at a refresh, T·M, stays local). Every rank then holds about 1/N of the state;
the price is one all-gather of Q (n×r) per step on the right side, one all-reduce of R and one
all-gather of D (r×n each) on the left, all small next to FSDP2's own traffic on G (m×n).

Supported: GaLoreAdamW (and NaturalGaLoreAdamW with ``natural_history=0``), 32-bit state, sides
``left``/``right`` (any ``proj_type`` except ``full``), ``proj_precision`` None or ``bf16``, either
``refresh_schedule`` (the phases follow from the global shapes, the same on every rank), parameters
sharded ``Shard(0)`` on a 1-D mesh; unprojected parameters go through torch's AdamW, which handles
DTensors itself. Anything else is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from .. import projection as proj
from ..lowp.projection import BF16, PROJ_PRECISION, projection_bases
from .config import BASIS_BITS, OPTIM_BITS, PROJ_STEP, PROJ_TYPE, RANK, STEP, compute_dtype
from .plan import Plan
from .rules.base import Step

LowRankOptimizer = Any  # the loop (galorex.optim.lowrank), which imports this module on demand


def check_group(opt: LowRankOptimizer, group: dict[str, Any], index: int) -> None:
    """Refuse, at construction, what the sharded step cannot do (the rule says what it supports).

    Args:
        opt: the optimizer (its rule).
        group: the group.
        index: the group's index, for the error message.

    Raises:
        ValueError: the rule, 8-bit state, 4/8-bit bases or ``proj_type="full"`` with DTensors.
    """
    where = f"param_groups[{index}]"
    opt.rule.check_sharding(group, where)
    if group.get(OPTIM_BITS, 32) != 32 or group.get(BASIS_BITS, 32) != 32:
        raise ValueError(f"{where}: optim_bits=8 / basis_bits=4 or 8 are not supported with FSDP2 (DTensor) parameters")
    if group.get(RANK) is not None and group[PROJ_TYPE] == "full":
        raise ValueError(f"{where}: proj_type='full' is not supported with FSDP2 (DTensor) parameters")
    if group.get(RANK) is not None and group.get(PROJ_PRECISION) not in (None, BF16):
        raise ValueError(
            f"{where}: proj_precision={group[PROJ_PRECISION]!r} is not supported with FSDP2 (DTensor) parameters; "
            "use None or 'bf16'"
        )


def _check_placement(opt: LowRankOptimizer, p: DTensor, gi: int, pi: int) -> None:
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"{opt._param_label(gi, pi)}: the sharded GaLore step needs a parameter sharded on its "
            f"rows over a 1-D mesh (FSDP2's default), got placements {tuple(p.placements)} on a "
            f"{p.device_mesh.ndim}-D mesh"
        )


def _local_view(state: dict[str, Any]) -> dict[str, Any]:
    """The state with every DTensor replaced by its local shard (same storage: in-place updates
    land in the DTensor)."""
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}


def _write_back(state: dict[str, Any], view: dict[str, Any]) -> None:
    """Copy into the DTensors what the inner rule replaced (rather than updated in place)."""
    for key, value in view.items():
        held = state.get(key)
        if isinstance(held, DTensor):
            local = held.to_local()
            if value is not local:
                local.copy_(value)
        else:
            state[key] = value


def _moment_placement(side: str) -> Shard:
    return Shard(0) if side == "right" else Shard(1)


def _shard(full: torch.Tensor, mesh, placement: Shard) -> DTensor:
    # Every rank holds the same full tensor: each keeps its own chunk, no communication.
    local = full.chunk(mesh.size(), dim=placement.dim)
    rank = mesh.get_local_rank()
    if rank < len(local):
        mine = local[rank]
    else:  # torch.chunk gives fewer chunks than ranks for a short dimension
        shape = list(full.shape)
        shape[placement.dim] = 0
        mine = full.new_empty(shape)
    return DTensor.from_local(
        mine.contiguous().clone(),
        mesh,
        [placement],
        run_check=False,
        shape=full.shape,
        stride=full.contiguous().stride(),
    )


@torch.no_grad()
def sharded_step(opt: LowRankOptimizer, closure: Callable[[], Any] | None = None) -> Any:
    """``opt.step()`` for an optimizer holding DTensor parameters; see the module docstring.

    Args:
        opt: the optimizer.
        closure: re-evaluates the model and returns the loss (run with gradients enabled).

    Returns:
        The closure's loss, or None.

    Raises:
        ValueError: a projected parameter that is not a DTensor sharded ``Shard(0)`` on a 1-D mesh.
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()

    def check(p: torch.Tensor, gi: int, pi: int) -> None:
        if not isinstance(p, DTensor):
            raise ValueError(
                f"{opt._param_label(gi, pi)}: mixing DTensor and plain projected parameters in one "
                "optimizer is not supported"
            )
        _check_placement(opt, p, gi, pi)

    opt._run_plans(
        opt._step_plans(check),
        lambda group, item: _prepare(opt, group, item),
        lambda group, item: _commit(opt, group, item),
        lambda group, items: _lowrank_step(opt, group, items),
    )
    return loss


def _prepare(opt: LowRankOptimizer, group: dict[str, Any], item: Plan) -> None:
    # Every rank reaches a refresh at the same steps for the same parameters, in the same order, so
    # the all-gathers of the gradient shards pair up; each rank then computes the same bases.
    opt._prepare_projection(
        group, item, full_gradient=lambda p: proj.as_matrix(p.grad.full_tensor()).to(compute_dtype(p.dtype))
    )


def _commit(opt: LowRankOptimizer, group: dict[str, Any], item: Plan) -> None:
    new = item.new_bases
    if new is None:
        return
    p, side = item.param, item.side
    mesh = p.device_mesh
    state = opt.state[p]
    if not state:
        state[STEP] = torch.zeros((), dtype=torch.float32)
        state[PROJ_STEP] = torch.zeros((), dtype=torch.float32)
        m, n = proj.matrix_shape(p.shape)
        fresh: dict[str, Any] = {}
        opt.rule.init_state(
            group, p.to_local(), fresh, proj.lowrank_shape(side, m, n, group[RANK]), compute_dtype(p.dtype)
        )
        for key, value in fresh.items():
            state[key] = _shard(value, mesh, _moment_placement(side))
    else:
        old = [state["basis"].full_tensor()]
        view = _local_view(state)
        # The moment policies act on whole rows (right side) or whole columns (left side) of the
        # moments with an r×r transition, so each rank applies them to its own shard.
        opt.rule.on_refresh(group, view, old, new, side)
        _write_back(state, view)
        state[PROJ_STEP].fill_(item.step)
    state["basis"] = _shard(new[0], mesh, Shard(0))
    item.new_bases = None


def _lowrank_step(opt: LowRankOptimizer, group: dict[str, Any], items: list[Plan]) -> None:
    params = [it.param for it in items]
    states = [opt.state[p] for p in params]
    views = [_local_view(s) for s in states]
    lows, bases = [], []
    precision = group.get(PROJ_PRECISION)
    for p, state, it in zip(params, states, items):
        g, _ = opt.rule.gradient(group, p.to_local(), p.grad.to_local())
        if it.side == "right":
            # n×r: every rank needs all of it (bf16 copies for proj_precision="bf16")
            q = projection_bases([state["basis"].full_tensor()], precision)
            lows.append(proj.project(g, q, "right"))
            bases.append(q)
        else:
            # the rows of P matching this rank's rows of G
            local_p = projection_bases([state["basis"].to_local()], precision)
            r, n = state["basis"].shape[1], g.shape[1]
            partial = DTensor.from_local(
                proj.project(g, local_p, "left"),
                p.device_mesh,
                [Partial()],
                run_check=False,
                shape=(r, n),
                stride=(n, 1),
            )
            low = partial.redistribute(p.device_mesh, [Replicate()]).redistribute(p.device_mesh, [Shard(1)])
            lows.append(low.to_local())
            bases.append(local_p)
        state[STEP] += 1
    local_params = [p.to_local() for p in params]
    steps = opt.rule.steps(group, local_params, [proj.as_matrix(p) for p in local_params], lows, views)
    for state, view in zip(states, views):
        _write_back(state, view)
    for p, state, view, it, step, b in zip(params, states, views, items, steps, bases):
        d = step.direction
        if it.side == "left":
            r, n = state["basis"].shape[1], proj.matrix_shape(p.shape)[1]
            d = DTensor.from_local(
                d.contiguous(), p.device_mesh, [Shard(1)], run_check=False, shape=(r, n), stride=(n, 1)
            ).full_tensor()
        opt.rule.write(group, p.to_local(), view, Step(d, step.decay, step.alpha), b, it.side, None)


def local_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` held by this rank (a DTensor counts its local
    shard only), for any optimizer."""
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, DTensor):
                value = value.to_local()
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
