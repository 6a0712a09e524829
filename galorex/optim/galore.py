"""GaLoreAdamW: Adam inside a low-rank gradient subspace (Zhao et al., 2024, "GaLore:
Memory-Efficient LLM Training by Gradient Low-Rank Projection") — the step loop
(``lowrank.LowRankOptimizer``) with the Adam rule (``rules.adam.AdamRule``).

    R_t = project(G_t, P),  M_t = β₁M + (1−β₁)R_t,  V_t = β₂V + (1−β₂)R_t²
    W ← (1 − lr·wd)·W − lr·scale·project_back( M̂_t / (√V̂_t + ε), P )
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .adam_math import adam_directions
from .config import CompileOption, refuse_unsupported_flags
from .lowrank import LowRankOptimizer
from .rules.adam import AdamRule


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
    - ``refresh_schedule`` ("together"): ``together`` refreshes every basis of the group at steps
      0, T, 2T, … (galore-torch); ``staggered`` gives each matrix its own phase φ and refreshes it
      at the steps t ≡ φ (mod T), the phases spread over T by refresh cost so that each step
      computes about N/T of the N bases instead of all of them every T-th step (the first step
      still computes every basis). Phases follow from the group's shapes alone, so a resumed,
      layer-wise or FSDP2 run keeps them (``galorex.optim.schedule``).

    - ``eps_mode`` ("torch"): where ε enters. ``torch`` follows the GaLore paper's Algorithm 1 and
      ``torch.optim.AdamW``: m̂/(√v̂ + ε), and decay W ← (1 − lr·wd)W before the update.
      ``galore_torch`` reproduces galore-torch 1.0 exactly: (√(1−β₂ᵗ)/(1−β₁ᵗ))·m/(√v + ε) — an ε
      effectively 1/√(1−β₂ᵗ) times larger early in training — and decay applied after the update,
      for every parameter of the group, projected or not. Use it to continue a galore-torch run.

    - ``optim_bits`` (32): 8 stores Adam's moments block-wise in 8 bits (``state8bit``: per-block
      absmax scales, non-linear codes, √v for the second moment; tensors under 4096 elements stay
      float32), for projected and unprojected parameters alike. Unprojected parameters then use a
      foreach AdamW instead of torch's kernels.

    - ``basis_bits`` (32): 4 or 8 stores each basis in 4 or 8 bits (symmetric codes, one float32
      scale per 64 entries; Q-GaLore keeps its projections in 4 bits) and dequantises it on use; the
      basis is then only approximately orthonormal (entries within half a code step).

    - ``basis_rotation`` (False): with ``basis_bits`` 4 or 8, quantise the basis after a block
      Hadamard rotation of its last dimension (blocks ≤ 64) and rotate back on use, so a spiky
      block does not set a coarse code step for the rest (``state8bit.rotate_basis``). Off by
      default: measured with ``python -m galorex.bench basis`` (docs/benchmarks.md), it did not
      pay on GaLore's bases. The Hadamard blocks are the largest power of two dividing the rank, at
      most 64: an odd rank is not rotated at all, rank 40 in blocks of 8.

    - ``weight_rounding`` (None) and ``rounding_seed`` (0): how a weight stored below the compute
      precision is written — INT8 codes (``galorex.quantize_weights``) or a bf16 weight. None:
      stochastic for INT8 codes, round-to-nearest for bf16; ``"stochastic"`` updates a float32
      working copy and rounds it up with probability equal to its fraction above the grid point
      below (q = ⌊x⌋ + 𝟙[u < x − ⌊x⌋]), with draws seeded from (``rounding_seed``, parameter,
      step); ``"nearest"`` rounds to nearest. Unprojected weights stepped so keep float32 AdamW
      moments (``galorex.weights``).

    - ``proj_precision`` (None), group key only: ``"bf16"`` runs the projection, the
      back-projection and the randomized refresh's GEMMs on bf16 operands with float32
      accumulation (bases and state stay float32; refused for float64 weights; fast only where
      the hardware multiplies bf16: GPUs, CPUs with AMX or AVX512-BF16 — elsewhere the rounded
      operands are multiplied in float32, the same numbers at float32's speed). ``"fp8"``,
      ``"int8"``, ``"fp8-hadamard"`` or ``"int8-hadamard"`` runs the projection GEMM on quantised
      operands (per-row scales), with a Hadamard rotation of its inner dimension for
      ``-hadamard`` (``galorex.lowp.projection``).

    Weight decay is decoupled and applied to the full weight.

    The arguments shared with ``torch.optim.AdamW`` have its defaults (``lr=1e-3``,
    ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=1e-2``; galore-torch's ``weight_decay``
    default is 0.0) and its meaning:

    - ``amsgrad``, ``maximize`` (False): honoured for unprojected parameters (torch's own AdamW
      runs them); a group with ``rank`` refuses either, since neither is defined for Adam
      moments whose basis changes at every refresh.
    - ``foreach``, ``fused`` (None): torch's AdamW implementation for unprojected parameters.
      Both None (the default): torch's fused kernel for every parameter it serves (floating point,
      on a device type with the kernel: CPU and CUDA; not a DTensor), torch's default for the
      rest; torch.optim.AdamW itself never picks the fused kernel, so the default matches it to
      float rounding (torch's fused-vs-loop tolerance), not bit for bit. Set either flag and the
      choice is torch's with that flag: ``foreach=False`` (and ``fused=False`` on CPU) runs its
      single-tensor loop, step for step ``torch.optim.AdamW(..., foreach=False)``.
      ``fused=True`` is checked up front (floating point parameters on a device with the fused
      kernel, not with ``foreach=True``, not with 8-bit moments or ``eps_mode="galore_torch"``),
      and a gradient whose strides differ from its parameter's is handed to the fused kernel in
      the parameter's layout (the kernel mis-updates it otherwise).
    - ``capturable``, ``differentiable``: only False (the refresh schedule runs on the host).

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
    mode), ``state_dict()`` in the middle of an accumulation. FSDP2 (DTensor) parameters get no
    post-accumulate-grad hook: call :meth:`register_fsdp2_hooks` with the sharded model, which steps
    each parameter's shard from its FSDP2 group's post-backward.
    Do not wrap the model in DDP (its hooks would fire before DDP's all-reduce, and DDP's buckets
    hold every gradient anyway); average gradients across ranks with
    :meth:`set_layerwise_grad_reducer` instead, as ``galorex-train --distributed ddp --layerwise`` does.

    Args:
        params: parameters or parameter groups (dicts, optionally with ``(name, tensor)`` pairs so
            errors name the parameter), as for any ``torch.optim.Optimizer``.
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach, fused, capturable,
            differentiable: as ``torch.optim.AdamW`` (above for what a projected group does
            with them).
        update_proj_gap, scale, proj_type, refresh_method, moment_policy, oversample,
            power_iters, refresh_seed, refresh_schedule, eps_mode, optim_bits, basis_bits,
            basis_rotation, weight_rounding, rounding_seed: the defaults of the group keys of the
            same names (above).
        compile: False, True, or a dict of ``torch.compile`` options for the numeric update.
        layerwise, accumulation_steps, per_param_grad_clip: the layer-wise mode (above).
        **rule_options: the rule's own group keys (a subclass's, e.g. NaturalGaLoreAdamW's
            ``natural_history``); any other keyword raises a TypeError.

    Raises:
        ValueError: a bad setting, naming the group and key (or the parameter).
        TypeError: an unknown keyword argument.
    """

    rule = AdamRule()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        refresh_method: str = "svd",
        moment_policy: str = "keep",
        oversample: int = 16,
        power_iters: int = 2,
        refresh_seed: int = 0,
        refresh_schedule: str = "together",
        eps_mode: str = "torch",
        optim_bits: int = 32,
        basis_bits: int = 32,
        basis_rotation: bool = False,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        compile: CompileOption = False,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        per_param_grad_clip: float | None = None,
        **rule_options: Any,
    ) -> None:
        refuse_unsupported_flags(capturable=capturable, differentiable=differentiable)
        unknown = set(rule_options) - set(self.rule.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
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
            refresh_schedule=refresh_schedule,
            eps_mode=eps_mode,
            optim_bits=optim_bits,
            basis_bits=basis_bits,
            basis_rotation=basis_rotation,
            weight_rounding=weight_rounding,
            rounding_seed=rounding_seed,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            **rule_options,
        )
        super().__init__(
            params,
            defaults,
            compile=compile,
            layerwise=layerwise,
            accumulation_steps=accumulation_steps,
            per_param_grad_clip=per_param_grad_clip,
        )


__all__ = ["GaLoreAdamW", "adam_directions"]
