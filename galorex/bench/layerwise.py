"""``python -m galorex.bench layerwise-memory``: peak memory of training steps with and without
layer-wise updates (``layerwise=True``), each measured in a fresh process.

A process's peak is all a measurement can see on the CPU (``resource.getrusage``'s ``ru_maxrss``
never goes down), so each mode runs alone in its own interpreter: build the model and the
optimizer, take ``--steps`` training steps (the first one creates the optimizer state and
computes every basis), report the peak. On CUDA the peak is ``torch.cuda.max_memory_allocated``.
The saving is compared with the bytes of the model's gradients, which layer-wise mode never holds
all at once (the GaLore paper, §4.2): it can save at most that, less the largest gradient held at a
time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

MODES = ("normal", "layerwise")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def measure(
    mode: str,
    model_name: str,
    optimizer: str,
    rank: int,
    batch_size: int,
    seq_len: int,
    steps: int,
    device: str,
    seed: int = 0,
) -> dict[str, Any]:
    """One mode's figures, in this process (call it in a fresh one: the CPU peak only grows)."""
    from ..models.llama import Llama, get_config
    from ..optim.factory import build_optimizer

    dev = torch.device(device)
    torch.manual_seed(seed)
    cfg = get_config(model_name)
    model = Llama(cfg).to(dev)
    opt = build_optimizer(optimizer, model, lr=1e-3, rank=rank, update_proj_gap=200, layerwise=(mode == "layerwise"))
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    largest_grad = max(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    tokens = torch.randint(
        0, cfg.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed)
    ).to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    before = _peak_bytes(dev) if dev.type != "cuda" else int(torch.cuda.memory_allocated(dev))
    for _ in range(steps):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {
        "mode": mode,
        "model": model_name,
        "optimizer": optimizer,
        "rank": rank,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "device": str(dev),
        "peak_bytes": _peak_bytes(dev),
        "before_steps_bytes": before,
        "peak_kind": "cuda_max_allocated" if dev.type == "cuda" else "cpu_max_rss",
        "gradient_bytes": grad_bytes,
        "largest_gradient_bytes": largest_grad,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_fresh(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """``measure`` in a new interpreter, so that one mode's peak cannot hide the other's."""
    cmd = [
        sys.executable,
        "-m",
        "galorex.bench.layerwise",
        "--mode",
        mode,
        "--model",
        args.model,
        "--optimizer",
        args.optimizer,
        "--rank",
        str(args.rank),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
        "--device",
        str(args.device),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"layerwise-memory: the {mode} measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_layerwise_memory(args: argparse.Namespace) -> dict[str, Any]:
    from .common import _env, _write

    rows = {mode: run_fresh(mode, args) for mode in MODES}
    normal, lw = rows["normal"], rows["layerwise"]
    saving = normal["peak_bytes"] - lw["peak_bytes"]
    mib = 2**20
    kind = normal["peak_kind"]
    lines = [
        f"Peak memory ({kind}) of {args.steps} training steps of {args.model} with {args.optimizer} "
        f"(rank {args.rank}), batch {args.batch_size}×{args.seq_len}, on {normal['device']}; "
        "one fresh process per row.",
        "",
        "| mode | peak MiB | before the steps MiB |",
        "| --- | ---: | ---: |",
    ]
    for mode in MODES:
        r = rows[mode]
        lines.append(f"| {mode} | {r['peak_bytes'] / mib:.1f} | {r['before_steps_bytes'] / mib:.1f} |")
    lines += [
        "",
        f"saving: {saving / mib:.1f} MiB; the model's gradients: {normal['gradient_bytes'] / mib:.1f} MiB "
        f"(largest single gradient {normal['largest_gradient_bytes'] / mib:.1f} MiB); "
        f"saving / gradients = {saving / normal['gradient_bytes']:.2f}",
    ]
    data = {
        "rows": rows,
        "saving_bytes": saving,
        "saving_over_gradient_bytes": saving / normal["gradient_bytes"],
        "env": _env(),
    }
    _write(Path(args.out), "layerwise_memory", "\n".join(lines), data)
    return data


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-60m")
    p.add_argument("--optimizer", default="galore", help="adamw | galore | natural-galore | gradnorm-lorp")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)


def main(argv: list[str] | None = None) -> int:
    """The child side of run_fresh: one measurement, printed as one JSON line."""
    p = argparse.ArgumentParser(prog="python -m galorex.bench.layerwise")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_arguments(p)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.mode, a.model, a.optimizer, a.rank, a.batch_size, a.seq_len, a.steps, a.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
