"""``python -m galorex.bench``: optimizer step time, refresh cost, state memory, reference losses.

    python -m galorex.bench step      [--model llama-60m --rank 128 --repeats 15]
    python -m galorex.bench refresh   [--m 4096 --n 11008 --rank 512]
    python -m galorex.bench memory    [--rank 128 ...]
    python -m galorex.bench train-reference [--steps 1000]
    python -m galorex.bench convergence [--steps 300 --lrs 1e-3 3e-3 1e-2 3e-2 --extend 1 --seeds 0 1 2 --jobs 2]
    python -m galorex.bench layerwise-memory [--model llama-60m --batch-size 4 --seq-len 256]
    python -m galorex.bench halo [--tokens 2048 --in-features 512 --out-features 512]
    python -m galorex.bench basis [--model llama-60m --rank 128 --steps 20]
    python -m galorex.bench hf-trainer [--steps 300 --seed 0]
    python -m galorex.bench peak-memory [--steps 2] -- <galorex-train flags>   (or --figure)
    python -m galorex.bench variants [--steps 1000 --seeds 0 1 2 --variant NAME=FLAGS ...]
    python -m galorex.bench int8-linear [--in-features 4096 --out-features 11008 --tokens 256]
    python -m galorex.bench all [--quick]

Each writes a Markdown table and a JSON file into --out (default bench-out/) and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import projection as proj
from ..memory import estimate_optimizer_state_bytes, optimizer_state_bytes
from ..models.llama import MODEL_CONFIGS, Llama, get_config
from ..optim import GaLoreAdamW, NaturalGaLoreAdamW, galore_param_groups
from . import basis as basis_bench
from . import convergence as convergence_bench
from . import halo as halo_bench
from . import hf_trainer as hf_trainer_bench
from . import int8_linear as int8_linear_bench
from . import peak_memory as peak_memory_bench
from . import variants as variants_bench
from .common import _env, _write
from .layerwise import add_arguments as add_layerwise_arguments
from .layerwise import bench_layerwise_memory


def _import_reference():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW as Reference
        return Reference
    except ImportError:
        return None


def _state_bytes_any(opt: torch.optim.Optimizer) -> int:
    """State bytes of any optimizer, galore-torch's too (its projector objects hold tensors)."""
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix"):
                mats = v.ortho_matrix if isinstance(v.ortho_matrix, list) else [v.ortho_matrix]
                total += sum(t.numel() * t.element_size() for t in mats if t is not None)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- step
