"""GaLoreAdamW's low-rank Adam directions written into fresh tensors (before) or into the projected
gradients' own buffers (after, ``adam_directions(out=...)``), against the step bench's floor.

One process, Llama-350M shapes at rank 256 by default, ``fused=True`` for the unprojected
parameters (as the floor). For each of the three: the self time per call of ``aten::sqrt`` and
``aten::div`` in one profiled step, then the steps timed in interleaved rounds (the order
reversed every other round) with the median over rounds of each one's time over the floor's.
Run: ``python docs/profile_lowrank_directions.py [--model llama-350m --rank 256 --rounds 8]``.
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from galorex.bench.__main__ import _ArithmeticFloor
from galorex.models.llama import Llama, get_config
from galorex.optim import GaLoreAdamW, galore_param_groups
from galorex.optim.rules.adam import AdamRule, adam_coefficients
from galorex.optim.rules.base import Step


class FreshDirectionsRule(AdamRule):
    """The Adam rule as it was before: directions in new tensors."""

    def steps(self, group, params, weights, lows, states):
        decay, alpha = adam_coefficients(group)
        return [Step(d, decay, alpha) for d in self.directions(group, lows, states)]


class FreshDirectionsGaLoreAdamW(GaLoreAdamW):
    rule = FreshDirectionsRule()


def per_call_us(opt, set_grads) -> dict[str, float]:
    set_grads()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    events = {e.key: e for e in prof.key_averages()}
    return {op: events[op].self_cpu_time_total / events[op].count for op in ("aten::sqrt", "aten::div")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-350m")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Llama(get_config(args.model))
    grads = {p: torch.randn_like(p) * 1e-3 for p in model.parameters()}

    def set_grads():
        for p, g in grads.items():
            p.grad = g.clone()

    groups = lambda: galore_param_groups(model, rank=args.rank, update_proj_gap=10**9, scale=0.25)
    runs = {
        "before (fresh tensors)": FreshDirectionsGaLoreAdamW(groups(), lr=1e-3, fused=True),
        "after (out=lows)": GaLoreAdamW(groups(), lr=1e-3, fused=True),
        "floor": _ArithmeticFloor(groups()),
    }
    for opt in runs.values():  # warm-up, with the first step's refresh
        for _ in range(2):
            set_grads()
            opt.step()
    for name, opt in runs.items():
        us = per_call_us(opt, set_grads)
        print(f"{name}: aten::sqrt {us['aten::sqrt']:.0f} us/call, aten::div {us['aten::div']:.0f} us/call")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            set_grads()
            start = time.perf_counter()
            runs[name].step()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times["floor"]))
        print(f"{name}: median step {statistics.median(ts) * 1e3:.0f} ms, {ratio:.2f}x the floor (per round)")


if __name__ == "__main__":
    main()
