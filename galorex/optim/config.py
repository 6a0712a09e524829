"""Settings of galorex's optimizers: the group keys, their typed form, and their validation.

Every projection, refresh and state-precision setting is read and checked here, once, as frozen
dataclasses (:class:`ProjectionConfig`, :class:`RefreshConfig`, :class:`StatePrecision`); the
optimizers, the factory and ``galorex-train`` all build from them. Group keys keep galore-torch's
names (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) so its parameter groups work as
they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from .. import projection as proj
from ..lowp.projection import PROJ_PRECISION, PROJ_PRECISIONS

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
REFRESH_SCHEDULE = "refresh_schedule"
EPS_MODE = "eps_mode"
OPTIM_BITS = "optim_bits"
BASIS_BITS = "basis_bits"
BASIS_ROTATION = "basis_rotation"
# torch.optim.AdamW's flags.
AMSGRAD = "amsgrad"
MAXIMIZE = "maximize"

WEIGHT_ROUNDING = "weight_rounding"
ROUNDING_SEED = "rounding_seed"

EPS_MODES = ("torch", "galore_torch")
WEIGHT_ROUNDINGS = ("nearest", "stochastic")
MOMENT_POLICIES = ("keep", "reset", "reproject")
REFRESH_SCHEDULES = ("together", "staggered")

# State keys every projected parameter has.
STEP = "step"
PROJ_STEP = "proj_step"

# ``compile=``: False (eager), True (torch.compile with fullgraph=True), or torch.compile options.
CompileOption = bool | dict[str, Any]

Bad = Callable[[str, str], ValueError]


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.is_complex()
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def bad_key(group: dict[str, Any], index: int) -> Bad:
    """The error for a bad group key: names the group, the key, the rule and the value."""

    def bad(key: str, what: str) -> ValueError:
        return ValueError(f"param_groups[{index}]: {key!r} {what}, got {dict.get(group, key)!r}")

    return bad


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """How a group's matrices are projected (group keys of the same names).

    Args:
        rank: subspace rank r (clipped to min(m, n)); None means the group is not projected.
        update_proj_gap: steps between basis refreshes (refresh at steps 0, T, 2T, …).
        scale: multiplies the projected-back update (the GaLore paper uses 0.25).
        proj_type: ``std``, ``reverse_std``, ``left``, ``right`` or ``full`` (see ``projection``).
        moment_policy: what subspace state does at a refresh: ``keep``, ``reset`` or ``reproject``.
        proj_precision: None (the compute dtype), ``bf16`` (projection, back-projection and the
            randomized refresh's GEMMs on bf16 operands with float32 accumulation; state float32;
            refused for float64 weights), or a quantised projection GEMM (``galorex.lowp.projection``).
    """

    rank: int | None = None
    update_proj_gap: int = 200
    scale: float = 1.0
    proj_type: str = "std"
    moment_policy: str = "keep"
    proj_precision: str | None = None

    def validate(self, bad: Bad) -> None:
        if self.rank is None:
            return
        if not is_int(self.rank) or self.rank <= 0:
            raise bad(RANK, "must be a positive integer")
        if not is_int(self.update_proj_gap) or self.update_proj_gap <= 0:
            raise bad(UPDATE_PROJ_GAP, "must be a positive integer")
        if not is_real(self.scale) or not math.isfinite(float(self.scale)) or float(self.scale) <= 0:
            raise bad(SCALE, "must be a finite number > 0")
        if self.proj_type not in proj.PROJ_TYPES:
            raise bad(PROJ_TYPE, f"must be one of {proj.PROJ_TYPES}")
        if self.moment_policy not in MOMENT_POLICIES:
            raise bad(MOMENT_POLICY, f"must be one of {MOMENT_POLICIES}")
        if self.proj_precision not in (None,) + PROJ_PRECISIONS:
            raise bad(PROJ_PRECISION, f"must be None or one of {PROJ_PRECISIONS}")


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
    """How a basis is computed at a refresh.

    Args:
        refresh_method: ``svd`` (exact) or ``randomized`` (a range finder).
        oversample: extra columns of the range finder's sketch.
        power_iters: power iterations of the range finder.
        refresh_seed: seeds the sketch with the parameter's index and the step (splitmix64), so a
            resumed run draws the same bases without any RNG state in the checkpoint.
        refresh_schedule: ``together`` (every matrix of a group at steps 0, T, 2T, …) or
            ``staggered`` (each matrix at its own phase, spread over T so a step refreshes about
            N/T of them; the first step computes every basis; ``galorex.optim.schedule``).
    """

    refresh_method: str = "svd"
    oversample: int = 16
    power_iters: int = 2
    refresh_seed: int = 0
    refresh_schedule: str = "together"

    def validate(self, bad: Bad) -> None:
        if self.refresh_method not in proj.REFRESH_METHODS:
            raise bad(REFRESH_METHOD, f"must be one of {proj.REFRESH_METHODS}")
        if not is_int(self.oversample) or self.oversample < 0:
            raise bad(OVERSAMPLE, "must be an integer >= 0")
        if not is_int(self.power_iters) or self.power_iters < 0:
            raise bad(POWER_ITERS, "must be an integer >= 0")
        if not is_int(self.refresh_seed):
            raise bad(REFRESH_SEED, "must be an integer")
        if self.refresh_schedule not in REFRESH_SCHEDULES:
            raise bad(REFRESH_SCHEDULE, f"must be one of {REFRESH_SCHEDULES}")


@dataclasses.dataclass(frozen=True)
class StatePrecision:
    """How optimizer state is stored (applied by ``codec`` around every rule).

    Args:
        optim_bits: 32, or 8 for block-wise 8-bit moments (``state8bit``).
        basis_bits: 32, or 4/8 for block-quantised projection bases.
        basis_rotation: Hadamard-rotate a 4/8-bit basis before quantising it.
    """

    optim_bits: int = 32
    basis_bits: int = 32
    basis_rotation: bool = False

    def validate(self, bad: Bad, projected: bool) -> None:
        if not is_int(self.optim_bits) or self.optim_bits not in (8, 32):
            raise bad(OPTIM_BITS, "must be 8 or 32")
        if not projected:
            return
        if not is_int(self.basis_bits) or self.basis_bits not in (4, 8, 32):
            raise bad(BASIS_BITS, "must be 4, 8 or 32")
        if not isinstance(self.basis_rotation, bool):
            raise bad(BASIS_ROTATION, "must be True or False")
        if self.basis_rotation and self.basis_bits == 32:
            raise bad(BASIS_ROTATION, "rotates a quantised basis: it needs basis_bits=4 or 8")


@dataclasses.dataclass(frozen=True)
class WeightWrite:
    """How the step writes a weight stored below the compute precision: a bf16 weight, or INT8
    codes (``galorex.quantize_weights``), for every group, projected or not (``galorex.weights``).

    Args:
        weight_rounding: ``nearest``, ``stochastic``, or None: stochastic for INT8 weights, nearest
            for bf16 weights (the measured default, docs/benchmarks.md). Stochastic rounding applies
            the float32 update to a working copy and rounds it up with probability equal to the
            fraction it lies above the grid point below, so updates smaller than the grid survive
            in expectation.
        rounding_seed: seeds the stochastic rounding's draws with the parameter's index and its
            step (splitmix64), so a resumed run rounds the same way.
    """

    weight_rounding: str | None = None
    rounding_seed: int = 0

    def validate(self, bad: Bad) -> None:
        if self.weight_rounding not in (None,) + WEIGHT_ROUNDINGS:
            raise bad(WEIGHT_ROUNDING, f"must be None or one of {WEIGHT_ROUNDINGS}")
        if not is_int(self.rounding_seed):
            raise bad(ROUNDING_SEED, "must be an integer")


def _from_group(cls: type, group: dict[str, Any]) -> Any:
    return cls(**{f.name: dict.get(group, f.name, f.default) for f in dataclasses.fields(cls)})


def projection_config(group: dict[str, Any]) -> ProjectionConfig:
    return _from_group(ProjectionConfig, group)


def refresh_config(group: dict[str, Any]) -> RefreshConfig:
    return _from_group(RefreshConfig, group)


def weight_write(group: dict[str, Any]) -> WeightWrite:
    return _from_group(WeightWrite, group)


def state_precision(group: dict[str, Any]) -> StatePrecision:
    return _from_group(StatePrecision, group)


def group_keys(*configs: Any) -> dict[str, Any]:
    """The group keys (and values) of config objects, e.g. for ``galore_param_groups``."""
    return {k: v for c in configs for k, v in dataclasses.asdict(c).items()}


def projection_defaults() -> dict[str, Any]:
    """Every projection, refresh and precision key with its default (``rank`` excluded: absent
    means unprojected)."""
    keys = group_keys(ProjectionConfig(), RefreshConfig(), StatePrecision(), WeightWrite())
    keys.pop(RANK)
    return keys


def validate_projection(group: dict[str, Any], index: int) -> None:
    """Check a group's projection, refresh and precision keys (what every rule shares)."""
    bad = bad_key(group, index)
    projection = projection_config(group)
    state_precision(group).validate(bad, projection.rank is not None)
    weight_write(group).validate(bad)
    projection.validate(bad)
    if projection.rank is not None:
        refresh_config(group).validate(bad)
    if projection.rank is not None and projection.proj_precision == "bf16":
        for pi, p in enumerate(group["params"]):
            if p.dtype == torch.float64 and p.dim() >= 2:
                raise ValueError(
                    f"param_groups[{index}]: {PROJ_PRECISION!r} 'bf16' would round the projections of the float64 "
                    f"parameter param_groups[{index}]['params'][{pi}] (shape {tuple(p.shape)}) to 8 significant "
                    "bits; use proj_precision=None (float64) for float64 weights"
                )


