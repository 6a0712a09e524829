"""``python -m galorex.bench peak-memory``: the peak memory of a ``galorex-train`` configuration,
measured in a fresh process, beside its analytic breakdown.

    python -m galorex.bench peak-memory [--steps 2] -- <galorex-train flags>
    python -m galorex.bench peak-memory --figure [--models llama-1b llama-7b] [--measure llama-1b]
        [--measured llama-7b:+4-bit-basis=runs/7b/summary.json]

One configuration: ``galorex-train`` runs in a new interpreter (a process's CPU peak, max RSS,
only grows, so each measurement needs its own) for ``--steps`` steps with nothing else to do
(no evaluation but one batch, no sample, no checkpoint, no saved model), and its ``summary.json``
figures are reported: CPU max RSS, and on CUDA ``max_memory_allocated`` / ``max_memory_reserved``,
after construction, after the first step (which computes every basis) and after the last; the
first step's wall time and the mean of the others; and
:func:`galorex.memory.training_memory_breakdown` (weights, gradients, optimizer state,
activations, step workspace, runtime), which ``galorex-train`` also checks before building a model.

``--figure``: the GaLore paper's memory figure for each of ``--models``: bf16 weights with AdamW,
GaLore (32-bit state), 8-bit GaLore, + layer-wise updates, + activation checkpointing, + 4-bit
bases, at batch 1 × 256 tokens. Every configuration gets its analytic bars; the models named in
``--measure`` are also run (each configuration in its own process, skipped with a note when its
estimate exceeds the memory available); ``--measured MODEL:LABEL=summary.json`` adds the peak of a
run made separately (e.g. the 7B recipe run once with ``galorex-train``). Writes
``peak_memory_figure.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

GIB = 1024**3

# The paper's memory figure, as cumulative changes of the galorex-train flags.
BASE = ["--dtype", "bf16", "--batch-size", "1", "--seq-len", "256", "--vocab-size", "32000"]
GALORE = ["--optimizer", "galore", "--update-proj-gap", "200", "--scale", "0.25", "--refresh-method", "randomized"]
RECIPE_8BIT = ["--optim-bits", "8", "--layerwise", "--activation-checkpointing"]
FIGURE_CONFIGS: list[tuple[str, list[str]]] = [
    ("AdamW", ["--optimizer", "adamw"]),
    ("GaLore", GALORE),
    ("8-bit GaLore", GALORE + ["--optim-bits", "8"]),
    ("+ layer-wise", GALORE + ["--optim-bits", "8", "--layerwise"]),
    ("+ act. ckpt", GALORE + ["--optim-bits", "8", "--layerwise", "--activation-checkpointing"]),
    ("+ 4-bit basis", GALORE + ["--optim-bits", "8", "--layerwise", "--activation-checkpointing", "--basis-bits", "4"]),
    (
        "+ INT8 weights",
        GALORE
        + ["--optim-bits", "8", "--layerwise", "--activation-checkpointing", "--basis-bits", "4", "--weight-bits", "8"],
    ),
    (
        "APOLLO-Mini, 8-bit, INT8 weights",
        [
            "--optimizer",
            "apollo-mini",
            "--optim-bits",
            "8",
            "--layerwise",
            "--activation-checkpointing",
            "--weight-bits",
            "8",
        ],
    ),
]
FIGURE_RANK = {"llama-1b": 1024, "llama-7b": 1024}
PARTS = ("weights", "weight_scales", "gradients", "optimizer_state", "activations", "step_workspace", "runtime")
# Flags the measurement sets itself: the run does nothing but build and step.
QUIET = [
    "--eval-every",
    "0",
    "--eval-batches",
    "1",
    "--sample-tokens",
    "0",
    "--save-every",
    "0",
    "--no-save-model",
    "--no-progress",
    "--warmup",
    "0",
]


def estimate(train_args: list[str]) -> dict[str, int]:
    """The analytic breakdown ``galorex-train`` computes for these flags (nothing is built)."""
    import torch

    from ..models.llama import get_config
    from ..train.cli import build_parser
    from ..train.trainer import TrainConfig, _dtype, _estimate

    cfg = TrainConfig(**vars(build_parser().parse_args(train_args)))
    model_cfg = get_config(cfg.model, vocab_size=cfg.vocab_size)
    return _estimate(cfg, model_cfg, _dtype(cfg.dtype) if cfg.dtype else torch.float32)


def run_fresh(train_args: list[str], steps: int, timeout: float | None = None) -> dict[str, Any]:
    """``galorex-train`` with ``train_args`` for ``steps`` steps in a new interpreter; its summary."""
    with tempfile.TemporaryDirectory(prefix="galorex-peak-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "galorex.train", *train_args, *QUIET, "--steps", str(steps), "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"peak-memory: {' '.join(cmd[3:])} failed:\n{done.stderr[-3000:]}")
        return json.loads((out / "summary.json").read_text())


def row_from_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run: peaks (bytes) at three points, timings, and the estimate."""
    mem = summary["memory"]
    steps = summary["steps"]
    first = mem.get("first_step_s")
    later = (summary["wall_s"] - first) / (steps - 1) if first is not None and steps > 1 else None
    return {
        "peaks": {k: v for k, v in mem.items() if isinstance(v, dict)},
        "peak_bytes": summary["peak_memory_bytes"],
        "peak_kind": summary["peak_memory_kind"],
        "first_step_s": first,
        "later_step_s": later,
        "estimate": summary.get("memory_estimate"),
        "device": summary["device"],
        "parameters": summary["parameters"],
    }


