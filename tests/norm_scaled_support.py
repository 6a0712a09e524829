"""Shared by tests/test_fira.py and tests/test_apollo.py: a float64 twin of both optimizers written
plainly from the papers' equations (explicit bases, one matrix at a time, no galorex code), the small
problems they train, and the reference packages' groups."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

GAMMA = 1.01


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (b the reference)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def side_of(proj_type: str, m: int, n: int) -> str:
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


class Twin:
    """One projected (m×n) weight stepped by Fira or APOLLO in float64, the plain way.

    ``basis(G, k)`` gives the k-th basis (k = 0, 1, … at steps 0, gap, 2·gap …) as galorex lays
    it out: (m×r) on the left, (n×r) on the right; the low-rank gradient is PᵀG or GP either way.
    """

    def __init__(self, kind, *, proj_type, gap, lr, betas, eps, wd, eps_mode, limiter, basis, **keys):
        self.kind, self.proj_type, self.gap, self.lr = kind, proj_type, gap, lr
        self.b1, self.b2 = betas
        self.eps, self.wd, self.eps_mode, self.limiter, self.basis = eps, wd, eps_mode, limiter, basis
        self.keys = keys
        self.t, self.m, self.v, self.prev, self.P = 0, None, None, None, None

    def step(self, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        W, G = W.double(), G.double()
        side = side_of(self.proj_type, *G.shape)
        if self.t % self.gap == 0:
            self.P = self.basis(G, self.t // self.gap, side)
        P = self.P
        R = P.T @ G if side == "left" else G @ P
        if self.m is None:
            self.m, self.v = torch.zeros_like(R), torch.zeros_like(R)
        self.t += 1
        t = self.t
        self.m = self.b1 * self.m + (1 - self.b1) * R
        self.v = self.b2 * self.v + (1 - self.b2) * R * R
        if self.eps_mode == "torch":
            N = (self.m / (1 - self.b1**t)) / ((self.v / (1 - self.b2**t)).sqrt() + self.eps)
            c = 1.0
        else:
            N = self.m / (self.v.sqrt() + self.eps)
            c = math.sqrt(1 - self.b2**t) / (1 - self.b1**t)

        def back(X):
            return P @ X if side == "left" else X @ P.T

        def ratio(channelwise):
            if not channelwise:
                return N.norm() / (R.norm() + 1e-8)
            if side == "left":  # one per column of G
                return (N.norm(dim=0) / (R.norm(dim=0) + 1e-8))[None, :]
            return (N.norm(dim=1) / (R.norm(dim=1) + 1e-8))[:, None]

        if self.kind == "fira":
            alpha = self.keys["alpha"]
            S = (G - alpha * back(R)) * ratio(True)
            S = self._limit(S)
            U = alpha * back(N) + S
        else:
            root = math.sqrt(self.keys["scale"])
            S = G * ratio(self.keys["scale_type"] == "channel")
            if self.keys.get("scale_front"):
                S = self._limit(S * root)
            else:
                S = self._limit(S) * root
            U = S
        if self.eps_mode == "torch":
            return (1 - self.lr * self.wd) * W - self.lr * c * U
        return (1 - self.lr * self.wd) * (W - self.lr * c * U)

    def _limit(self, S):
        if not self.limiter:
            return S
        norm = S.norm()
        if self.prev is None:
            self.prev = norm
            return S
        scale = max(norm / (self.prev + 1e-8), GAMMA) / GAMMA
        self.prev = norm / scale
        return S / scale


def svd_basis(G: torch.Tensor, k: int, side: str, rank: int) -> torch.Tensor:
    """The top-``rank`` singular vectors of G (float64), whatever the refresh number k."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U[:, :rank] if side == "left" else Vh[:rank].T


def apollo_random_basis(first_seed: int, rank: int):
    """APOLLO's random bases drawn with apollo-torch's own seed chain and generator
    (``random_projector.next_seed``, ``stable_randn``): refresh k uses the k-th seed after
    ``first_seed``; entries N(0, 1/r) drawn in float32, as there."""
    stable_randn = quiet_import("apollo_torch.random_projector", "stable_randn")
    next_seed = quiet_import("apollo_torch.random_projector", "next_seed")

    def basis(G: torch.Tensor, k: int, side: str) -> torch.Tensor:
        seed = first_seed
        for _ in range(k):
            seed = next_seed(seed)
        m, n = G.shape
        if side == "left":
            return (stable_randn((m, rank), seed=seed) / math.sqrt(rank)).double()
        return (stable_randn((rank, n), seed=seed) / math.sqrt(rank)).double().T

    return basis


def make_bias_free(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    """A tall 20×12 and a wide 8×20 weight, nothing else: every parameter is projected."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20, bias=False), nn.Tanh(), nn.Linear(20, 8, bias=False)).to(dtype)


TWIN_DATA = (
    torch.randn(64, 12, generator=torch.Generator().manual_seed(11)),
    torch.randn(64, 8, generator=torch.Generator().manual_seed(12)),
)


def twin_run(model: nn.Sequential, opt, twins: list[Twin] | None, steps: int) -> None:
    """``steps`` full-batch steps of mean squared error on TWIN_DATA: by ``opt`` when ``twins`` is
    None, else by one Twin per weight."""
    x, y = TWIN_DATA
    weights = [model[0].weight, model[2].weight]
    for _ in range(steps):
        for w in weights:
            w.grad = None
        loss = (model(x.to(weights[0].dtype)) - y.to(weights[0].dtype)).square().mean()
        loss.backward()
        if twins is None:
            opt.step()
            continue
        with torch.no_grad():
            for w, twin in zip(weights, twins):
                w.copy_(twin.step(w, w.grad).to(w.dtype))


def split_groups(model: nn.Module, rank_keys: dict) -> list[dict]:
    """Weights (≥ 2-D) with ``rank_keys``, the rest (biases) in a plain group: the layout both
    reference packages need (they would project a 1-D parameter of a rank group)."""
    return [
        {"params": [p for p in model.parameters() if p.dim() < 2]},
        {"params": [p for p in model.parameters() if p.dim() >= 2], **rank_keys},
    ]


def quiet_import(module: str, name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = __import__(module, fromlist=[name])
    return getattr(mod, name)
