"""GaLoreAdamW: Adam inside a low-rank gradient subspace (Zhao et al., 2024, "GaLore:
Memory-Efficient LLM Training by Gradient Low-Rank Projection").

    R_t = project(G_t, P),  M_t = β₁M + (1−β₁)R_t,  V_t = β₂V + (1−β₂)R_t²
    W ← (1 − lr·wd)·W − lr·scale·project_back( M̂_t / (√V̂_t + ε), P )
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .base import EXP_AVG, EXP_AVG_SQ, LowRankOptimizer, _eight_bit, load_moment, store_moment


def adam_directions(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    bias_steps: list[int],
    beta1: float,
    beta2: float,
    eps: float,
    eps_mode: str = "torch",
) -> list[torch.Tensor]:
    """Update the moments in place and return Adam's directions for a list of tensors at once.

    ``eps_mode="torch"``: m̂ / (√v̂ + ε), ε after the bias correction of √v, as in the GaLore
    paper's Algorithm 1 and torch.optim.AdamW. ``eps_mode="galore_torch"``:
    (√(1−β₂ᵗ)/(1−β₁ᵗ))·m / (√v + ε), as galore-torch (and transformers' AdamW) compute it.
    """
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bias1 = [1.0 - beta1**s for s in bias_steps]
    bias2_sqrt = [math.sqrt(1.0 - beta2**s) for s in bias_steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if eps_mode == "torch":
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        directions = torch._foreach_div(exp_avgs, denom)
        torch._foreach_div_(directions, bias1)
    else:
        torch._foreach_add_(denom, eps)
        directions = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(directions, [b2 / b1 for b1, b2 in zip(bias1, bias2_sqrt)])
    return directions


class GaLoreAdamW(LowRankOptimizer):
    """Drop-in ``torch.optim.AdamW`` that keeps Adam's state in a low-rank gradient subspace.

    Parameter groups use galore-torch's keys: a group with ``rank`` projects every parameter of
    ≥ 2 dimensions (viewed as (shape[0], rest)); a group without it is plain AdamW, as are 1-D
    parameters. Group keys and their defaults:

    - ``rank``: subspace rank r, clipped to min(m, n). No default: absent means AdamW.
    - ``update_proj_gap`` (200): steps between basis refreshes (refresh at steps 0, T, 2T, …).
    - ``scale`` (1.0): multiplies the projected-back update (galore-torch's ``scale``; the paper
      uses 0.25).
    - ``proj_type`` ("std"): ``std`` projects the smaller dimension of G away (right when m ≥ n),
      ``reverse_std`` the larger one, ``left``/``right`` always that side, ``full`` both sides.
    - ``refresh_method`` ("svd"): ``svd`` exact; ``randomized`` a range finder with ``oversample``
      (16) extra columns and ``power_iters`` (2) power iterations, seeded by ``refresh_seed`` (0),
      the parameter and the step, so a resumed run draws the same bases.
    - ``moment_policy`` ("keep"): what the Adam moments do at a refresh — ``keep`` them as they are
      (galore-torch), ``reset`` them to zero (bias correction restarts), or ``reproject`` them into
      the new basis.

    - ``eps_mode`` ("torch"): where ε enters. ``torch`` follows the GaLore paper's Algorithm 1 and
      ``torch.optim.AdamW``: m̂/(√v̂ + ε), and decay W ← (1 − lr·wd)W before the update.
      ``galore_torch`` reproduces galore-torch 1.0 exactly: (√(1−β₂ᵗ)/(1−β₁ᵗ))·m/(√v + ε) — an ε
      effectively 1/√(1−β₂ᵗ) times larger early in training — and decay applied after the update,
      for every parameter of the group, projected or not. Use it to continue a galore-torch run.

    - ``optim_bits`` (32): 8 stores Adam's moments block-wise in 8 bits (``state8bit``: per-block
      absmax scales, non-linear codes, √v for the second moment; tensors under 4096 elements stay
      float32), for projected and unprojected parameters alike. Unprojected parameters then use a
      foreach AdamW instead of torch's fused kernel.

    - ``basis_bits`` (32): 4 stores each basis in 4 bits (symmetric codes, one float32 scale per 64
      entries, as Q-GaLore does) and dequantises it on use; the basis is then only approximately
      orthonormal (entries within half a code step).

    - ``proj_precision`` (None), group key only: ``"fp8"``, ``"int8"``, ``"fp8-hadamard"`` or
      ``"int8-hadamard"`` runs the projection GEMM on quantised operands (per-row scales), with a
      Hadamard rotation of its inner dimension for ``-hadamard`` (``galorex.halo.projection``).

    Weight decay is decoupled and applied to the full weight.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        refresh_method: str = "svd",
        moment_policy: str = "keep",
        oversample: int = 16,
        power_iters: int = 2,
        refresh_seed: int = 0,
        eps_mode: str = "torch",
        optim_bits: int = 32,
        basis_bits: int = 32,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            refresh_method=refresh_method,
            moment_policy=moment_policy,
            oversample=oversample,
            power_iters=power_iters,
            refresh_seed=refresh_seed,
            eps_mode=eps_mode,
            optim_bits=optim_bits,
            basis_bits=basis_bits,
            foreach=foreach,
            fused=fused,
        )
        # Subclasses add their own group keys (set before calling this constructor).
        defaults.update(getattr(self, "_extra_defaults", {}))
        super().__init__(params, defaults)

    def _lowrank_directions(self, group, params, lows, states):
        beta1, beta2 = group["betas"]
        exp_avgs = [load_moment(s, EXP_AVG) for s in states]
        exp_avg_sqs = [load_moment(s, EXP_AVG_SQ) for s in states]
        directions = adam_directions(
            lows,
            exp_avgs,
            exp_avg_sqs,
            [self._bias_step(group, s) for s in states],
            float(beta1),
            float(beta2),
            float(group["eps"]),
            group["eps_mode"],
        )
        if _eight_bit(group):
            for s, m, v in zip(states, exp_avgs, exp_avg_sqs):
                store_moment(s, EXP_AVG, m, True)
                store_moment(s, EXP_AVG_SQ, v, True)
        return directions
