"""AdamW for unprojected parameters (groups without ``rank``, and 1-D parameters).

:func:`adamw_torch` is ``torch.optim.AdamW``'s own functional update. Its implementation: with
``foreach`` and ``fused`` both unset (None, the default), torch's fused kernel for every parameter
it serves (:func:`takes_fused_by_default`: a plain floating point tensor on a device type with the
kernel, CPU and CUDA included), torch's own default for the others; ``fused=True`` the fused kernel;
``foreach=True``/``False`` or ``fused=False`` exactly what ``torch.optim.AdamW`` runs with those
flags (``foreach=False``, and ``fused=False`` on the CPU: its single-tensor loop). The fused kernel
computes the same update as the loop, to float rounding (the tolerance torch's own
``test_fused_matches_forloop`` allows); torch itself never picks it by default. Where torch's
kernels do not apply — 8-bit moments, galore-torch's ε placement — :func:`adamw_foreach` runs the
same maths through ``adam_math``; a large weight with 8-bit moments (an embedding, an output head)
steps slice by slice (:func:`adamw_8bit_chunked`). AdamW: Loshchilov
& Hutter, 2019, "Decoupled Weight Decay Regularization", Algorithm 2.

Every entry point takes ``(group, params, state_of)``: the parameter group (its ``lr``, ``betas``,
``eps``, ``weight_decay``, ``eps_mode``, ``optim_bits`` and torch's flags), the parameters to step
(gradients in ``p.grad``), and ``state_of[p]``, each parameter's state dict (created when empty).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adamw import adamw as _adamw_functional

from . import state8bit
from .adam_math import adam_directions
from .codec import load_moment, moment_kind, store_moment
from .config import AMSGRAD, EPS_MODE, MAXIMIZE, OPTIM_BITS, STEP
from .plan import is_dtensor

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
MAX_EXP_AVG_SQ = "max_exp_avg_sq"
ADAM_MOMENTS = (EXP_AVG, EXP_AVG_SQ)

# Elements per slice of an unprojected weight stepped with 8-bit moments (a multiple of the 8-bit
# block size, so each slice quantises exactly the blocks the whole tensor would).
DENSE_8BIT_CHUNK = 1 << 22


def eight_bit(group: dict[str, Any]) -> bool:
    """Whether the group keeps its moments in 8 bits (``optim_bits=8``)."""
    return group.get(OPTIM_BITS, 32) == 8


def fused_devices() -> set[str]:
    """Device types with torch's fused AdamW kernel (CPU included since torch 2.4)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return set(_get_fused_kernels_supported_devices())


def adamw(group: dict[str, Any], params: list[torch.Tensor], state_of: Any) -> None:
    """One AdamW step of ``params``: :func:`adamw_foreach` for 8-bit moments or galore-torch's ε
    placement, else :func:`adamw_torch` (arguments: module docstring)."""
    if group[EPS_MODE] == "galore_torch" or eight_bit(group):
        return adamw_foreach(group, params, state_of)
    return adamw_torch(group, params, state_of)


def takes_fused_by_default(p: torch.Tensor) -> bool:
    """Whether the default (``foreach`` and ``fused`` None) steps ``p`` with torch's fused AdamW
    kernel: a floating point, dense tensor on a device type that has the kernel. A DTensor (FSDP2)
    keeps torch's default, which handles its placements."""
    return p.is_floating_point() and not p.is_sparse and p.device.type in fused_devices() and not is_dtensor(p)


def adamw_torch(group: dict[str, Any], params: list[torch.Tensor], state_of: Any) -> None:
    """``torch.optim.AdamW``'s functional step with torch's state layout (``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad) and the implementation of the module docstring."""
    if group.get("fused") is None and group.get("foreach") is None:
        chosen = [takes_fused_by_default(p) for p in params]
        fused = [p for p, c in zip(params, chosen) if c]
        others = [p for p, c in zip(params, chosen) if not c]
        if fused:
            _adamw_torch(group, fused, state_of, fused=True)
        if others:
            _adamw_torch(group, others, state_of, fused=False)
        return
    _adamw_torch(group, params, state_of, fused=bool(group.get("fused")))


def _adamw_torch(group: dict[str, Any], params: list[torch.Tensor], state_of: Any, *, fused: bool) -> None:
    amsgrad = group.get(AMSGRAD, False)
    grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], []
    for p in params:
        state = state_of[p]
        step_device = p.device if fused else torch.device("cpu")
        if not state:
            state[STEP] = torch.zeros((), dtype=torch.float32, device=step_device)
            state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[EXP_AVG_SQ] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state[STEP].device != step_device:
            state[STEP] = state[STEP].to(step_device)
        if amsgrad and MAX_EXP_AVG_SQ not in state:
            state[MAX_EXP_AVG_SQ] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grad = p.grad
        if fused and grad.stride() != p.stride():
            # torch's fused kernel walks parameter and gradient as if they shared one layout.
            grad = torch.empty_like(p).copy_(grad)
        grads.append(grad)
        exp_avgs.append(state[EXP_AVG])
        exp_avg_sqs.append(state[EXP_AVG_SQ])
        if amsgrad:
            max_exp_avg_sqs.append(state[MAX_EXP_AVG_SQ])
        steps.append(state[STEP])
    beta1, beta2 = group["betas"]
    _adamw_functional(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        foreach=None if fused else group.get("foreach"),
        fused=True if fused else None,
        amsgrad=amsgrad,
        # Tensor hyperparameters as numbers, except lr for the fused kernel, which takes a
        # tensor lr as it is (older torch refuses tensor betas, and tensor lr with foreach).
        beta1=float(beta1),
        beta2=float(beta2),
        lr=group["lr"] if fused else float(group["lr"]),
        weight_decay=float(group["weight_decay"]),
        eps=float(group["eps"]),
        maximize=group.get(MAXIMIZE, False),
    )


