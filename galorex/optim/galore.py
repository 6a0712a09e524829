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

from .. import projection as proj
from .base import (
    EXP_AVG,
    EXP_AVG_SQ,
    STEP,
    CompileOption,
    LowRankOptimizer,
    _eight_bit,
    hyperparameter,
    load_bases,
    load_moment,
    store_moment,
)

Scalar = float | torch.Tensor


def adam_directions(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    bias_steps: list[int] | list[torch.Tensor],
    beta1: Scalar,
    beta2: Scalar,
    eps: Scalar,
    eps_mode: str = "torch",
) -> list[torch.Tensor]:
    """Update the moments in place and return Adam's directions for a list of tensors at once.

    ``eps_mode="torch"``: m̂ / (√v̂ + ε), ε after the bias correction of √v, as in the GaLore
    paper's Algorithm 1 and torch.optim.AdamW. ``eps_mode="galore_torch"``:
    (√(1−β₂ᵗ)/(1−β₁ᵗ))·m / (√v + ε), as galore-torch (and transformers' AdamW) compute it.

    Steps and hyperparameters may be 0-dim tensors (a compiled step): the same maths then runs as
    tensor arithmetic, with the bias corrections in float64, and never reads a value on the host.
    """
    if any(isinstance(x, torch.Tensor) for x in (beta1, beta2, eps, *bias_steps)):
        return _adam_directions_tensor(grads, exp_avgs, exp_avg_sqs, bias_steps, beta1, beta2, eps, eps_mode)
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