def check_lr(group: dict[str, Any], bad: Bad) -> None:
    lr = dict.get(group, "lr")
    if not is_real(lr) or float(lr) < 0 or not math.isfinite(float(lr)):
        raise bad("lr", "must be a finite number >= 0")


def check_weight_decay(group: dict[str, Any], bad: Bad) -> None:
    wd = group["weight_decay"]
    if not is_real(wd) or not math.isfinite(float(wd)) or float(wd) < 0:
        raise bad("weight_decay", "must be a finite number >= 0")


def refuse_unsupported_flags(**flags: bool) -> None:
    """torch.optim.AdamW's ``capturable``/``differentiable``: accepted as False only."""
    for name, value in flags.items():
        if value:
            raise ValueError(
                f"{name}=True is not supported by galorex optimizers: the refresh schedule (step "
                f"counters, SVD) runs on the host, outside any captured or differentiated graph; pass {name}=False"
            )


def hyperparameter(value: float | torch.Tensor) -> float | torch.Tensor:
    """A group hyperparameter (lr, weight_decay, betas, eps …) as the step uses it: a Python float,
    except that a tensor stays a tensor inside a compiled step, where reading it would be a host
    synchronisation and a graph break; the graph then takes it as an input, so a scheduler that
    changes it in place does not cause a recompile (as ``torch.optim`` does with ``lr=tensor``)."""
    if isinstance(value, torch.Tensor) and torch.compiler.is_compiling():
        return value
    return float(value)


