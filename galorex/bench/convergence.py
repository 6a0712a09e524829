"""``python -m galorex.bench convergence``: final validation loss of each optimizer on llama-tiny, each
at the best learning rate of a sweep, over several seeds, at equal tokens.

    python -m galorex.bench convergence [--optimizers adamw galore fira apollo apollo-mini ...]
        [--steps 300 --lrs 1e-3 3e-3 1e-2 3e-2 --extend 1 --seeds 0 1 2 --jobs 2 --threads 1]

Every run is ``galorex-train --recipe cpu-tiny`` (llama-tiny, the embedded corpus, batch 16 × 128,
rank 32, a refresh every 100 steps, 20 warm-up steps, cosine to 10 %) with only the optimizer, its
own default ``scale`` (``--scale`` unset: 0.25 for the GaLore family and Fira, 1 for APOLLO,
APOLLO-Mini's preset), the learning rate, the seed and ``--steps`` changed, so every optimizer sees
the same data in the same order and the same number of tokens.

The procedure, for each optimizer:

1. **Sweep** every learning rate of ``--lrs`` on the first seed.
2. **Extend** (up to ``--extend`` times): when the best rate is the smallest or largest one tried,
   run the next point of the grid beyond it (the grid's own step: after 1e-2, 3e-2 comes 1e-1) and
   look again. A best rate still at an edge after that is flagged in the table.
3. **Seeds**: run the best rate on every other seed of ``--seeds``; report the mean and the sample
   standard deviation of the final validation loss over all seeds.

A diverged run (non-finite loss) counts as worse than any finite one. Runs execute ``--jobs`` at a
time in separate processes (each with ``--threads`` torch threads). Each finished run is appended to
``OUT/convergence_runs.jsonl`` keyed by its complete training settings; a rerun of the command
reuses every run whose settings match (so an interrupted sweep resumes, and two halves of a sweep
run into the same folder combine) unless ``--rerun`` is given.

Writes ``convergence.md`` (the sweep table and the per-seed table, with each mean's gap to AdamW's
and GaLore's), ``convergence.json`` and ``convergence.png`` (validation-loss curves at each
optimizer's best rate, mean over seeds with the min-max band; final loss against learning rate).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import _env, _write

__all__ = ["QUICK", "add_parser", "bench_convergence", "next_lr"]

# --quick: a smoke run, every optimizer given for two seeds at one rate, a few steps on small batches.
QUICK = {"steps": 10, "lrs": [3e-3], "seeds": [0, 1], "extend": 0}
_QUICK_TRAIN = {"batch_size": 4, "seq_len": 32, "eval_batches": 2}

DEFAULT_OPTIMIZERS = ["adamw", "galore", "fira", "apollo", "apollo-mini", "natural-galore", "gradnorm-lorp"]
RUNS_FILE = "convergence_runs.jsonl"


def add_parser(sub) -> None:
    c = sub.add_parser("convergence", help="validation loss of each optimizer on llama-tiny, lr sweep and seeds")
    c.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS)
    c.add_argument("--steps", type=int, default=300)
    c.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2, 3e-2], help="the sweep's grid")
    c.add_argument(
        "--extend",
        type=int,
        default=1,
        help="how many grid points to add beyond an edge when an optimizer's best rate sits on it",
    )
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the first one is the sweep's")
    c.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    c.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    c.add_argument("--rerun", action="store_true", help=f"ignore the runs recorded in OUT/{RUNS_FILE}")
    c.add_argument("--natural-history", type=int, default=8)
    c.add_argument("--natural-damping", type=float, default=1e-3)
    c.add_argument("--optim-bits", type=int, default=32, choices=(8, 32))
    c.add_argument("--basis-bits", type=int, default=32, choices=(4, 8, 32))
    c.add_argument("--basis-rotation", action="store_true", help="Hadamard-rotate 4/8-bit bases before quantising")


def next_lr(grid: Sequence[float], up: bool) -> float:
    """The grid point beyond its largest (``up``) or smallest rate: one more of the grid's own steps
    (for three or more points the step two places in, so that a 1-3-10 grid continues 1-3-10:
    3e-2 · (1e-2 / 3e-3) = 0.1), rounded to two significant digits."""
    g = sorted(grid)
    if len(g) < 2:
        raise ValueError(f"extending a learning-rate grid needs at least two rates, got {list(g)}")
    if up:
        x = g[-1] * (g[-2] / g[-3] if len(g) >= 3 else g[-1] / g[-2])
    else:
        x = g[0] * (g[1] / g[2] if len(g) >= 3 else g[0] / g[1])
    return float(f"{x:.2g}")


def _loss_key(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def _train_one(settings: dict[str, Any]) -> dict[str, Any]:
    """One ``galorex-train`` run with ``settings`` (TrainConfig fields but ``out``), in a scratch
    folder: its final validation loss, validation curve, the corpus's unigram entropy, seconds."""
    from ..train.trainer import TrainConfig, train

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(**settings, out=f"{tmp}/run")
        summary = train(cfg, log=lambda *a: None)
        curve = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    return {
        "final_val_loss": float(summary["final_val_loss"]),
        "curve": [(r["step"], r["val_loss"]) for r in curve if "val_loss" in r],
        "unigram_entropy": summary["unigram_entropy"],
        "seconds": time.perf_counter() - t0,
    }


