"""Symmetric against asymmetric group-wise INT8 weight codes: the error each leaves on real weights.

    python docs/int8_weight_error.py [--group-size 256]

Symmetric (galorex.weights.codes): s = ⌈max|W_g|/127⌉_bf16, q ∈ [−127, 127], W ≈ q·s — 1 + 4/g bytes
an element. Asymmetric (min/max): s = (max − min)/255, z = min, q ∈ [0, 255], W ≈ z + q·s — 1 + 8/g
bytes an element. Both rounded to nearest. Measured on the attention and MLP weights of llama-tiny
after 300 AdamW steps on the embedded corpus (lr 3e-3), of llama-60m at its initialisation
(N(0, 0.02), the shrunk residual projections included), and on one 4096 × 11008 N(0, 0.02) matrix
(a Llama-7B MLP weight at initialisation): the relative Frobenius error ‖Ŵ − W‖/‖W‖ over all of a
model's quantised weights, and the largest relative error of one weight.
"""

from __future__ import annotations

import argparse

import torch

from galorex.bench.common import warm_llama
from galorex.models.llama import build_llama, get_config
from galorex.weights import codes as C
from galorex.weights.convert import quantized_linear_names


def symmetric(w: torch.Tensor, g: int) -> torch.Tensor:
    codes, scales = C.quantize(w, g)
    return C.dequantize(codes, scales, g, torch.float64)


def asymmetric(w: torch.Tensor, g: int) -> torch.Tensor:
    groups = w.double().reshape(-1, g)
    lo, hi = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    s = ((hi - lo) / 255).clamp_min(1e-300)
    q = torch.round((groups - lo) / s).clamp(0, 255)
    return (lo + q * s).reshape(w.shape)


def errors(weights: list[torch.Tensor], g: int) -> dict[str, tuple[float, float]]:
    out = {}
    for name, fn in (("symmetric", symmetric), ("asymmetric", asymmetric)):
        num = den = worst = 0.0
        for w in weights:
            e = float((fn(w, g) - w.double()).norm() ** 2)
            n = float(w.double().norm() ** 2)
            num, den, worst = num + e, den + n, max(worst, (e / n) ** 0.5)
        out[name] = ((num / den) ** 0.5, worst)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group-size", type=int, default=256)
    g = p.parse_args().group_size
    torch.set_num_threads(2)
    trained, _ = warm_llama("llama-tiny", batch=16, seq_len=128, steps=300, seed=0, lr=3e-3)
    init60 = build_llama(get_config("llama-60m"), seed=0)
    cases = {}
    for label, model in (("llama-tiny, 300 AdamW steps", trained), ("llama-60m, initialisation", init60)):
        modules = dict(model.named_modules())
        cases[label] = [modules[n].weight.detach() for n in quantized_linear_names(model)]
    cases["4096 × 11008, N(0, 0.02)"] = [torch.randn(4096, 11008, generator=torch.Generator().manual_seed(0)) * 0.02]
    print(f"Relative Frobenius error of INT8 codes in groups of {g} (all quantised weights; worst single weight)")
    print()
    print("| weights | symmetric (1 + 4/g bytes) | asymmetric (1 + 8/g bytes) |")
    print("| --- | ---: | ---: |")
    for label, weights in cases.items():
        e = errors(weights, g)
        cells = [f"{e[k][0]:.5f} (worst {e[k][1]:.5f})" for k in ("symmetric", "asymmetric")]
        print(f"| {label} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
