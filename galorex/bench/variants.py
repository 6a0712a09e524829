"""``python -m galorex.bench variants``: final validation loss of named ``galorex-train`` flag sets
over several seeds, each against the first — what a change of storage, rounding or schedule costs in
quality at equal tokens.

    python -m galorex.bench variants --steps 1000 --seeds 0 1 2 --jobs 2 \\
        --variant "bf16=--dtype bf16" --variant "int8=--dtype bf16 --weight-bits 8" ...

Every run is ``galorex-train --recipe cpu-tiny`` (llama-tiny, the embedded corpus, batch 16 × 128,
rank 32; the convergence benchmark's runs) plus the variant's flags, ``--seed`` and ``--steps``, in
a scratch folder (a variant may add ``--init-from`` a trained model to fine-tune it). Finished runs
are appended to ``OUT/variants_runs.jsonl`` keyed by their complete settings and reused by a rerun
(so an interrupted comparison resumes). The table gives each variant's mean ± sample standard
deviation over the seeds, the seeds' losses, and its mean's gap to the first variant's, in percent
and in units of the first variant's seed standard deviation.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from .common import _env, _write
from .convergence import _train_one

RUNS_FILE = "variants_runs.jsonl"


def add_parser(sub: Any) -> None:
    v = sub.add_parser("variants", help="final validation loss of named galorex-train flag sets over seeds")
    v.add_argument(
        "--variant",
        action="append",
        metavar="NAME=FLAGS",
        help="a name and galorex-train flags (quoted), e.g. 'int8=--dtype bf16 --weight-bits 8'; the first is "
        "the base (default: bf16 weights, INT8 with stochastic rounding, INT8 to nearest; with --quick, the "
        "same three in float32)",
    )
    v.add_argument("--steps", type=int, default=1000)
    v.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    v.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    v.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    v.add_argument("--rerun", action="store_true", help=f"ignore the runs recorded in OUT/{RUNS_FILE}")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=FLAGS`` → (name, flags split as a shell would)."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--variant {text!r}: expected NAME=FLAGS")
    return name.strip(), shlex.split(flags)


def variant_settings(flags: list[str], seed: int, steps: int, threads: int | None) -> dict[str, Any]:
    """The TrainConfig fields (but ``out``) of ``galorex-train --recipe cpu-tiny FLAGS`` for one seed."""
    from ..train.cli import build_parser
    from ..train.recipes import recipe_settings

    parser = build_parser()
    parser.set_defaults(**recipe_settings("cpu-tiny"))
    args = vars(parser.parse_args(["--recipe", "cpu-tiny", *flags]))
    args.update(
        seed=seed,
        steps=steps,
        eval_every=max(1, steps // 10),
        save_every=0,
        sample_tokens=0,
        progress=False,
        threads=threads,
    )
    args.pop("out", None)
    return args


DEFAULT_VARIANTS = [
    "bf16=--dtype bf16",
    "int8=--dtype bf16 --weight-bits 8",
    "int8-nearest=--dtype bf16 --weight-bits 8 --weight-rounding nearest",
]
# --quick without --variant: the same comparison in float32, which every CPU computes at speed (a
# CPU without bf16 arithmetic takes minutes for a few bf16 steps of llama-tiny).
QUICK_VARIANTS = [
    "fp32=--dtype fp32",
    "int8=--dtype fp32 --weight-bits 8",
    "int8-nearest=--dtype fp32 --weight-bits 8 --weight-rounding nearest",
]


def bench_variants(args: argparse.Namespace) -> dict[str, Any]:
    chosen = args.variant or (QUICK_VARIANTS if getattr(args, "quick", False) else DEFAULT_VARIANTS)
    variants = [parse_variant(v) for v in chosen]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variant names must differ, got {names}")
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None)
    out = Path(args.out)
    path = out / RUNS_FILE
    done: dict[str, dict[str, Any]] = {}
    if path.exists() and not args.rerun:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            done[record["key"]] = record["result"]
    runs = []
    for name, flags in variants:
        for seed in args.seeds:
            settings = variant_settings(flags, seed, args.steps, threads)
            runs.append((name, seed, json.dumps(settings, sort_keys=True), settings))
    todo = [r for r in runs if r[2] not in done]

    def record(name: str, seed: int, key: str, result: dict[str, Any]) -> None:
        done[key] = result
        out.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"key": key, "run": [name, seed], "result": result}) + "\n")
        print(
            f"{name} seed={seed}: val loss {result['final_val_loss']:.4f} ({result['seconds']:.0f} s)", file=sys.stderr
        )

    if args.jobs > 1 and len(todo) > 1:
        import concurrent.futures
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            futures = {pool.submit(_train_one, s): (n, seed, k) for n, seed, k, s in todo}
            for future in concurrent.futures.as_completed(futures):
                record(*futures[future], future.result())
    else:
        for name, seed, key, settings in todo:
            record(name, seed, key, _train_one(settings))

    losses = {name: [done[k]["final_val_loss"] for n, _, k, _ in runs if n == name] for name in names}
    base = losses[names[0]]
    base_mean = statistics.fmean(base)
    base_std = statistics.stdev(base) if len(base) > 1 else float("nan")
    lines = [
        f"Final validation loss (nats/byte) of `galorex-train --recipe cpu-tiny --steps {args.steps}` with each "
        f"variant's flags, seeds {', '.join(map(str, args.seeds))}; gaps against `{names[0]}`.",
        "",
        "| variant | flags | mean ± std | seeds | vs first | in first's std |",
        "| --- | --- | ---: | --- | ---: | ---: |",
    ]
    rows = {}
    for name, flags in variants:
        vals = losses[name]
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        gap = 100 * (mean - base_mean) / base_mean
        sigmas = (mean - base_mean) / base_std if base_std > 0 else float("nan")
        rows[name] = {"flags": flags, "losses": vals, "mean": mean, "std": std, "gap_percent": gap, "gap_std": sigmas}
        lines.append(
            f"| {name} | `{' '.join(flags)}` | {mean:.4f} ± {std:.4f} | {', '.join(f'{x:.4f}' for x in vals)} "
            f"| {gap:+.2f} % | {sigmas:+.2f} |"
        )
    data = {"steps": args.steps, "seeds": args.seeds, "variants": rows, "env": _env()}
    _write(out, "variants", "\n".join(lines), data)
    return data


QUICK = {"steps": 4, "seeds": [0, 1]}