def zero_dim_hyperparameters(group: dict[str, Any]) -> None:
    """Every 1-element tensor hyperparameter of a group becomes a 0-dim view of itself, so a
    ``lr=torch.tensor([[1e-3]])`` broadcasts like a number everywhere (the view shares its
    storage, so a scheduler's in-place update reaches both)."""

    def zero_dim(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dim() > 0:
            return v.reshape(())
        return v

    for key, value in dict.items(group):
        if key in ("params", "param_names"):
            continue
        if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            group[key] = type(value)(zero_dim(v) for v in value)
        else:
            group[key] = zero_dim(value)


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Projection and subspace state run in float32, or float64 for float64 parameters."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def as_step_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """A step counter as torch.optim keeps it: a float32 0-dim tensor (older checkpoints and
    hand-made state dicts hold a Python number)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32, copy=True).reshape(())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"a step counter in the optimizer state must be a number >= 0 or a tensor, got {value!r}")
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def mix_seed(*values: int) -> int:
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


# ----------------------------------------------------------------------------- settings as options
@dataclasses.dataclass(frozen=True)
class RuleOptions:
    """Rules' own group keys that ``galorex-train`` and the factory take by name: each goes to the
    optimizers whose rule has the key in its ``defaults`` and is ignored by the others (the rule
    validates it).

    Args:
        natural_history: natural-galore: recent low-rank gradients in the empirical Fisher (s);
            0 turns the preconditioning off.
        natural_damping: natural-galore: Tikhonov damping of the Fisher (lambda).
    """

    natural_history: int = 8
    natural_damping: float = 1e-3