def _time_interleaved(
    runs: dict[str, torch.optim.Optimizer], repeats: int, set_grads, device
) -> dict[str, list[float]]:
    """Seconds per ``step()`` of each optimizer, taking turns so that machine noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, opt in runs.items():
            set_grads()
            _sync(device)
            t = time.perf_counter()
            opt.step()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return times


class _ArithmeticFloor:
    """The arithmetic a GaLore step cannot avoid, timed like an optimizer: torch's fused AdamW on
    the unprojected parameters, the two GEMMs per projected matrix (R = project(G, P) and
    W ← (1 − lr·wd)·W − lr·scale·project_back(D, P), the decay and update inside the second), and
    Adam on the low-rank R as foreach ops. Bases are fixed random orthonormal matrices (no refresh)."""

    def __init__(self, groups: list[dict[str, Any]], lr: float = 1e-3, weight_decay: float = 1e-2) -> None:
        self.state: dict[Any, Any] = {}  # holds nothing it counts as optimizer state
        self.lr, self.wd, self.matrices = lr, weight_decay, []
        dense = []
        gen = torch.Generator().manual_seed(0)
        for group in groups:
            for _, p in group["params"]:
                if group.get("rank") is None or p.dim() < 2:
                    dense.append(p)
                    continue
                m, n = p.shape
                side = proj.projection_side("std", m, n)
                basis_rows = m if side == "left" else n
                q = torch.linalg.qr(torch.randn(basis_rows, group["rank"], generator=gen))[0].to(p.device)
                low = proj.lowrank_shape(side, m, n, group["rank"])
                zeros = lambda: torch.zeros(low, device=p.device)
                self.matrices.append((p, q, side, group["scale"], zeros(), zeros()))
        self.dense = torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay, fused=True)

    @torch.no_grad()
    def step(self) -> None:
        self.dense.step()
        lows = [proj.project(p.grad, [q], side) for p, q, side, *_ in self.matrices]
        ms, vs = [t[4] for t in self.matrices], [t[5] for t in self.matrices]
        torch._foreach_lerp_(ms, lows, 0.1)
        torch._foreach_mul_(vs, 0.999)
        torch._foreach_addcmul_(vs, lows, lows, value=0.001)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, 1e-8)
        directions = torch._foreach_div(ms, denom)
        for (p, q, side, scale, *_), d in zip(self.matrices, directions):
            proj.add_projected_back_(p, d, [q], side, alpha=-self.lr * scale, beta=1.0 - self.lr * self.wd)


FLOOR = "floor: fused AdamW + 2 GEMMs + low-rank Adam"
STEP_ROWS = (
    "galore",
    "galore-fused",
    "galore-bf16",
    "natural-galore",
    "fira",
    "apollo",
    "apollo-mini",
    "apollo-fused",
    "apollo-mini-fused",
)


def bench_step(args: argparse.Namespace) -> dict[str, Any]:
    """Median optimizer.step() time with no refresh, on the GaLore paper's Llama shapes; the time of
    a step that refreshes every basis; and the amortised cost at refresh gap ``--gap``."""
    device = torch.device(args.device)
    cfg = get_config(args.model)
    torch.manual_seed(0)
    model = Llama(cfg).to(device)
    grads = {p: torch.randn_like(p) * 1e-3 for p in model.parameters()}

    def set_grads():
        for p, g in grads.items():
            p.grad = g.clone()

    runs: dict[str, torch.optim.Optimizer] = {}
    runs["torch AdamW (foreach)"] = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    Reference = _import_reference()
    gap = 10**9  # only the first step refreshes; timed steps measure the steady state
    groups = lambda: galore_param_groups(model, rank=args.rank, update_proj_gap=gap, scale=0.25)
    if Reference is not None:
        ref_groups = [{**g, "params": [p for _, p in g["params"]]} for g in groups()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs["galore-torch GaLoreAdamW"] = Reference(ref_groups, lr=1e-3)
    rows = set(args.rows)
    if "galore" in rows:
        runs["galorex GaLoreAdamW"] = GaLoreAdamW(groups(), lr=1e-3)
    if "galore-fused" in rows:
        # The floor steps the unprojected parameters with torch's fused kernel; so does this row.
        runs["galorex GaLoreAdamW (fused=True)"] = GaLoreAdamW(groups(), lr=1e-3, fused=True)
    if "galore-bf16" in rows:
        bf16 = [{**g, "proj_precision": "bf16"} if g.get("rank") else g for g in groups()]
        runs[BF16_ROW] = GaLoreAdamW(bf16, lr=1e-3)
    runs[FLOOR] = _ArithmeticFloor(groups())
    if args.natural_history > 0 and "natural-galore" in rows:
        runs["galorex NaturalGaLoreAdamW"] = NaturalGaLoreAdamW(groups(), lr=1e-3, natural_history=args.natural_history)
    runs.update(_norm_scaled_optimizers(model, args.rank, gap, fused_rows=True, rows=rows))

    # Warm-up (includes the first refresh), then interleave the optimizers so that machine noise
    # hits all of them alike. Parameters drift a little; the work per step does not change.
    for opt in runs.values():
        for _ in range(2):
            set_grads()
            opt.step()
    times = _time_interleaved(runs, args.repeats, set_grads, device)
    schedule = _bench_schedule(model, args, set_grads, device, Reference) if args.schedule_periods > 0 else None

    # Steps that refresh every basis (update_proj_gap = 1), for the amortised cost.
    refresh_runs: dict[str, torch.optim.Optimizer] = {}
    every = lambda: galore_param_groups(model, rank=args.rank, update_proj_gap=1, scale=0.25)
    if Reference is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            refresh_runs["galore-torch GaLoreAdamW"] = Reference(
                [{**g, "params": [p for _, p in g["params"]]} for g in every()], lr=1e-3
            )
    if "galore" in rows:
        refresh_runs["galorex GaLoreAdamW"] = GaLoreAdamW(every(), lr=1e-3)
    if args.natural_history > 0 and "natural-galore" in rows:
        refresh_runs["galorex NaturalGaLoreAdamW"] = NaturalGaLoreAdamW(
            every(), lr=1e-3, natural_history=args.natural_history
        )
    refresh_runs.update(_norm_scaled_optimizers(model, args.rank, 1, rows=rows))
    refresh_times = _time_interleaved(refresh_runs, args.refresh_repeats, set_grads, device)
    del refresh_runs

    analytic_galore = estimate_optimizer_state_bytes(groups())
    analytic_natural = estimate_optimizer_state_bytes(groups(), natural_history=args.natural_history)
    analytic_adamw = estimate_optimizer_state_bytes(model, optimizer="adamw")
    rows, data = (
        [],
        {"env": _env(), "model": args.model, "rank": args.rank, "natural_history": args.natural_history, "results": {}},
    )
    ref_median = statistics.median(times["galore-torch GaLoreAdamW"]) if Reference else None
    floor_median = statistics.median(times[FLOOR])

    def paired(name: str, against: str) -> float | None:
        """The median over rounds of this row's time over ``against``'s in the same round: the
        rows take turns, so a slow spell of the machine that spans a round cancels out."""
        if against not in times:
            return None
        return statistics.median(a / b for a, b in zip(times[name], times[against]))

    for name, opt in runs.items():
        med = statistics.median(times[name])
        measured = optimizer_state_bytes(opt) if name != "galore-torch GaLoreAdamW" else _state_bytes_any(opt)
        analytic = {
            "galorex GaLoreAdamW": analytic_galore,
            "galorex GaLoreAdamW (fused=True)": analytic_galore,
            "galorex NaturalGaLoreAdamW": analytic_natural,
            "torch AdamW (foreach)": analytic_adamw,
            **_norm_scaled_estimates(model, args.rank),
        }.get(name)
        ratio = med / ref_median if ref_median else None  # galore-torch not installed
        refresh = statistics.median(refresh_times[name]) if refresh_times.get(name) else None
        amortised = med if refresh is None else med + (refresh - med) / args.gap
        data["results"][name] = {
            "median_step_s": med,
            "all_s": times[name],
            "state_bytes": measured,
            "analytic_state_bytes": analytic,
            "vs_galore_torch": ratio,
            "vs_adamw": med / statistics.median(times["torch AdamW (foreach)"]),
            "vs_floor": med / floor_median,
            "vs_floor_paired": paired(name, FLOOR),
            "vs_galore_torch_paired": paired(name, "galore-torch GaLoreAdamW"),
            "refresh_step_s": refresh,
            "amortised_step_s": amortised,
        }
        pf, pr = paired(name, FLOOR), paired(name, "galore-torch GaLoreAdamW")
        rows.append(
            f"| {name} | {med * 1e3:.1f} | {med / floor_median:.2f}× | {'—' if ratio is None else f'{ratio:.2f}×'} | "
            f"{pf:.2f}× | {'—' if pr is None else f'{pr:.2f}×'} | "
            f"{'—' if refresh is None else f'{refresh * 1e3:.0f}'} | {amortised * 1e3:.1f} | "
            f"{measured / 2**20:.2f} | {'' if analytic is None else f'{analytic / 2**20:.2f}'} |"
        )
    table = "\n".join(
        [
            f"optimizer.step() on {args.model} (rank {args.rank} on attention and MLP weights), "
            f"{args.repeats} interleaved repeats, device {device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; refresh step: median of {args.refresh_repeats} steps that "
            f"refresh every basis (exact SVD); amortised at update_proj_gap {args.gap}; per round: the "
            "median over rounds of the row's time over the other's in the same round",
            "",
            "| optimizer | median step (ms) | time vs floor | time vs galore-torch | vs floor, per round | "
            "vs galore-torch, per round | refresh step (ms) | amortised step (ms) | state (MiB) | "
            "analytic minimum (MiB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    if BF16_ROW in times and "galorex GaLoreAdamW" in times:
        ratio = paired(BF16_ROW, "galorex GaLoreAdamW")
        data["bf16_vs_float32_paired"] = ratio
        table += f"\n\nproj_precision='bf16' / float32 projections (GaLoreAdamW, per round): {ratio:.2f}×"
    if schedule is not None:
        data["schedule"] = schedule.pop("data")
        table += "\n\n" + schedule["table"]
    _write(Path(args.out), "step", table, data)
    return data


BF16_ROW = "galorex GaLoreAdamW (proj_precision='bf16')"


def _bench_schedule(model, args: argparse.Namespace, set_grads, device, reference) -> dict[str, Any]:
    """Every step of ``--schedule-periods`` refresh periods at ``--schedule-gap`` after a first step
    (which computes every basis under any schedule), the optimizers taking turns step by step:
    the slowest step over the median step of each, and the total time of staggered over together."""
    gap = args.schedule_gap
    groups = lambda **kw: galore_param_groups(model, rank=args.rank, update_proj_gap=gap, scale=0.25, **kw)
    runs: dict[str, torch.optim.Optimizer] = {}
    if reference is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs["galore-torch GaLoreAdamW"] = reference(
                [{**g, "params": [p for _, p in g["params"]]} for g in groups()], lr=1e-3
            )
    runs["galorex GaLoreAdamW, together"] = GaLoreAdamW(groups(), lr=1e-3)
    runs["galorex GaLoreAdamW, staggered"] = GaLoreAdamW(groups(refresh_schedule="staggered"), lr=1e-3)
    for opt in runs.values():  # the first step: every basis
        set_grads()
        opt.step()
    times = _time_interleaved(runs, args.schedule_periods * gap, set_grads, device)
    rows, data = [], {"gap": gap, "periods": args.schedule_periods, "results": {}}
    for name, ts in times.items():
        slowest, median = max(ts), statistics.median(ts)
        data["results"][name] = {"all_s": ts, "slowest_s": slowest, "median_s": median, "total_s": sum(ts)}
        rows.append(f"| {name} | {median * 1e3:.0f} | {slowest * 1e3:.0f} | {slowest / median:.2f} | {sum(ts):.2f} |")
    ratio = sum(times["galorex GaLoreAdamW, staggered"]) / sum(times["galorex GaLoreAdamW, together"])
    data["staggered_vs_together_total"] = ratio
    table = "\n".join(
        [
            f"Every step of {args.schedule_periods} refresh periods at update_proj_gap {gap} after the first "
            f"(which computes every basis), {args.model} rank {args.rank}, exact SVD, the optimizers taking turns "
            "step by step",
            "",
            "| optimizer | median step (ms) | slowest step (ms) | slowest / median | total (s) |",
            "| --- | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            f"total time, staggered / together: {ratio:.3f}",
        ]
    )
    return {"table": table, "data": data}


# ----------------------------------------------------------------------------- refresh
def synthetic_gradient(m: int, n: int, *, spectrum: str, seed: int, device, decay: float = 1.0) -> torch.Tensor:
    """A test gradient. ``decaying``: σᵢ ∝ (1 + i)^(−decay) on a random basis (built as a sum of
    random rank-one terms, nearly orthogonal in high dimension) plus 1% Gaussian noise — gradients
    of trained networks have such spectra. ``flat``: plain Gaussian entries (worst case)."""
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(m, n, generator=g, device=device)
    if spectrum == "flat":
        return noise
    k = min(m, n)
    a = torch.linalg.qr(torch.randn(m, k, generator=g, device=device)).Q
    b = torch.randn(k, n, generator=g, device=device) / n**0.5
    s = (1.0 + torch.arange(k, device=device, dtype=torch.float32)) ** (-decay)
    low = (a * s) @ b
    return low + 0.01 * noise * (proj.energy(low) / proj.energy(noise)) ** 0.5


def bench_refresh(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    rows, results = [], []
    for spectrum in args.spectrum:
        G = synthetic_gradient(args.m, args.n, spectrum=spectrum, seed=0, device=device)
        side = proj.projection_side("std", args.m, args.n)
        timings: dict[str, float] = {}
        bases: dict[str, list[torch.Tensor]] = {}
        for method in ("svd", "randomized", "randomized-bf16"):
            best = float("inf")
            for rep in range(args.repeats if method != "svd" else 1):
                gen = torch.Generator(device=device).manual_seed(rep)  # the same sketches, float32 and bf16
                _sync(device)
                t = time.perf_counter()
                b = proj.compute_bases(
                    G,
                    args.rank,
                    side,
                    method.removesuffix("-bf16"),
                    oversample=args.oversample,
                    power_iters=args.power_iters,
                    generator=gen,
                    bf16=method.endswith("-bf16"),
                )
                _sync(device)
                best = min(best, time.perf_counter() - t)
            timings[method], bases[method] = best, b
        s = torch.linalg.svdvals(G).double()
        top = float((s[: args.rank] ** 2).sum())
        energy = {k: proj.energy(proj.project(G, b, side)) / top for k, b in bases.items()}
        eye = torch.eye(args.rank, dtype=torch.float64, device=device)
        ortho = {k: float(torch.linalg.norm(b[0].double().mT @ b[0].double() - eye)) for k, b in bases.items()}
        speedup = timings["svd"] / timings["randomized"]
        results.append(
            {
                "spectrum": spectrum,
                "svd_s": timings["svd"],
                "randomized_s": timings["randomized"],
                "randomized_bf16_s": timings["randomized-bf16"],
                "speedup": speedup,
                "energy_svd": energy["svd"],
                "energy_randomized": energy["randomized"],
                "energy_randomized_bf16": energy["randomized-bf16"],
                "orthonormality_randomized": ortho["randomized"],
                "orthonormality_randomized_bf16": ortho["randomized-bf16"],
            }
        )
        rows.append(
            f"| {spectrum} | {timings['svd']:.2f} | {timings['randomized']:.3f} | {speedup:.1f}× | "
            f"{timings['randomized-bf16']:.3f} | {energy['svd']:.4f} | {energy['randomized']:.4f} | "
            f"{energy['randomized-bf16']:.4f} | {ortho['randomized']:.1e} | {ortho['randomized-bf16']:.1e} |"
        )
    native = "native" if proj.bf16_gemm_is_native(device) else "emulated: bf16-rounded operands in float32 GEMMs"
    table = "\n".join(
        [
            f"Basis refresh of a {args.m}×{args.n} float32 gradient at rank {args.rank} "
            f"(randomized: oversample {args.oversample}, {args.power_iters} power iterations; best of "
            f"{args.repeats}; bf16: its GEMMs with G on bf16 operands, {native}), device {device}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            "",
            "| spectrum | svd (s) | randomized (s) | speed-up | randomized bf16 (s) | energy svd | "
            "energy randomized | energy randomized bf16 | ‖QᵀQ − I‖_F randomized | ‖QᵀQ − I‖_F bf16 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            "energy = ‖project(G)‖²_F / Σᵢ≤r σᵢ² (1.0 = the exact top-r subspace)",
        ]
    )
    data = {"env": _env(), "m": args.m, "n": args.n, "rank": args.rank, "results": results}
    _write(Path(args.out), "refresh", table, data)
    return data


# ----------------------------------------------------------------------------- memory
def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Optimizer-state bytes for the paper's shapes: analytic everywhere, measured where it fits."""
    from ..optim import GradNormLoRPAdamW

    # name: (optimizer class, estimate kind, options given to both the optimizer and the estimate)
    variants = {
        "GaLore 32-bit": (GaLoreAdamW, "galore", {}),
        "GaLore 8-bit": (GaLoreAdamW, "galore", {"optim_bits": 8}),
        "Natural GaLore 32-bit (s=8)": (NaturalGaLoreAdamW, "galore", {"natural_history": 8}),
        "GradNormLoRP 8-bit": (GradNormLoRPAdamW, "gradnorm_lorp", {"optim_bits": 8}),
        "GradNormLoRP 8-bit, 4-bit basis": (GradNormLoRPAdamW, "gradnorm_lorp", {"optim_bits": 8, "basis_bits": 4}),
        **NORM_SCALED_MEMORY_VARIANTS,
    }
    rows, results = [], []
    for name in args.models:
        cfg = get_config(name)
        with torch.device("meta"):
            model = Llama(cfg)
        groups = galore_param_groups(model, rank=args.rank, scale=0.25)
        row = {
            "model": name,
            "parameters": model.num_parameters(),
            "AdamW": estimate_optimizer_state_bytes(model, optimizer="adamw"),
        }
        projected_only = {}
        for label, (_, kind, options) in variants.items():
            groups = _memory_groups(model, args.rank, label)
            row[label] = estimate_optimizer_state_bytes(groups, optimizer=kind, **options)
            projected_only[label] = estimate_optimizer_state_bytes([groups[-1]], optimizer=kind, **options)
        row["projected_ratio_gradnorm8_vs_galore32"] = (
            projected_only["GradNormLoRP 8-bit"] / projected_only["GaLore 32-bit"]
        )
        row["projected_ratio_gradnorm8_basis4_vs_galore32"] = (
            projected_only["GradNormLoRP 8-bit, 4-bit basis"] / projected_only["GaLore 32-bit"]
        )
        measured = {}
        if model.num_parameters() <= args.measure_up_to:
            for label, (cls, _kind, options) in variants.items():
                real = Llama(cfg)
                opt = cls(_memory_groups(real, args.rank, label), lr=1e-3, **options)
                for p in real.parameters():
                    p.grad = torch.randn_like(p) * 1e-3
                opt.step()
                measured[label] = optimizer_state_bytes(opt)
                del real, opt
        row["measured"] = measured
        results.append(row)
        cells = []
        for label in ("AdamW", *variants):
            value = f"{row[label] / 2**30:.3f}"
            if label in measured:
                value += " ✓" if measured[label] == row[label] else f" (measured {measured[label] / 2**30:.3f})"
            cells.append(value)
        rows.append(
            f"| {name} | {row['parameters'] / 1e6:.0f}M | "
            + " | ".join(cells)
            + f" | {row['projected_ratio_gradnorm8_vs_galore32']:.2f} | "
            f"{row['projected_ratio_gradnorm8_basis4_vs_galore32']:.2f} |"
        )
    table = "\n".join(
        [
            f"Optimizer state in GiB (fp32 weights; rank {args.rank} on attention and MLP weights, embeddings/"
            "head/norms on AdamW). ✓: measured after one real step and equal to the analytic count.",
            "",
            "| model | parameters | AdamW | " + " | ".join(variants) + " | projected weights: GradNormLoRP 8-bit "
            "/ GaLore 32-bit | the same with a 4-bit basis |",
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in variants) + " | ---: | ---: |",
            *rows,
        ]
    )
    data = {"env": _env(), "rank": args.rank, "results": results}
    _write(Path(args.out), "memory", table, data)
    return data


