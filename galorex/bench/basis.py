"""``python -m galorex.bench basis``: the error of 4- and 8-bit projection bases, with and without a
Hadamard rotation before quantising (``basis_bits``, ``basis_rotation``).

    python -m galorex.bench basis [--model llama-60m --rank 128 --steps 20 --batch-size 8 --seq-len 128]

Bases are computed as the optimizer computes them (``projection.compute_bases``, exact SVD, side
from ``proj_type="std"``, stored as (long side × rank), so the 64-entry code blocks run along the
rank) from three kinds of gradient: Gaussian (512 × 1376), Gaussian with eight rows ×100 (outlier
rows make the leading singular vectors spiky), and the real weight gradients of every projected
matrix of a Llama trained ``--steps`` AdamW steps on the embedded corpus. For each basis B and each
format it reports

- ``basis``: ‖B̂ − B‖_F / ‖B‖_F, B̂ the basis the optimizer decodes;
- ``proj``: ‖R̂ − R‖_F / ‖R‖_F for the projected gradient R = project(G, B), R̂ = project(G, B̂);
- the kurtosis E[b⁴]/E[b²]² of B's entries (3 for Gaussian entries; a spiky basis is far above).

Real gradients are grouped into the attention q/k/v projections (heavy-tailed bases) and the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from .. import projection as proj
from ..optim import state8bit
from .common import rel_error, warm_llama

FORMATS = [(4, False), (4, True), (8, False), (8, True)]
QUICK = {"model": "llama-tiny", "rank": 16, "steps": 2, "batch_size": 2, "seq_len": 32, "synthetic_shape": [64, 96]}


def add_parser(sub) -> None:
    b = sub.add_parser("basis", help="error of 4/8-bit projection bases with and without Hadamard rotation")
    b.add_argument("--model", default="llama-60m", help="model whose real gradients are measured")
    b.add_argument("--rank", type=int, default=128)
    b.add_argument("--steps", type=int, default=20, help="AdamW steps before the gradients are taken")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--synthetic-shape", type=int, nargs=2, default=[512, 1376], help="m n of the synthetic gradients")


def basis_errors(g: torch.Tensor, rank: int) -> dict[str, Any]:
    """Errors of every stored format for the basis of one gradient matrix ``g`` (float32)."""
    m, n = g.shape
    side = proj.projection_side("std", m, n)
    (basis,) = proj.compute_bases(g, rank, side)
    exact = proj.project(g, [basis], side)
    out: dict[str, Any] = {"kurtosis": float(basis.pow(4).mean() / basis.pow(2).mean().square())}
    for bits, rotated in FORMATS:
        decoded = state8bit.roundtrip_basis(basis, bits, rotated)
        key = f"{bits}{'h' if rotated else ''}"
        out[f"basis_{key}"] = rel_error(decoded, basis)
        out[f"proj_{key}"] = rel_error(proj.project(g, [decoded], side), exact)
    return out


def real_gradients(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The gradient of every attention/MLP weight of ``args.model`` after ``args.steps`` AdamW steps."""
    model, seq = warm_llama(args.model, args.batch_size, args.seq_len, args.steps, args.seed, lr=1e-3)
    _, loss = model(seq[:, :-1], seq[:, 1:])
    model.zero_grad()
    loss.backward()
    return {
        name: p.grad.detach().float().clone()
        for name, p in model.named_parameters()
        if p.dim() == 2 and (".attn." in name or ".mlp." in name)
    }


def _mean_rows(label: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in rows[0] if k != "name"]
    return {"data": label, "matrices": len(rows), **{k: statistics.fmean(r[k] for r in rows) for k in keys}}


def bench_basis(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    m, n = args.synthetic_shape
    gauss = torch.randn(m, n)
    outlier = torch.randn(m, n)
    outlier[:8] *= 100.0
    summary = [
        _mean_rows("gaussian", [basis_errors(gauss, args.rank)]),
        _mean_rows("gaussian, 8 rows ×100", [basis_errors(outlier, args.rank)]),
    ]
    grads = real_gradients(args)
    per_matrix = []
    for name, g in grads.items():
        per_matrix.append({"name": name, **basis_errors(g, args.rank)})
    qkv = [r for r in per_matrix if any(f".{k}_proj." in r["name"] for k in "qkv")]
    rest = [r for r in per_matrix if r not in qkv]
    for label, rows in ((f"{args.model} attn q/k/v", qkv), (f"{args.model} attn o + mlp", rest)):
        if rows:
            summary.append(_mean_rows(label, rows))
    header = (
        "| gradients | matrices | kurtosis | basis 4-bit | 4-bit rotated | basis 8-bit | 8-bit rotated "
        "| proj 4-bit | 4-bit rotated | proj 8-bit | 8-bit rotated |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in summary:
        cells = [f"{r[f'{kind}_{key}']:.4f}" for kind in ("basis", "proj") for key in ("4", "4h", "8", "8h")]
        lines.append(f"| {r['data']} | {r['matrices']} | {r['kurtosis']:.1f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    data = {
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, bool))},
        "summary": summary,
        "per_matrix": per_matrix,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "basis.md").write_text(table + "\n")
    (out / "basis.json").write_text(json.dumps(data, indent=1))
    print(table)
    print(f"wrote {out / 'basis.md'}", file=sys.stderr)
    return data