class _Runner:
    """Runs (optimizer, lr, seed) triples, ``jobs`` at a time, reusing and recording results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.path = Path(args.out) / RUNS_FILE
        self.done: dict[str, dict[str, Any]] = {}
        self.reused = 0
        self.threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None)
        if self.path.exists() and not args.rerun:
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{self.path}, line {n}: not a JSON record ({e}); delete the line or use --rerun"
                    ) from e
                self.done[record["key"]] = record["result"]
        self.pool = None
        if args.jobs > 1:
            import concurrent.futures
            import multiprocessing

            spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
            self.pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn)

    def settings(self, optimizer: str, lr: float, seed: int) -> dict[str, Any]:
        from ..train.recipes import recipe_settings

        a = self.args
        settings = recipe_settings("cpu-tiny")
        settings.pop("out", None)
        settings.update(
            optimizer=optimizer,
            lr=lr,
            seed=seed,
            scale=None,  # each optimizer's own (factory.DEFAULT_SCALE; APOLLO-Mini's preset), not the recipe's
            steps=a.steps,
            eval_every=max(1, a.steps // 10),
            save_every=0,
            sample_tokens=0,
            progress=False,
            natural_history=a.natural_history,
            natural_damping=a.natural_damping,
            optim_bits=a.optim_bits,
            basis_bits=a.basis_bits,
            basis_rotation=a.basis_rotation,
            threads=self.threads,
        )
        if getattr(a, "quick", False):
            settings.update(_QUICK_TRAIN)
        return settings

    def run(self, triples: list[tuple[str, float, int]], bar) -> list[dict[str, Any]]:
        keyed = []
        for optimizer, lr, seed in triples:
            settings = self.settings(optimizer, lr, seed)
            keyed.append((json.dumps(settings, sort_keys=True), settings, (optimizer, lr, seed)))
        todo = [(k, s, t) for k, s, t in keyed if k not in self.done]
        self.reused += len(keyed) - len(todo)
        bar.update(len(keyed) - len(todo))

        def record(key: str, triple: tuple[str, float, int], result: dict[str, Any]) -> None:
            self.done[key] = result
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:  # one line per run, written whole
                f.write(json.dumps({"key": key, "run": list(triple), "result": result}) + "\n")
            optimizer, lr, seed = triple
            bar.update(1)
            print(
                f"{optimizer} lr={lr:g} seed={seed}: val loss {result['final_val_loss']:.4f} "
                f"({result['seconds']:.0f} s)",
                file=sys.stderr,
            )

        if self.pool is None:
            for key, settings, triple in todo:
                record(key, triple, _train_one(settings))
        else:
            futures = {self.pool.submit(_train_one, s): (k, t) for k, s, t in todo}
            import concurrent.futures

            for future in concurrent.futures.as_completed(futures):
                record(*futures[future], future.result())
        return [self.done[k] for k, _, _ in keyed]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _select(sweep: dict[float, dict[str, Any]]) -> float:
    return min(sorted(sweep), key=lambda lr: _loss_key(sweep[lr]["final_val_loss"]))


def bench_convergence(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep, the extension at the edges and the seeds (see the module docstring)."""
    from tqdm.auto import tqdm

    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.extend < 0:
        raise ValueError(f"--extend must be 0 or more, got {args.extend}")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs):
        raise ValueError(f"--lrs must be positive and finite, got {args.lrs}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds has a repeated seed: {args.seeds}")
    if args.extend and len(set(args.lrs)) < 2:
        raise ValueError("--extend needs at least two rates in --lrs (the grid's step); give more or --extend 0")
    from ..optim.factory import AVAILABLE

    unknown = [name for name in args.optimizers if name not in AVAILABLE]
    if unknown:
        raise ValueError(f"--optimizers: unknown {unknown}; available: {', '.join(AVAILABLE)}")

    names, seed0 = list(dict.fromkeys(args.optimizers)), args.seeds[0]
    bar = tqdm(
        total=len(names) * (len(set(args.lrs)) + len(args.seeds) - 1),
        desc="convergence runs",
        unit="run",
        file=sys.stderr,
    )
    runner = _Runner(args)
    t0 = time.perf_counter()
    try:
        grid = {name: sorted(set(args.lrs)) for name in names}
        sweep: dict[str, dict[float, dict[str, Any]]] = {name: {} for name in names}

        def run_sweep(points: dict[str, list[float]]) -> None:
            triples = [(name, lr, seed0) for name, lrs in points.items() for lr in lrs]
            for (name, lr, _), result in zip(triples, runner.run(triples, bar)):
                sweep[name][lr] = result

        run_sweep(grid)
        for _ in range(args.extend):
            more: dict[str, list[float]] = {}
            for name in names:
                best = _select(sweep[name])
                if best in (grid[name][0], grid[name][-1]):
                    more[name] = [next_lr(grid[name], up=best == grid[name][-1])]
                    grid[name] = sorted(grid[name] + more[name])
            if not more:
                break
            bar.total += sum(map(len, more.values()))
            run_sweep(more)
        best_lr = {name: _select(sweep[name]) for name in names}
        # Seed by seed across the optimizers, so that a sweep stopped early has them all alike.
        triples = [(name, best_lr[name], seed) for seed in args.seeds[1:] for name in names]
        per_seed = {name: {seed0: sweep[name][best_lr[name]]} for name in names}
        for (name, _, seed), result in zip(triples, runner.run(triples, bar)):
            per_seed[name][seed] = result
    finally:
        bar.close()
        runner.close()

    results: dict[str, Any] = {}
    for name in names:
        losses = [r["final_val_loss"] for r in per_seed[name].values()]
        results[name] = {
            "sweep": {str(lr): r["final_val_loss"] for lr, r in sorted(sweep[name].items())},
            "best_lr": best_lr[name],
            "best_at_edge": best_lr[name] in (grid[name][0], grid[name][-1]) and len(grid[name]) > 1,
            "seeds": {str(k): v["final_val_loss"] for k, v in per_seed[name].items()},
            "mean": statistics.mean(losses),
            "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "curves": {str(k): v["curve"] for k, v in per_seed[name].items()},
            "sweep_curves": {str(lr): r["curve"] for lr, r in sorted(sweep[name].items())},
            "seconds": {f"{lr:g}/{seed0}": r["seconds"] for lr, r in sorted(sweep[name].items())},
        }
    for name in ("adamw", "galore"):
        if name in results:
            for r in results.values():
                r[f"vs_{name}"] = r["mean"] / results[name]["mean"] - 1
    entropy = next(iter(per_seed[names[0]].values()))["unigram_entropy"]
    table = _tables(args, results, entropy, runner)
    data = {
        "env": _env(),
        "steps": args.steps,
        "lrs": args.lrs,
        "extend": args.extend,
        "seeds": args.seeds,
        "jobs": args.jobs,
        "threads": runner.threads,
        "runs_reused": runner.reused,
        "wall_seconds": time.perf_counter() - t0,
        "settings": {k: v for k, v in runner.settings("", 0.0, seed0).items() if k not in ("optimizer", "lr", "seed")},
        "results": results,
    }
    _write(Path(args.out), "convergence", table, data)
    _plot(results, Path(args.out) / "convergence.png", args.steps)
    return data


