"""The optimizer step on FSDP2 parameters: every rule, every state precision, every ``proj_type``.

FSDP2 (``fully_shard``) leaves each rank the rows W_i of every weight and, after its reduce-scatter,
the matching rows G_i of the gradient. Each parameter is stepped by one of three strategies, all of
which compute what one process computes on the whole matrix (so a sharded run matches a
single-process one to rounding), and store the state back in the sharded form (``layout``):

**whole** (the reference; any rule, any setting): all-gather W, G and the state, run the loop's own
single-process step on the whole matrix (refresh, codec, rule, write, and whatever the loop does
around them), keep this rank's rows of W and its shards of the state. Every rank computes the same
step, so no result needs to be sent anywhere.

**subspace** (a rule that declares ``"subspace"`` in ``Rule.shard_local``, such as Adam's and Natural
GaLore's, with ``proj_precision`` unset): W and G stay sharded; only the low-rank quantities cross
ranks (GaLore: Zhao et al., 2024):

    right side (R = G Q, m×r):   R_i = G_i Q,  R = all_gather(R_i);   W_i ← decay·W_i + alpha·D_i Qᵀ
    left side  (R = Pᵀ G, r×n):  R = all_reduce(Σ_i P_iᵀ G_i);          W_i ← decay·W_i + alpha·P_i D
    full       (R = Pᵀ G Q):     R = all_reduce(Σ_i P_iᵀ G_i Q);        W_i ← decay·W_i + alpha·P_i D Qᵀ

and the rule steps the whole low-rank R with the whole (all-gathered, decoded) state, exactly as in
one process, so 8-bit moments quantise the same blocks.

**rows** (unprojected parameters of a rule that declares ``"dense"``: AdamW is elementwise): each
rank steps its own rows with no communication at all; 8-bit moments are grouped by rows there
(``layout``) and quantise exactly the blocks one process would, when every shard holds whole
blocks and is large enough to be quantised as the whole is; otherwise the parameter goes *whole*.

Refreshes come first, for every parameter, before anything changes (as in one process, a non-finite
gradient at a refresh then raises with the model and the state as they were); a refresh all-gathers
W and G of the parameters that refresh, and every rank computes the same bases (an exact SVD
included), so none is sent. One parameter's whole W, G and state exist at a time, never the
model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from ... import projection as proj
from .. import codec, state8bit
from ..config import PROJ_PRECISION, RANK, STEP, compute_dtype
from ..dense import eight_bit
from ..plan import Plan, is_dtensor
from ..rules.base import Step
from . import layout

LowRankOptimizer = Any  # the loop (galorex.optim.lowrank), which imports this package on demand

# What each entry of ``Rule.shard_local`` vouches for: these methods, as the declaring class has them.
_COVERS = {"subspace": ("gradient", "steps", "write"), "dense": ("step_dense",)}


class _RefreshDue(Exception):
    """Raised by the full-gradient callback: this parameter refreshes at this step."""


def _refresh_due(p: torch.Tensor) -> torch.Tensor:
    raise _RefreshDue


def declares(rule: Any, what: str) -> bool:
    """Whether ``rule`` declares ``what`` (``"subspace"`` or ``"dense"``) in ``shard_local``, for
    the methods that declaration vouches for as the declaring class has them: a subclass that
    overrides one of them (Fira's ``write``) loses the declaration unless it repeats it."""
    if what not in getattr(rule, "shard_local", ()):
        return False
    mro = type(rule).__mro__
    declaring = next(c for c in mro if "shard_local" in c.__dict__)
    for name in _COVERS[what]:
        owner = next(c for c in mro if name in c.__dict__)
        if not issubclass(declaring, owner):
            return False
    return True


def check_group(opt: LowRankOptimizer, group: dict[str, Any], index: int) -> None:
    """Refuse what the placement cannot serve: the rule's own refusal (``Rule.check_sharding``)
    and DTensors that are not split by rows on a 1-D mesh.

    Raises:
        ValueError: naming the group or the parameter, and the reason.
    """
    opt.rule.check_sharding(group, f"param_groups[{index}]")
    for pi, p in enumerate(group["params"]):
        if is_dtensor(p):
            check_placement(opt, p, index, pi)


def check_placement(opt: LowRankOptimizer, p: DTensor, gi: int, pi: int) -> None:
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"{opt._param_label(gi, pi)}: galorex steps FSDP2 parameters sharded on their rows over a 1-D "
            f"mesh (fully_shard's default), got placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh"
        )