def _memory_groups(model, rank: int, label: str) -> list[dict[str, Any]]:
    """The memory table's groups: GaLore's at ``rank``, with Fira's ``alpha`` for Fira and rank 1
    for APOLLO-Mini."""
    if label.startswith("Fira"):
        return galore_param_groups(model, rank=rank, scale=0.25)  # FiraAdamW reads it as alpha
    if label.startswith("APOLLO-Mini"):
        return galore_param_groups(model, rank=1, scale=128.0, scale_type="tensor")
    return galore_param_groups(model, rank=rank, scale=1.0 if label.startswith("APOLLO") else 0.25)


def _norm_scaled_optimizers(
    model, rank: int, gap: int, fused_rows: bool = False, rows: set[str] | None = None
) -> dict[str, torch.optim.Optimizer]:
    """The step benchmark's FiraAdamW, ApolloAdamW (random, channel-wise) and APOLLO-Mini; with
    ``fused_rows`` also APOLLO and APOLLO-Mini with torch's fused AdamW kernel on the unprojected
    parameters (``fused=True``, opt-in as for GaLoreAdamW; the default is torch's own choice).
    ``rows``: the ``--rows`` names to build (default: all)."""
    from ..optim import ApolloAdamW, FiraAdamW

    groups = lambda: galore_param_groups(model, rank=rank, update_proj_gap=gap, scale=1.0)
    apollo = lambda **kw: ApolloAdamW(groups(), lr=1e-3, **kw)
    mini = lambda **kw: ApolloAdamW.mini(galore_param_groups(model, update_proj_gap=gap), lr=1e-3, **kw)
    builders = {
        "fira": (
            "galorex FiraAdamW",
            lambda: FiraAdamW(galore_param_groups(model, rank=rank, update_proj_gap=gap), lr=1e-3),
        ),
        "apollo": ("galorex ApolloAdamW", apollo),
        "apollo-mini": ("galorex APOLLO-Mini", mini),
    }
    if fused_rows:
        builders["apollo-fused"] = ("galorex ApolloAdamW (fused=True)", lambda: apollo(fused=True))
        builders["apollo-mini-fused"] = ("galorex APOLLO-Mini (fused=True)", lambda: mini(fused=True))
    return {name: build() for key, (name, build) in builders.items() if rows is None or key in rows}


