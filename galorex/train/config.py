"""Every setting of a ``galorex-train`` run (:class:`TrainConfig`), its validation and what a
resumed run may change.

The optimizer's settings are not listed here: they are the fields of the frozen dataclasses of
:mod:`galorex.optim.config` (projection, refresh, state precision, the rules' own options), read
through :func:`galorex.optim.config.options`, which gives each one's name, type, default, help and
allowed values. :class:`TrainConfig` takes them as fields of the same names, the command line as
flags (``--update-proj-gap`` …), the factory as keywords, and the dataclasses' validators check
them; so a new setting is a field (with its ``Args:`` line) of one of those dataclasses, and
nothing here changes. Only galorex-train's own defaults (:data:`TRAIN_DEFAULTS`) and help
(:data:`TRAIN_HELP`), where they differ from the optimizers', are written here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from ..optim import config as optim_config

OPTIONS: tuple[optim_config.Option, ...] = optim_config.options()
OPTION_NAMES = frozenset(o.name for o in OPTIONS)
# galorex-train's defaults where they differ from the optimizers' (scale None: the optimizer's
# own, galorex.optim.factory.DEFAULT_SCALE).
# Staggered refreshes: within a seed's spread of together on llama-tiny at 1000 steps, 3 seeds
# (docs/benchmarks.md, "Flat, fast steps", 2026-12-07).
TRAIN_DEFAULTS: dict[str, Any] = {"rank": 32, "update_proj_gap": 100, "scale": None, "refresh_schedule": "staggered"}
# What a run saved before a setting existed ran with, where that is not the setting's default now:
# an older config.json or checkpoint without the key gets this value, not the new default.
BEFORE_THE_SETTING: dict[str, Any] = {"refresh_schedule": "together"}
# galorex-train's help where it says more than the option's own (its Args: line).
TRAIN_HELP = {
    "rank": "GaLore rank r (clipped to min(m, n))",
    "proj_precision": "the projection GEMMs' precision: bf16 (projection, back-projection and randomized refresh "
    "on bf16 operands, float32 accumulation), or quantised: fp8 or int8, -hadamard after a block Hadamard "
    "rotation (galorex.lowp.projection); default: in the compute dtype",
    "scale": "scale of the projected-back update (GaLore's scale, Fira's alpha, APOLLO's scale); "
    "default: the optimizer's own (0.25; apollo 1)",
    "weight_rounding": "how the step writes INT8 (--weight-bits 8) and bf16 weights: stochastic or nearest "
    "(default: stochastic for INT8, nearest for bf16)",
}

# Settings a resumed run may change; every other one defines the model, the optimizer, the
# schedule or the data order and must match the checkpoint's. (--steps may grow: the cosine then
# stretches to the new length. The data itself is compared by content, not by path.)
RESUME_MAY_CHANGE = frozenset(
    {
        "steps",
        "eval_every",
        "eval_batches",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "out",
        "resume",
        "device",
        "threads",
        "progress",
        "sample_tokens",
        "cache_dir",
        "data",
        "dataset",
        "dataset_max_chars",
        "init_from",
        # galorex.train.data / tracking: the data is compared by content; the rest only observes.
        "dataset_config",
        "text_field",
        "workers",
        "val_data",
        "val_split",
        "val_max_chars",
        "report_to",
        "compile",
        "recipe",
        "activation_checkpointing",  # the same gradients, recomputed
        "force",
        "save_model",
    }
)


class TrainError(ValueError):
    """A problem with the user's input: reported as one line, exit code 2."""


def flag(name: str) -> str:
    """The command-line flag of a setting: ``update_proj_gap`` → ``--update-proj-gap``."""
    return "--" + name.replace("_", "-")


def option_help(option: optim_config.Option) -> str:
    """An option's ``--help`` text, as argparse takes it (no reST quotes, ``%`` escaped)."""
    text = TRAIN_HELP.get(option.name, option.help.rstrip("."))
    return text.replace("``", "").replace("%", "%%")