def _gib(b: int | None) -> str:
    return "–" if b is None else f"{b / GIB:.2f}"


def _single(args: argparse.Namespace) -> dict[str, Any]:
    from .common import _env, _write

    train_args = [a for a in args.train_args if a != "--"]
    row = row_from_summary(run_fresh(train_args, args.steps))
    est = row["estimate"] or estimate(train_args)
    lines = [
        f"Peak memory of `galorex-train {' '.join(train_args)}` ({args.steps} steps, {row['device']}, "
        "fresh process); GiB.",
        "",
        "| point | CPU max RSS | CUDA max allocated | CUDA max reserved |",
        "| --- | ---: | ---: | ---: |",
    ]
    for point, figures in row["peaks"].items():
        lines.append(
            f"| {point.replace('_', ' ')} | {_gib(figures['cpu_max_rss'])} | "
            f"{_gib(figures.get('cuda_max_allocated'))} | {_gib(figures.get('cuda_max_reserved'))} |"
        )
    lines += ["", "| analytic | GiB |", "| --- | ---: |"]
    lines += [f"| {k.replace('_', ' ')} | {_gib(v)} |" for k, v in est.items()]
    gpu = est["total"] - est["runtime"]
    lines += [
        "",
        f"On a GPU this configuration needs about {_gib(gpu)} GiB of device memory: the analytic total without "
        "the CPU runtime allowance (what galorex-train's preflight checks against a GPU's free memory).",
    ]
    timing = f"first step (with the refresh) {row['first_step_s']:.2f} s"
    if row["later_step_s"] is not None:
        timing += f", later steps {row['later_step_s']:.2f} s each"
    lines += ["", timing]
    data = {"train_args": train_args, "steps": args.steps, **row, "estimate": est, "env": _env()}
    _write(Path(args.out), "peak_memory", "\n".join(lines), data)
    return data


def _available_bytes() -> int:
    import torch

    from ..train.trainer import _available_memory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _available_memory(device)[0]


