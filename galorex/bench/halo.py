"""``python -m galorex.bench halo``: the error of HALO's quantised GEMMs, per level, format and scale.

For each data source — Gaussian X, W, E_Y; the same with outlier channels (a few input channels of
X and output channels of E_Y scaled ×20…×200); activations, weights and output gradients captured
from a real ``llama-tiny`` training step — and each of levels 0/1/2 × FP8/INT8 × per-tensor/per-row
scales, plus the quantise-once pipeline (``save_quantized=True``, per tensor), it reports the
relative error ‖Ŷ − Y‖/‖Y‖ of Y = XWᵀ, E_X = E_Y W and G = E_Yᵀ X against float64, on all entries
and on the normal channels only (outlier channels left out). A second table compares e4m3 and
e5m2 for the gradient operand; a third the ``proj_precision`` settings of the GaLore projection on
the same gradients; a fourth the bytes one layer saves for backward, with and without
``save_quantized``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..halo import HaloLinear
from ..lowp.projection import PROJ_PRECISIONS, project_lowprec
from .common import rel_error, warm_llama

LEVELS = (0, 1, 2)
FORMATS = ("fp8", "int8")
GRANULARITIES = ("tensor", "row")
OUTLIER_SCALES = (20.0, 50.0, 100.0, 200.0)


def add_parser(sub) -> None:
    h = sub.add_parser("halo", help="HALO quantisation error table (levels x formats x scales)")
    h.add_argument("--tokens", type=int, default=2048)
    h.add_argument("--in-features", type=int, default=512)
    h.add_argument("--out-features", type=int, default=512)
    h.add_argument("--outliers", type=int, default=8, help="outlier channels in X and in E_Y")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--llama-batch", type=int, default=16, help="batch of the captured llama-tiny step (x 128 tokens)")
    h.add_argument("--llama-steps", type=int, default=30, help="AdamW steps on llama-tiny before the capture")


QUICK = {"tokens": 128, "in_features": 64, "out_features": 32, "outliers": 2, "llama_batch": 2, "llama_steps": 2}


def _synthetic(tokens: int, k: int, n: int, outliers: int, seed: int, with_outliers: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    ey = torch.randn(tokens, n, generator=g)
    out_in = out_out = torch.zeros(0, dtype=torch.long)
    if with_outliers:
        mags = torch.tensor(OUTLIER_SCALES).repeat((outliers + 3) // 4)[:outliers]
        out_in = torch.randperm(k, generator=g)[:outliers]
        out_out = torch.randperm(n, generator=g)[:outliers]
        x[:, out_in] *= mags
        ey[:, out_out] *= mags
    return {"x": x, "w": w, "ey": ey, "outlier_in": out_in, "outlier_out": out_out}


def _outlier_channels(t: torch.Tensor, ratio: float = 6.0) -> torch.Tensor:
    """Columns whose RMS is more than ``ratio`` × the median column RMS."""
    rms = t.double().square().mean(0).sqrt()
    return torch.nonzero(rms > ratio * rms.median().clamp_min(1e-30)).flatten()


def capture_llama(batch: int, seed: int, steps: int = 30) -> list[dict[str, Any]]:
    """X, W and E_Y of a few linear layers of llama-tiny after ``steps`` training steps (real text)."""
    model, seq = warm_llama("llama-tiny", batch, 128, steps, seed, lr=3e-3)
    names = ["layers.0.attn.q_proj", "layers.3.attn.o_proj", "layers.1.mlp.gate_proj", "layers.3.mlp.down_proj"]
    captured: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name in names:
        module = _find(model, name)
        captured[name] = {}

        def fwd(mod, inp, out, name=name):
            captured[name]["x"] = inp[0].detach().reshape(-1, inp[0].shape[-1]).clone()

        def bwd(mod, gin, gout, name=name):
            captured[name]["ey"] = gout[0].detach().reshape(-1, gout[0].shape[-1]).clone()

        hooks += [module.register_forward_hook(fwd), module.register_full_backward_hook(bwd)]
        captured[name]["w"] = module.weight.detach().clone()
    _, loss = model(seq[:, :-1], seq[:, 1:])
    loss.backward()
    for h in hooks:
        h.remove()
    out = []
    for name, c in captured.items():
        # The loss is a mean over tokens: scale E_Y back to per-token size (errors are relative anyway).
        out.append(
            {
                "name": name,
                "x": c["x"],
                "w": c["w"],
                "ey": c["ey"],
                "outlier_in": _outlier_channels(c["x"]),
                "outlier_out": _outlier_channels(c["ey"]),
            }
        )
    return out


def _find(model: torch.nn.Module, name: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    # Model layouts differ in naming; take the module whose name ends like the one asked for.
    tail = name.split(".", 2)[-1]
    index = name.split(".")[1]
    for key, mod in modules.items():
        if key.endswith(tail) and f".{index}." in f".{key}.":
            return mod
    raise KeyError(name)


def _keep(n: int, drop: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[drop] = False
    return mask


def layer_errors(
    case: dict[str, Any],
    level: int,
    fmt: str,
    granularity: str,
    grad_fp8: str = "e4m3",
    save_quantized: bool = False,
) -> dict[str, float]:
    x, w, ey = case["x"], case["w"], case["ey"]
    n, k = w.shape
    layer = HaloLinear(
        k,
        n,
        bias=False,
        level=level,
        fmt=fmt,
        granularity=granularity,
        grad_fp8=grad_fp8,
        save_quantized=save_quantized,
    )
    with torch.no_grad():
        layer.weight.copy_(w)
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    y.backward(ey)
    x64, w64, e64 = x.double(), w.double(), ey.double()
    y64, ex64, g64 = x64 @ w64.T, e64 @ w64, e64.T @ x64
    keep_in, keep_out = _keep(k, case["outlier_in"]), _keep(n, case["outlier_out"])
    return {
        "Y": rel_error(y.detach(), y64),
        "E_X": rel_error(xr.grad, ex64),
        "G": rel_error(layer.weight.grad, g64),
        "Y normal": rel_error(y.detach()[:, keep_out], y64[:, keep_out]),
        "E_X normal": rel_error(xr.grad[:, keep_in], ex64[:, keep_in]),
        "G normal": rel_error(layer.weight.grad[keep_out][:, keep_in], g64[keep_out][:, keep_in]),
    }


def saved_bytes(module: torch.nn.Module, *inputs: Any) -> int:
    """Bytes of the tensors one forward of ``module`` saves for backward, beyond its own parameters
    and buffers (which exist anyway): distinct storages, counted once."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(seen.values())


