"""What ``galorex-train`` reports while it runs: gradient norm, throughput, MFU, memory, and
the trackers (``--report-to tensorboard|wandb|none``) that receive it.

Every line of ``metrics.jsonl`` goes to the tracker as scalars under the same names (``train/``
and ``val/`` prefixes for the losses), at the step it belongs to; this module adds to those
lines ``grad_norm``, ``mfu``, ``memory_bytes`` and ``peak_memory_bytes`` (and ``val_perplexity``
next to ``val_loss``).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TrackingError",
    "GradNorm",
    "flops_per_token",
    "peak_flops",
    "memory_bytes",
    "Tracker",
    "open_tracker",
    "compile_model",
]

REPORT_TO = ("none", "tensorboard", "wandb")


class TrackingError(ValueError):
    """A tracker that was asked for cannot be served (missing package, bad choice)."""


# ----------------------------------------------------------------------------- gradient norm
class GradNorm:
    """The global L2 norm of the gradient an optimizer step uses, before clipping.

    Normal mode: ``torch.nn.utils.get_total_norm`` of the ``.grad`` tensors, computed only on
    the steps that are logged. ``--layerwise``: gradients are stepped and freed inside
    backward, so a post-accumulate-grad hook on each parameter, registered before the
    optimizer's (hooks run in registration order), records ``||g||^2`` of the gradient the
    optimizer is about to use; with accumulation every backward overwrites the record, so the
    last one, the accumulated gradient, is what is summed. Under DDP with ``--layerwise`` the
    hook sees the rank's own gradient before the all-reduce, so the norm is rank 0's.
    """

    def __init__(self, model: torch.nn.Module, layerwise: bool) -> None:
        self.layerwise = layerwise
        self._squares: dict[int, torch.Tensor] = {}
        self._handles = []
        if layerwise:
            for p in model.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._record))

    def _record(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            with torch.no_grad():
                dtype = torch.promote_types(p.grad.dtype, torch.float32)  # bf16 sums in float32
                self._squares[id(p)] = torch.linalg.vector_norm(p.grad.detach(), dtype=dtype).square()

    def take(self, model: torch.nn.Module, needed: bool) -> float | None:
        """The norm of the step just taken's gradient (call between backward and ``step()``);
        None when not ``needed`` (not a logged step) in the normal mode."""
        if self.layerwise:
            squares, self._squares = self._squares, {}
            if not needed or not squares:
                return None
            return math.sqrt(sum(float(s) for s in squares.values()))
        if not needed:
            return None
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return None
        return _to_float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _to_float(x: Any) -> float:
    if hasattr(x, "full_tensor"):  # a DTensor (FSDP2)
        x = x.full_tensor()
    return float(x)


# ----------------------------------------------------------------------------- FLOPs and peak
def flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token of a Llama: ``6 N + 12 L d T`` (PaLM, appendix B).

    ``N`` counts the weights that multiply (every linear layer and the head; not the embedding
    lookup, nor norms); ``12 L d T`` is the attention's ``QK^T`` and ``AV`` (forward and backward,
    causal masking not discounted, as PaLM counts it).
    """
    d, L, f, v = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.vocab_size
    heads = cfg.num_heads
    kv = getattr(cfg, "num_kv_heads", None) or heads
    head_dim = d // heads
    attn = d * d + 2 * d * kv * head_dim + d * d  # q, k, v, o
    mlp = 3 * d * f  # gate, up, down
    n = L * (attn + mlp) + d * v  # + the head
    return 6.0 * n + 12.0 * L * d * seq_len


# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), matched on the device name.
_CUDA_BF16_PEAK = (
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; PCIe is 756e12
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` ``n x n`` matmuls in ``dtype`` on ``device``: what this
    device reaches on the operation a transformer spends its time in."""
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """``(FLOP/s, where it comes from)``: a CUDA GPU's data-sheet bf16 peak when known and the run
    is bf16; otherwise a measured matmul peak (on a CPU the only honest reference, and a noisy one
    when other processes share the cores)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, flops in _CUDA_BF16_PEAK:
            if key in name:
                return flops, f"data sheet: {name} dense bf16"
    return measured_matmul_flops(device, dtype), f"measured {str(dtype).removeprefix('torch.')} matmul on {device.type}"


def memory_bytes(device: torch.device) -> tuple[int, int]:
    """``(now, peak)``: CUDA: the caching allocator's allocated bytes now and at most since the
    start (its statistics are never reset here); CPU: the resident set now and at most."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device)), int(torch.cuda.max_memory_allocated(device))
    now = peak = 0
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        import resource

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (OSError, ValueError, IndexError, ImportError):
        pass
    return now, max(now, peak)


# ----------------------------------------------------------------------------- trackers
class Tracker:
    """Writes each metrics record as scalars; ``kind`` is ``none`` (nothing), ``tensorboard`` or
    ``wandb``."""

    def __init__(self, kind: str, writer: Any = None, run: Any = None) -> None:
        self.kind, self._writer, self._run = kind, writer, run

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        scalars = {_scalar_name(k): float(v) for k, v in record.items() if k != "step" and _is_number(v)}
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        if self._run is not None:
            self._run.log(scalars, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._run is not None:
            self._run.finish()
            self._run = None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scalar_name(key: str) -> str:
    if key.startswith("train_"):
        return "train/" + key[len("train_") :]
    if key.startswith("val_"):
        return "val/" + key[len("val_") :]
    return "perf/" + key if key in ("tokens_per_s", "mfu", "memory_bytes", "peak_memory_bytes") else "train/" + key


def open_tracker(kind: str, out: Path, config: dict[str, Any], resume_step: int | None = None) -> Tracker:
    """The tracker ``--report-to kind`` asks for, logging under ``out`` (``out/tensorboard``,
    ``out/wandb``). W&B runs offline when ``WANDB_MODE`` is unset and no API key is configured.

    Raises :class:`TrackingError` when the package is missing: an explicit choice is never
    silently dropped.
    """
    if kind not in REPORT_TO:
        raise TrackingError(f"--report-to {kind!r}: expected one of {', '.join(REPORT_TO)}")
    if kind == "none":
        return Tracker("none")
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackingError(
                "--report-to tensorboard needs the `tensorboard` package (pip install tensorboard, "
                "or pip install galorex[train])"
            ) from None
        # purge_step: a resumed run's events after its checkpoint (a killed run's tail) are hidden.
        writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=resume_step)
        return Tracker("tensorboard", writer=writer)
    try:
        import wandb
    except ImportError:
        raise TrackingError(
            "--report-to wandb needs the `wandb` package (pip install wandb, or galorex[wandb])"
        ) from None
    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    (out / "wandb").mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "galorex"),
        dir=str(out),
        config=config,
        mode=mode,
        name=out.name,
        resume="allow",
        id=os.environ.get("WANDB_RUN_ID") or out.name,
    )
    return Tracker("wandb", run=run)


# ----------------------------------------------------------------------------- compile
def compile_model(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` for ``--compile`` (the same parameters, a compiled forward and
    backward); the model itself otherwise. Raises :class:`TrackingError` when torch cannot."""
    if not enabled:
        return model
    if not hasattr(torch, "compile"):
        raise TrackingError("--compile needs torch.compile (torch >= 2.0)")
    return torch.compile(model)


def check_report_to(kind: str) -> None:
    """Raise :class:`TrackingError` now (before a run writes anything) when ``--report-to kind``
    cannot be served."""
    if kind not in REPORT_TO:
        raise TrackingError(f"--report-to {kind!r}: expected one of {', '.join(REPORT_TO)}")
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if package is None:
        return
    import importlib.util

    if importlib.util.find_spec(package) is None:
        extra = {
            "tensorboard": "pip install tensorboard, or galorex[train]",
            "wandb": "pip install wandb, or galorex[wandb]",
        }[kind]
        raise TrackingError(f"--report-to {kind} needs the `{package}` package ({extra})")


class RunMetrics:
    """The trainer's side of tracking: gradient norms, MFU, memory and the tracker, in one place.

    ``grad_norm(...)`` between backward and the step; ``extend(record)`` adds ``grad_norm``,
    ``mfu``, ``memory_bytes``, ``peak_memory_bytes`` (and ``val_perplexity`` next to
    ``val_loss``) to a metrics record and sends it to the tracker.
    """

    def __init__(self, cfg: Any, model: torch.nn.Module, model_cfg: Any, device: torch.device, world_size: int):
        self.cfg, self.device, self.world_size = cfg, device, world_size
        self.norms = GradNorm(model, cfg.layerwise)
        self.flops_per_token = flops_per_token(model_cfg, cfg.seq_len)
        self._peak: tuple[float, str] | None = None
        self.tracker = Tracker("none")
        self.last_grad_norm: float | None = None

    def open(self, out: Path, config: dict[str, Any], is_main: bool, resume_step: int | None) -> None:
        self.peak()  # measured (on a CPU) now, not inside a throughput window
        if is_main:
            self.tracker = open_tracker(self.cfg.report_to, out, config, resume_step)

    def peak(self) -> tuple[float, str]:
        if self._peak is None:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[self.cfg.dtype]
            flops, source = peak_flops(self.device, dtype)
            self._peak = (flops * self.world_size, source)
        return self._peak

    def grad_norm(self, model: torch.nn.Module, step: int, clipped_norm: Any = None) -> None:
        """Record the norm of the gradient of ``step`` (1-based); ``clipped_norm``: what
        ``clip_grad_norm_`` returned, when it ran."""
        logged = step % self.cfg.log_every == 0 or step == self.cfg.steps
        if clipped_norm is not None:
            self.norms.take(model, False)
            self.last_grad_norm = _to_float(clipped_norm) if logged else None
        else:
            self.last_grad_norm = self.norms.take(model, logged)

    def extend(self, record: dict[str, Any]) -> dict[str, Any]:
        if "train_loss" in record:
            if self.last_grad_norm is not None:
                record["grad_norm"] = self.last_grad_norm
            peak, _ = self.peak()
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / peak
            record["memory_bytes"], record["peak_memory_bytes"] = memory_bytes(self.device)
        if "val_loss" in record:
            record["val_perplexity"] = math.exp(min(record["val_loss"], 50.0))
        self.tracker.log(record)
        return record

    def summary(self, tokens_per_s: float) -> dict[str, Any]:
        peak, source = self.peak()
        return {
            "flops_per_token": self.flops_per_token,
            "peak_flops": peak,
            "peak_flops_source": source,
            "mfu": tokens_per_s * self.flops_per_token / peak,
        }

    def close(self) -> None:
        self.norms.remove()
        self.tracker.close()