def _apply(group: dict[str, Any], params: list[torch.Tensor], directions: list[torch.Tensor]) -> None:
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    if group[EPS_MODE] == "galore_torch":
        torch._foreach_add_(params, directions, alpha=-lr)
        if wd > 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
    else:
        if wd > 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, directions, alpha=-lr)


def adamw_foreach(group: dict[str, Any], params: list[torch.Tensor], state_of: Any) -> None:
    """AdamW when torch's kernels do not apply: 8-bit moments (``optim_bits=8``, kept in float32
    when too small to quantise), or galore-torch's ε and decay placement (decay after the
    update). Directions from :func:`galorex.optim.adam_math.adam_directions`; arguments: module
    docstring."""
    eight = eight_bit(group)
    if eight:
        # A large weight steps slice by slice: its float32 moments, gradient and direction would
        # otherwise be ~8x its 8-bit state at once.
        big = [p for p in params if p.numel() > DENSE_8BIT_CHUNK and p.is_contiguous()]
        for p in big:
            adamw_8bit_chunked(state_of[p], p, group)
        params = [p for p in params if not any(p is b for b in big)]
        if not params:
            return
    states = []
    for p in params:
        state = state_of[p]
        if not state:
            state[STEP] = torch.zeros((), dtype=torch.float32)
            for key in ADAM_MOMENTS:
                zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
                store_moment(state, key, zeros.float() if eight else zeros, eight)
        state[STEP] += 1
        states.append(state)
    exp_avgs = [load_moment(s, EXP_AVG) for s in states]
    exp_avg_sqs = [load_moment(s, EXP_AVG_SQ) for s in states]
    grads = [p.grad.to(m.dtype) for p, m in zip(params, exp_avgs)]
    beta1, beta2 = group["betas"]
    directions = adam_directions(
        grads,
        exp_avgs,
        exp_avg_sqs,
        [int(s[STEP].item()) for s in states],
        float(beta1),
        float(beta2),
        float(group["eps"]),
        group[EPS_MODE],
    )
    if eight:
        for s, m, v in zip(states, exp_avgs, exp_avg_sqs):
            store_moment(s, EXP_AVG, m, True)
            store_moment(s, EXP_AVG_SQ, v, True)
    _apply(group, params, [d.to(p.dtype) for d, p in zip(directions, params)])


@torch.no_grad()
def adamw_8bit_chunked(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
    """:func:`adamw_foreach`'s 8-bit step of one contiguous weight, DENSE_8BIT_CHUNK elements at a
    time: every operation is elementwise or per 8-bit block and slices align with the blocks, so
    the result is bit for bit the unsliced one, with float32 temporaries of one slice only (on one
    intra-op thread; with several, torch's elementwise kernels round a bf16 weight's update
    differently at the edges of each thread's range, which sit elsewhere in a slice: one bf16
    rounding at those few elements, the moments unchanged).

    Args:
        state: the weight's state dict (created when empty: ``step`` and the codes and block
            scales of both moments).
        p: the contiguous weight, gradient in ``p.grad``.
        group: its group.
    """
    block = state8bit.BLOCK_SIZE
    n = p.numel()
    fresh = not state
    if fresh:
        state[STEP] = torch.zeros((), dtype=torch.float32)
        for key in ADAM_MOMENTS:
            state[key + "_q"] = torch.empty(p.shape, dtype=torch.uint8, device=p.device)
            state[key + "_absmax"] = torch.empty(-(-n // block), dtype=torch.float32, device=p.device)
    state[STEP] += 1
    step = int(state[STEP].item())
    beta1, beta2 = group["betas"]
    flat_p, flat_g = p.view(-1), p.grad.reshape(-1)
    for a in range(0, n, DENSE_8BIT_CHUNK):
        b = min(n, a + DENSE_8BIT_CHUNK)
        blocks = slice(a // block, -(-b // block))
        moments = []
        for key in ADAM_MOMENTS:
            q, absmax = state[key + "_q"].view(-1)[a:b], state[key + "_absmax"][blocks]
            if fresh:
                moments.append(torch.zeros(b - a, dtype=torch.float32, device=p.device))
            else:
                moments.append(state8bit.unpack_moment({"q": q, "absmax": absmax}, (b - a,), moment_kind(key)))
        m, v = moments
        g = flat_g[a:b].to(m.dtype)
        (direction,) = adam_directions(
            [g], [m], [v], [step], float(beta1), float(beta2), float(group["eps"]), group[EPS_MODE]
        )
        # pack_moment's two codes, called directly: a short last slice is still 8-bit here.
        q, absmax = state8bit.quantize_blockwise(m, state8bit.signed_code(p.device), block)
        state[EXP_AVG + "_q"].view(-1)[a:b].copy_(q)
        state[EXP_AVG + "_absmax"][blocks].copy_(absmax)
        q, absmax = state8bit.quantize_second_moment(v, block)
        state[EXP_AVG_SQ + "_q"].view(-1)[a:b].copy_(q)
        state[EXP_AVG_SQ + "_absmax"][blocks].copy_(absmax)
        _apply(group, [flat_p[a:b]], [direction.to(p.dtype)])
