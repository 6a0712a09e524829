"""Time and profile the optimizer step of one Llama-7B decoder block's projected weights.

The seven weights of a block (q, k, v, o: 4096×4096; gate, up: 11008×4096; down: 4096×11008) in
bf16 with random gradients, under the issue-16 recipe's optimizer (GaLore at rank 1024, randomized
refresh, 8-bit moments, 4-bit bases). Prints the first step (which computes every basis), two
steady-state steps, an operator profile of a fourth, and the two projection GEMMs of the seven
shapes alone in float32 and bf16. Run: ``python docs/profile_7b_block.py`` (about 2 minutes and
2 GiB on a 2-core CPU).

``--proj-precision bf16`` runs the projections, back-projections and the refresh's GEMMs on bf16
operands (issue 27; emulated in float32 GEMMs where the CPU has no bf16 GEMM, which the script
says); ``--refresh-schedule staggered`` gives the seven matrices phases 0–6 of the gap, so steps
1–6 each refresh one of them (the first step still computes all seven).
"""

import argparse
import time

import torch
from torch import nn

from galorex.optim.factory import build_optimizer

HIDDEN, INTERMEDIATE, RANK = 4096, 11008, 1024


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name in "qkvo":
            setattr(self, name, nn.Linear(HIDDEN, HIDDEN, bias=False))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attn()
        self.mlp = MLP()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proj-precision", choices=("bf16",), default=None, help="default: float32 projections")
    parser.add_argument("--refresh-schedule", choices=("together", "staggered"), default="together")
    args = parser.parse_args()
    from galorex.projection import bf16_gemm_is_native

    native = bf16_gemm_is_native(torch.device("cpu"))
    print(f"proj_precision={args.proj_precision}, refresh_schedule={args.refresh_schedule}; this CPU's bf16 GEMM:")
    print("  native (oneDNN with AVX512-BF16 or AMX)" if native else "  none (bf16 projections run emulated)")
    torch.manual_seed(0)
    block = Block().to(torch.bfloat16)
    opt = build_optimizer(
        "galore",
        block,
        lr=1e-3,
        rank=RANK,
        update_proj_gap=200,
        scale=0.25,
        refresh_method="randomized",
        optim_bits=8,
        basis_bits=4,
        proj_precision=args.proj_precision,
        refresh_schedule=args.refresh_schedule,
    )

    def new_grads() -> None:
        for p in block.parameters():
            p.grad = torch.randn_like(p)

    times = []
    for _ in range(3):
        new_grads()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    later = ", ".join(f"{t:.2f}" for t in times[1:])
    print(f"step times (s): first (with the refresh) {times[0]:.2f}, then {later}")

    new_grads()
    with torch.profiler.profile() as prof:
        opt.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))

    for dtype in (torch.float32, torch.bfloat16):
        gemm_s = 0.0
        for p in block.parameters():
            g = torch.randn(p.shape, dtype=dtype)
            basis = torch.randn(HIDDEN, RANK, dtype=dtype)
            start = time.perf_counter()
            if g.shape[0] == HIDDEN:
                (basis @ (basis.mT @ g)).sum()
            else:
                ((g @ basis) @ basis.mT).sum()
            gemm_s += time.perf_counter() - start
        print(f"{dtype}: the two projection GEMMs of the seven weights: {gemm_s:.2f} s")


if __name__ == "__main__":
    main()