def option_flags() -> list[tuple[str, dict[str, Any]]]:
    """``(flag, argparse keywords)`` for every optimizer option, with galorex-train's defaults."""
    flags = []
    for o in OPTIONS:
        default = TRAIN_DEFAULTS.get(o.name, o.default)
        if o.type is bool:  # a switch; one that is on by default also gets its --no- form
            kw: dict[str, Any] = {"action": argparse.BooleanOptionalAction if default else "store_true"}
        else:
            kw = {"type": o.type, "choices": o.choices}
        flags.append((flag(o.name), {**kw, "default": default, "help": option_help(o)}))
    return flags


class OptimizerSettings:
    """The optimizer options of a :class:`TrainConfig`, as the dataclasses that hold them."""

    def option_values(self) -> dict[str, Any]:
        """Every optimizer option by name (what ``build_optimizer`` takes as keywords)."""
        return {o.name: getattr(self, o.name) for o in OPTIONS}

    def _config(self, cls: type) -> Any:
        return cls(**{o.name: getattr(self, o.name) for o in OPTIONS if o.owner is cls})

    @property
    def projection(self) -> optim_config.ProjectionConfig:
        return self._config(optim_config.ProjectionConfig)

    @property
    def refresh(self) -> optim_config.RefreshConfig:
        return self._config(optim_config.RefreshConfig)

    @property
    def precision(self) -> optim_config.StatePrecision:
        return self._config(optim_config.StatePrecision)

    @property
    def rule_options(self) -> optim_config.RuleOptions:
        return self._config(optim_config.RuleOptions)


def _option_field(option: optim_config.Option) -> tuple[str, Any, Any]:
    default = TRAIN_DEFAULTS.get(option.name, option.default)
    kind = option.type | None if option.optional or default is None else option.type
    return option.name, kind, dataclasses.field(default=default)


@dataclass
class _ModelAndOptimizer:
    """TrainConfig's first two fields (its others follow them, the optimizer's options first)."""

    model: str = "llama-tiny"
    optimizer: str = "galore"


# The optimizer options as dataclass fields (TrainConfig's after model and optimizer), generated
# from OPTIONS.
_OptimizerFields = dataclasses.make_dataclass(
    "_OptimizerFields", [_option_field(o) for o in OPTIONS], bases=(_ModelAndOptimizer, OptimizerSettings)
)
_OptimizerFields.__module__ = __name__