def _check_projected(opt: LowRankOptimizer, p: torch.Tensor, gi: int, pi: int) -> None:
    if not isinstance(p, DTensor):
        raise ValueError(
            f"{opt._param_label(gi, pi)}: a plain tensor among FSDP2 (DTensor) parameters; its gradient is not "
            "reduced across ranks by FSDP2, so the ranks would drift apart (shard it too, or leave it out)"
        )
    check_placement(opt, p, gi, pi)


@torch.no_grad()
def sharded_step(opt: LowRankOptimizer, closure: Callable[[], Any] | None = None) -> Any:
    """``opt.step()`` for an optimizer holding DTensor parameters (module docstring). Every rank
    must call it, with the same parameters holding gradients (the collectives pair up in order).

    Args:
        opt: the optimizer.
        closure: re-evaluates the model and returns the loss (run with gradients enabled).

    Returns:
        The closure's loss, or None.

    Raises:
        ValueError: a parameter the placement cannot step (see :func:`check_group`).
        FloatingPointError: a non-finite gradient at a refresh (nothing has changed then).
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    for index, group in enumerate(opt.param_groups):  # params may have become DTensors since (accelerate)
        check_group(opt, group, index)
    plans = opt._step_plans(lambda p, gi, pi: _check_projected(opt, p, gi, pi))
    _prepare(opt, [(group, plan) for group, _, projected in plans for plan in projected])
    for group, dense, projected in plans:
        if dense:
            step_dense(opt, group, dense)
        if projected:
            step_projected(opt, group, projected)
    return loss


def step_one(opt: LowRankOptimizer, gi: int, pi: int, index: int) -> None:
    """One DTensor parameter's step, its refresh included (layer-wise mode, from FSDP2's
    post-backward; every rank steps the same parameter at the same time)."""
    group = opt.param_groups[gi]
    p = group["params"][pi]
    if not opt.is_projected(group, p):
        return step_dense(opt, group, [p])
    check_placement(opt, p, gi, pi)
    plan = Plan(p, gi, pi, index, opt.side_of(group, p))
    _prepare(opt, [(group, plan)])
    step_projected(opt, group, [plan])


# Whole tensors gathered by one collective, at most (a larger parameter goes alone): the bound on
# what a step holds beyond the sharded model and state.
BUCKET_BYTES = 1 << 26


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _buckets(items: list[Any], size: Callable[[Any], int]) -> list[list[Any]]:
    """Consecutive runs of ``items`` whose ``size`` adds up to at most :data:`BUCKET_BYTES`."""
    out: list[list[Any]] = []
    total = 0
    for item in items:
        n = size(item)
        if not out or total + n > BUCKET_BYTES:
            out.append([])
            total = 0
        out[-1].append(item)
        total += n
    return out


def _state_nbytes(state: dict[str, Any]) -> int:
    return sum(_nbytes(v) for v in state.values() if isinstance(v, DTensor))


def _keep_rows(p: DTensor, whole: torch.Tensor) -> None:
    start, stop = layout.row_range(p)
    p.to_local().copy_(whole[start:stop])


def _prepare(opt: LowRankOptimizer, items: list[tuple[dict[str, Any], Plan]]) -> None:
    """The loop's own refresh for every plan, before anything changes. It asks for the gradient
    only when the parameter refreshes; those parameters' G (and W, for a rule whose gradient() may
    read it) are then gathered, a bucket at a time, and the bases computed from the whole matrix."""
    due = []
    for group, plan in items:
        try:
            opt._prepare_projection(group, plan, full_gradient=_refresh_due)
        except _RefreshDue:
            due.append((group, plan, uses_subspace(opt, group)))
    for bucket in _buckets(due, lambda item: _nbytes(item[1].param) * (1 if item[2] else 2)):
        wanted = [t for _, plan, sub in bucket for t in ((plan.param.grad,) if sub else (plan.param, plan.param.grad))]
        _, whole = layout.to_full([], wanted)
        for group, plan, sub in bucket:
            p = plan.param
            if sub:  # the default gradient() reads nothing of W but its dtype
                grad = whole.pop(0)
                opt._prepare_projection(group, plan, full_gradient=lambda _, grad=grad: grad)
                continue
            w, w.grad = whole.pop(0), whole.pop(0)
            opt.state[w] = opt.state[p]  # the refresh only reads the step counters
            plan.param = w
            try:
                opt._prepare_projection(group, plan)
            finally:
                plan.param = p
                del opt.state[w]


def uses_subspace(opt: LowRankOptimizer, group: dict[str, Any]) -> bool:
    """Whether the group's projected parameters take the subspace strategy (module docstring); a
    quantised projection (``proj_precision``) scales by the whole G, so it goes whole."""
    return declares(opt.rule, "subspace") and group.get(PROJ_PRECISION) is None


def step_projected(opt: LowRankOptimizer, group: dict[str, Any], plans: list[Plan]) -> None:
    """Commit the refreshes of a group's projected parameters and step them, whole or in the
    subspace (module docstring), a bucket at a time."""
    subspace = uses_subspace(opt, group)
    extra = 0 if subspace else 2

    def size(plan: Plan) -> int:
        return _state_nbytes(opt.state[plan.param]) + extra * _nbytes(plan.param)

    for bucket in _buckets(plans, size):
        params = [plan.param for plan in bucket]
        wanted = [] if subspace else [t for p in params for t in (p, p.grad)]
        fulls, whole = layout.to_full([opt.state[p] for p in params], wanted)
        if subspace:
            _subspace_bucket(opt, group, bucket, fulls)
        else:
            _whole_bucket(opt, group, bucket, fulls, whole)


def _whole_bucket(opt, group, bucket: list[Plan], fulls: list[dict], whole: list[torch.Tensor]) -> None:
    """The loop's single-process step on the gathered matrices; each rank keeps its rows."""
    params = [plan.param for plan in bucket]
    proxies = []
    for plan, full in zip(bucket, fulls):
        w, w.grad = whole.pop(0), whole.pop(0)
        opt.state[w] = full
        plan.param = w
        proxies.append(w)
    try:
        for plan in bucket:
            opt._commit_refresh(group, plan)
        opt._lowrank_step(group, bucket)
        for p, w in zip(params, proxies):
            _keep_rows(p, w)
    finally:
        for plan, p, w in zip(bucket, params, proxies):
            plan.param = p
            opt.state[p] = layout.to_sharded(opt.state.pop(w), p.device_mesh)


