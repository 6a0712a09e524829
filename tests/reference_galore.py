"""A deliberately plain float64 reference of one GaLoreAdamW step.

No foreach, no addmm, no in-place fused kernels: one parameter at a time, every formula written
out, following the docstrings of ``galorex/optim/base.py``, ``galorex/optim/galore.py`` and
``galorex/projection.py``:

* a group with ``rank`` projects every parameter with >= 2 dimensions, viewed as the matrix
  (shape[0], rest); everything else (groups without rank, 1-D parameters) is plain AdamW;
* the basis is refreshed when the parameter's own step counter (steps it actually took, i.e. had a
  gradient) is 0, T, 2T, ... by the exact SVD of the float64 gradient matrix G = U S Vᵀ:
  left basis U[:, :r], right basis V[:, :r], r = min(rank, m, n);
* the side per ``proj_type``: std → right iff m >= n, reverse_std → left iff m >= n,
  left/right/full literal;
* R = PᵀG (left), G P (right), Pₗᵀ G Pᵣ (full); Adam in the subspace;
  ``eps_mode="torch"``:  D = m̂ / (√v̂ + ε) with m̂ = m/(1-β₁ᵗ), v̂ = v/(1-β₂ᵗ);
  ``eps_mode="galore_torch"``: D = (√(1-β₂ᵗ)/(1-β₁ᵗ)) · m / (√v + ε);
* update ``torch``: W ← (1 − lr·wd)·W − lr·scale·back(D);
  ``galore_torch``: W ← (1 − lr·wd)·(W − lr·scale·back(D));
  back(D) = P D (left), D Pᵀ (right), Pₗ D Pᵣᵀ (full);
* moment policies at a refresh (not the first): keep → unchanged; reset → zeros and the bias
  correction counts steps since the refresh; reproject → with Rᵢ = P_newᵢᵀ P_oldᵢ:
  m ← R m (left), m Rᵀ (right), Rₗ m Rᵣᵀ (full) and v the same with the element-wise squares Rᵢ∘Rᵢ.

Only the "svd" refresh method is modelled.
"""

from __future__ import annotations

import math
from typing import Any

import torch

GROUP_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    update_proj_gap=200,
    scale=1.0,
    proj_type="std",
    moment_policy="keep",
    eps_mode="torch",
)


def side_for(proj_type: str, m: int, n: int) -> str:
    if proj_type == "std":
        if m >= n:
            return "right"
        return "left"
    if proj_type == "reverse_std":
        if m >= n:
            return "left"
        return "right"
    assert proj_type in ("left", "right", "full"), proj_type
    return proj_type


def svd_bases(g: torch.Tensor, rank: int, side: str) -> list[torch.Tensor]:
    m, n = g.shape
    r = min(rank, m, n)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    left = u[:, :r].clone()
    right = vh[:r, :].T.clone()
    if side == "left":
        return [left]
    if side == "right":
        return [right]
    return [left, right]


def project(g: torch.Tensor, bases: list[torch.Tensor], side: str) -> torch.Tensor:
    if side == "left":
        return torch.matmul(bases[0].T, g)
    if side == "right":
        return torch.matmul(g, bases[0])
    return torch.matmul(torch.matmul(bases[0].T, g), bases[1])


def project_back(d: torch.Tensor, bases: list[torch.Tensor], side: str) -> torch.Tensor:
    if side == "left":
        return torch.matmul(bases[0], d)
    if side == "right":
        return torch.matmul(d, bases[0].T)
    return torch.matmul(torch.matmul(bases[0], d), bases[1].T)


def carry(low: torch.Tensor, trans: list[torch.Tensor], side: str) -> torch.Tensor:
    if side == "left":
        return torch.matmul(trans[0], low)
    if side == "right":
        return torch.matmul(low, trans[0].T)
    return torch.matmul(torch.matmul(trans[0], low), trans[1].T)