def _adam_directions_tensor(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    bias_steps: list[int] | list[torch.Tensor],
    beta1: Scalar,
    beta2: Scalar,
    eps: Scalar,
    eps_mode: str,
) -> list[torch.Tensor]:
    directions = []
    for g, m, v, step in zip(grads, exp_avgs, exp_avg_sqs, bias_steps):
        t = torch.as_tensor(step, dtype=torch.float64)
        m.add_((g - m) * (1.0 - beta1))  # m ← lerp(m, g, 1 − β₁)
        v.mul_(beta2).add_(g * g * (1.0 - beta2))
        b1 = torch.as_tensor(beta1, dtype=torch.float64)
        b2 = torch.as_tensor(beta2, dtype=torch.float64)
        bias1 = 1.0 - b1**t
        bias2_sqrt = (1.0 - b2**t).sqrt()
        if eps_mode == "torch":
            directions.append(m / ((v.sqrt() / bias2_sqrt.to(v.dtype)) + eps) / bias1.to(m.dtype))
        else:
            directions.append(m / (v.sqrt() + eps) * (bias2_sqrt / bias1).to(m.dtype))
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

    - ``basis_bits`` (32): 4 or 8 stores each basis in 4 or 8 bits (symmetric codes, one float32
      scale per 64 entries; Q-GaLore keeps its projections in 4 bits) and dequantises it on use; the
      basis is then only approximately orthonormal (entries within half a code step).

    - ``basis_rotation`` (False): with ``basis_bits`` 4 or 8, quantise the basis after a block
      Hadamard rotation of its last dimension (blocks ≤ 64) and rotate back on use, so a spiky
      block does not set a coarse code step for the rest (``state8bit.rotate_basis``). Measured
      (``python -m galorex.bench basis``, docs/benchmarks.md): it brings spiky bases down to the
      Gaussian floor (4-bit error 0.108–0.120 → 0.107 on Llama-60M's heavy-tailed ones) but the
      error of the projected gradient moves either way, and llama-tiny training was no better, so
      it is off by default. The Hadamard blocks are the largest power of two dividing the rank, at
      most 64: an odd rank is not rotated at all, rank 40 in blocks of 8.

    - ``proj_precision`` (None), group key only: ``"fp8"``, ``"int8"``, ``"fp8-hadamard"`` or
      ``"int8-hadamard"`` runs the projection GEMM on quantised operands (per-row scales), with a
      Hadamard rotation of its inner dimension for ``-hadamard`` (``galorex.lowp.projection``).

    Weight decay is decoupled and applied to the full weight.

    ``lr``, ``weight_decay``, ``betas`` and ``eps`` may be 0-dim tensors (``lr=torch.tensor(1e-3)``),
    which ``torch.optim.lr_scheduler`` schedulers update in place; eagerly the run is the same as with
    their values as floats. ``compile=True`` (or a dict of ``torch.compile`` options, e.g.
    ``{"backend": "aot_eager"}``) compiles the numeric update of the projected parameters with
    ``fullgraph=True`` — no host synchronisation inside it — while the refresh schedule and the SVD
    stay on the host; with a tensor ``lr`` a scheduler's changes do not recompile it. Each group is
    its own graph (dynamo's ``cache_size_limit``, 8 by default, bounds how many); unprojected
    parameters keep torch's fused AdamW kernel.

    Layer-wise updates (the GaLore paper's per-layer weight update, §4.2), constructor arguments
    shared by every galorex optimizer:

    - ``layerwise`` (False): step each parameter from a ``register_post_accumulate_grad_hook`` as
      soon as backward() has accumulated its gradient, then free that gradient, so the gradients
      of the whole model never exist at once. ``step()`` is then a no-op kept for LR schedulers
      and training loops (``step(closure)`` raises); schedulers work as usual, since each hook
      reads its group's current ``lr``.
    - ``accumulation_steps`` (1, layer-wise only): step on every k-th backward of a parameter;
      gradients accumulate in ``.grad`` in between, as in the normal mode with ``step()`` every k
      backward passes (scale the loss by 1/k yourself, as usual).
    - ``per_param_grad_clip`` (None, layer-wise only): clip each parameter's gradient to this
      norm before its step. Global-norm clipping (``clip_grad_norm_`` over the model) is
      impossible in this mode: the first parameters are stepped before the last gradients exist.

    Not supported with ``layerwise=True`` (each raises a clear error): ``step(closure)``,
    gradients set by hand instead of by backward(), sparse or complex gradients (as in the normal
    mode), FSDP2 (DTensor) parameters, ``state_dict()`` in the middle of an accumulation.
    Do not wrap the model in DDP (its hooks would fire before DDP's all-reduce, and DDP's buckets
    hold every gradient anyway); average gradients across ranks with
    :meth:`set_layerwise_grad_reducer` instead, as ``galorex-train --distributed ddp --layerwise`` does.
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
        basis_rotation: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        compile: CompileOption = False,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        per_param_grad_clip: float | None = None,
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
            basis_rotation=basis_rotation,
            foreach=foreach,
            fused=fused,
        )
        # Subclasses add their own group keys (set before calling this constructor).
        defaults.update(getattr(self, "_extra_defaults", {}))
        super().__init__(
            params,
            defaults,
            compile=compile,
            layerwise=layerwise,
            accumulation_steps=accumulation_steps,
            per_param_grad_clip=per_param_grad_clip,
        )

    def _lowrank_directions(self, group, params, lows, states):
        beta1, beta2 = group["betas"]
        exp_avgs = [load_moment(s, EXP_AVG) for s in states]
        exp_avg_sqs = [load_moment(s, EXP_AVG_SQ) for s in states]
        directions = adam_directions(
            lows,
            exp_avgs,
            exp_avg_sqs,
            [self._bias_step(group, s) for s in states],
            hyperparameter(beta1),
            hyperparameter(beta2),
            hyperparameter(group["eps"]),
            group["eps_mode"],
        )
        if _eight_bit(group):
            for s, m, v in zip(states, exp_avgs, exp_avg_sqs):
                store_moment(s, EXP_AVG, m, True)
                store_moment(s, EXP_AVG_SQ, v, True)
        return directions

    # ------------------------------------------------------- the fused Triton path
    def _lowrank_update(self, group: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Where ``triton_kernels.select_backend`` picks Triton for op ``galore_adam_step`` (on
        CUDA only with ``GALOREX_BACKEND=triton`` until a GPU run has shown it correct and faster),
        plain 32-bit GaLore groups take ``triton_kernels.fused_galore_adam_step``: the moments are
        updated in place and D = M̂/(√V̂+ε) is formed tile by tile inside the GEMM that writes W, so the normalised update
        never exists in full. Everything else (8-bit state, 4-bit bases, ``proj_precision``,
        galore-torch's ε placement, tensor hyperparameters, a compiled step, ``full`` projection,
        subclasses with another inner rule) takes the shared path, which the fused one equals to
        fp32 rounding (tests/test_galore_fused.py)."""
        if not self._fused_path_applies(group, items):
            return super()._lowrank_update(group, items)
        from triton_kernels import fused_galore_adam_step

        beta1, beta2 = group["betas"]
        for it in items:
            p = it["param"]
            state = it["state"] if "state" in it else self.state[p]
            (basis,) = load_bases(state, it["side"], p, group["rank"])
            low = proj.project(self._gradient_matrix(group, p, it.get("grad")), [basis], it["side"])
            state[STEP] += 1
            fused_galore_adam_step(
                proj.as_matrix(p),
                low,
                state[EXP_AVG],
                state[EXP_AVG_SQ],
                basis,
                it["side"],
                step=self._bias_step(group, state),
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                scale=float(group["scale"]),
            )

    def _fused_path_applies(self, group: dict[str, Any], items: list[dict[str, Any]]) -> bool:
        cls = type(self)
        if (
            cls._lowrank_directions is not GaLoreAdamW._lowrank_directions
            or cls._gradient_matrix is not LowRankOptimizer._gradient_matrix
            or cls._apply_lowrank_update is not LowRankOptimizer._apply_lowrank_update
            or getattr(self, "_compile_options", None) is not None
            or group["eps_mode"] != "torch"
            or _eight_bit(group)
            or group.get("basis_bits", 32) != 32
            or group.get("proj_precision") is not None
        ):
            return False
        hyper = (group["lr"], group["weight_decay"], group["eps"], group["scale"], *group["betas"])
        if any(isinstance(h, torch.Tensor) for h in hyper):
            return False
        from triton_kernels.dispatch import select_backend

        for it in items:
            p = it["param"]
            state = it["state"] if "state" in it else self.state[p]
            if (
                it["side"] not in ("left", "right")
                or not p.is_contiguous()
                or p.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                or state[EXP_AVG].dtype != torch.float32
                or select_backend(p.device, "galore_adam_step") != "triton"
            ):
                return False
        return True