def _tables(args: argparse.Namespace, results: dict[str, Any], entropy: float, runner: _Runner) -> str:
    lrs = sorted({float(lr) for r in results.values() for lr in r["sweep"]})
    seed0 = args.seeds[0]
    quick = " (--quick: batch 4 × 32, 2 validation batches)" if getattr(args, "quick", False) else ""
    caption = (
        f"llama-tiny on the embedded corpus (galorex-train --recipe cpu-tiny), {args.steps} steps "
        f"(batch 16 × 128){quick}, rank 32, each optimizer's default scale, final validation loss; "
        f"natural-galore s={args.natural_history}, "
        f"λ={args.natural_damping:g}; {args.optim_bits}-bit moments, {args.basis_bits}-bit bases"
        f"{' (Hadamard-rotated)' if args.basis_rotation else ''}; unigram entropy {entropy:.3f}"
    )
    sweep_rows = []
    for name, r in results.items():
        cells = []
        for lr in lrs:
            loss = r["sweep"].get(str(lr))
            cell = "—" if loss is None else f"{loss:.4f}"
            cells.append(f"**{cell}**" if lr == r["best_lr"] else cell)
        edge = " (edge)" if r["best_at_edge"] else ""
        sweep_rows.append(f"| {name} | {' | '.join(cells)} | {r['best_lr']:g}{edge} |")
    seed_cols = [str(s) for s in args.seeds]
    gaps = [name for name in ("adamw", "galore") if name in results]
    seed_rows = []
    for name, r in results.items():
        cells = " | ".join(f"{r['seeds'][s]:.4f}" for s in seed_cols)
        gap_cells = "".join(f" {100 * r[f'vs_{g}']:+.2f} % |" for g in gaps)
        seed_rows.append(f"| {name} | {r['best_lr']:g} | {cells} | {r['mean']:.4f} ± {r['std']:.4f} |{gap_cells}")
    gap_head = "".join(f" vs {g} |" for g in gaps)
    lines = [
        caption,
        "",
        f"Sweep on seed {seed0} (bold: the best; '—': not run; the grid extended by up to {args.extend} "
        "point(s) where the best sat on an edge; '(edge)': still on one):",
        "",
        "| optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
        "| --- | " + " | ".join("---:" for _ in lrs) + " | ---: |",
        *sweep_rows,
        "",
        f"Each optimizer at its best lr over seeds {', '.join(seed_cols)} (mean ± sample std; "
        "gaps: the mean's relative difference):",
        "",
        "| optimizer | lr | " + " | ".join(f"seed {s}" for s in seed_cols) + " | mean ± std |" + gap_head,
        "| --- | ---: | " + " | ".join("---:" for _ in seed_cols) + " | ---: |" + " ---: |" * len(gaps),
        *seed_rows,
    ]
    if runner.reused:
        lines += ["", f"({runner.reused} run(s) reused from {RUNS_FILE}.)"]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path, steps: int) -> None:
    """Left: validation loss against step at each optimizer's best rate, the mean over seeds and the
    band from the lowest to the highest seed. Right: final validation loss against the rate (the
    sweep's seed), with the mean ± std over seeds at the best rate."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, r) in enumerate(results.items()):
        color = f"C{i}"
        curves = list(r["curves"].values())
        steps_axis = [s for s, _ in curves[0]]
        rows = [[v for _, v in c] for c in curves if [s for s, _ in c] == steps_axis]
        mean = [statistics.mean(col) for col in zip(*rows)]
        left.plot(steps_axis, mean, color=color, label=f"{name} (lr {r['best_lr']:g}, {r['mean']:.3f})")
        low, high = [min(c) for c in zip(*rows)], [max(c) for c in zip(*rows)]
        left.fill_between(steps_axis, low, high, color=color, alpha=0.2)
        sweep = sorted((float(lr), loss) for lr, loss in r["sweep"].items())
        right.plot(*zip(*sweep), marker="o", color=color, label=name)
        right.errorbar([r["best_lr"]], [r["mean"]], yerr=[r["std"]], color=color, marker="s", capsize=4)
    finals = [r["mean"] for r in results.values()]
    left.set_ylim(min(finals) - 0.1, min(finals) + 1.0)
    left.set_xlabel("step")
    left.set_ylabel("validation loss")
    left.set_title(f"llama-tiny, {steps} steps: best lr each, mean and range over seeds")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.set_xscale("log")
    finite = [loss for r in results.values() for loss in r["sweep"].values() if math.isfinite(loss)]
    right.set_ylim(min(finite) - 0.05, min(min(finite) + 0.8, max(finite) + 0.05))
    right.set_xlabel("learning rate")
    right.set_ylabel("final validation loss")
    right.set_title("sweep (first seed); square: mean ± std over seeds")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
