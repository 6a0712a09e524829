"""The fused Triton GaLore-Adam step (``triton_kernels.fused_galore_adam_step``): where
``triton_kernels.select_backend`` picks Triton for op ``galore_adam_step`` (on CUDA only with
``GALOREX_BACKEND=triton`` until a GPU run has shown it correct and faster), plain 32-bit Adam
groups have their moments
updated in place and D = M̂/(√V̂+ε) formed tile by tile inside the GEMM that writes W, so the
normalised update never exists in full. Everything else — 8-bit state, 4/8-bit bases,
``proj_precision``, galore-torch's ε placement, tensor hyperparameters, a compiled step, ``full``
projection, any rule other than the plain Adam one — takes the loop's path, which the fused one
equals to fp32 rounding (tests/test_galore_fused.py)."""

from __future__ import annotations

from typing import Any

import torch

from .. import projection as proj
from . import codec
from .config import BASIS_BITS, EPS_MODE, PROJ_PRECISION, RANK, STEP
from .dense import eight_bit
from .plan import Work

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"


def fused_path_applies(opt: Any, group: dict[str, Any], works: list[Work]) -> bool:
    """Whether the fused Triton step serves this group's step (module docstring): a rule class
    declaring ``fusable`` in its own body, no compiled step, ``eps_mode="torch"``, 32-bit moments
    and bases, no ``proj_precision``, number hyperparameters, and every parameter contiguous,
    float32/float16/bfloat16, projected on one side, with float32 moments, on a device where
    ``select_backend`` picks Triton for ``galore_adam_step``.

    Args:
        opt: the optimizer (its rule and compile options).
        group: the group.
        works: the parameters to step, with their gradients and states.
    """
    # Only a rule class that declares itself fusable in its own body (a subclass that changes the
    # maths must opt in again).
    if (
        not type(opt.rule).__dict__.get("fusable", False)
        or getattr(opt, "_compile_options", None) is not None
        or group[EPS_MODE] != "torch"
        or eight_bit(group)
        or group.get(BASIS_BITS, 32) != 32
        or group.get(PROJ_PRECISION) is not None
    ):
        return False
    hyper = (group["lr"], group["weight_decay"], group["eps"], group["scale"], *group["betas"])
    if any(isinstance(h, torch.Tensor) for h in hyper):
        return False
    from triton_kernels.dispatch import select_backend

    for w in works:
        p = w.param
        if (
            w.side not in ("left", "right")
            or not p.is_contiguous()
            or p.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or w.state[EXP_AVG].dtype != torch.float32
            or select_backend(p.device, "galore_adam_step") != "triton"
        ):
            return False
    return True


def fused_update(opt: Any, group: dict[str, Any], works: list[Work]) -> None:
    """The step of every parameter in ``works`` through ``triton_kernels.fused_galore_adam_step``:
    project the rule's gradient, count the step, update the moments and write W in place.
    Arguments as :func:`fused_path_applies`, which must have returned True."""
    from triton_kernels import fused_galore_adam_step

    beta1, beta2 = group["betas"]
    for w in works:
        p, state = w.param, w.state
        (basis,) = codec.load_bases(state, w.side, p, group[RANK])
        g, _ = opt.rule.gradient(group, p, w.grad)
        low = proj.project(g, [basis], w.side)
        state[STEP] += 1
        fused_galore_adam_step(
            proj.as_matrix(p),
            low,
            state[EXP_AVG],
            state[EXP_AVG_SQ],
            basis,
            w.side,
            step=opt.rule.bias_step(group, state),
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            scale=float(group["scale"]),
        )
