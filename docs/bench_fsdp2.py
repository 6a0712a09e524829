"""FSDP2 measurements of galorex-train on the CPU (gloo), every optimizer: what docs/benchmarks.md and
the README's distributed section report.

    python docs/bench_fsdp2.py equality [--dtype fp32|fp64]   2 ranks against one process
    python docs/bench_fsdp2.py state                          per-rank optimizer state, 2 and 4 ranks
    python docs/bench_fsdp2.py resume                         a 2-rank checkpoint resumed on 4 ranks
    python docs/bench_fsdp2.py memory [--ranks 1 2 4]         per-rank peak, llama-130m 8-bit + layer-wise

Every run is ``galorex-train`` in fresh processes (``python -m galorex.train``, or ``torchrun
--nproc_per_node N -m galorex.train --distributed fsdp2``) on llama-tiny, 5 steps of a global batch of
4 × 32 tokens, refreshes at steps 0, 2 and 4 (``--update-proj-gap 2``), rank 4, ``--moment-policy
reproject`` where the optimizer has it (APOLLO's random projections take ``keep``), each optimizer's
default learning rate. ``equality`` also runs DDP on 2 ranks and measures the floor of the
comparison: one process against itself with the same global batch taken as 2 × 2 (``--batch-size 2
--grad-accum 2``), which changes only the order of the gradient's sums, as the ranks' reduction
does. Run it from the repository root (``PYTHONPATH=.``); outputs go to ``--work`` (default
``bench-fsdp2/``; ``--reuse`` keeps the runs already there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = {
    "GaLore": ["--optimizer", "galore"],
    "GaLore --layerwise": ["--optimizer", "galore", "--layerwise"],
    "GaLore --optim-bits 8 --basis-bits 4": ["--optimizer", "galore", "--optim-bits", "8", "--basis-bits", "4"],
    "Fira": ["--optimizer", "fira"],
    "APOLLO": ["--optimizer", "apollo"],
    "APOLLO-Mini": ["--optimizer", "apollo-mini"],
    "GradNormLoRP": ["--optimizer", "gradnorm-lorp"],
    "Natural GaLore": ["--optimizer", "natural-galore"],
    "GaLoreAdafactor": ["--optimizer", "galore-adafactor"],
}
RANDOM_PROJECTION = ("APOLLO", "APOLLO-Mini")  # moment_policy="reproject" needs orthonormal bases
REUSE = False
COMMON = "--model llama-tiny --batch-size 4 --seq-len 32 --steps 5 --warmup 2 --update-proj-gap 2 --rank 4"
COMMON += " --save-every 0 --sample-tokens 0 --threads 1 --no-progress --eval-batches 1 --eval-every 0"
COMMON += " --refresh-schedule together"  # every basis at steps 0, 2 and 4 (galorex-train's default staggers them)


def flags(case: str, dtype: str = "fp32") -> list[str]:
    out = COMMON.split() + CASES[case] + ["--dtype", dtype]
    if case not in RANDOM_PROJECTION:
        out += ["--moment-policy", "reproject"]
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], out: Path, ranks: int = 0, mode: str = "fsdp2") -> dict:
    """galorex-train with ``args`` into ``out``: one process (``ranks=0``) or torchrun with ``ranks``
    processes under ``--distributed mode``; returns its summary.json. A finished run in ``out`` is
    reused when REUSE is set (``--reuse``)."""
    if REUSE and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    _fresh(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
        command += ["--master-port", str(_free_port()), "-m", "galorex.train"]
        command += [*args, "--distributed", mode]
    else:
        command = [sys.executable, "-m", "galorex.train", *args]
    done = subprocess.run([*command, "--out", str(out)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def worst_relative(a: Path, b: Path) -> float:
    """max over tensors of ‖A − B‖ / ‖A‖ between two runs' final weights."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((wa[k].double() - wb[k].double()).norm() / wa[k].double().norm()) for k in wa)


def _fresh(path: Path) -> Path:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return path