def _norm_scaled_estimates(model, rank: int) -> dict[str, int]:
    apollo = estimate_optimizer_state_bytes(galore_param_groups(model, rank=rank), optimizer="apollo")
    mini = estimate_optimizer_state_bytes(galore_param_groups(model, rank=1), optimizer="apollo")
    return {
        "galorex FiraAdamW": estimate_optimizer_state_bytes(galore_param_groups(model, rank=rank), optimizer="fira"),
        "galorex ApolloAdamW": apollo,
        "galorex APOLLO-Mini": mini,
        "galorex ApolloAdamW (fused=True)": apollo,
        "galorex APOLLO-Mini (fused=True)": mini,
    }


def _norm_scaled_memory_variants() -> dict[str, tuple[Any, str, dict[str, Any]]]:
    from ..optim import ApolloAdamW, FiraAdamW

    return {
        "Fira 32-bit": (FiraAdamW, "fira", {}),
        "APOLLO 32-bit": (ApolloAdamW, "apollo", {}),
        "APOLLO-Mini 32-bit": (ApolloAdamW, "apollo", {}),
    }


NORM_SCALED_MEMORY_VARIANTS = _norm_scaled_memory_variants()


# ----------------------------------------------------------------------------- train-reference
def _reference_factory(cls):
    """A ``make_optimizer`` for galorex-train that builds galore-torch's optimizer on the same groups."""

    def make(optimizer_name, model, *, lr, betas, weight_decay, eps=1e-8, **galore_keys):
        # galore-torch takes plain parameter lists and only its own group keys.
        groups = galore_param_groups(
            model,
            rank=galore_keys["rank"],
            scale=galore_keys["scale"],
            update_proj_gap=galore_keys["update_proj_gap"],
            proj_type=galore_keys["proj_type"],
        )
        plain = [{**g, "params": [p for _, p in g["params"]]} for g in groups]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(plain, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    return make


def bench_train_reference(args: argparse.Namespace) -> dict[str, Any]:
    """galorex-train's llama-tiny recipe with AdamW, galorex GaLore and galore-torch's GaLoreAdamW,
    same seed, data and schedule; galore-torch runs through the same loop with its optimizer
    swapped in (same groups, lr, betas, ε and weight decay)."""
    import tempfile

    from ..train.trainer import TrainConfig, train

    Reference = _import_reference()
    results = {}
    runs = [("adamw", "adamw", None), ("galore", "galore", None)]
    if Reference is not None:
        runs.append(("galore-torch", "galore", Reference))
    for label, name, cls in runs:
        make = _reference_factory(cls) if cls is not None else None
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                optimizer=name,
                steps=args.steps,
                out=f"{tmp}/run",
                progress=False,
                sample_tokens=0,
                save_every=0,
                seed=args.seed,
                lr=getattr(args, "lr", 3e-3),
                **_train_overrides(args),
            )
            s = train(cfg, log=lambda *a: None, make_optimizer=make)
        results[label] = {
            k: s[k]
            for k in (
                "final_val_loss",
                "val_perplexity",
                "tokens_per_s",
                "wall_s",
                "optimizer_state_bytes",
                "unigram_entropy",
            )
        }
        print(f"{label}: val loss {s['final_val_loss']:.4f}", file=sys.stderr)
    rows = [
        f"| {k} | {v['final_val_loss']:.4f} | {v['val_perplexity']:.2f} | {v['tokens_per_s']:,.0f} |"
        for k, v in results.items()
    ]
    entropy = next(iter(results.values()))["unigram_entropy"]
    table = "\n".join(
        [
            f"llama-tiny on the embedded corpus, {args.steps} steps, seed {args.seed}, galorex-train defaults "
            f"(unigram entropy of the corpus {entropy:.3f} nats)",
            "",
            "| optimizer | final validation loss | perplexity | tokens/s |",
            "| --- | ---: | ---: | ---: |",
            *rows,
        ]
    )
    data = {"env": _env(), "steps": args.steps, "results": results}
    _write(Path(args.out), "train_reference", table, data)
    return data