def memory_rows(tokens: int, k: int, n: int, llama_batch: int, seed: int) -> list[dict[str, Any]]:
    """Saved-for-backward bytes, default pipeline (per tensor) against ``save_quantized``, INT8 (FP8
    stores as many bytes), float32 and bfloat16 input and weights: of one HaloLinear at each level,
    and of a whole llama-tiny forward (every linear layer but the head converted) at levels 0 and 2."""
    from ..halo import convert_to_halo
    from ..models.llama import Llama, get_config

    rows = []
    g = torch.Generator().manual_seed(seed)
    tokens_in = torch.randint(0, 256, (llama_batch, 128), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(tokens, k, generator=g).to(dtype).requires_grad_(True)
        for what, levels in (("one layer", LEVELS), ("llama-tiny", (0, 2))):
            for level in levels:
                got = {}
                for saved in (False, True):
                    kw = {"level": level, "fmt": "int8", "granularity": "tensor", "save_quantized": saved}
                    if what == "one layer":
                        got[saved] = saved_bytes(HaloLinear(k, n, dtype=dtype, **kw), x)
                    else:
                        torch.manual_seed(seed)
                        model = Llama(get_config("llama-tiny")).to(dtype)
                        convert_to_halo(model, **kw)
                        got[saved] = saved_bytes(model, tokens_in, tokens_in)
                rows.append(
                    {
                        "what": what,
                        "dtype": str(dtype).removeprefix("torch."),
                        "level": level,
                        "default": got[False],
                        "save_quantized": got[True],
                        "ratio": got[True] / got[False],
                    }
                )
    return rows


def projection_errors(g: torch.Tensor, rank: int) -> dict[str, float]:
    from .. import projection as proj

    side = proj.projection_side("std", *g.shape)
    bases = proj.compute_bases(g.float(), rank, side)
    exact = proj.project(g.double(), [b.double() for b in bases], side)
    return {p: rel_error(project_lowprec(g.float(), bases, side, p), exact) for p in PROJ_PRECISIONS}


def bench_halo(args: argparse.Namespace) -> dict[str, Any]:
    from . import common as bench_main

    torch.manual_seed(args.seed)
    sources: dict[str, list[dict[str, Any]]] = {
        "gaussian": [_synthetic(args.tokens, args.in_features, args.out_features, args.outliers, args.seed, False)],
        "outlier channels": [
            _synthetic(args.tokens, args.in_features, args.out_features, args.outliers, args.seed, True)
        ],
        "llama-tiny step": capture_llama(args.llama_batch, args.seed, args.llama_steps),
    }
    cols = ("Y", "E_X", "G", "Y normal", "E_X normal", "G normal")
    results: list[dict[str, Any]] = []
    # (granularity, save_quantized): the quantise-once pipeline exists per tensor only.
    scales = [(gran, False) for gran in GRANULARITIES] + [("tensor", True)]
    for source, cases in sources.items():
        for fmt in FORMATS:
            for gran, saved in scales:
                for level in LEVELS:
                    errs = [layer_errors(c, level, fmt, gran, save_quantized=saved) for c in cases]
                    mean = {col: sum(e[col] for e in errs) / len(errs) for col in cols}
                    results.append(
                        {
                            "data": source,
                            "fmt": fmt,
                            "granularity": gran,
                            "save_quantized": saved,
                            "level": level,
                            **mean,
                        }
                    )
    grad_rows: list[dict[str, Any]] = []
    for source, cases in sources.items():
        for gran in GRANULARITIES:
            for grad_fp8 in ("e4m3", "e5m2"):
                errs = [layer_errors(c, 2, "fp8", gran, grad_fp8) for c in cases]
                grad_rows.append(
                    {
                        "data": source,
                        "granularity": gran,
                        "grad_fp8": grad_fp8,
                        **{col: sum(e[col] for e in errs) / len(errs) for col in ("E_X", "G")},
                    }
                )
    proj_rows: list[dict[str, Any]] = []
    for source, cases in sources.items():
        grads = [(c["ey"].double().T @ c["x"].double()).float() for c in cases]
        rank = max(1, min(32, min(grads[0].shape) // 4))
        errs = [projection_errors(gr, rank) for gr in grads]
        proj_rows.append(
            {"data": source, "rank": rank, **{p: sum(e[p] for e in errs) / len(errs) for p in PROJ_PRECISIONS}}
        )

    llama_names = ", ".join(c["name"] for c in sources["llama-tiny step"])
    head = [
        f"Relative error ‖·−exact‖/‖exact‖ against float64 (mean over layers for llama-tiny); "
        f"synthetic: {args.tokens} tokens × {args.in_features} → {args.out_features}, {args.outliers} outlier "
        f"channels in X and E_Y (×{', ×'.join(f'{s:g}' for s in OUTLIER_SCALES)}); llama-tiny: {llama_names} "
        f"after {args.llama_steps} AdamW steps, batch {args.llama_batch} × 128; FP8 = e4m3 everywhere; "
        f"'normal' leaves the "
        "outlier channels out (llama: channels whose RMS > 6× the median). Scale 'tensor, saved': "
        "save_quantized=True (X, W, E_Y quantised once per tensor, the 8-bit X R_K and W R_K reused "
        "transposed in backward).",
        "",
        "| data | format | scale | level | Y | E_X | G | Y normal | E_X normal | G normal |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [
        f"| {r['data']} | {r['fmt']} | {r['granularity']}{', saved' if r['save_quantized'] else ''} | {r['level']} | "
        + " | ".join(f"{r[c]:.4f}" for c in cols)
        + " |"
        for r in results
    ]
    grad_table = [
        "",
        "FP8 format of the gradient operand E_Y (level 2; X and W in e4m3):",
        "",
        "| data | scale | E_Y format | E_X | G |",
        "| --- | --- | --- | ---: | ---: |",
        *[f"| {r['data']} | {r['granularity']} | {r['grad_fp8']} | {r['E_X']:.4f} | {r['G']:.4f} |" for r in grad_rows],
    ]
    proj_table = [
        "",
        "GaLore projection R = Pᵀ G (or G Q) with `proj_precision`, G = E_Yᵀ X of the data above, "
        "P its top-r singular vectors, per-row scales:",
        "",
        "| data | rank | " + " | ".join(PROJ_PRECISIONS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in PROJ_PRECISIONS) + " |",
        *[
            f"| {r['data']} | {r['rank']} | " + " | ".join(f"{r[p]:.4f}" for p in PROJ_PRECISIONS) + " |"
            for r in proj_rows
        ],
    ]
    mem_rows = memory_rows(args.tokens, args.in_features, args.out_features, args.llama_batch, args.seed)
    mem_table = [
        "",
        f"Bytes saved for backward beyond the parameters, default pipeline against save_quantized (INT8, "
        f"per tensor; FP8 the same): one layer, {args.tokens} tokens × {args.in_features} → {args.out_features}; "
        f"a llama-tiny forward (every linear layer but the head converted), batch {args.llama_batch} × 128:",
        "",
        "| what | input and weights | level | default | save_quantized | ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *[
            f"| {r['what']} | {r['dtype']} | {r['level']} | {r['default']:,} | {r['save_quantized']:,} "
            f"| {r['ratio']:.3f} |"
            for r in mem_rows
        ],
    ]
    table = "\n".join(head + rows + grad_table + proj_table + mem_table)
    data = {
        "env": bench_main._env(),
        "args": {k: v for k, v in vars(args).items() if not callable(v)},
        "layer": results,
        "grad_format": grad_rows,
        "projection": proj_rows,
        "saved_bytes": mem_rows,
    }
    bench_main._write(Path(args.out), "halo", table, data)
    return data


if __name__ == "__main__":  # pragma: no cover
    # `python -m galorex.bench.halo ...` is `python -m galorex.bench halo ...`: run that program.
    import runpy
    import sys

    sys.argv = [sys.argv[0], "halo", *sys.argv[1:]]
    runpy.run_module("galorex.bench", run_name="__main__", alter_sys=True)