@dataclass
class TrainConfig(_OptimizerFields):
    """A ``galorex-train`` run: one field per flag (``--grad-accum`` is ``grad_accum``), saved as
    ``config.json`` and in every checkpoint.

    Its first fields are ``model`` (a name or a JSON file) and ``optimizer`` (a name of
    ``galorex.optim.factory``), then the optimizer options of :mod:`galorex.optim.config` (``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``, ``moment_policy``, ``refresh_method``,
    ``optim_bits``, ``basis_bits``, ``basis_rotation``, ``natural_history`` …; see
    :data:`OPTIONS`), generated from those dataclasses; ``projection``, ``refresh``, ``precision``
    and ``rule_options`` give them back as the dataclasses. The fields below are the run's own.
    """

    lr: float | None = None  # None: the optimizer's own (factory.DEFAULT_LR)
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    dtype: str = "fp32"
    steps: int = 1000
    eval_every: int = 200
    eval_batches: int = 16
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 3
    out: str | None = None
    resume: str | None = None
    seed: int = 0
    device: str = "auto"
    data: str | None = None
    cache_dir: str | None = None
    dataset: str | None = None
    dataset_max_chars: int = 20_000_000
    tokenizer: str | None = None
    init_from: str | None = None
    halo: int | None = None
    halo_format: str | None = None  # fp8 (the default with --halo) or int8
    halo_save_quantized: bool = False  # per-tensor scales, 8-bit X kept for backward
    sample_tokens: int = 200
    threads: int | None = None
    progress: bool = True
    layerwise: bool = False
    distributed: str = "none"
    # Data at scale, tracking and compile (galorex.train.data, .corpus, .tracking, .recipes).
    dataset_config: str | None = None
    text_field: str = "text"
    workers: int | None = None
    val_data: str | None = None
    val_split: str | None = None
    val_max_chars: int = 5_000_000
    report_to: str = "none"
    compile: bool = False
    recipe: str | None = None
    vocab_size: int | None = None  # the model's embedding size (default: the --model config's)
    activation_checkpointing: bool = False
    force: bool = False  # build the model even when the memory estimate says it will not fit
    save_model: bool = True  # write OUT/model.safetensors at the end
    weight_bits: int | None = None  # 8: INT8 attention and MLP weights (galorex.weights)
    weight_group_size: int = 256  # elements per INT8 scale

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A configuration from a saved ``config.json``'s ``train`` dict or a checkpoint's
        ``config``, of this version or an earlier one (a setting it lacks takes the value runs had
        before it existed, :data:`BEFORE_THE_SETTING`, else its default).

        Args:
            values: setting name → value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainError(f"config keys {unknown} are not galorex-train settings (a newer galorex's run?)")
        return cls(**{**BEFORE_THE_SETTING, **values})


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings no run can use, naming the flag: the optimizer options through their
    dataclasses' validators (:func:`galorex.optim.config.validate_options`), then the run's own.

    Args:
        cfg: the configuration, after the optimizer's own lr and scale were filled in.
    """

    def bad(key: str, what: str) -> TrainError:
        # The validators speak in group keys (basis_bits=4); the user gave flags (--basis-bits 4).
        what = re.sub(r"\b(\w+)=", lambda m: f"{flag(m[1])} " if m[1] in OPTION_NAMES else m[0], what)
        return TrainError(f"{flag(key)} {what}, got {getattr(cfg, key)!r}")

    # None is "the optimizer's own" for an option that has no None of its own (--scale).
    given = {o.name: getattr(cfg, o.name) for o in OPTIONS if o.optional or getattr(cfg, o.name) is not None}
    optim_config.validate_options(given, bad)
    positive = ("batch_size", "grad_accum", "seq_len", "eval_batches", "log_every", "keep_checkpoints")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise TrainError(f"{flag(key)} must be > 0, got {getattr(cfg, key)}")
    for key in ("steps", "warmup", "eval_every", "save_every", "sample_tokens"):
        if getattr(cfg, key) < 0:
            raise TrainError(f"{flag(key)} must be >= 0, got {getattr(cfg, key)}")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise TrainError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.halo is not None and cfg.halo not in (0, 1, 2):
        raise TrainError(f"--halo must be 0, 1 or 2, got {cfg.halo}")
    if cfg.halo_format is not None and cfg.halo_format not in ("fp8", "int8"):
        raise TrainError(f"--halo-format must be fp8 or int8, got {cfg.halo_format!r}")
    if cfg.halo_format is not None and cfg.halo is None:
        raise TrainError("--halo-format needs --halo 0|1|2")
    if cfg.halo_save_quantized and cfg.halo is None:
        raise TrainError("--halo-save-quantized needs --halo 0|1|2")
    if cfg.data is not None and cfg.dataset is not None:
        raise TrainError("give either --data or --dataset, not both")
    if cfg.weight_bits is not None:
        from ..weights.codes import check_group_size
        from ..weights.convert import check_bits

        try:
            check_bits(cfg.weight_bits, "--weight-bits")
            check_group_size(cfg.weight_group_size, "--weight-group-size")
        except ValueError as e:
            raise TrainError(str(e)) from None
        if cfg.halo is not None:
            raise TrainError(
                "--halo with --weight-bits: HALO's layers quantise their GEMM operands from float weights, "
                "INT8 weights are dequantised for bf16/float32 GEMMs; choose one"
            )
        if cfg.distributed == "fsdp2":
            raise TrainError("--weight-bits with --distributed fsdp2 is not supported yet (use ddp, or one process)")
    elif cfg.weight_group_size != TrainConfig.weight_group_size:
        raise TrainError("--weight-group-size needs --weight-bits 8")
