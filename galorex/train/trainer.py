"""Pretrain a Llama from scratch with any galorex optimizer: the loop behind ``galorex-train``.

:func:`train` runs four phases, top to bottom in this file: :func:`_setup` checks every input
and builds the data, model, optimizer and schedule (nothing is written into --out before it
succeeds); :func:`_resume` restores a checkpoint's position, or starts the run's folder;
:func:`_loop` trains (accumulate, clip, step, log, evaluate, checkpoint); :func:`_report` writes
the summary. The settings are :class:`galorex.train.config.TrainConfig`; the memory preflight is
:mod:`galorex.train.preflight`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..memory import optimizer_state_bytes
from ..models.llama import Llama, LlamaConfig, build_llama, get_config
from ..optim.factory import DEFAULT_SCALE, PLANNED, build_optimizer, default_lr
from ..optim.factory import available as available_optimizers
from ..optim.sharded import local_state_bytes
from ..weights.convert import load_across_storage, reconcile_keys
from . import allocator, distributed
from .atomic import atomic_write
from .checkpoint import (
    CheckpointError,
    load_safetensors_into,
    read_safetensors_header,
    read_safetensors_tensor,
    rng_state,
    save_checkpoint,
    save_safetensors,
    set_rng_state,
)
from .config import BEFORE_THE_SETTING, RESUME_MAY_CHANGE, TrainConfig, TrainError, check_config
from .data import (
    DataError,
    TokenBatcher,
    eval_batches,
    prepare_run_data,
    unigram_entropy,
)

# Re-exported: galorex.bench (peak-memory) and the tests import these from here.
from .preflight import _available_memory as _available_memory
from .preflight import _estimate as _estimate
from .preflight import _memory_now, _peak_memory_bytes, _preflight
from .tracking import RunMetrics, TrackingError, check_report_to, compile_model

CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------- helpers
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise TrainError(f"--device {name!r} is not a device torch knows ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine")
    return device


def _dtype(name: str) -> torch.dtype:
    # fp64 is for checking that two ways of computing a run agree beyond float32's rounding.
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
    if name not in dtypes:
        raise TrainError(f"--dtype {name!r}: expected one of {', '.join(dtypes)}")
    return dtypes[name]


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: Llama, tokens: np.ndarray, cfg: TrainConfig, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches):
        _, loss = model(x.to(device), y.to(device))
        total += float(loss) * x.shape[0]
        count += x.shape[0]
    model.train()
    return total / max(count, 1)


def _prepare_out_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        out = Path(cfg.out)
    elif cfg.resume not in (None, "latest") and Path(cfg.resume).parent.name == "checkpoints":
        out = Path(cfg.resume).parent.parent  # the run the checkpoint belongs to
    else:
        out = Path("runs") / time.strftime("galorex-%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out}: exists and is not a folder")
    holds_run = out.is_dir() and any(out.iterdir())
    if cfg.resume is None and holds_run:
        raise TrainError(
            f"--out {out}: the folder already holds files (another run?); "
            "pass --resume to continue it, or choose another --out"
        )
    if cfg.resume is not None and not holds_run and cfg.resume == "latest":
        raise TrainError(f"--resume: {out} holds no run to resume")
    return out


def _load_resume(cfg: TrainConfig, out: Path, ctx: distributed.Context | None = None) -> dict[str, Any]:
    ctx = ctx or distributed.Context()
    path = distributed.latest_checkpoint(ctx, out / "checkpoints") if cfg.resume == "latest" else Path(cfg.resume)
    if path is None:
        raise TrainError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    try:
        ckpt = distributed.load_extra(ctx, path)
    except CheckpointError as e:
        raise TrainError(f"--resume: {e}") from None
    needed = (
        "config",
        "model_config",
        "model",
        "optimizer",
        "scheduler",
        "data",
        "rng",
        "step",
        "tokens_seen",
        "wall_s",
        "data_fingerprint",
    )
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or any(k not in ckpt for k in needed):
        raise TrainError(f"--resume: {path} is not a galorex-train checkpoint (format {CHECKPOINT_FORMAT})")
    saved = ckpt["config"]
    # A setting newer than the checkpoint (absent from its config) had the value runs had before
    # it existed (BEFORE_THE_SETTING), else its default.
    defaults = {**TrainConfig().to_dict(), **BEFORE_THE_SETTING}
    for key, value in cfg.to_dict().items():
        before = saved.get(key, defaults[key])
        if key not in RESUME_MAY_CHANGE and before != value:
            raise TrainError(f"--resume: {path} was trained with {key}={before!r}, this run asks for {key}={value!r}")
    ckpt["path"] = str(path)
    return ckpt


def _data_fingerprint(tokens) -> str:
    """The token cache is named by a hash of the tokenizer and the corpus text: that names the data."""
    return Path(tokens.filename).stem.rsplit("-", 1)[-1].split(".")[0]


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run's tail)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut off by a crash
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def _plot(metrics_path: Path, png: Path) -> bool:
    try:
        # A Figure of its own on the Agg canvas: no pyplot, so the caller's matplotlib backend (a
        # notebook's inline plots) stays as it was.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return False  # nothing was trained (--steps 0): no curve to draw
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return True


def _check_init_file(path: str) -> None:
    if not Path(path).is_file():
        raise TrainError(f"--init-from {path}: no such file")


def _load_initial_weights(model: Llama, path: str) -> None:
    """--init-from: a safetensors file (e.g. an earlier run's OUT/model.safetensors), read tensor by
    tensor straight into the model's storage (never two copies of the weights), or a torch file
    holding a state dict or a galorex-train checkpoint (memory-mapped, copied tensor by tensor).
    A weight stored otherwise in the file than in the model (INT8 codes against float values, either
    way round: --weight-bits 8) is converted one tensor at a time (``galorex.weights.convert``)."""
    p = Path(path)
    _check_init_file(path)
    own = model.state_dict()
    if p.suffix == ".safetensors":
        try:
            header, _ = read_safetensors_header(p)
            quantize, dequantize = reconcile_keys(own, header)
            replaced = {k for pair in quantize.values() for k in pair} | set(dequantize)
            saved = set(quantize) | {k for pair in dequantize.values() for k in pair}
            load_safetensors_into({k: v for k, v in own.items() if k not in replaced}, p, "the model", skip=saved)
            load_across_storage(model, quantize, dequantize, lambda name: read_safetensors_tensor(p, name))
        except (CheckpointError, ValueError) as e:
            raise TrainError(f"--init-from {e}") from None
        return
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("model", state) if isinstance(state, dict) else state
    except Exception as e:  # unreadable or corrupt: say which file and why, in one line
        raise TrainError(f"--init-from {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise TrainError(f"--init-from {path}: holds no state dict")
    quantize, dequantize = reconcile_keys(own, state)
    replaced = {k for pair in quantize.values() for k in pair} | set(dequantize)
    direct = {k: v for k, v in own.items() if k not in replaced}
    expected = set(direct) | set(quantize) | {k for pair in dequantize.values() for k in pair}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise TrainError(
            f"--init-from {path}: keys do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, value in direct.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise TrainError(
                f"--init-from {path}: {key} has shape {tuple(state[key].shape)}, the model needs {tuple(value.shape)}"
            )
    with torch.no_grad():
        for key, value in direct.items():
            value.copy_(state[key])
    try:
        load_across_storage(model, quantize, dequantize, state.__getitem__)
    except ValueError as e:
        raise TrainError(f"--init-from {path}: {e}") from None


def _save_weights(state: dict[str, torch.Tensor], out: Path) -> Path:
    """OUT/model.safetensors, for --init-from and other tools: streamed out one tensor at a time
    (no copy of the weights) and renamed into place when complete."""
    return save_safetensors(state, out / "model.safetensors")


# ----------------------------------------------------------------------------- the run
def train(
    cfg: TrainConfig,
    log: Callable[[str], Any] = print,
    make_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
) -> dict[str, Any]:
    """Run the training described by ``cfg``; returns the summary (also written to OUT/summary.json).

    ``make_optimizer(model, **options)`` replaces :func:`galorex.optim.factory.build_optimizer`
    (same options), e.g. to run another library's optimizer through the same loop.
    """
    if cfg.lr is None and cfg.optimizer in available_optimizers():
        cfg = dataclasses.replace(cfg, lr=default_lr(cfg.optimizer))
    if cfg.scale is None and cfg.optimizer in DEFAULT_SCALE:  # apollo-mini keeps None: it sets its own
        cfg = dataclasses.replace(cfg, scale=DEFAULT_SCALE[cfg.optimizer])
    check_config(cfg)
    try:
        ctx, device_name = distributed.setup(cfg.distributed, cfg.device, cfg.batch_size)
    except distributed.DistributedError as e:
        raise TrainError(str(e)) from None
    try:
        summary = _train(cfg, ctx, device_name, log, make_optimizer)
    except BaseException:
        ctx.close(wait=False)
        raise
    ctx.close()
    return summary


@dataclass
class Run:
    """What :func:`_setup` builds and the later phases use: the run's settings, where it writes,
    its data, model, optimizer and schedule, and the checkpoint it resumes from (or None)."""

    cfg: TrainConfig
    ctx: distributed.Context
    device: torch.device
    log: Callable[..., Any]
    out: Path
    ckpt: dict[str, Any] | None
    model_cfg: LlamaConfig
    run_data: Any  # galorex.train.data.RunData
    batcher: TokenBatcher
    estimate: dict[str, int] | None
    model: Llama
    runner: torch.nn.Module  # the model as wrapped for DDP and torch.compile
    run_metrics: RunMetrics
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    memory: dict[str, Any]  # figures at points of the run

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


@dataclass
class Position:
    """Where a run stands: restored by :func:`_resume`, advanced by :func:`_loop`, saved in every
    checkpoint (but the timers and the last validation loss, which belong to this session).
    ``loss_sum`` and ``window_steps`` are the training loss of the steps not yet logged (so a
    resumed log line averages the same steps as the straight run's)."""

    loss_sum: torch.Tensor
    step: int = 0
    tokens_seen: int = 0
    wall_before: float = 0.0  # seconds of earlier sessions of the run
    t_start: float = 0.0  # perf_counter() when this session's loop started
    window_steps: int = 0
    val_loss: float | None = None
    window_t0: float = 0.0  # perf_counter() when the throughput window started
    window_tokens: int = 0  # tokens trained in it

    def wall_s(self) -> float:
        return self.wall_before + (time.perf_counter() - self.t_start)


def _train(cfg: TrainConfig, ctx: distributed.Context, device_name: str, log, make_optimizer) -> dict[str, Any]:
    """The run in its four phases: build everything (checking every input before writing into
    --out), restore the checkpoint's position, train, and report."""
    run = _setup(cfg, ctx, device_name, log, make_optimizer)
    position = _resume(run)
    wall_s = _loop(run, position)
    return _report(run, position, wall_s)


# ----------------------------------------------------------------------------- 1. setup
def _setup(cfg: TrainConfig, ctx: distributed.Context, device_name: str, log, make_optimizer) -> Run:
    """Check the inputs and build the run: output folder and checkpoint to resume (read, nothing
    written yet), data, model (with the checkpoint's weights), optimizer and schedule.

    Args:
        cfg: the run's settings (lr and scale filled in by :func:`train`).
        ctx: the distributed context (a single process when not under torchrun).
        device_name: the device this process runs on.
        log: prints a line (a no-op on ranks other than 0).
        make_optimizer: replaces ``build_optimizer``, or None.
    """
    device = _device(device_name)
    dtype = _dtype(cfg.dtype)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not ctx.is_main:
        log = lambda *args, **kwargs: None
    # Nothing is written into --out until every input has been checked, so a failed start leaves
    # the folder as it was (and reusable).
    out = _prepare_out_dir(cfg)
    ckpt = _load_resume(cfg, out, ctx) if cfg.resume is not None else None
    ctx.barrier()  # every rank has looked at --out before rank 0 writes into it
    if cfg.optimizer not in available_optimizers():
        known = "not available in this version of galorex yet" if cfg.optimizer in PLANNED else "unknown optimizer"
        raise TrainError(f"--optimizer {cfg.optimizer}: {known}; available: {', '.join(available_optimizers())}")
    model_cfg = _model_config(cfg)
    run_data, batcher = _setup_data(cfg, log)
    model_cfg = _vocabulary_of(cfg, model_cfg, run_data.tokenizer, log)
    model, memory, estimate = _setup_model(cfg, model_cfg, run_data, ckpt, device, dtype, log, ctx)
    # DDP: `runner` wraps `model`; FSDP2 shards `model` in place (runner is model).
    runner = distributed.wrap_model(ctx, model, layerwise=cfg.layerwise)
    runner = compile_model(runner, cfg.compile)
    # Its gradient-norm hooks must come before the optimizer's --layerwise hooks.
    run_metrics = RunMetrics(cfg, model, model_cfg, device, ctx.world_size)
    optimizer = _setup_optimizer(cfg, ctx, model, make_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    )
    return Run(
        cfg, ctx, device, log, out, ckpt, model_cfg, run_data, batcher, estimate, model, runner, run_metrics,
        optimizer, scheduler, memory,
    )  # fmt: skip


def _model_config(cfg: TrainConfig) -> LlamaConfig:
    """--model's configuration, with --vocab-size when given."""
    try:
        model_cfg: LlamaConfig = get_config(cfg.model)
    except ValueError as e:
        raise TrainError(f"--model: {e}") from None
    if cfg.vocab_size is not None:
        try:
            model_cfg = get_config(cfg.model, vocab_size=cfg.vocab_size)
        except ValueError as e:
            raise TrainError(f"--vocab-size {cfg.vocab_size}: {e}") from None
    return model_cfg


def _setup_data(cfg: TrainConfig, log) -> tuple[Any, TokenBatcher]:
    """Tokens (tokenised once into a memory-mapped cache), validation on --val-data or the tail,
    and the batcher; a corpus too short for one batch is refused here, naming it."""
    try:
        check_report_to(cfg.report_to)
        run_data = prepare_run_data(cfg, log)
    except (DataError, TrackingError) as e:
        raise TrainError(str(e)) from None
    try:
        batcher = TokenBatcher(run_data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    except DataError as e:
        raise TrainError(f"{run_data.source}: {e}") from None
    try:
        next(iter(eval_batches(run_data.val, cfg.batch_size, cfg.seq_len, 1)))
    except DataError as e:
        raise TrainError(f"{run_data.val_source}: {e}") from None
    return run_data, batcher


VOCAB_MULTIPLE = 64  # a vocabulary taken from the tokenizer is rounded up to this (GEMM-friendly sizes)


def _vocabulary_of(cfg: TrainConfig, model_cfg: LlamaConfig, tokenizer: Any, log) -> LlamaConfig:
    """The model follows the tokenizer: when ``--tokenizer`` has more tokens than the preset's
    vocabulary and ``--vocab-size`` is not given, the embedding takes the tokenizer's size rounded up
    to a multiple of :data:`VOCAB_MULTIPLE` (one line says so). An explicit ``--vocab-size`` below the
    tokenizer's stays an error (:func:`_setup_model`)."""
    if cfg.vocab_size is not None or tokenizer.vocab_size <= model_cfg.vocab_size:
        return model_cfg
    size = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    log(
        f"vocabulary: {size} (the tokenizer's {tokenizer.vocab_size} tokens rounded up to a multiple of "
        f"{VOCAB_MULTIPLE}; --model {cfg.model} has {model_cfg.vocab_size}); --vocab-size sets it"
    )
    return dataclasses.replace(model_cfg, vocab_size=size)


def _setup_model(
    cfg: TrainConfig,
    model_cfg: LlamaConfig,
    run_data: Any,
    ckpt: dict[str, Any] | None,
    device: torch.device,
    dtype: torch.dtype,
    log,
    ctx: distributed.Context | None = None,
) -> tuple[Llama, dict[str, Any], dict[str, int] | None]:
    """The model, after the memory preflight: built on the meta device and materialised in
    ``dtype`` on ``device``, seeded or loaded (--init-from, or the checkpoint's weights), HALO
    layers swapped in (under FSDP2, ``ctx``, each block sharded as it is built). Returns it, the
    memory figures so far and the preflight's estimate."""
    tokenizer = run_data.tokenizer
    if tokenizer.vocab_size > model_cfg.vocab_size:
        given = f"--vocab-size {cfg.vocab_size}" if cfg.vocab_size is not None else f"--model {cfg.model}'s vocabulary"
        raise TrainError(
            f"--tokenizer has {tokenizer.vocab_size} tokens, more than {given} of {model_cfg.vocab_size}; "
            f"pass --vocab-size {tokenizer.vocab_size} or more"
        )
    if cfg.seq_len > model_cfg.max_seq_len:
        raise TrainError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    estimate = _preflight(cfg, model_cfg, device, dtype, log)
    torch.manual_seed(cfg.seed)
    loading = cfg.init_from is not None and ckpt is None
    if loading:
        _check_init_file(cfg.init_from)
    # Built on the meta device, then materialised piece by piece in `dtype` on `device`: no
    # float32 copy of the model ever exists (weights about to be loaded are left uninitialised).
    # FSDP2: shard each block as it is built (weights loaded from a file, or HALO's layer swap,
    # need the whole model first and are sharded by wrap_model).
    build_sharded = ctx is not None and not loading and cfg.halo is None
    on_piece = distributed.shard_as_built(ctx, model_cfg.tie_embeddings) if build_sharded else None
    model = build_llama(
        model_cfg,
        device=device,
        dtype=dtype,
        seed=None if loading else cfg.seed,
        activation_checkpointing=cfg.activation_checkpointing,
        weight_bits=cfg.weight_bits,
        weight_group_size=cfg.weight_group_size,
        on_piece=on_piece,
    )
    if loading:
        _load_initial_weights(model, cfg.init_from)
    memory = {"after_construction": _memory_now(device)}
    if cfg.halo is not None:
        # HALO: every linear layer but the head runs its GEMMs in FP8/INT8; weights stay as they are.
        from ..halo import convert_to_halo

        # --halo-save-quantized: per-tensor scales are what lets backward reuse the forward's 8-bit X.
        saving = {"granularity": "tensor", "save_quantized": True} if cfg.halo_save_quantized else {}
        convert_to_halo(model, level=cfg.halo, fmt=cfg.halo_format or "fp8", **saving)
    if ckpt is not None and cfg.distributed != "fsdp2" and ckpt["model_config"] == model_cfg.to_dict():
        # Before DDP sees the weights (a checkpoint of another shape is reported in _resume).
        try:
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise TrainError(f"--resume: {ckpt['path']} does not fit this model ({str(e).splitlines()[0]})") from None
    return model, memory, estimate


def _setup_optimizer(cfg: TrainConfig, ctx: distributed.Context, model: Llama, make_optimizer) -> torch.optim.Optimizer:
    """The optimizer by name (``build_optimizer`` or ``make_optimizer``) with every optimizer
    option of ``cfg``; with --layerwise, each parameter steps inside backward."""
    layerwise = {}
    if cfg.layerwise:
        # Global-norm clipping is impossible when each parameter steps as soon as its gradient is
        # ready: --grad-clip then clips each parameter's gradient on its own.
        layerwise = dict(
            layerwise=True,
            accumulation_steps=cfg.grad_accum,
            per_param_grad_clip=cfg.grad_clip if cfg.grad_clip > 0 else None,
        )
    try:
        optimizer = (make_optimizer or build_optimizer)(
            cfg.optimizer,
            model,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
            **cfg.option_values(),
            **layerwise,
        )
    except (ValueError, TypeError) as e:
        raise TrainError(f"--optimizer {cfg.optimizer}: {e}") from None
    if cfg.layerwise and not getattr(optimizer, "_layerwise", False):
        raise TrainError("--layerwise needs a galorex optimizer built with layerwise=True")
    if cfg.layerwise and ctx.mode == "ddp":
        optimizer.set_layerwise_grad_reducer(ctx.average_gradient)  # DDP's all-reduce, one gradient at a time
    if cfg.layerwise and ctx.mode == "fsdp2":
        optimizer.register_fsdp2_hooks(model)  # each block's shards step once its reduce-scatter lands
    return optimizer


# ----------------------------------------------------------------------------- 2. resume
def _resume(run: Run) -> Position:
    """A fresh run: create --out and write config.json. A resumed one: check the checkpoint
    against the model and data, load the optimizer, schedule, data order and RNG states, and drop
    the log lines written after it. Then open the metrics' sinks; returns the position."""
    cfg, ctx, ckpt, out = run.cfg, run.ctx, run.ckpt, run.out
    position = Position(loss_sum=torch.zeros((), device=run.device))
    if ckpt is not None:
        where = f"--resume: {ckpt['path']}"
        if ckpt["model_config"] != run.model_cfg.to_dict():
            diff = sorted(k for k, v in run.model_cfg.to_dict().items() if ckpt["model_config"].get(k) != v)
            raise TrainError(f"{where} holds a model of another shape (differs in {', '.join(diff)})")
        if ckpt["data_fingerprint"] != _data_fingerprint(run.run_data.tokens):
            raise TrainError(f"{where} was trained on other data (or another tokenizer) than {run.run_data.source}")
        try:
            if cfg.distributed == "fsdp2":
                distributed.load_sharded(run.model, run.optimizer, ckpt["model"])
            else:
                run.optimizer.load_state_dict(ckpt["optimizer"])
            run.scheduler.load_state_dict(ckpt["scheduler"])
            run.batcher.load_state_dict(ckpt["data"])
            set_rng_state(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{where} does not fit this model/optimizer/data ({str(e).splitlines()[0]})") from None
        out.mkdir(parents=True, exist_ok=True)
        position.step, position.tokens_seen, position.wall_before = ckpt["step"], ckpt["tokens_seen"], ckpt["wall_s"]
        if ctx.is_main:
            _truncate_metrics(run.metrics_path, position.step)
        run.log(f"resumed from {ckpt['path']} at step {position.step}")
    elif ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out / "config.json", {"train": cfg.to_dict(), "model": run.model_cfg.to_dict()})
    try:
        run.run_metrics.open(out, cfg.to_dict(), ctx.is_main, position.step if ckpt is not None else None)
    except TrackingError as e:
        raise TrainError(str(e)) from None
    if ckpt is not None and "log_window" in ckpt:
        position.loss_sum.copy_(ckpt["log_window"]["loss_sum"])
        position.window_steps = ckpt["log_window"]["steps"]
    return position


def _save(run: Run, position: Position) -> Path | None:
    """A checkpoint of the run at ``position`` (FSDP2: every rank writes its shards)."""
    cfg, ctx = run.cfg, run.ctx
    extra = {
        "format": CHECKPOINT_FORMAT,
        "step": position.step,
        "tokens_seen": position.tokens_seen,
        "wall_s": position.wall_s(),
        "config": cfg.to_dict(),
        "model_config": run.model_cfg.to_dict(),
        "scheduler": run.scheduler.state_dict(),
        "data": run.batcher.state_dict(),
        "rng": rng_state(),
        "data_fingerprint": _data_fingerprint(run.run_data.tokens),
        "log_window": {"loss_sum": position.loss_sum.detach().cpu().clone(), "steps": position.window_steps},
    }
    if cfg.distributed == "fsdp2":
        return distributed.save_sharded(
            ctx, run.model, run.optimizer, extra, run.out / "checkpoints", position.step, cfg.keep_checkpoints
        )
    path = None
    if ctx.is_main:  # DDP: every rank holds the same model and optimizer state
        extra.update(model=run.model.state_dict(), optimizer=run.optimizer.state_dict())
        path = save_checkpoint(extra, run.out / "checkpoints", position.step, keep_last=cfg.keep_checkpoints)
    ctx.barrier()
    return path


# ----------------------------------------------------------------------------- 3. the loop
def _loop(run: Run, position: Position) -> float:
    """Train from ``position`` to --steps: accumulate, clip, step, log, evaluate, checkpoint; a
    last checkpoint at the end when the last step was not one. Returns the run's wall-clock
    seconds at its last step (earlier sessions included)."""
    cfg, ctx = run.cfg, run.ctx
    progress = None
    if cfg.progress and ctx.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=cfg.steps,
            initial=position.step,
            desc=f"{cfg.optimizer} {cfg.model}",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    position.t_start = time.perf_counter()
    position.window_t0, position.window_tokens = time.perf_counter(), 0
    run.model.train()
    with open(run.metrics_path if ctx.is_main else os.devnull, "a") as metrics:
        while position.step < cfg.steps:
            lr = _step(run, position)
            record = _log_and_evaluate(run, position, lr)
            if record is not None:
                run.run_metrics.extend(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if progress is not None:
                    post = {k: f"{v:.4g}" for k, v in record.items() if k != "step"}
                    progress.set_postfix(post, refresh=False)
            if progress is not None:
                progress.update(1)
            if cfg.save_every and position.step % cfg.save_every == 0:
                _save(run, position)
    if progress is not None:
        progress.close()
    wall_s = position.wall_s()
    run.memory["after_last_step"] = _memory_now(run.device)
    if cfg.save_every and (position.step % cfg.save_every != 0):
        _save(run, position)
    return wall_s


def _step(run: Run, position: Position) -> float:
    """One optimizer step over --grad-accum micro-batches; returns the lr it used."""
    cfg, device, optimizer = run.cfg, run.device, run.optimizer
    for _ in range(cfg.grad_accum):
        x, y = (run.ctx.local_rows(t) for t in run.batcher.next_batch())
        _, loss = run.runner(x.to(device), y.to(device))
        try:
            (loss / cfg.grad_accum).backward()  # with --layerwise, this steps the optimizer
        except FloatingPointError as e:
            raise TrainError(f"step {position.step + 1}: {e}; lower --lr or raise --grad-clip") from None
        position.loss_sum += loss.detach() / cfg.grad_accum
    clipped = None
    if cfg.grad_clip > 0 and not cfg.layerwise:
        clipped = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.run_metrics.grad_norm(run.model, position.step + 1, clipped)
    lr = optimizer.param_groups[0]["lr"]
    try:
        optimizer.step()
    except FloatingPointError as e:
        raise TrainError(f"step {position.step + 1}: {e}; lower --lr or raise --grad-clip") from None
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    position.step += 1
    position.tokens_seen += tokens
    position.window_steps += 1
    if "after_first_step" not in run.memory:
        run.memory["after_first_step"] = _memory_now(device)
        run.memory["first_step_s"] = time.perf_counter() - position.t_start
    return lr


def _log_and_evaluate(run: Run, position: Position, lr: float) -> dict[str, Any] | None:
    """The metrics line of this step, if it has one: the mean training loss and throughput since
    the last line (every --log-every steps), the validation loss (every --eval-every steps)."""
    cfg, step = run.cfg, position.step
    position.window_tokens += cfg.batch_size * cfg.seq_len * cfg.grad_accum
    record = None
    if step % cfg.log_every == 0 or step == cfg.steps:
        elapsed = time.perf_counter() - position.window_t0
        mean_loss = run.ctx.mean_over_ranks(position.loss_sum)
        record = {
            "step": step,
            "train_loss": float(mean_loss) / position.window_steps,
            "lr": lr,
            "tokens_per_s": position.window_tokens / max(elapsed, 1e-9),
        }
        position.loss_sum.zero_()
        position.window_steps = 0
        position.window_t0, position.window_tokens = time.perf_counter(), 0
    if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
        position.val_loss = evaluate(run.model, run.run_data.val, cfg, run.device)
        record = record or {"step": step}
        record["val_loss"] = position.val_loss
        position.window_t0 = time.perf_counter()  # evaluation time is not training throughput
    return record


# ----------------------------------------------------------------------------- 4. the report
def _report(run: Run, position: Position, wall_s: float) -> dict[str, Any]:
    """The summary: final validation loss, a sample, throughput, memory; rank 0 writes the
    weights, summary.json and loss.png.

    Args:
        run: the run as :func:`_setup` built it.
        position: where the loop ended.
        wall_s: the run's wall-clock seconds at its last step.
    """
    cfg, ctx, device, model, out = run.cfg, run.ctx, run.device, run.model, run.out
    val_tokens = run.run_data.val
    val_loss = position.val_loss
    if val_loss is None:
        val_loss = evaluate(model, val_tokens, cfg, device)
    sample = ""
    if cfg.sample_tokens and (ctx.is_main or cfg.distributed == "fsdp2"):  # FSDP2: every rank runs the forward
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        prompt = torch.as_tensor(val_tokens[: min(16, cfg.seq_len)].astype("int64"), device=device)[None]
        ids = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=40, generator=g)
        sample = run.run_data.tokenizer.decode(ids[0].tolist())
    summary = {
        "final_val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 50.0)),
        "unigram_entropy": unigram_entropy(run.run_data.train),
        "steps": position.step,
        "tokens": position.tokens_seen,
        "wall_s": wall_s,
        "tokens_per_s": position.tokens_seen / max(wall_s, 1e-9),
        "optimizer": cfg.optimizer,
        "optimizer_state_bytes": (
            local_state_bytes(run.optimizer) if cfg.distributed == "fsdp2" else optimizer_state_bytes(run.optimizer)
        ),
        "peak_memory_bytes": _peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss",
        "allocator": allocator.configured(),  # glibc's thresholds: set by galorex-train, or not
        # The same figures at three points of the run, and the analytic breakdown checked before
        # building the model (galorex.memory.training_memory_breakdown).
        "memory": run.memory,
        "memory_estimate": run.estimate,
        "parameters": model.num_parameters(),
        "model": cfg.model,
        "vocab_size": run.model_cfg.vocab_size,
        "device": str(device),
        "dtype": cfg.dtype,
        "sample": sample,
        "distributed": cfg.distributed,
        "world_size": ctx.world_size,
    }
    summary.update(run.run_metrics.summary(summary["tokens_per_s"]), val_data=str(run.run_data.val_source))
    if ctx.active:  # each rank's own figures (rank 0's are the ones above)
        mine = {k: summary[k] for k in ("optimizer_state_bytes", "peak_memory_bytes")}
        summary["per_rank"] = ctx.gather_objects({**mine, "memory": run.memory})
    run.run_metrics.close()
    weights = distributed.full_state_dict(ctx, model)  # a collective under FSDP2
    if not ctx.is_main:
        summary.update(out=str(out), rank=ctx.rank)  # rank 0 writes the outputs and reports
        return summary
    model_file = _save_weights(weights, out) if cfg.save_model else None
    summary["model_file"] = str(model_file) if model_file else None
    _write_json_atomic(out / "summary.json", summary)
    plotted = _plot(run.metrics_path, out / "loss.png")
    summary["out"] = str(out)
    summary["loss_png"] = str(out / "loss.png") if plotted else None
    return summary