class ReferenceGaLoreAdamW:
    """``groups``: list of dicts like GaLoreAdamW's, whose ``params`` are tensors this class owns
    (converted to float64 clones). :meth:`step` takes the gradients as a list (per group) of lists
    (per parameter) of tensors or None."""

    def __init__(self, groups: list[dict[str, Any]], **defaults: Any) -> None:
        self.groups = []
        for g in groups:
            full = dict(GROUP_DEFAULTS)
            full.update(defaults)
            full.update({k: v for k, v in g.items() if k != "params"})
            full["params"] = [p.detach().to(torch.float64).clone() for p in g["params"]]
            self.groups.append(full)
        self.state: list[list[dict[str, Any]]] = [[{} for _ in g["params"]] for g in self.groups]

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.groups for p in g["params"]]

    def step(self, grads: list[list[torch.Tensor | None]]) -> None:
        for gi, group in enumerate(self.groups):
            for pi, p in enumerate(group["params"]):
                grad = grads[gi][pi]
                if grad is None:
                    continue
                grad = grad.detach().to(torch.float64)
                state = self.state[gi][pi]
                if group.get("rank") is not None and p.dim() >= 2:
                    new_p = self._galore(group, p, grad, state)
                else:
                    new_p = self._adamw(group, p, grad, state)
                group["params"][pi] = new_p

    # ---------------------------------------------------------------- plain AdamW
    def _adamw(self, group, p, grad, state):
        if not state:
            state["step"] = 0
            state["m"] = torch.zeros_like(p)
            state["v"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        state["step"] += 1
        t = state["step"]
        state["m"] = beta1 * state["m"] + (1 - beta1) * grad
        state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad
        d = self._direction(state["m"], state["v"], t, beta1, beta2, eps, group["eps_mode"])
        if group["eps_mode"] == "torch":
            return (1 - lr * wd) * p - lr * d
        return (1 - lr * wd) * (p - lr * d)

    @staticmethod
    def _direction(m, v, t, beta1, beta2, eps, eps_mode):
        bc1 = 1 - beta1**t
        bc2 = 1 - beta2**t
        if eps_mode == "torch":
            m_hat = m / bc1
            v_hat = v / bc2
            return m_hat / (torch.sqrt(v_hat) + eps)
        return (math.sqrt(bc2) / bc1) * m / (torch.sqrt(v) + eps)

    # ---------------------------------------------------------------- GaLore
    def _galore(self, group, p, grad, state):
        shape = p.shape
        m_rows = shape[0]
        g = grad.reshape(m_rows, -1)
        m_, n_ = g.shape
        side = side_for(group["proj_type"], m_, n_)
        rank = group["rank"]
        if not state:
            state["step"] = 0
            state["proj_step"] = 0
            state["bases"] = svd_bases(g, rank, side)
            low_shape = project(g, state["bases"], side).shape
            state["m"] = torch.zeros(low_shape, dtype=torch.float64)
            state["v"] = torch.zeros(low_shape, dtype=torch.float64)
        elif state["step"] % group["update_proj_gap"] == 0:
            new = svd_bases(g, rank, side)
            policy = group["moment_policy"]
            if policy == "reset":
                state["m"] = torch.zeros_like(state["m"])
                state["v"] = torch.zeros_like(state["v"])
            elif policy == "reproject":
                trans = [torch.matmul(pn.T, po) for po, pn in zip(state["bases"], new)]
                squares = [t * t for t in trans]
                state["m"] = carry(state["m"], trans, side)
                state["v"] = carry(state["v"], squares, side)
            else:
                assert policy == "keep"
            state["bases"] = new
            state["proj_step"] = state["step"]
        bases = state["bases"]
        low = project(g, bases, side)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        state["m"] = beta1 * state["m"] + (1 - beta1) * low
        state["v"] = beta2 * state["v"] + (1 - beta2) * low * low
        t = state["step"]
        if group["moment_policy"] == "reset":
            t = state["step"] - state["proj_step"]
        d = self._direction(state["m"], state["v"], t, beta1, beta2, group["eps"], group["eps_mode"])
        back = project_back(d, bases, side).reshape(shape)
        lr, wd, scale = group["lr"], group["weight_decay"], group["scale"]
        if group["eps_mode"] == "torch":
            return (1 - lr * wd) * p - lr * scale * back
        return (1 - lr * wd) * (p - lr * scale * back)
