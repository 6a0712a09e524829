"""The one step loop every galorex optimizer shares.

For each parameter group with a ``rank`` key, every parameter with ≥ 2 dimensions is stepped as

    G = grad as an (m×n) matrix
    every update_proj_gap steps: P ← orthonormal top-r basis of G   (moments follow moment_policy)
    R = project(G, P)                                  (r×n, m×r or r×r)
    D = inner_rule(R)                                  (Adam's m̂/(√v̂+ε) in GaLoreAdamW)
    W ← (1 − lr·wd)·W − lr·scale·project_back(D, P)    (decay decoupled, in full space)

and everything else (groups without ``rank``, 1-D parameters) is plain AdamW through
``torch.optim.adamw.adamw`` (fused where the device supports it), so it matches
``torch.optim.AdamW``. Subclasses change only :meth:`_lowrank_directions` (what happens inside the
subspace) and, if they keep more state, :meth:`_reproject_state`.

The optimizer state holds tensors only: a checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as _adamw_functional

from .. import projection as proj
from ..halo.projection import PROJ_PRECISION, PROJ_PRECISIONS, project_lowprec
from . import state8bit

# Group keys, as galore-torch names them, plus galorex's own.
RANK = "rank"
UPDATE_PROJ_GAP = "update_proj_gap"
SCALE = "scale"
PROJ_TYPE = "proj_type"
REFRESH_METHOD = "refresh_method"
MOMENT_POLICY = "moment_policy"
OVERSAMPLE = "oversample"
POWER_ITERS = "power_iters"
REFRESH_SEED = "refresh_seed"
EPS_MODE = "eps_mode"
EPS_MODES = ("torch", "galore_torch")
OPTIM_BITS = "optim_bits"
BASIS_BITS = "basis_bits"
BASIS_ROTATION = "basis_rotation"

MOMENT_POLICIES = ("keep", "reset", "reproject")

# Elements per slice of an unprojected weight stepped with 8-bit moments (a multiple of the 8-bit
# block size, so each slice quantises exactly the blocks the whole tensor would).
DENSE_8BIT_CHUNK = 1 << 22

# ``compile=``: False (eager), True (torch.compile with fullgraph=True), or torch.compile options.
CompileOption = bool | dict[str, Any]

# State keys.
STEP = "step"
PROJ_STEP = "proj_step"
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
ADAM_MOMENTS = (EXP_AVG, EXP_AVG_SQ)


def _moment_kind(key: str) -> str:
    """How a moment is stored with optim_bits=8 (state8bit): first moments signed, second
    moments (keys ending in ``exp_avg_sq``) as √v."""
    return state8bit.UNSIGNED_SQRT if key.endswith(EXP_AVG_SQ) else state8bit.SIGNED


def load_moment(state: dict[str, Any], key: str) -> torch.Tensor:
    """A moment as a float tensor: the state tensor itself (32-bit) or a dequantised copy (8-bit)."""
    if key + "_q" in state:
        q = state[key + "_q"]
        return state8bit.unpack_moment({"q": q, "absmax": state[key + "_absmax"]}, q.shape, _moment_kind(key))
    return state[key]


def store_moment(state: dict[str, Any], key: str, value: torch.Tensor, eight_bit: bool) -> None:
    """Write a moment back: as is (32-bit), or block-wise quantised when large enough (8-bit)."""
    if not eight_bit:
        state[key] = value
        return
    packed = state8bit.pack_moment(value, _moment_kind(key))
    if "value" in packed:
        state[key] = packed["value"]
    else:
        state[key + "_q"], state[key + "_absmax"] = packed["q"], packed["absmax"]


def _eight_bit(group: dict[str, Any]) -> bool:
    return group.get(OPTIM_BITS, 32) == 8


def basis_keys(side: str) -> list[str]:
    return ["basis_left", "basis_right"] if side == "full" else ["basis"]


def store_bases(
    state: dict[str, Any],
    side: str,
    bases: list[torch.Tensor],
    bits: int,
    rotated: bool = False,
    encoded: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Keep the bases as they are (32 bits) or as 4- or 8-bit codes with per-64 scales
    (``basis_bits=4|8``, ``state8bit.BASIS_CODECS``), Hadamard-rotated first when ``rotated``
    (``basis_rotation``; the state keys say which, so a checkpoint decodes itself). ``encoded``:
    the (codes, scales) of ``bases`` already computed, stored as they are. Whatever another format
    left under these keys is removed (the group's settings may have changed since)."""
    for i, (key, basis) in enumerate(zip(basis_keys(side), bases)):
        coded = bits in state8bit.BASIS_CODECS
        keep = key + state8bit.basis_code_suffix(bits, rotated) if coded else key
        for suffix in state8bit.BASIS_SUFFIXES:
            if key + suffix != keep:
                state.pop(key + suffix, None)
        if coded:
            codes, scale = encoded[i] if encoded is not None else state8bit.encode_basis(basis, bits, rotated)
            state[keep], state[key + "_scale"] = codes, scale
        else:
            state.pop(key + "_scale", None)
            state[key] = basis