def _row_bases(bases: list[torch.Tensor], side: str, start: int, stop: int) -> list[torch.Tensor]:
    """The bases as this rank's rows of W meet them: P (m×r) cut to the rows, Q (n×r) whole."""
    if side == "right":
        return bases
    return [bases[0][start:stop], *bases[1:]]


def _subspace_bucket(opt, group, bucket: list[Plan], fulls: list[dict]) -> None:
    """W and G stay sharded; R is assembled from the ranks' rows (one gather and one all-reduce for
    the bucket), the rule steps the whole R with the whole state, each rank writes its rows."""
    rule = opt.rule
    keys, eight = rule.moment_keys(group), eight_bit(group)
    for plan, full in zip(bucket, fulls):
        opt.state[plan.param] = full
    try:
        for plan in bucket:
            opt._commit_refresh(group, plan)
        locals_, records, row_bases, lows = [], [], [], []
        for plan in bucket:
            p, side = plan.param, plan.side
            start, stop = layout.row_range(p)
            local = p.to_local()
            g, record = rule.gradient(group, local, p.grad.to_local())
            bases = _row_bases(codec.load_bases(opt.state[p], side, p, group[RANK]), side, start, stop)
            lows.append(opt._project_gradient(group, g, bases, side))
            locals_.append(local)
            records.append(record)
            row_bases.append(bases)
        lows = _assemble(bucket, lows)
        views = []
        for plan in bucket:
            state = opt.state[plan.param]
            state[STEP] += 1
            views.append(codec.load_view(state, keys, compute_dtype(plan.param.dtype)))
        steps = rule.steps(group, locals_, [proj.as_matrix(x) for x in locals_], lows, views)
        for plan, local, view, step, bases, record in zip(bucket, locals_, views, steps, row_bases, records):
            start, stop = layout.row_range(plan.param)
            d = step.direction[start:stop] if plan.side == "right" else step.direction
            rule.write(group, local, view, Step(d, step.decay, step.alpha, step.extra), bases, plan.side, record)
            codec.store_view(opt.state[plan.param], view, keys, eight)
    finally:
        for plan in bucket:
            opt.state[plan.param] = layout.to_sharded(opt.state[plan.param], plan.param.device_mesh)