def equality(work: Path, dtype: str) -> list[dict]:
    rows = []
    for case in CASES:
        tag = case.replace(" ", "_").replace("-", "")
        args = flags(case, dtype)
        one = work / f"{tag}-{dtype}-one"
        run(args, one)
        two = work / f"{tag}-{dtype}-fsdp2"
        run(args, two, ranks=2)
        ddp = work / f"{tag}-{dtype}-ddp"
        run(args, ddp, ranks=2, mode="ddp")
        split = work / f"{tag}-{dtype}-split"
        split_args = [*args[: args.index("--batch-size") + 1], "2", *args[args.index("--batch-size") + 2 :]]
        run([*split_args, "--grad-accum", "2"], split)
        row = {"case": case, "fsdp2": worst_relative(one, two), "ddp": worst_relative(one, ddp)}
        row["floor"] = worst_relative(one, split)
        rows.append(row)
        print(f"| {case} | {row['fsdp2']:.1e} | {row['ddp']:.1e} | {row['floor']:.1e} |", flush=True)
    return rows


def state(work: Path) -> list[dict]:
    rows = []
    for case in CASES:
        tag = case.replace(" ", "_").replace("-", "")
        one = run(flags(case), work / f"{tag}-state-one")["optimizer_state_bytes"]
        row = {"case": case, "one": one}
        for ranks in (2, 4):
            summary = run(flags(case), work / f"{tag}-state-{ranks}", ranks=ranks)
            row[ranks] = [r["optimizer_state_bytes"] * ranks / one for r in summary["per_rank"]]
        rows.append(row)
        spans = [f"{min(row[n]):.4f}–{max(row[n]):.4f}" for n in (2, 4)]
        print(f"| {case} | {one} | {spans[0]} | {spans[1]} |", flush=True)
    return rows


def resume(work: Path) -> list[dict]:
    rows = []
    for case in CASES:
        tag = case.replace(" ", "_").replace("-", "")
        two = work / f"{tag}-resume-2"
        args = flags(case)
        args = [*args[: args.index("--save-every") + 1], "3", *args[args.index("--save-every") + 2 :]]
        run(args, two, ranks=2)
        four = work / f"{tag}-resume-4"
        checkpoint = two / "checkpoints" / "ckpt-00000003.dcp"
        run([*args, "--resume", str(checkpoint)], four, ranks=4)
        rows.append({"case": case, "resumed_on_4": worst_relative(two, four)})
        print(f"| {case} | {rows[-1]['resumed_on_4']:.1e} |", flush=True)
    return rows


def memory(work: Path, ranks_list: list[int], model: str, steps: int) -> list[dict]:
    args = f"--model {model} --optimizer galore --rank 128 --optim-bits 8 --basis-bits 4 --layerwise"
    args += f" --batch-size 4 --seq-len 128 --steps {steps} --warmup 1 --eval-batches 1 --eval-every 0"
    args += " --sample-tokens 0 --save-every 0 --no-save-model --threads 1 --no-progress"
    rows = []
    for ranks in ranks_list:
        summary = run(args.split(), work / f"memory-{model}-{ranks}", ranks=ranks if ranks > 1 else 0)
        per_rank = summary.get("per_rank") or [summary]
        peaks = [r["memory"]["after_last_step"]["cpu_max_rss"] for r in per_rank]
        state = [r["optimizer_state_bytes"] for r in per_rank]
        rows.append({"ranks": ranks, "peak_bytes": peaks, "state_bytes": state})
        print(f"| {ranks} | {max(peaks) / 2**20:.0f} MiB | {max(state) / 2**20:.1f} MiB |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("equality", "state", "resume", "memory"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp64"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--model", default="llama-130m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default="bench-fsdp2")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in --work")
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.what == "equality":
        rows = equality(work, args.dtype)
    elif args.what == "state":
        rows = state(work)
    elif args.what == "resume":
        rows = resume(work)
    else:
        rows = memory(work, args.ranks, args.model, args.steps)
    suffix = f"-{args.dtype}" if args.what == "equality" else ""
    (work / f"{args.what}{suffix}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
