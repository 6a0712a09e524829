"""Memory of a ``galorex-train`` run: the process's peak so far, what the machine has available,
and the preflight check of the analytic estimate (``galorex.memory.training_memory_breakdown``)
before the model is built."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ..memory import GiB, training_memory_breakdown
from ..models.llama import LlamaConfig
from ..optim.factory import available as available_optimizers
from .config import TrainConfig, TrainError


def _peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Linux: VmHWM, this process's own peak. getrusage's ru_maxrss is not: a child started by
    # vfork + exec (Python's subprocess) inherits its parent's peak as its starting value.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:  # pragma: no cover - non-POSIX
        return 0


def _memory_now(device: torch.device) -> dict[str, int]:
    """The process's peak so far: CPU max RSS, and on CUDA the allocator's peak allocated and
    reserved bytes."""
    figures = {"cpu_max_rss": _peak_memory_bytes(torch.device("cpu"))}
    if device.type == "cuda":
        figures["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated(device))
        figures["cuda_max_reserved"] = int(torch.cuda.max_memory_reserved(device))
    return figures


def _available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes a run on ``device`` can still use, and where the figure comes from.

    ``GALOREX_AVAILABLE_MEMORY`` (bytes, or a number followed by GiB/MiB) overrides the
    measurement (for tests, or to keep headroom). CUDA: the device's free memory
    (``torch.cuda.mem_get_info``). CPU: MemAvailable of /proc/meminfo plus what this process
    already holds (its current RSS), since the estimate counts the whole process."""
    forced = os.environ.get("GALOREX_AVAILABLE_MEMORY")
    if forced:
        text = forced.strip()
        units = {"GiB": GiB, "MiB": 2**20, "KiB": 2**10}
        try:
            for unit, factor in units.items():
                if text.endswith(unit):
                    return int(float(text[: -len(unit)]) * factor), "GALOREX_AVAILABLE_MEMORY"
            return int(text), "GALOREX_AVAILABLE_MEMORY"
        except ValueError:
            raise TrainError(
                f"GALOREX_AVAILABLE_MEMORY={forced!r}: expected bytes, or a number followed by GiB or MiB"
            ) from None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()}
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return info["MemAvailable"] + rss, "the machine's available memory (MemAvailable + this process)"
    except (OSError, KeyError, ValueError, IndexError):
        return -1, "unknown"


def _estimate(cfg: TrainConfig, model_cfg: LlamaConfig, dtype: torch.dtype, **change: Any) -> dict[str, int]:
    c = dataclasses.replace(cfg, **change)
    return training_memory_breakdown(
        model_cfg,
        dtype=dtype,
        optimizer=c.optimizer,
        rank=c.rank,
        proj_type=c.proj_type,
        optim_bits=c.optim_bits,
        basis_bits=c.basis_bits,
        natural_history=c.natural_history,
        layerwise=c.layerwise,
        activation_checkpointing=c.activation_checkpointing,
        batch_size=c.batch_size,
        seq_len=c.seq_len,
        beta1=c.beta1,
        weight_bits=c.weight_bits,
        weight_group_size=c.weight_group_size,
        weight_rounding=c.weight_rounding,
    )


def _preflight(
    cfg: TrainConfig, model_cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, log
) -> dict[str, int] | None:
    """Before building the model: its analytic peak (``training_memory_breakdown``) against the
    memory available; when it cannot fit, a TrainError naming the estimate, what is available and
    the flags that would bring it down (with their estimates), unless ``--force``. Applies to one
    process (``--distributed none``) and to the optimizers whose state the estimate models."""
    if cfg.distributed != "none" or cfg.optimizer not in available_optimizers():
        return None
    estimate = _estimate(cfg, model_cfg, dtype)
    available, source = _available_memory(device)
    need = estimate["total"] - (estimate["runtime"] if device.type == "cuda" else 0)
    if available < 0 or need <= available:
        return estimate
    g = lambda b: f"{b / GiB:.1f} GiB"
    parts = ", ".join(f"{k.replace('_', ' ')} {g(v)}" for k, v in estimate.items() if k != "total")
    options = []
    if not cfg.layerwise:
        options.append(("--layerwise", {"layerwise": True}))
    if cfg.optim_bits == 32:
        options.append(("--optim-bits 8", {"optim_bits": 8}))
    if not cfg.activation_checkpointing:
        options.append(("--activation-checkpointing", {"activation_checkpointing": True}))
    if cfg.basis_bits == 32 and cfg.optimizer != "adamw":
        options.append(("--basis-bits 4", {"basis_bits": 4}))
    if cfg.weight_bits is None and cfg.halo is None:
        options.append(("--weight-bits 8", {"weight_bits": 8}))
    if cfg.batch_size > 1:
        half = cfg.batch_size // 2
        options.append((f"--batch-size {half} --grad-accum {2 * cfg.grad_accum}", {"batch_size": half}))
    if cfg.dtype == "fp32":
        options.append(("--dtype bf16", {}))
    hints = []
    combined: dict[str, Any] = {}
    for flag, change in options:
        if flag == "--dtype bf16":
            after = _estimate(cfg, model_cfg, torch.bfloat16)["total"]
        else:
            after = _estimate(cfg, model_cfg, dtype, **change)["total"]
            combined.update(change)
        if after < estimate["total"]:
            hints.append(f"{flag} ({g(after)})")
    advice = (
        "; ".join(hints)
        if hints
        else "none of --layerwise, --optim-bits 8, --activation-checkpointing, --weight-bits 8 applies"
    )
    if combined:
        advice += f"; all of these together: {g(_estimate(cfg, model_cfg, dtype, **combined)['total'])}"
    message = (
        f"--model {cfg.model} with --optimizer {cfg.optimizer} needs about {g(need)} at its peak "
        f"({parts}), more than the {g(available)} available ({source}). Estimated peak with each "
        f"change: {advice}. Pass --force to try anyway."
    )
    if not cfg.force:
        raise TrainError(message)
    log(f"warning: {message} (--force: trying anyway)")
    return estimate