def _stored_format(state: dict[str, Any], key: str, p: torch.Tensor) -> tuple[int, bool]:
    for bits in state8bit.BASIS_CODECS:
        for rotated in (False, True):
            if key + state8bit.basis_code_suffix(bits, rotated) in state:
                return bits, rotated
    raise KeyError(
        f"the optimizer state of a parameter of shape {tuple(p.shape)} holds no basis {key!r} in any stored "
        f"format (state keys: {sorted(state)}): the state dict does not belong to this parameter"
    )


def load_bases(state: dict[str, Any], side: str, p: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """The bases as float tensors (4- and 8-bit ones decoded, and un-rotated if they were stored
    rotated; their shapes follow from p and the rank)."""
    keys = basis_keys(side)
    if keys[0] in state:
        return [state[k] for k in keys]
    m, n = proj.matrix_shape(p.shape)
    dtype = compute_dtype(p.dtype)
    bits, rotated = _stored_format(state, keys[0], p)
    suffix = state8bit.basis_code_suffix(bits, rotated)
    return [
        state8bit.decode_basis(state[k + suffix], state[k + "_scale"], shape, bits, rotated).to(dtype)
        for k, shape in zip(keys, proj.basis_shapes(side, m, n, rank))
    ]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.is_complex()
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def hyperparameter(value: float | torch.Tensor) -> float | torch.Tensor:
    """A group hyperparameter (lr, weight_decay, betas, eps …) as the step uses it: a Python float,
    except that a tensor stays a tensor inside a compiled step, where reading it would be a host
    synchronisation and a graph break; the graph then takes it as an input, so a scheduler that
    changes it in place does not cause a recompile (as ``torch.optim`` does with ``lr=tensor``)."""
    if isinstance(value, torch.Tensor) and torch.compiler.is_compiling():
        return value
    return float(value)


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Projection and subspace state run in float32, or float64 for float64 parameters."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


class LowRankOptimizer(Optimizer):
    """Base class: the shared projected step loop; see the module docstring.

    ``compile`` (False, True, or a dict of ``torch.compile`` options): compile the per-group numeric
    update (:meth:`_lowrank_update`, project → inner rule → project back) with ``fullgraph=True``.
    What needs the host — which parameters refresh at this step, the SVD, the finite check —
    runs eagerly before it, so the compiled graph is the same at every step."""

    # Scalars read on the host every step: they live on the CPU so reading them never syncs a GPU.
    _cpu_state_keys: tuple[str, ...] = ("step", "proj_step")

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        compile: CompileOption = False,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        per_param_grad_clip: float | None = None,
    ) -> None:
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
        # The refresh schedule (step counters, SVD) stays on the host; what ``compile`` compiles is
        # the per-group numeric update that follows it (see ``_lowrank_step``).
        self._compile_options: dict[str, Any] | None = (
            None if compile is False else {"fullgraph": True, **(compile if isinstance(compile, dict) else {})}
        )
        self._compiled_fns: dict[str, Callable[..., Any]] = {}
        # Set before Optimizer.__init__, whose add_param_group calls register the hooks.
        self._configure_layerwise(layerwise, accumulation_steps, per_param_grad_clip)
        super().__init__(params, defaults)

    def _compiled(self, name: str) -> Callable[..., Any]:
        """The bound method ``name``, through ``torch.compile`` when the optimizer was built with
        ``compile`` (one compiled function per method, created on first use)."""
        fn = getattr(self, name)
        options = getattr(self, "_compile_options", None)  # absent after unpickling an old state
        if options is None:
            return fn
        fns = self.__dict__.setdefault("_compiled_fns", {})
        if name not in fns:
            fns[name] = torch.compile(fn, **options)
        return fns[name]

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        sharded_params = any(_is_dtensor(p) for p in group["params"])
        try:
            self._validate_group(group, index)
            if sharded_params:
                from . import sharded  # FSDP2 parameters: see sharded.py

                sharded.check_group(self, group, index)
            if self._layerwise:
                self._register_layerwise_hooks(index)
        except ValueError:
            self.param_groups.pop()
            raise
        self._sharded = getattr(self, "_sharded", False) or sharded_params

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        def bad(key: str, what: str) -> ValueError:
            return ValueError(f"param_groups[{index}]: {key!r} {what}, got {group.get(key)!r}")

        lr = group["lr"]
        if not _is_real(lr) or float(lr) < 0 or not math.isfinite(float(lr)):
            raise bad("lr", "must be a finite number >= 0")
        eps = group["eps"]
        if not _is_real(eps) or eps < 0:
            raise bad("eps", "must be a number >= 0")
        betas = group["betas"]
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(_is_real(b) and 0.0 <= float(b) < 1.0 for b in betas)
        ):
            raise bad("betas", "must be two numbers in [0, 1)")
        wd = group["weight_decay"]
        if not _is_real(wd) or wd < 0:
            raise bad("weight_decay", "must be a number >= 0")
        if group.get(EPS_MODE, "torch") not in EPS_MODES:
            raise bad(EPS_MODE, f"must be one of {EPS_MODES}")
        bits = group.get(OPTIM_BITS, 32)
        if not _is_int(bits) or bits not in (8, 32):
            raise bad(OPTIM_BITS, "must be 8 or 32")
        if group.get(RANK) is None:
            return
        if not _is_int(group[RANK]) or group[RANK] <= 0:
            raise bad(RANK, "must be a positive integer")
        if not _is_int(group[UPDATE_PROJ_GAP]) or group[UPDATE_PROJ_GAP] <= 0:
            raise bad(UPDATE_PROJ_GAP, "must be a positive integer")
        if not _is_real(group[SCALE]) or not math.isfinite(group[SCALE]) or group[SCALE] <= 0:
            raise bad(SCALE, "must be a finite number > 0")
        if group[PROJ_TYPE] not in proj.PROJ_TYPES:
            raise bad(PROJ_TYPE, f"must be one of {proj.PROJ_TYPES}")
        if group[REFRESH_METHOD] not in proj.REFRESH_METHODS:
            raise bad(REFRESH_METHOD, f"must be one of {proj.REFRESH_METHODS}")
        if group[MOMENT_POLICY] not in MOMENT_POLICIES:
            raise bad(MOMENT_POLICY, f"must be one of {MOMENT_POLICIES}")
        if not _is_int(group[OVERSAMPLE]) or group[OVERSAMPLE] < 0:
            raise bad(OVERSAMPLE, "must be an integer >= 0")
        if not _is_int(group[POWER_ITERS]) or group[POWER_ITERS] < 0:
            raise bad(POWER_ITERS, "must be an integer >= 0")
        if not _is_int(group[REFRESH_SEED]):
            raise bad(REFRESH_SEED, "must be an integer")
        bits = group.get(BASIS_BITS, 32)
        if not _is_int(bits) or bits not in (4, 8, 32):
            raise bad(BASIS_BITS, "must be 4, 8 or 32")
        rotation = group.get(BASIS_ROTATION, False)
        if not isinstance(rotation, bool):
            raise bad(BASIS_ROTATION, "must be True or False")
        if rotation and bits == 32:
            raise bad(BASIS_ROTATION, "rotates a quantised basis: it needs basis_bits=4 or 8")
        if group.get(PROJ_PRECISION) not in (None,) + PROJ_PRECISIONS:
            raise bad(PROJ_PRECISION, f"must be None or one of {PROJ_PRECISIONS}")

    # ------------------------------------------------------------------ helpers
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
        return proj.projection_side(group[PROJ_TYPE], m, n)

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

    def _refresh_generator(self, device: torch.device, seed: int, index: int, step: int):
        # Seeded from (seed, parameter, step) so a resumed run draws the same sketch without any
        # RNG state in the checkpoint.
        g = torch.Generator(device=device)
        g.manual_seed(_mix_seed(seed, index, step))
        return g

    # ------------------------------------------------------------------ the step
    # torch.compile(opt.step) would trace the host-side refresh schedule (step counters, SVD),
    # which breaks the graph at every step and fails in dynamo; the step runs eagerly instead and
    # ``compile=True`` compiles the numeric update inside it.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self._layerwise:
            return self._layerwise_step_call(closure)
        if getattr(self, "_sharded", False):
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
    ) -> list[tuple[dict[str, Any], list[torch.Tensor], list[dict[str, Any]]]]:
        """Per group: (group, unprojected params with a gradient, projected ones with their context).
        ``check_projected(p, group_index, param_index)`` may refuse a projected parameter."""
        plans = []
        global_index = 0
        for gi, group in enumerate(self.param_groups):
            dense: list[torch.Tensor] = []
            projected: list[dict[str, Any]] = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._check_grad(p, gi, pi)
                if self.is_projected(group, p):
                    if check_projected is not None:
                        check_projected(p, gi, pi)
                    projected.append({"param": p, "group_index": gi, "param_index": pi, "index": global_index + pi})
                else:
                    dense.append(p)
            global_index += len(group["params"])
            plans.append((group, dense, projected))
        return plans

    def _run_plans(self, plans, prepare, commit, lowrank_step) -> None:
        """Every new basis is computed (``prepare``) before any parameter changes, so a non-finite
        gradient at a refresh raises with the optimizer and the model exactly as they were; then
        per group the refreshes are committed, unprojected parameters take AdamW and projected
        ones ``lowrank_step``."""
        for group, _, projected in plans:
            for item in projected:
                prepare(group, item)
        for group, dense, projected in plans:
            for item in projected:
                commit(group, item)
            if dense:
                self._dense_adamw(group, dense)
            if projected:
                lowrank_step(group, projected)

    def _prepare_projection(
        self,
        group: dict[str, Any],
        item: dict[str, Any],
        full_gradient: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """At a refresh step, compute the parameter's new bases into ``item["new_bases"]`` (nothing
        changes yet). ``full_gradient(p)`` gives the matrix to decompose where the gradient is not
        whole on this process (FSDP2 all-gathers its shards); by default ``_gradient_matrix``."""
        p = item["param"]
        state = self.state[p]
        side = self.side_of(group, p)
        item["side"] = side
        step = int(state[STEP].item()) if STEP in state else 0
        item["step"] = step
        item["new_bases"] = None
        if state and step % group[UPDATE_PROJ_GAP] != 0:
            return
        # Cast here only at a refresh, and drop the copy afterwards: holding a float32 copy of
        # every bf16 gradient at once would cost as much memory as AdamW's moments.
        g = self._gradient_matrix(group, p) if full_gradient is None else full_gradient(p)
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(
                f"{self._param_label(item['group_index'], item['param_index'])} has a non-finite "
                f"gradient at step {step}, where its projection basis is refreshed; the previous "
                "basis and the optimizer state are kept unchanged"
            )
        generator = None
        if group[REFRESH_METHOD] == "randomized":
            generator = self._refresh_generator(g.device, group[REFRESH_SEED], item["index"], step)
        item["new_bases"] = proj.compute_bases(
            g,
            group[RANK],
            side,
            group[REFRESH_METHOD],
            oversample=group[OVERSAMPLE],
            power_iters=group[POWER_ITERS],
            generator=generator,
        )

    def _commit_refresh(self, group: dict[str, Any], item: dict[str, Any]) -> None:
        new = item["new_bases"]
        if new is None:
            return
        p = item["param"]
        state = self.state[p]
        side = item["side"]
        bits, rotated = group[BASIS_BITS], group.get(BASIS_ROTATION, False)
        encoded = None
        if bits in state8bit.BASIS_CODECS:
            # Work with the basis as it will be stored, so moments carried into it match it exactly.
            encoded = [state8bit.encode_basis(b, bits, rotated) for b in new]
            new = [state8bit.decode_basis(*e, b.shape, bits, rotated).to(b.dtype) for e, b in zip(encoded, new)]
        if not state:
            state[STEP] = torch.zeros((), dtype=torch.float32)
            state[PROJ_STEP] = torch.zeros((), dtype=torch.float32)
            store_bases(state, side, new, bits, rotated, encoded)
            m, n = proj.matrix_shape(p.shape)
            shape = proj.lowrank_shape(item["side"], m, n, group[RANK])
            self._init_lowrank_state(group, p, state, shape, compute_dtype(p.dtype))
        else:
            old = load_bases(state, side, p, group[RANK])
            self._on_refresh(group, p, state, old, new, side)
            store_bases(state, side, new, bits, rotated, encoded)
            state[PROJ_STEP].fill_(item["step"])
        item["new_bases"] = None

    # -------------------------------------------------------- hooks for the inner rule
    def _init_lowrank_state(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any], shape, dtype) -> None:
        for key in ADAM_MOMENTS:
            store_moment(state, key, torch.zeros(shape, dtype=dtype, device=p.device), _eight_bit(group))

    def _on_refresh(self, group, p, state, old_bases, new_bases, side) -> None:
        """Called when a parameter's basis changes (not at its first one), before the swap."""
        policy = group[MOMENT_POLICY]
        if policy == "reset":
            self._reset_state(group, p, state)
        elif policy == "reproject":
            self._reproject_state(group, p, state, proj.transition_matrices(old_bases, new_bases), side)

    def _reset_state(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> None:
        for key in ADAM_MOMENTS:
            store_moment(state, key, torch.zeros_like(load_moment(state, key)), _eight_bit(group))

    def _reproject_state(self, group, p, state, transitions, side) -> None:
        """Carry the moments into the new basis: m ← R m (R = P_newᵀ P_old); v ← (R∘R) v, which is
        exact for the second moment when the coordinates are uncorrelated."""
        squares = [t * t for t in transitions]
        m = proj.reproject_lowrank(load_moment(state, EXP_AVG), transitions, side)
        v = proj.reproject_lowrank(load_moment(state, EXP_AVG_SQ), squares, side)
        store_moment(state, EXP_AVG, m, _eight_bit(group))
        store_moment(state, EXP_AVG_SQ, v, _eight_bit(group))

    def _bias_step(self, group: dict[str, Any], state: dict[str, Any]) -> int | torch.Tensor:
        """Steps the current moments have seen (bias correction restarts on a reset refresh); a
        tensor inside a compiled step, where reading it would break the graph."""
        if torch.compiler.is_compiling():
            if group[MOMENT_POLICY] == "reset":
                return state[STEP] - state[PROJ_STEP]
            return state[STEP]
        step = int(state[STEP].item())
        if group[MOMENT_POLICY] == "reset":
            return step - int(state[PROJ_STEP].item())
        return step

    def _lowrank_directions(
        self, group: dict[str, Any], params, lows: list[torch.Tensor], states: list[dict[str, Any]]
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the updates
    def _lowrank_step(self, group: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """The numeric update of a group's projected parameters, after any refresh: compiled when
        the optimizer was built with ``compile``. Only the parameters, their sides, gradients and
        states cross into the compiled function (not the host's step numbers), and the gradients
        and states as plain inputs: reached through ``p.grad`` or ``self.state`` they would be
        guarded by identity, and a gradient freed by ``zero_grad`` or a new state entry would force
        a recompile every step."""
        if getattr(self, "_compile_options", None) is not None:
            items = [
                {"param": it["param"], "side": it["side"], "grad": it["param"].grad, "state": self.state[it["param"]]}
                for it in items
            ]
        self._compiled("_lowrank_update")(group, items)

    def _lowrank_update(self, group: dict[str, Any], items: list[dict[str, Any]]) -> None:
        params = [it["param"] for it in items]
        states = [it["state"] if "state" in it else self.state[p] for p, it in zip(params, items)]
        all_bases = [load_bases(s, it["side"], p, group[RANK]) for p, it, s in zip(params, items, states)]
        lows = []
        for p, state, bases, it in zip(params, states, all_bases, items):
            g = self._gradient_matrix(group, p, it.get("grad"))
            lows.append(self._project_gradient(group, g, bases, it["side"]))
            state[STEP] += 1
        directions = self._lowrank_directions(group, params, lows, states)

        lr = hyperparameter(group["lr"])
        decay = 1.0 - lr * hyperparameter(group["weight_decay"])
        alpha = -lr * hyperparameter(group[SCALE])
        if group[EPS_MODE] == "galore_torch":
            alpha = alpha * decay  # galore-torch decays the already-updated weight
        for p, state, bases, it, d in zip(params, states, all_bases, items, directions):
            self._apply_lowrank_update(group, p, state, d, bases, it["side"], decay=decay, alpha=alpha)

    def _project_gradient(self, group: dict[str, Any], g: torch.Tensor, bases, side: str) -> torch.Tensor:
        """R = project(G): in the compute dtype, or quantised when the group sets ``proj_precision``."""
        if group.get(PROJ_PRECISION) is None:
            return proj.project(g, bases, side)
        return project_lowprec(g, bases, side, group[PROJ_PRECISION])

    def _gradient_matrix(
        self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The (m×n) matrix that is projected (and whose SVD gives the basis): here the gradient
        (``grad``, or ``p.grad`` when not given)."""
        return proj.as_matrix(p.grad if grad is None else grad).to(compute_dtype(p.dtype))

    def _apply_lowrank_update(
        self, group, p, state, d, bases, side, *, decay: float | torch.Tensor, alpha: float | torch.Tensor
    ) -> None:
        """W ← decay·W + alpha·project_back(D)."""
        if isinstance(decay, torch.Tensor) or isinstance(alpha, torch.Tensor):
            # Tensor hyperparameters (compiled step): scale the small low-rank D instead of passing
            # alpha to addmm (which takes numbers only), and decay in place.
            in_place = p.dtype == d.dtype and p.is_contiguous()
            w = proj.as_matrix(p) if in_place else proj.as_matrix(p).to(d.dtype, copy=True)
            w.mul_(decay)
            proj.add_projected_back_(w, d * alpha, bases, side, alpha=1.0)
            if not in_place:
                p.copy_(w.view_as(p))
            return
        if p.dtype == d.dtype and p.is_contiguous():
            # One fused GEMM into the weight, no full-size temporary.
            proj.add_projected_back_(proj.as_matrix(p), d, bases, side, alpha=alpha, beta=decay)
        else:
            # Low-precision weights: accumulate in the compute dtype, round once.
            w = proj.as_matrix(p).to(d.dtype)
            proj.add_projected_back_(w, d, bases, side, alpha=alpha, beta=decay)
            p.copy_(w.view_as(p))

    def _dense_adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if group[EPS_MODE] == "galore_torch" or _eight_bit(group):
            return self._dense_adamw_foreach(group, params)
        fused = group.get("fused")
        if fused is None:
            fused = _fused_supported(params)
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            step_device = p.device if fused else torch.device("cpu")
            if not state:
                state[STEP] = torch.zeros((), dtype=torch.float32, device=step_device)
                state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[EXP_AVG_SQ] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state[STEP].device != step_device:
                state[STEP] = state[STEP].to(step_device)
            grads.append(p.grad)
            exp_avgs.append(state[EXP_AVG])
            exp_avg_sqs.append(state[EXP_AVG_SQ])
            steps.append(state[STEP])
        beta1, beta2 = group["betas"]
        _adamw_functional(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None if fused else group.get("foreach"),
            fused=fused or None,
            amsgrad=False,
            # Tensor hyperparameters as numbers, except lr for the fused kernel, which takes a
            # tensor lr as it is (older torch refuses tensor betas, and tensor lr with foreach).
            beta1=float(beta1),
            beta2=float(beta2),
            lr=group["lr"] if fused else float(group["lr"]),
            weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]),
            maximize=False,
        )

    def _dense_adamw_foreach(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """AdamW for unprojected parameters when torch's kernels do not apply: 8-bit moments
        (``optim_bits=8``, kept in float32 when too small to quantise), or galore-torch's ε and
        decay placement (``eps_mode="galore_torch"``)."""
        from .galore import adam_directions

        eight_bit = _eight_bit(group)
        if eight_bit:
            # A large weight (an embedding or output head) steps slice by slice: its float32
            # moments, gradient and direction would otherwise be ~8x its 8-bit state at once.
            big = [p for p in params if p.numel() > DENSE_8BIT_CHUNK and p.is_contiguous()]
            for p in big:
                _dense_adamw_8bit_chunked(self.state[p], p, group)
            params = [p for p in params if not any(p is b for b in big)]
            if not params:
                return
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state[STEP] = torch.zeros((), dtype=torch.float32)
                for key in ADAM_MOMENTS:
                    zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
                    store_moment(state, key, zeros.float() if eight_bit else zeros, eight_bit)
            state[STEP] += 1
            states.append(state)
        exp_avgs = [load_moment(s, EXP_AVG) for s in states]
        exp_avg_sqs = [load_moment(s, EXP_AVG_SQ) for s in states]
        grads = [p.grad.to(m.dtype) for p, m in zip(params, exp_avgs)]
        beta1, beta2 = group["betas"]
        directions = adam_directions(
            grads,
            exp_avgs,
            exp_avg_sqs,
            [int(s[STEP].item()) for s in states],
            float(beta1),
            float(beta2),
            float(group["eps"]),
            group[EPS_MODE],
        )
        if eight_bit:
            for s, m, v in zip(states, exp_avgs, exp_avg_sqs):
                store_moment(s, EXP_AVG, m, True)
                store_moment(s, EXP_AVG_SQ, v, True)
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        directions = [d.to(p.dtype) for d, p in zip(directions, params)]
        if group[EPS_MODE] == "galore_torch":
            torch._foreach_add_(params, directions, alpha=-lr)
            if wd > 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
        else:
            if wd > 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, directions, alpha=-lr)

    # ------------------------------------------------------------------ layer-wise updates
    def _configure_layerwise(self, layerwise: bool, accumulation_steps: int, clip: float | None) -> None:
        if not isinstance(layerwise, bool):
            raise TypeError(f"layerwise must be True or False, got {layerwise!r}")
        if not _is_int(accumulation_steps) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if clip is not None and (not _is_real(clip) or not math.isfinite(float(clip)) or float(clip) <= 0):
            raise ValueError(f"per_param_grad_clip must be a finite number > 0 or None, got {clip!r}")
        if not layerwise and accumulation_steps != 1:
            raise ValueError(
                f"accumulation_steps={accumulation_steps} applies only with layerwise=True; in the "
                "normal mode accumulate by calling step() once every k backward passes"
            )
        if not layerwise and clip is not None:
            raise ValueError(
                "per_param_grad_clip applies only with layerwise=True; in the normal mode call "
                "torch.nn.utils.clip_grad_norm_ before step()"
            )
        self._layerwise = layerwise
        self._accumulation_steps = int(accumulation_steps)
        self._per_param_grad_clip = None if clip is None else float(clip)
        self._backward_counts: dict[torch.Tensor, int] = {}
        self._layerwise_handles: list[Any] = []
        self._grad_reducer: Callable[[torch.Tensor], None] | None = None

    def _register_layerwise_hooks(self, group_index: int) -> None:
        params = self.param_groups[group_index]["params"]
        for pi, p in enumerate(params):  # check them all before hooking any
            if _is_dtensor(p):
                raise ValueError(
                    f"layerwise=True: {self._param_label(group_index, pi)} is a DTensor (FSDP2); "
                    "FSDP2 writes the reduce-scattered gradient after the hooks would fire, so "
                    "layer-wise updates are not supported there; use layerwise=False"
                )
        for p in params:
            if p.requires_grad:
                self._layerwise_handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def _locate(self, p: torch.Tensor) -> tuple[int, int, int]:
        """(group index, index in the group, index over all groups) of a parameter."""
        offset = 0
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return gi, pi, offset + pi
            offset += len(group["params"])
        raise RuntimeError("layerwise=True: a hooked parameter is no longer in any parameter group")

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: on every k-th backward, step this parameter and free its gradient."""
        count = self._backward_counts.get(p, 0) + 1
        if count < self._accumulation_steps:
            self._backward_counts[p] = count
            return
        self._backward_counts[p] = 0
        with torch.no_grad():
            if self._grad_reducer is not None and p.grad is not None:
                self._grad_reducer(p.grad)
            self._step_one(*self._locate(p))
        p.grad = None  # the point of the mode: this gradient is never held next to the others

    def _step_one(self, gi: int, pi: int, index: int) -> None:
        """The step of one parameter, exactly as step() would take it (its refresh included)."""
        group = self.param_groups[gi]
        p = group["params"][pi]
        if p.grad is None:
            return
        self._check_grad(p, gi, pi)
        if self._per_param_grad_clip is not None:
            # clip_grad_norm_'s rule, applied to this parameter's gradient alone.
            norm = torch.linalg.vector_norm(p.grad)
            p.grad.mul_(torch.clamp(self._per_param_grad_clip / (norm + 1e-6), max=1.0))
        if self.is_projected(group, p):
            item = {"param": p, "group_index": gi, "param_index": pi, "index": index}
            self._prepare_projection(group, item)
            self._commit_refresh(group, item)
            self._lowrank_step(group, [item])
        else:
            self._dense_adamw(group, [p])

    def _layerwise_step_call(self, closure: Callable[[], Any] | None) -> None:
        if closure is not None:
            raise RuntimeError(
                "layerwise=True: step(closure) is not supported; parameters are stepped during "
                "backward(), so call loss.backward() yourself (step() is then a no-op)"
            )
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and self._backward_counts.get(p, 0) == 0:
                    raise RuntimeError(
                        f"layerwise=True: {self._param_label(gi, pi)} holds a gradient that no "
                        "backward() delivered to its hook (set by hand, or zero_grad() was not "
                        "called before?); in layer-wise mode only backward() steps parameters"
                    )

    def set_layerwise_grad_reducer(self, reducer: Callable[[torch.Tensor], None] | None) -> None:
        """Have each complete gradient passed to ``reducer`` (in place) just before its layer-wise
        step: e.g. averaged over data-parallel ranks, which is how ``galorex-train --distributed ddp
        --layerwise`` runs without DDP's buckets. Every rank's hooks fire in the same order (the
        same graph), so collectives issued here pair up; every parameter must get a gradient on
        every rank, as under DDP without ``find_unused_parameters``."""
        if not self._layerwise:
            raise ValueError("set_layerwise_grad_reducer needs an optimizer built with layerwise=True")
        if reducer is not None and not callable(reducer):
            raise TypeError(f"reducer must be callable or None, got {reducer!r}")
        self._grad_reducer = reducer

    def remove_layerwise_hooks(self) -> None:
        """Detach the layer-wise hooks from the parameters (e.g. before handing them to another optimizer)."""
        for handle in self._layerwise_handles:
            handle.remove()
        self._layerwise_handles.clear()

    def state_dict(self) -> dict[str, Any]:
        if self._layerwise and any(self._backward_counts.values()):
            raise RuntimeError(
                "layerwise=True: state_dict() in the middle of a gradient accumulation (some "
                "parameters have seen fewer than accumulation_steps backward passes); take "
                "checkpoints between optimizer steps"
            )
        return super().state_dict()

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like ``Optimizer.load_state_dict``, but subspace state keeps its own dtype.

        torch casts every floating state tensor to its parameter's dtype, which would round the
        float32 basis and moments of a bf16 weight to bf16. Here the state of projected parameters
        keeps the dtype it was saved with and moves to its parameter's device; unprojected (AdamW)
        state is cast to its parameter's dtype, as torch does. ``step`` counters of projected
        parameters stay on the CPU (they drive the refresh schedule without a device sync).
        """
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        built = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        # A setting newer than the checkpoint (absent from its groups, e.g. basis_rotation) keeps the
        # value this optimizer's group was built with, rather than vanishing.
        for group, own in zip(self.param_groups, built):
            for key, value in own.items():
                group.setdefault(key, value)
        id_to_param = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                id_to_param[pid] = (p, group)
        for pid, values in saved_state.items():
            if pid not in id_to_param:
                continue
            p, group = id_to_param[pid]
            restored = {}
            projected = any(
                k + suffix in values for k in ("basis", "basis_left") for suffix in state8bit.BASIS_SUFFIXES
            )
            for key, value in values.items():
                if not isinstance(value, torch.Tensor):
                    restored[key] = value
                elif key in self._cpu_state_keys:
                    keep_on_cpu = projected or not (group.get("fused") or _fused_supported([p]))
                    device = torch.device("cpu") if keep_on_cpu else p.device
                    restored[key] = value.detach().to(device=device, dtype=torch.float32, copy=True)
                elif projected or _eight_bit(group) or not (value.is_floating_point() and p.is_floating_point()):
                    # 8-bit scales and float32 small moments keep their dtype, like subspace state.
                    restored[key] = value.detach().to(device=p.device, copy=True)
                else:
                    restored[key] = value.detach().to(device=p.device, dtype=p.dtype, copy=True)
            self.state[p] = restored


@torch.no_grad()
def _dense_adamw_8bit_chunked(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
    """``_dense_adamw_foreach``'s 8-bit step of one contiguous weight, DENSE_8BIT_CHUNK elements
    at a time: every operation is elementwise or per 8-bit block and slices align with the blocks,
    so the result is bit for bit the unsliced one, with float32 temporaries of one slice only (on
    one intra-op thread; with several, torch's elementwise kernels round a bf16 weight's update
    differently at the edges of each thread's range, which sit elsewhere in a slice: one bf16
    rounding at those few elements, the moments unchanged)."""
    from .galore import adam_directions

    block = state8bit.BLOCK_SIZE
    assert DENSE_8BIT_CHUNK % block == 0
    n = p.numel()
    if not state:
        state[STEP] = torch.zeros((), dtype=torch.float32)
        for key in ADAM_MOMENTS:
            state[key + "_q"] = torch.empty(p.shape, dtype=torch.uint8, device=p.device)
            state[key + "_absmax"] = torch.empty(-(-n // block), dtype=torch.float32, device=p.device)
        fresh = True
    else:
        fresh = False
    state[STEP] += 1
    step = int(state[STEP].item())
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    flat_p, flat_g = p.view(-1), p.grad.reshape(-1)
    for a in range(0, n, DENSE_8BIT_CHUNK):
        b = min(n, a + DENSE_8BIT_CHUNK)
        blocks = slice(a // block, -(-b // block))
        moments = []
        for key in ADAM_MOMENTS:
            q, absmax = state[key + "_q"].view(-1)[a:b], state[key + "_absmax"][blocks]
            if fresh:
                moments.append(torch.zeros(b - a, dtype=torch.float32, device=p.device))
            else:
                moments.append(state8bit.unpack_moment({"q": q, "absmax": absmax}, (b - a,), _moment_kind(key)))
        m, v = moments
        g = flat_g[a:b].to(m.dtype)
        (direction,) = adam_directions(
            [g], [m], [v], [step], float(beta1), float(beta2), float(group["eps"]), group[EPS_MODE]
        )
        # pack_moment's two codes, called directly: a short last slice is still 8-bit here.
        q, absmax = state8bit.quantize_blockwise(m, state8bit.signed_code(p.device), block)
        state[EXP_AVG + "_q"].view(-1)[a:b].copy_(q)
        state[EXP_AVG + "_absmax"][blocks].copy_(absmax)
        q, absmax = state8bit.quantize_second_moment(v, block)
        state[EXP_AVG_SQ + "_q"].view(-1)[a:b].copy_(q)
        state[EXP_AVG_SQ + "_absmax"][blocks].copy_(absmax)
        w = flat_p[a:b]
        direction = direction.to(p.dtype)
        if group[EPS_MODE] == "galore_torch":
            w.add_(direction, alpha=-lr)
            if wd > 0:
                w.mul_(1.0 - lr * wd)
        else:
            if wd > 0:
                w.mul_(1.0 - lr * wd)
            w.add_(direction, alpha=-lr)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers, through splitmix64 so that nearby tuples give unrelated seeds
    (a linear combination would repeat: parameter 1 at step 0 = parameter 0 at step k)."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h >> 1


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Use torch's fused AdamW kernel when every tensor is a floating dense tensor on a device it
    supports (CPU included since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except Exception:  # pragma: no cover - very old torch
        return False
    return all(p.device.type in devices and p.is_floating_point() and not p.is_sparse for p in params)