def _assemble(bucket: list[Plan], parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The whole low-rank gradients from each rank's part: the right side's rows of R = G Q are
    all-gathered, the left and full sides' partial sums Σ_i P_iᵀ G_i (Q) all-reduced (one of each
    for the bucket, per dtype)."""
    out: list[torch.Tensor | None] = [None] * len(parts)
    right = [i for i, plan in enumerate(bucket) if plan.side == "right"]
    if right:
        mesh = bucket[right[0]].param.device_mesh
        rows = [layout.from_rows(parts[i].contiguous(), bucket[i].param.shape[0], mesh) for i in right]
        for i, whole in zip(right, layout.gather(rows)):
            out[i] = whole
    summed = [i for i, plan in enumerate(bucket) if plan.side != "right"]
    for dtype in {parts[i].dtype for i in summed}:
        same = [i for i in summed if parts[i].dtype == dtype]
        flat = torch.cat([parts[i].reshape(-1) for i in same])
        torch.distributed.all_reduce(flat, group=bucket[same[0]].param.device_mesh.get_group())
        at = 0
        for i in same:
            out[i] = flat[at : at + parts[i].numel()].view_as(parts[i])
            at += parts[i].numel()
    return out


def rows_suffice(opt: LowRankOptimizer, group: dict[str, Any], p: DTensor) -> bool:
    """Whether an unprojected parameter takes the rows strategy (module docstring): an elementwise
    rule, and with 8-bit moments every rank's shard made of whole blocks and at least as large as
    the size from which a moment is quantised (else a shard would be stored otherwise than the
    whole)."""
    if not declares(opt.rule, "dense"):
        return False
    if not eight_bit(group) or not state8bit.use_8bit(p.numel()):
        return True
    if p.dim() < 2 or not layout.row_layout(p.shape, state8bit.BLOCK_SIZE, 1):
        return False
    per_row = p.numel() // p.shape[0]
    return min(layout.rows_per_rank(p.shape[0], p.device_mesh.size())) * per_row >= state8bit.MIN_8BIT_NUMEL


def step_dense(opt: LowRankOptimizer, group: dict[str, Any], params: list[torch.Tensor]) -> None:
    """The rule's dense step of unprojected parameters: plain tensors as they are, DTensors by rows
    where :func:`rows_suffice`, else whole (a bucket at a time)."""
    plain = [p for p in params if not is_dtensor(p)]
    rows = [p for p in params if is_dtensor(p) and rows_suffice(opt, group, p)]
    whole = [p for p in params if is_dtensor(p) and not any(p is q for q in rows)]
    if plain:
        opt._dense_step(group, plain)
    if rows:
        proxies = []
        for p in rows:
            x = p.to_local().detach()  # a new tensor object on the same storage
            x.grad = p.grad.to_local().detach()
            opt.state[x] = layout.to_local(opt.state[p], p)
            proxies.append(x)
        try:
            opt._dense_step(group, proxies)
        finally:
            for p, x in zip(rows, proxies):
                layout.from_local(opt.state[p], opt.state.pop(x), p)
    for bucket in _buckets(whole, lambda p: _state_nbytes(opt.state[p]) + 2 * _nbytes(p)):
        fulls, gathered = layout.to_full([opt.state[p] for p in bucket], [t for p in bucket for t in (p, p.grad)])
        proxies = []
        for full in fulls:
            w, w.grad = gathered.pop(0), gathered.pop(0)
            opt.state[w] = full
            proxies.append(w)
        try:
            opt._dense_step(group, proxies)
            for p, w in zip(bucket, proxies):
                _keep_rows(p, w)
        finally:
            for p, w in zip(bucket, proxies):
                opt.state[p] = layout.to_sharded(opt.state.pop(w), p.device_mesh, rows=True)


def materialize_state(opt: LowRankOptimizer) -> None:
    """Create every parameter's state as a first step would — zero gradients, lr 0 — so that
    ``torch.distributed.checkpoint`` can load a checkpoint into it. torch's own initialisation
    (``_init_optim_state``) calls ``step()``, which layer-wise mode refuses; this runs the sharded
    step directly. Weights may move (an lr-free rule); the checkpoint's weights are loaded after.
    Every rank must call it; an optimizer with state is left alone."""
    if opt.state:
        return
    params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    saved = [group.get("lr") for group in opt.param_groups]
    for group in opt.param_groups:
        if "lr" in group:
            group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    try:
        sharded_step(opt)
    finally:
        for group, lr in zip(opt.param_groups, saved):
            if "lr" in group:
                group["lr"] = lr
        for p in params:
            p.grad = None
