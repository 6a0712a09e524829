"""Adam's arithmetic, written once: the moments' update and the normalised direction, for lists of
tensors at once (foreach), or as tensor arithmetic inside a compiled step.

    m ← β₁m + (1−β₁)g,   v ← β₂v + (1−β₂)g²,   d = m̂/(√v̂ + ε)   (m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ))

(Kingma & Ba, 2015; the GaLore paper's Algorithm 1). ``eps_mode="galore_torch"`` places ε as
galore-torch and transformers' AdamW do: (√(1−β₂ᵗ)/(1−β₁ᵗ))·m/(√v + ε).
"""

from __future__ import annotations

import math

import torch

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
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Update the moments in place and return Adam's directions for a list of tensors at once.

    ``eps_mode="torch"``: m̂ / (√v̂ + ε), ε after the bias correction of √v, as in the GaLore
    paper's Algorithm 1 and torch.optim.AdamW. ``eps_mode="galore_torch"``:
    (√(1−β₂ᵗ)/(1−β₁ᵗ))·m / (√v + ε), as galore-torch (and transformers' AdamW) compute it.

    Steps and hyperparameters may be 0-dim tensors (a compiled step): the same maths then runs as
    tensor arithmetic, with the bias corrections in float64, and never reads a value on the host.

    Args:
        grads: the gradients g (the moments' dtype).
        exp_avgs, exp_avg_sqs: the moments m and v, updated in place.
        bias_steps: t per tensor, the steps the moments have seen (≥ 1).
        beta1, beta2, eps: numbers, or 0-dim tensors.
        eps_mode: "torch" or "galore_torch".
        out: tensors of the moments' shapes and dtypes to write the directions into, or None for
            new ones. They may be ``grads`` themselves (whose values are then lost): the gradients
            are read only by the moments' update, which comes first. Writing into tensors that
            already exist spares the allocator a fresh buffer per tensor and step, which on the CPU
            costs a page fault per 4 KiB once buffers are large enough to be mapped afresh.

    Returns:
        The directions: ``out`` when given, else new tensors of the moments' shapes. Either way the
        same values, bit for bit.
    """
    if any(isinstance(x, torch.Tensor) for x in (beta1, beta2, eps, *bias_steps)):
        directions = _adam_directions_tensor(grads, exp_avgs, exp_avg_sqs, bias_steps, beta1, beta2, eps, eps_mode)
        if out is None:
            return directions
        torch._foreach_copy_(out, directions)
        return out
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bias1 = [1.0 - beta1**s for s in bias_steps]
    bias2_sqrt = [math.sqrt(1.0 - beta2**s) for s in bias_steps]
    if out is None:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    else:
        denom = out
        for v, d in zip(exp_avg_sqs, out):
            torch.sqrt(v, out=d)
    if eps_mode == "torch":
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        directions = _divide(exp_avgs, denom, in_place=out is not None)
        torch._foreach_div_(directions, bias1)
    else:
        torch._foreach_add_(denom, eps)
        directions = _divide(exp_avgs, denom, in_place=out is not None)
        torch._foreach_mul_(directions, [b2 / b1 for b1, b2 in zip(bias1, bias2_sqrt)])
    return directions


def _divide(numerators: list[torch.Tensor], denominators: list[torch.Tensor], *, in_place: bool) -> list[torch.Tensor]:
    """n / d elementwise, per pair: into ``denominators`` when ``in_place``, else new tensors."""
    if not in_place:
        return torch._foreach_div(numerators, denominators)
    for n, d in zip(numerators, denominators):
        torch.div(n, d, out=d)
    return denominators


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


__all__ = ["adam_directions"]