def _figure(args: argparse.Namespace) -> dict[str, Any]:
    from .common import _env, _write

    given: dict[tuple[str, str], dict[str, Any]] = {}
    for item in args.measured:
        try:
            key, path = item.split("=", 1)
            model, label = key.split(":", 1)
        except ValueError:
            raise SystemExit(f"--measured {item!r}: expected MODEL:LABEL=summary.json") from None
        given[(model, label)] = row_from_summary(json.loads(Path(path).read_text()))
    results: dict[str, list[dict[str, Any]]] = {}
    for model in args.models:
        rank = FIGURE_RANK.get(model, args.rank)
        rows = []
        for label, flags in FIGURE_CONFIGS:
            train_args = ["--model", model, *BASE, *flags]
            if "galore" in flags:
                train_args += ["--rank", str(rank)]
            row: dict[str, Any] = {"label": label, "train_args": train_args, "estimate": estimate(train_args)}
            if (model, label) in given:
                row.update({k: v for k, v in given[(model, label)].items() if k != "estimate"}, source="separate run")
            elif model in args.measure:
                if row["estimate"]["total"] > _available_bytes():
                    row["note"] = "estimate exceeds the available memory: not run"
                else:
                    measured = row_from_summary(run_fresh(train_args, args.steps))
                    row.update({k: v for k, v in measured.items() if k != "estimate"}, source="measured")
            rows.append(row)
            measured = _gib(row.get("peak_bytes"))
            print(f"{model} {label}: estimate {_gib(row['estimate']['total'])} GiB, measured {measured}")
        results[model] = rows
    lines = [
        f"Peak memory per configuration (bf16 weights, batch 1 × 256 tokens, vocab 32000, rank "
        f"{', '.join(f'{m}: {FIGURE_RANK.get(m, args.rank)}' for m in args.models)}); GiB. Analytic parts "
        "from galorex.memory.training_memory_breakdown; measured: max RSS of a fresh galorex-train "
        f"process over {args.steps} steps.",
        "",
        "| model | configuration | weights | gradients | optimizer state | activations | workspace + runtime "
        "| analytic total | measured peak | first step s | later step s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, rows in results.items():
        for r in rows:
            e = r["estimate"]
            weights = e["weights"] + e.get("weight_scales", 0)
            first = "–" if r.get("first_step_s") is None else f"{r['first_step_s']:.1f}"
            later = "–" if r.get("later_step_s") is None else f"{r['later_step_s']:.1f}"
            lines.append(
                f"| {model} | {r['label']} | {_gib(weights)} | {_gib(e['gradients'])} | "
                f"{_gib(e['optimizer_state'])} | {_gib(e['activations'])} | "
                f"{_gib(e['step_workspace'] + e['runtime'])} | {_gib(e['total'])} | {_gib(r.get('peak_bytes'))} "
                f"| {first} | {later} |"
            )
    data = {"models": results, "steps": args.steps, "env": _env()}
    out = Path(args.out)
    _write(out, "peak_memory_figure", "\n".join(lines), data)
    _plot(results, out / "peak_memory_figure.png")
    return data


def _plot(results: dict[str, list[dict[str, Any]]], png: Path) -> bool:
    """Stacked bars of the analytic parts per configuration, one panel per model; a black tick
    marks each measured peak; a dashed line at 24 GiB."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colours = {
        "weights": "#4c72b0",
        "gradients": "#dd8452",
        "optimizer_state": "#55a868",
        "activations": "#c44e52",
        "other": "#bbbbbb",
    }
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, (model, rows) in zip(axes[0], results.items()):
        labels = [r["label"] for r in rows]
        bottom = [0.0] * len(rows)
        for part in ("weights", "gradients", "optimizer_state", "activations", "other"):
            if part == "weights":
                values = [(r["estimate"]["weights"] + r["estimate"].get("weight_scales", 0)) / GIB for r in rows]
                name = "weights"
            elif part == "other":
                values = [(r["estimate"]["step_workspace"] + r["estimate"]["runtime"]) / GIB for r in rows]
                name = "workspace + runtime"
            else:
                values = [r["estimate"][part] / GIB for r in rows]
                name = part.replace("_", " ")
            ax.bar(labels, values, bottom=bottom, color=colours[part], label=name, width=0.65)
            bottom = [b + v for b, v in zip(bottom, values)]
        for i, r in enumerate(rows):
            if r.get("peak_bytes") is not None:
                y = r["peak_bytes"] / GIB
                ax.plot([i - 0.38, i + 0.38], [y, y], color="black", lw=2.5, label="measured peak" if i == 0 else None)
                ax.annotate(f"{y:.1f}", (i, y), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
            ax.annotate(
                f"{bottom[i]:.1f}",
                (i, bottom[i]),
                textcoords="offset points",
                xytext=(0, 12),
                ha="center",
                fontsize=8,
                color="#555555",
            )
        ax.axhline(24, color="black", ls="--", lw=1)
        ax.text(-0.45, 24.3, "24 GiB", ha="left", va="bottom", fontsize=8, bbox={"color": "white", "pad": 1})
        ax.set_title(f"{model} (bf16, batch 1 × 256)")
        ax.set_ylabel("GiB")
        ax.tick_params(axis="x", labelrotation=25, labelsize=8)
        handles, names = ax.get_legend_handles_labels()
        uniq = dict(zip(names, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def bench_peak_memory(args: argparse.Namespace) -> dict[str, Any]:
    if args.figure:
        return _figure(args)
    return _single(args)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "peak-memory",
        help="peak memory of a galorex-train configuration in a fresh process, beside the analytic breakdown",
    )
    p.add_argument("--steps", type=int, default=2, help="training steps (the first computes every basis)")
    p.add_argument("--figure", action="store_true", help="the paper's memory figure for --models")
    p.add_argument("--models", nargs="+", default=["llama-1b", "llama-7b"])
    p.add_argument("--measure", nargs="*", default=[], help="--figure: models whose configurations are run")
    p.add_argument("--measured", nargs="*", default=[], help="--figure: MODEL:LABEL=summary.json of a separate run")
    p.add_argument("--rank", type=int, default=128, help="--figure: rank of models not in FIGURE_RANK")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="galorex-train flags, after --")


QUICK = {"steps": 2, "train_args": ["--model", "llama-tiny", "--batch-size", "2", "--seq-len", "32", "--rank", "8"]}