# Small sizes for --quick: everything end to end in well under a minute on 2 CPU cores.
QUICK = {
    "step": {"model": "llama-tiny", "rank": 16, "repeats": 3, "refresh_repeats": 1},
    "refresh": {"m": 256, "n": 512, "rank": 32, "repeats": 1},
    "memory": {"models": ["llama-tiny", "llama-60m"], "measure_up_to": 1_000_000},
    "train-reference": {"steps": 10},
    "layerwise-memory": {"model": "llama-tiny", "rank": 16, "batch_size": 2, "seq_len": 32, "steps": 1},
}
COMMANDS = {
    "step": bench_step,
    "refresh": bench_refresh,
    "memory": bench_memory,
    "train-reference": bench_train_reference,
    "layerwise-memory": bench_layerwise_memory,
}
QUICK["convergence"], COMMANDS["convergence"] = convergence_bench.QUICK, convergence_bench.bench_convergence
QUICK["halo"], COMMANDS["halo"] = halo_bench.QUICK, halo_bench.bench_halo
QUICK["basis"], COMMANDS["basis"] = basis_bench.QUICK, basis_bench.bench_basis
QUICK["hf-trainer"], COMMANDS["hf-trainer"] = hf_trainer_bench.QUICK, hf_trainer_bench.bench_hf_trainer
QUICK["peak-memory"], COMMANDS["peak-memory"] = peak_memory_bench.QUICK, peak_memory_bench.bench_peak_memory
QUICK["variants"], COMMANDS["variants"] = variants_bench.QUICK, variants_bench.bench_variants
QUICK["int8-linear"], COMMANDS["int8-linear"] = int8_linear_bench.QUICK, int8_linear_bench.bench_int8_linear


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Training settings for --quick runs of the training benchmarks (none otherwise)."""
    return {"batch_size": 4, "seq_len": 32, "eval_batches": 2} if getattr(args, "quick", False) else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m galorex.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # The common options go before or after the subcommand alike: each subcommand takes them too,
    # with no default of its own, so a value given after it overrides the one given before.
    common = argparse.ArgumentParser(add_help=False)
    for parser, default in ((p, None), (common, argparse.SUPPRESS)):
        parser.add_argument("--out", default=default or "bench-out", help="folder for the tables and JSON")
        parser.add_argument("--device", default=default or ("cuda" if torch.cuda.is_available() else "cpu"))
        parser.add_argument(
            "--quick",
            action="store_true",
            default=default or False,
            help="small sizes everywhere (a smoke run, not figures)",
        )
    sub = p.add_subparsers(dest="command", required=True)
    add_subparser = sub.add_parser

    def add_parser_with_common(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return add_subparser(name, parents=[common, *kwargs.pop("parents", [])], **kwargs)

    sub.add_parser = add_parser_with_common  # the benchmark modules register through it too
    sub.add_parser("all", help="every benchmark below, one after the other, into --out")
    s = sub.add_parser("step", help="median optimizer step time and state bytes")
    s.add_argument("--model", default="llama-60m", choices=sorted(MODEL_CONFIGS))
    s.add_argument("--rank", type=int, default=128)
    s.add_argument("--repeats", type=int, default=15)
    s.add_argument("--natural-history", type=int, default=8, help="NaturalGaLoreAdamW's s (0: leave it out)")
    s.add_argument("--gap", type=int, default=200, help="update_proj_gap for the amortised cost")
    s.add_argument("--refresh-repeats", type=int, default=3)
    s.add_argument(
        "--schedule-periods",
        type=int,
        default=0,
        help="also time every step of this many refresh periods, staggered vs together vs galore-torch (0: skip)",
    )
    s.add_argument("--schedule-gap", type=int, default=10, help="update_proj_gap of --schedule-periods")
    s.add_argument(
        "--rows",
        nargs="+",
        default=list(STEP_ROWS),
        choices=STEP_ROWS,
        help="galorex rows to time (default: all); torch AdamW, galore-torch and the floor always run",
    )
    r = sub.add_parser("refresh", help="exact vs randomized basis refresh")
    r.add_argument("--m", type=int, default=4096)
    r.add_argument("--n", type=int, default=11008)
    r.add_argument("--rank", type=int, default=512)
    r.add_argument("--oversample", type=int, default=16)
    r.add_argument("--power-iters", type=int, default=2)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--spectrum", nargs="+", default=["decaying", "flat"], choices=("decaying", "flat"))
    m = sub.add_parser("memory", help="optimizer state bytes of the paper's shapes")
    m.add_argument("--rank", type=int, default=128)
    m.add_argument("--models", nargs="+", default=["llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b"])
    m.add_argument("--measure-up-to", type=int, default=200_000_000, help="measure models up to this many parameters")
    t = sub.add_parser("train-reference", help="llama-tiny losses: AdamW, galorex GaLore, galore-torch")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="one learning rate for all three runs, so they compare like for like (default: 3e-3, "
        "the rate the README's table was measured at)",
    )
    convergence_bench.add_parser(sub)
    add_layerwise_arguments(
        sub.add_parser("layerwise-memory", help="peak memory of training steps with and without layer-wise updates")
    )
    halo_bench.add_parser(sub)
    basis_bench.add_parser(sub)
    hf_trainer_bench.add_parser(sub)
    peak_memory_bench.add_parser(sub)
    variants_bench.add_parser(sub)
    int8_linear_bench.add_parser(sub)
    args = p.parse_args(argv)
    commands = list(COMMANDS) if args.command == "all" else [args.command]
    for command in commands:
        sub_args = (
            args if command == args.command else p.parse_args(["--out", args.out, "--device", args.device, command])
        )
        sub_args.quick = args.quick
        sub_args.in_all = args.command == "all"  # optional benchmarks skip instead of failing `all`
        if args.quick:
            for key, value in QUICK[command].items():
                setattr(sub_args, key, value)
        COMMANDS[command](sub_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