# The dataclasses whose fields are the optimizers' named options (galorex-train's flags).
OPTION_CONFIGS: tuple[type, ...] = (ProjectionConfig, RefreshConfig, StatePrecision, WeightWrite, RuleOptions)
OPTIM_BITS_CHOICES = (8, 32)
BASIS_BITS_CHOICES = (4, 8, 32)
# Options whose values form a short list (the validators above refuse anything else).
CHOICES: dict[str, tuple[Any, ...]] = {
    PROJ_TYPE: proj.PROJ_TYPES,
    MOMENT_POLICY: MOMENT_POLICIES,
    PROJ_PRECISION: PROJ_PRECISIONS,
    REFRESH_METHOD: proj.REFRESH_METHODS,
    REFRESH_SCHEDULE: REFRESH_SCHEDULES,
    OPTIM_BITS: OPTIM_BITS_CHOICES,
    BASIS_BITS: BASIS_BITS_CHOICES,
    WEIGHT_ROUNDING: WEIGHT_ROUNDINGS,
}


@dataclasses.dataclass(frozen=True)
class Option:
    """One named setting of the optimizers, as the factory, ``TrainConfig`` and ``galorex-train``'s
    flags take it (see :func:`options`).

    Args:
        name: the field and group key; the flag is ``--`` + name with dashes.
        owner: the dataclass that holds and validates it (one of :data:`OPTION_CONFIGS`).
        default: the dataclass's default.
        type: int, float, str or bool (None removed from an optional annotation).
        optional: whether None is a value of the field.
        help: the field's entry in its dataclass's ``Args:`` section, on one line.
        choices: the values allowed (:data:`CHOICES`), or None.
    """

    name: str
    owner: type
    default: Any
    type: type
    optional: bool
    help: str
    choices: tuple[Any, ...] | None


def args_doc(cls: type) -> dict[str, str]:
    """The ``Args:`` entries of a class's docstring (``name: text``, continuation lines indented
    further), each joined into one line."""
    import inspect

    entries: dict[str, str] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Args:" not in lines:
        return entries
    indent, name = None, None
    for line in lines[lines.index("Args:") + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break  # the next section
        if depth == indent:
            name, _, text = line.strip().partition(":")
            entries[name] = text.strip()
        elif name is not None:
            entries[name] += " " + line.strip()
    return entries


def options() -> tuple[Option, ...]:
    """Every field of :data:`OPTION_CONFIGS`, in order, as an :class:`Option`: one definition of
    each setting's name, default, type, help and allowed values."""
    import typing

    found = []
    for cls in OPTION_CONFIGS:
        hints = typing.get_type_hints(cls)
        docs = args_doc(cls)
        for f in dataclasses.fields(cls):
            kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
            kind = next(k for k in kinds if k is not type(None))
            help_ = docs.get(f.name)
            if help_ is None:
                raise TypeError(f"{cls.__name__}.{f.name} has no entry in {cls.__name__}'s Args: docstring")
            found.append(Option(f.name, cls, f.default, kind, type(None) in kinds, help_, CHOICES.get(f.name)))
    return tuple(found)


def validate_options(values: dict[str, Any], bad: Bad) -> None:
    """Check named option values (e.g. a command line's) with the dataclasses' validators; a value
    absent from ``values`` takes its dataclass's default. ``rank`` is always checked (the
    projection keys are checked whenever it is given)."""
    projection = _from_group(ProjectionConfig, values)
    _from_group(StatePrecision, values).validate(bad, projection.rank is not None)
    _from_group(WeightWrite, values).validate(bad)
    projection.validate(bad)
    if projection.rank is not None:
        _from_group(RefreshConfig, values).validate(bad)
