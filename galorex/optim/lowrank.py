"""The one step loop every galorex optimizer shares; what happens inside the subspace is a rule.

For each parameter group with a ``rank`` key, every parameter with ≥ 2 dimensions is stepped as

    G = rule.gradient(grad) as an (m×n) matrix
    at its refresh steps:        P ← orthonormal top-r basis of G      (state follows moment_policy)
    R = project(G, P)                                                 (r×n, m×r or r×r)
    (D, decay, alpha) = rule.steps(R)                                 (Adam: M̂/(√V̂+ε), 1 − lr·wd, −lr·scale)
    W ← decay·W + alpha·project_back(D, P)                            (rule.write; one GEMM by default)

(refresh steps: once every ``update_proj_gap`` steps, all matrices of a group together or each at
its own phase: ``schedule``), and everything else (groups without ``rank``, 1-D parameters) by
``rule.step_dense`` (AdamW rules: ``torch.optim.AdamW``'s own functional). Around the rule the
loop applies the state codec (8-bit moments, 4/8-bit bases), the placement (one process, or FSDP2's
DTensors: ``sharded``), the layer-wise hooks (``layerwise``) and the checkpoint policy
(``checkpointing``). The optimizer state holds tensors only: a checkpoint loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .. import projection as proj
from ..lowp.projection import BF16, project_lowprec, projection_bases
from ..weights import write as weight_write
from . import codec, config, schedule
from .checkpointing import CheckpointMixin
from .config import PROJ_STEP, RANK, STEP, CompileOption, compute_dtype
from .dense import eight_bit
from .keys import warn_near_miss_keys
from .layerwise import LayerwiseMixin
from .plan import Plan, Work, is_dtensor
from .rules.base import Rule
from .writes import WeightWriteMixin

# Keys torch.optim's AdamW groups hold (a galorex group may hold them too).
_TORCH_GROUP_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable"})
_TORCH_GROUP_KEYS |= {"differentiable", "fused", "decoupled_weight_decay"}


class LowRankOptimizer(CheckpointMixin, LayerwiseMixin, WeightWriteMixin, Optimizer):
    """The projected step loop around a rule (``rule``, a class attribute of each binding).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        defaults: every group key's default; None (a new binding's usual choice) takes the
            projection keys' defaults (``config.projection_defaults``) and the rule's
            (``rule.defaults``), overridden by ``group_defaults``.
        compile: False, True, or a dict of ``torch.compile`` options: compile the numeric update of
            the projected parameters (project → rule → project back) with ``fullgraph=True``. What
            needs the host — which parameters refresh, the SVD, the finite check — runs eagerly
            before it, so the compiled graph is the same at every step.
        layerwise, accumulation_steps, per_param_grad_clip: layer-wise updates (``layerwise``).
    """

    rule: Rule = Rule()
    # Scalars read on the host every step: they live on the CPU so reading them never syncs a GPU.
    _base_cpu_state_keys: tuple[str, ...] = (STEP, PROJ_STEP)

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any] | None = None,
        *,
        compile: CompileOption = False,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        per_param_grad_clip: float | None = None,
        **group_defaults: Any,
    ) -> None:
        if defaults is None:
            defaults = {**config.projection_defaults(), **self.rule.defaults}
            unknown = set(group_defaults) - set(defaults)
            if unknown:
                raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
            defaults.update(group_defaults)
        elif group_defaults:
            raise TypeError("pass group defaults either as `defaults` or as keywords, not both")
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
        self._compile_options: dict[str, Any] | None = (
            None if compile is False else {"fullgraph": True, **(compile if isinstance(compile, dict) else {})}
        )
        self._compiled_fns: dict[str, Callable[..., Any]] = {}
        # Set before Optimizer.__init__, whose add_param_group calls register the hooks.
        self._configure_layerwise(layerwise, accumulation_steps, per_param_grad_clip)
        super().__init__(params, defaults)

    @property
    def _cpu_state_keys(self) -> tuple[str, ...]:
        return self._base_cpu_state_keys + tuple(getattr(self.rule, "cpu_state_keys", ()))

    def _compiled(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` through ``torch.compile`` when the optimizer was built with ``compile`` (one
        compiled function per key, created on first use)."""
        options = getattr(self, "_compile_options", None)
        if options is None:
            return fn
        fns = self.__dict__.setdefault("_compiled_fns", {})
        if key not in fns:
            fns[key] = torch.compile(fn, **options)
        return fns[key]

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        config.zero_dim_hyperparameters(group)
        sharded_params = any(is_dtensor(p) for p in group["params"])
        try:
            self.rule.validate(group, config.bad_key(group, index))
            config.validate_projection(group, index)
            warn_near_miss_keys(group, index, set(self.defaults) | _TORCH_GROUP_KEYS)
            self.rule.check_params(group, index, lambda pi: self._param_label(index, pi))
            if sharded_params:
                from . import sharded

                if config.weight_write(group).weight_rounding == "stochastic":
                    raise config.bad_key(group, index)(
                        config.WEIGHT_ROUNDING, "is not supported with FSDP2 (DTensor) parameters yet"
                    )
                sharded.check_group(self, group, index)
            if self._layerwise:
                self._register_layerwise_hooks(index)
        except ValueError:
            self.param_groups.pop()
            raise

    def _param_label(self, group_index: int, param_index: int) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        p = group["params"][param_index]
        where = f"param_groups[{group_index}]['params'][{param_index}]"
        if names:
            return f"parameter {names[param_index]!r} ({where}, shape {tuple(p.shape)})"
        return f"parameter {where} (shape {tuple(p.shape)})"

    @staticmethod
    def is_projected(group: dict[str, Any], p: torch.Tensor) -> bool:
        # Empty weights have nothing to project; AdamW treats them as a no-op.
        return group.get(RANK) is not None and p.dim() >= 2 and p.numel() > 0

    @staticmethod
    def side_of(group: dict[str, Any], p: torch.Tensor) -> str:
        m, n = proj.matrix_shape(p.shape)
        return proj.projection_side(group[config.PROJ_TYPE], m, n)

    def _check_grad(self, p: torch.Tensor, gi: int, pi: int) -> None:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(
                f"{self._param_label(gi, pi)} has a sparse gradient; galorex optimizers need dense "
                "gradients (use torch.optim.SparseAdam, or nn.Embedding(sparse=False))"
            )
        if g.is_complex() or p.is_complex():
            raise RuntimeError(
                f"{self._param_label(gi, pi)} is complex; galorex optimizers support real "
                "parameters only (view it with torch.view_as_real)"
            )

    # ------------------------------------------------------------------ the step
    # torch.compile(opt.step) would trace the host-side refresh schedule (step counters, SVD),
    # which breaks the graph at every step and fails in dynamo; the step runs eagerly instead and
    # ``compile=True`` compiles the numeric update inside it.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self._layerwise:
            return self._layerwise_step_call(closure)
        # Checked at every step: accelerate swaps the parameters for DTensors after construction.
        if any(is_dtensor(p) for group in self.param_groups for p in group["params"]):
            from .sharded import sharded_step

            return sharded_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run_plans(self._step_plans(), self._prepare_projection, self._commit_refresh, self._lowrank_step)
        return loss

    def _step_plans(
        self, check_projected: Callable[[torch.Tensor, int, int], None] | None = None
    ) -> list[tuple[dict[str, Any], list[torch.Tensor], list[Plan]]]:
        """Per group: (group, unprojected params with a gradient, projected ones' plans).
        ``check_projected(p, group_index, param_index)`` may refuse a projected parameter."""
        plans = []
        global_index = 0
        for gi, group in enumerate(self.param_groups):
            dense: list[torch.Tensor] = []
            projected: list[Plan] = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._check_grad(p, gi, pi)
                if self.is_projected(group, p):
                    if check_projected is not None:
                        check_projected(p, gi, pi)
                    projected.append(Plan(p, gi, pi, global_index + pi, self.side_of(group, p)))
                else:
                    dense.append(p)
            global_index += len(group["params"])
            plans.append((group, dense, projected))
        return plans

    def _run_plans(self, plans, prepare, commit, lowrank_step) -> None:
        """Every new basis is computed (``prepare``) before any parameter changes, so a non-finite
        gradient at a refresh raises with the optimizer and the model exactly as they were; then
        per group the refreshes are committed, unprojected parameters take the rule's dense step
        and projected ones ``lowrank_step``."""
        for group, _, projected in plans:
            for plan in projected:
                prepare(group, plan)
        for group, dense, projected in plans:
            for plan in projected:
                commit(group, plan)
            if dense:
                self._dense_step(group, dense)
            if projected:
                lowrank_step(group, projected)

    def _refresh_generator(self, device: torch.device, seed: int, index: int, step: int) -> torch.Generator:
        # Seeded from (seed, parameter, step) so a resumed run draws the same sketch without any
        # RNG state in the checkpoint.
        g = torch.Generator(device=device)
        g.manual_seed(config.mix_seed(seed, index, step))
        return g

    def _prepare_projection(
        self,
        group: dict[str, Any],
        plan: Plan,
        full_gradient: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """At a refresh step, compute the parameter's new bases into ``plan.new_bases`` (nothing
        changes yet). ``full_gradient(p)`` gives the gradient where it is not whole on this process
        (FSDP2 all-gathers its shards)."""
        p = plan.param
        state = self.state[p]
        plan.step = step = int(state[STEP].item()) if STEP in state else 0
        plan.new_bases = None
        gap = group[config.UPDATE_PROJ_GAP]
        if self.rule.basis_is_generated(group):
            # No gradient needed: the projection comes from a seed, and seeds advance together.
            plan.draw = not state or step % gap == 0
            return
        if state and not schedule.refreshes_at(step, gap, self._refresh_phase(group, plan)):
            return
        # Cast here only at a refresh, and drop the copy afterwards: holding a float32 copy of
        # every bf16 gradient at once would cost as much memory as AdamW's moments.
        grad = p.grad if full_gradient is None else full_gradient(p)
        # An INT8 weight is read as its exact values (GradNormLoRP's gradient reads W), as the update reads it.
        weight = p.dequantize(compute_dtype(p.dtype)) if weight_write.is_quantized(p) else p
        g, _ = self.rule.gradient(group, weight, grad)
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(
                f"{self._param_label(plan.group_index, plan.param_index)} has a non-finite "
                f"gradient at step {step}, where its projection basis is refreshed; the previous "
                "basis and the optimizer state are kept unchanged"
            )
        refresh = config.refresh_config(group)
        generator = None
        if refresh.refresh_method == "randomized":
            generator = self._refresh_generator(g.device, refresh.refresh_seed, plan.index, step)
        plan.new_bases = proj.compute_bases(
            g,
            group[RANK],
            plan.side,
            refresh.refresh_method,
            oversample=refresh.oversample,
            power_iters=refresh.power_iters,
            generator=generator,
            bf16=group.get(config.PROJ_PRECISION) == BF16,
        )

    def _refresh_phase(self, group: dict[str, Any], plan: Plan) -> int:
        """The parameter's phase in its group's refresh schedule (``schedule.group_phases``),
        computed once per group and again only when the group's settings or size change."""
        refresh = config.refresh_config(group)
        key = (len(group["params"]), group[config.UPDATE_PROJ_GAP], group[RANK], group[config.PROJ_TYPE], refresh)
        cache = self.__dict__.setdefault("_refresh_phases", {})
        held = cache.get(plan.group_index)
        if held is None or held[0] != key:
            held = cache[plan.group_index] = (key, schedule.group_phases(group, self.is_projected))
        return held[1][plan.param_index]

    def _commit_refresh(self, group: dict[str, Any], plan: Plan) -> None:
        if plan.draw:
            return self._commit_generated(group, plan)
        new = plan.new_bases
        if new is None:
            return
        p, side = plan.param, plan.side
        state = self.state[p]
        precision = config.state_precision(group)
        bits, rotated = precision.basis_bits, precision.basis_rotation
        new, encoded = codec.encode_for_storage(new, bits, rotated)
        keys, eight = self.rule.moment_keys(group), eight_bit(group)
        if not state:
            state[STEP] = torch.zeros((), dtype=torch.float32)
            state[PROJ_STEP] = torch.zeros((), dtype=torch.float32)
            codec.store_bases(state, side, new, bits, rotated, encoded)
            m, n = proj.matrix_shape(p.shape)
            view: dict[str, Any] = {}
            self.rule.init_state(group, p, view, proj.lowrank_shape(side, m, n, group[RANK]), compute_dtype(p.dtype))
            codec.store_view(state, view, keys, eight)
        else:
            old = codec.load_bases(state, side, p, group[RANK])
            view = codec.load_view(state, keys, compute_dtype(p.dtype))
            self.rule.on_refresh(group, view, old, new, side)
            codec.store_view(state, view, keys, eight)
            codec.store_bases(state, side, new, bits, rotated, encoded)
            state[PROJ_STEP].fill_(plan.step)
        plan.new_bases = None

    def _commit_generated(self, group: dict[str, Any], plan: Plan) -> None:
        """A refresh of a generated projection: a first seed, or the next one (the state follows
        ``moment_policy``; bases that are never stored cannot be reprojected)."""
        p, side = plan.param, plan.side
        state = self.state[p]
        keys, eight = self.rule.moment_keys(group), eight_bit(group)
        plan.draw = False
        if not state:
            state[STEP] = torch.zeros((), dtype=torch.float32)
            state[PROJ_STEP] = torch.zeros((), dtype=torch.float32)
            self.rule.init_projection(group, p, state, plan.index)
            m, n = proj.matrix_shape(p.shape)
            view: dict[str, Any] = {}
            self.rule.init_state(group, p, view, proj.lowrank_shape(side, m, n, group[RANK]), compute_dtype(p.dtype))
            codec.store_view(state, view, keys, eight)
            return
        self.rule.advance_projection(group, p, state)
        if group[config.MOMENT_POLICY] == "reset":
            view = codec.load_view(state, keys, compute_dtype(p.dtype))
            self.rule.reset(group, view)
            codec.store_view(state, view, keys, eight)
        state[PROJ_STEP].fill_(plan.step)

    def _lowrank_step(self, group: dict[str, Any], plans: list[Plan]) -> None:
        """The numeric update of a group's projected parameters, after any refresh: compiled when
        the optimizer was built with ``compile`` (only parameters, sides, gradients and states cross
        into it, not the host's step numbers)."""
        generated = self.rule.basis_is_generated(group)
        works = [
            Work(
                pl.param,
                pl.side,
                pl.param.grad,
                self.state[pl.param],
                # Drawn here, on the host, so a compiled update takes the matrix as an input.
                self.rule.make_bases(group, pl.param, self.state[pl.param], pl.side) if generated else None,
            )
            for pl in plans
        ]
        from .fused import fused_update

        rounding = config.weight_write(group).weight_rounding
        copied = [w for w in works if weight_write.needs_working_copy(w.param, rounding)]
        if not copied and self._fused_path_applies(group, works):
            return fused_update(self, group, works)
        update = self._compiled("lowrank_update", self._lowrank_update)
        if not copied:
            return update(group, works)
        plain = [w for w in works if not any(w is c for c in copied)]
        if plain:
            update(group, plain)
        self._update_on_copies(group, copied, update)

    def _fused_path_applies(self, group: dict[str, Any], works: list[Work]) -> bool:
        from .fused import fused_path_applies

        return fused_path_applies(self, group, works)

    def _lowrank_update(self, group: dict[str, Any], works: list[Work]) -> None:
        rule = self.rule
        keys, eight = rule.moment_keys(group), eight_bit(group)
        params, weights, lows, views, all_bases, records = [], [], [], [], [], []
        for w in works:
            p = w.param
            # The weight as the rule reads and writes it: the parameter, or its float32 working copy.
            weight = p if w.target is None else w.target
            bases = w.bases if w.bases is not None else codec.load_bases(w.state, w.side, p, group[RANK])
            bases = projection_bases(bases, group.get(config.PROJ_PRECISION))  # bf16 copies for "bf16"
            g, record = rule.gradient(group, weight, w.grad)
            lows.append(self._project_gradient(group, g, bases, w.side))
            del g  # the float32 gradient is freed here unless the rule keeps it as its record
            w.state[STEP] += 1
            params.append(p)
            weights.append(proj.as_matrix(weight))
            views.append(codec.load_view(w.state, keys, compute_dtype(p.dtype)))
            all_bases.append(bases)
            records.append(record)
        steps = rule.steps(group, params, weights, lows, views)
        for w, view, step, bases, record in zip(works, views, steps, all_bases, records):
            rule.write(group, w.param if w.target is None else w.target, view, step, bases, w.side, record)
            codec.store_view(w.state, view, keys, eight)

    def _project_gradient(self, group: dict[str, Any], g: torch.Tensor, bases, side: str) -> torch.Tensor:
        """R = project(G): in the compute dtype, on bf16 bases as given, or quantised when the
        group sets a quantised ``proj_precision``."""
        if group.get(config.PROJ_PRECISION) in (None, BF16):
            return proj.project(g, bases, side)
        return project_lowprec(g, bases, side, group[config.PROJ_PRECISION])


__all__ = ["LowRankOptimizer"]
