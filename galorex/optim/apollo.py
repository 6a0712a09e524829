"""ApolloAdamW: AdamW's update coarsened to channel- or tensor-wise learning rates, estimated in a
random low-rank space (Zhu et al., 2024, "APOLLO: SGD-like Memory, AdamW-level Performance").

With R = project(G) onto a rank-r space, Adam's moments kept on R only, and N Adam's direction there:

    s_c = ‖N_c‖ / (‖R_c‖ + 1e-8)  per channel c (``scale_type="channel"``)  or
    s   = ‖N‖   / (‖R‖   + 1e-8)  for the whole matrix (``scale_type="tensor"``)
    U   = limit(G ⊙ s)            (the raw full-rank gradient, rescaled; Fira's norm-growth limiter)
    W   ← W − lr·c_t·√scale·U,    decoupled weight decay

A channel is a row of G for a right projection (R is m×r) and a column for a left one (R is r×n):
the dimension the projection keeps. ``scale_front`` multiplies by √scale before the limiter rather
than after (the limiter then remembers the scaled norm; the update is the same up to rounding).
c_t is Adam's step factor (see :func:`galorex.optim.fira.adam_step_factor`).

The projection (``proj``):

- ``"random"``: P has i.i.d. N(0, 1/r) entries drawn from a seeded generator — (r×n) for a right
  projection, used as G Pᵀ, (m×r) for a left one, used as Pᵀ G — so it is never stored: it is
  regenerated from its seed at every step, and a new seed is drawn every ``update_proj_gap`` steps.
  The seeds are apollo-torch's: parameter i (counted from 1 over all groups, in order) starts at
  ``refresh_seed + i``, and each refresh moves to :func:`next_seed` of the last one; the current
  seed is a 0-dim int64 tensor in the state, so a resumed run regenerates the same matrix.
- ``"svd"``: GaLore's basis, the top-r singular vectors of G, stored and refreshed like GaLore's.

APOLLO-Mini (:meth:`ApolloAdamW.mini`): rank 1, tensor-wise, random, scale 128 (a √128 multiplier).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .. import projection as proj
from .base import (
    BASIS_BITS,
    EPS_MODE,
    MOMENT_POLICY,
    PROJ_STEP,
    PROJ_TYPE,
    RANK,
    REFRESH_METHOD,
    REFRESH_SEED,
    SCALE,
    STEP,
    UPDATE_PROJ_GAP,
    compute_dtype,
    hyperparameter,
    load_bases,
)
from .fira import (
    DISABLE_NL,
    LIMITER_NORM,
    NORM_GROWTH_LIMIT,
    RATIO_EPS,
    _axpy_,
    adam_step_factor,
    channel_norm_ratio,
    check_no_dtensor,
    limit_norm_growth,
    tensor_norm_ratio,
)
from .galore import GaLoreAdamW

# Group keys, as apollo-torch names them.
PROJ = "proj"
PROJS = ("random", "svd")
SCALE_TYPE = "scale_type"
SCALE_TYPES = ("channel", "tensor")
SCALE_FRONT = "scale_front"

# State key: the seed of the current random projection (0-dim int64, on the CPU).
PROJ_SEED = "proj_seed"

_NEXT_SEED_DRAWS = 0xF  # apollo-torch advances a seed by the last of 15 draws


def next_seed(seed: int) -> int:
    """The seed of the next random projection: the last of 15 integers in [0, 2⁶³−1) drawn by a CPU
    ``torch.Generator`` seeded with ``seed`` (apollo-torch's chain, so the same seeds give the same
    projections)."""
    generator = torch.Generator().manual_seed(int(seed))
    draws = torch.randint(0, torch.iinfo(torch.int64).max, (_NEXT_SEED_DRAWS,), generator=generator)
    return int(draws[-1])


def random_projection(
    m: int, n: int, rank: int, side: str, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """APOLLO's random basis for an (m×n) gradient, as galorex bases are laid out (columns):
    (m×r) for ``left`` (R = Pᵀ G), (n×r) for ``right`` (R = G P). Entries N(0, 1/r), drawn in float32
    from a generator on ``device`` seeded with ``seed`` (a right basis as the (r×n) draw,
    transposed), then cast to ``dtype``; r is ``rank`` clipped to min(m, n)."""
    r = proj.effective_rank(rank, m, n)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    if side == "left":
        basis = torch.randn((m, r), generator=generator, device=device, dtype=torch.float32) / math.sqrt(r)
    elif side == "right":
        basis = (torch.randn((r, n), generator=generator, device=device, dtype=torch.float32) / math.sqrt(r)).mT
    else:
        raise ValueError(f"APOLLO's random projection is one-sided (left or right), got side {side!r}")
    return basis.to(dtype)


def apollo_update(
    grad: torch.Tensor,
    low: torch.Tensor,
    direction: torch.Tensor,
    side: str,
    scale_type: str,
    scale: float,
    scale_front: bool,
    previous_norm: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """APOLLO's update √scale·limit(G ⊙ s) and the limiter's new norm (None when ``previous_norm``
    is None: the limiter is off).

    ``grad`` is G (m×n), ``low`` R = project(G), ``direction`` N (Adam's direction on R, before any
    step factor); s per channel (:func:`galorex.optim.fira.channel_norm_ratio`) or for the tensor.
    The caller steps W ← W − lr·c_t·U.
    """
    if scale_type == "channel":
        ratio = channel_norm_ratio(direction, low, side)
    elif scale_type == "tensor":
        ratio = tensor_norm_ratio(direction, low)
    else:
        raise ValueError(f"unknown scale_type {scale_type!r}; expected one of {SCALE_TYPES}")
    update = grad * ratio
    root = math.sqrt(scale)
    if scale_front:
        update = update * root
    new_norm = None
    if previous_norm is not None:
        update, new_norm = limit_norm_growth(update, previous_norm)
    if not scale_front:
        update = update * root
    return update, new_norm


def apollo_multiplier(
    grad: torch.Tensor,
    low: torch.Tensor,
    direction: torch.Tensor,
    side: str,
    scale_type: str,
    scale: float,
    scale_front: bool,
    previous_norm: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same step as :func:`apollo_update` as a multiplier μ with U = G ⊙ μ — per channel
    ((m, 1) or (n,)) or one number — and the limiter's new norm, without forming G ⊙ s: the
    limiter needs only ‖G ⊙ s‖ = ‖(‖G_c‖·s_c)_c‖. The optimizer then writes W in one pass
    (``addcmul``) instead of five over full-size temporaries."""
    if scale_type == "channel":
        ratio = channel_norm_ratio(direction, low, side)
    elif scale_type == "tensor":
        ratio = tensor_norm_ratio(direction, low)
    else:
        raise ValueError(f"unknown scale_type {scale_type!r}; expected one of {SCALE_TYPES}")
    root = math.sqrt(scale)
    if previous_norm is None:
        return ratio * root, None
    if scale_type == "channel":
        axis = 1 if side == "right" else 0
        grad_norms = torch.linalg.vector_norm(grad, dim=axis)
        norm = torch.linalg.vector_norm(grad_norms * ratio.reshape(grad_norms.shape))
    else:
        norm = torch.linalg.vector_norm(grad) * ratio
    if scale_front:
        norm = norm * root
    limiter = torch.clamp(norm / (previous_norm + RATIO_EPS), min=NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
    return ratio * (root / limiter), norm / limiter


class ApolloAdamW(GaLoreAdamW):
    """APOLLO (see the module docstring for the maths), behind GaLoreAdamW's API.

    Group keys are apollo-torch's: ``rank``; ``proj`` (``"random"``, default, or ``"svd"``);
    ``scale_type`` (``"channel"``, default, or ``"tensor"``); ``scale`` (1.0; the update is
    multiplied by √scale); ``update_proj_gap`` (200); ``proj_type`` (``std`` default,
    ``reverse_std``, ``left``, ``right``; ``full`` raises). apollo-torch's optimizer flags
    ``scale_front`` and ``disable_nl`` are constructor arguments here (and per-group keys).

    Every other GaLoreAdamW key and argument works as there (``eps_mode="galore_torch"``
    reproduces apollo-torch's arithmetic: ε on √v, decay after the update; the default ``"torch"``
    is torch.optim.AdamW's), with these limits, each of which raises: with ``proj="random"`` there
    is no stored basis, so ``basis_bits`` must stay 32, ``refresh_method`` "svd" (it applies to
    ``proj="svd"``) and ``moment_policy`` "keep" or "reset" (moments cannot be carried between two
    unrelated random spaces). ``refresh_seed`` (0) offsets the random projections' seeds. Groups
    without ``rank`` and 1-D parameters are plain AdamW. The rank is clipped to min(m, n)
    (apollo-torch would draw more rows than the matrix has).

    Differences from apollo-torch, none of which changes a run it can do: ``proj_type`` other than
    ``std`` with channel-wise scaling, which apollo-torch computes along the wrong axis (a shape
    error unless the rank is 1), scales the unprojected dimension's channels here; a float64 weight
    gets a float32 draw cast to float64, as there. FSDP2 (DTensor) parameters raise.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        proj: str = "random",
        scale_type: str = "channel",
        scale: float = 1.0,
        scale_front: bool = False,
        disable_nl: bool = False,
        **galore_options: Any,
    ) -> None:
        self._extra_defaults = {
            PROJ: proj,
            SCALE_TYPE: scale_type,
            SCALE_FRONT: scale_front,
            DISABLE_NL: disable_nl,
        }
        super().__init__(params, lr, betas, eps, weight_decay, scale=scale, **galore_options)

    MINI = {RANK: 1, SCALE_TYPE: "tensor", PROJ: "random", SCALE: 128.0}

    @classmethod
    def mini(cls, params: Iterable[Any], lr: float = 1e-3, **options: Any) -> ApolloAdamW:
        """APOLLO-Mini: rank 1, tensor-wise scaling, random projection, scale 128 (the paper's √128).

        ``params`` as for ApolloAdamW: the groups with a ``rank`` key are the projected ones, and the
        preset sets those four keys on them whatever they held (e.g. the rank of
        ``galore_param_groups``); other options (``update_proj_gap``, ``betas`` …) pass through.
        Build ApolloAdamW directly for other values."""
        for key in ("proj", "scale_type", "scale", "rank"):
            if key in options:
                raise TypeError(f"ApolloAdamW.mini sets {key!r} itself; build ApolloAdamW directly to choose it")
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [{**g, **cls.MINI} if g.get(RANK) is not None else g for g in params]
        else:
            raise ValueError(
                "ApolloAdamW.mini needs parameter groups, the projected ones with a 'rank' key "
                "(e.g. galore_param_groups(model)); a plain parameter list would all be AdamW"
            )
        return cls(params, lr=lr, proj="random", scale_type="tensor", scale=128.0, **options)

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_no_dtensor(type(self).__name__, param_group)
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        super()._validate_group(group, index)

        def bad(key: str, what: str) -> ValueError:
            return ValueError(f"param_groups[{index}]: {key!r} {what}, got {group.get(key)!r}")

        if group[PROJ] not in PROJS:
            raise bad(PROJ, f"must be one of {PROJS}")
        if group[SCALE_TYPE] not in SCALE_TYPES:
            raise bad(SCALE_TYPE, f"must be one of {SCALE_TYPES}")
        for flag in (SCALE_FRONT, DISABLE_NL):
            if not isinstance(group[flag], bool):
                raise bad(flag, "must be True or False")
        if group.get(RANK) is None:
            return
        if isinstance(group[SCALE], torch.Tensor):
            raise bad(SCALE, "must be a number (it enters the update as √scale)")
        if group[PROJ_TYPE] == "full":
            raise bad(
                PROJ_TYPE,
                "'full' is not an APOLLO projection (the random one is one-sided, channels need an "
                "unprojected side, and apollo-torch fails on it); use std, reverse_std, left or right",
            )
        if group[PROJ] == "random":
            if group[BASIS_BITS] != 32:
                raise bad(BASIS_BITS, "applies to a stored basis; proj='random' stores none (use 32)")
            if group[REFRESH_METHOD] != "svd":
                raise bad(REFRESH_METHOD, "chooses how proj='svd' computes its basis; proj='random' draws one")
            if group[MOMENT_POLICY] == "reproject":
                raise bad(MOMENT_POLICY, "'reproject' needs orthonormal bases; with proj='random' use keep or reset")

    # ------------------------------------------------------------------ the random projection
    def _prepare_projection(self, group, item, full_gradient=None) -> None:
        if group[PROJ] == "svd":
            return super()._prepare_projection(group, item, full_gradient)
        p = item["param"]
        state = self.state[p]
        item["side"] = self.side_of(group, p)
        step = int(state[STEP].item()) if STEP in state else 0
        item["step"] = step
        item["new_bases"] = None
        item["draw"] = not state or step % group[UPDATE_PROJ_GAP] == 0

    def _commit_refresh(self, group, item) -> None:
        if group[PROJ] == "svd":
            return super()._commit_refresh(group, item)
        if not item.pop("draw", False):
            return
        p = item["param"]
        state = self.state[p]
        if not state:
            state[STEP] = torch.zeros((), dtype=torch.float32)
            state[PROJ_STEP] = torch.zeros((), dtype=torch.float32)
            state[PROJ_SEED] = torch.tensor(group[REFRESH_SEED] + item["index"] + 1, dtype=torch.int64)
            m, n = proj.matrix_shape(p.shape)
            shape = proj.lowrank_shape(item["side"], m, n, group[RANK])
            self._init_lowrank_state(group, p, state, shape, compute_dtype(p.dtype))
            return
        state[PROJ_SEED].fill_(next_seed(int(state[PROJ_SEED])))
        if group[MOMENT_POLICY] == "reset":
            self._reset_state(group, p, state)
        state[PROJ_STEP].fill_(item["step"])

    def _init_lowrank_state(self, group, p, state, shape, dtype) -> None:
        super()._init_lowrank_state(group, p, state, shape, dtype)
        state[LIMITER_NORM] = torch.full((), math.inf, dtype=dtype, device=p.device)

    def _random_bases(self, group: dict[str, Any], p: torch.Tensor, side: str) -> list[torch.Tensor]:
        m, n = proj.matrix_shape(p.shape)
        seed = int(self.state[p][PROJ_SEED])
        return [random_projection(m, n, group[RANK], side, seed, p.device, compute_dtype(p.dtype))]

    # ------------------------------------------------------------------ the update
    def _lowrank_step(self, group: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Regenerate the random projections (on the host's schedule, outside any compiled graph),
        then the numeric update, compiled with ``compile`` (its inputs as plain arguments, as in
        LowRankOptimizer._lowrank_step)."""
        random = group[PROJ] == "random"
        compiled = getattr(self, "_compile_options", None) is not None
        calls = []
        for it in items:
            p = it["param"]
            call = {"param": p, "side": it["side"]}
            if random:
                call["bases"] = self._random_bases(group, p, it["side"])
            if compiled:
                call.update(grad=p.grad, state=self.state[p])
            calls.append(call)
        self._compiled("_lowrank_update")(group, calls)

    def _lowrank_update(self, group: dict[str, Any], items: list[dict[str, Any]]) -> None:
        params = [it["param"] for it in items]
        states = [it["state"] if "state" in it else self.state[p] for p, it in zip(params, items)]
        grads, lows = [], []
        for p, state, it in zip(params, states, items):
            bases = it["bases"] if "bases" in it else load_bases(state, it["side"], p, group[RANK])
            g = self._gradient_matrix(group, p, it.get("grad"))
            grads.append(g)
            lows.append(self._project_gradient(group, g, bases, it["side"]))
            state[STEP] += 1
        directions = self._lowrank_directions(group, params, lows, states)
        lr, wd = hyperparameter(group["lr"]), hyperparameter(group["weight_decay"])
        for p, state, it, g, low, d in zip(params, states, items, grads, lows, directions):
            factor = adam_step_factor(group, self._bias_step(group, state))
            raw = d if isinstance(factor, float) and factor == 1.0 else d / _as(factor, d)
            previous = None if group[DISABLE_NL] else state[LIMITER_NORM]
            multiplier, norm = apollo_multiplier(
                g, low, raw, it["side"], group[SCALE_TYPE], float(group[SCALE]), group[SCALE_FRONT], previous
            )
            if norm is not None:
                state[LIMITER_NORM].copy_(norm)
            _write_scaled_gradient(
                p,
                g,
                multiplier,
                lr=lr,
                step_factor=factor,
                weight_decay=wd,
                decay_after=group[EPS_MODE] == "galore_torch",
            )

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """LowRankOptimizer.load_state_dict, plus: the state of a randomly projected parameter keeps
        its dtype too. The base class recognises subspace state by its stored basis, which
        ``proj="random"`` does not have, and would cast the moments to the parameter's dtype (bf16)."""
        super().load_state_dict(state_dict)
        id_to_param = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                id_to_param[pid] = p
        for pid, values in state_dict["state"].items():
            if pid not in id_to_param or PROJ_SEED not in values:
                continue
            p = id_to_param[pid]
            restored = {}
            for key, value in values.items():
                if key in (STEP, PROJ_STEP):
                    restored[key] = value.detach().to(device="cpu", dtype=torch.float32, copy=True)
                elif key == PROJ_SEED:
                    restored[key] = value.detach().to(device="cpu", dtype=torch.int64, copy=True)
                else:
                    restored[key] = value.detach().to(device=p.device, copy=True)
            self.state[p] = restored


def _write_scaled_gradient(
    p: torch.Tensor,
    grad: torch.Tensor,
    multiplier: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    step_factor: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    decay_after: bool,
) -> None:
    """W ← W − lr·c_t·(G ⊙ μ) with decoupled decay before it (torch's AdamW) or after it
    (``decay_after``, the reference packages' order), as fira.write_update does with U = G ⊙ μ,
    but in one ``addcmul`` over G and W (μ is per channel or one number)."""
    shrink = lr * weight_decay
    in_place = p.dtype == grad.dtype and p.is_contiguous()
    w = proj.as_matrix(p) if in_place else proj.as_matrix(p).to(grad.dtype, copy=True)
    decays = isinstance(shrink, torch.Tensor) or shrink != 0.0
    if decays and not decay_after:
        _axpy_(w, w, -shrink)
    coef = lr * step_factor
    coef = coef.to(device=multiplier.device, dtype=multiplier.dtype) if isinstance(coef, torch.Tensor) else coef
    w.addcmul_(grad, multiplier * -coef)
    if decays and decay_after:
        _axpy_(w, w, -shrink)
    if not in_place:
        p.copy_(w.view_as(p))


def _as(x: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return x.to(device=like.device, dtype=like.dtype) if isinstance(x, torch.Tensor) else x


__all__ = ["ApolloAdamW", "apollo_multiplier", "apollo_update", "next_seed", "random_projection"]
