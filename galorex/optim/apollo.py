"""ApolloAdamW (APOLLO: Zhu et al., 2024, "SGD-like Memory, AdamW-level Performance") — the step
loop with the APOLLO rule (``rules.apollo``, where the maths and its pure functions live)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .config import RANK, SCALE
from .galore import GaLoreAdamW
from .rules.apollo import (
    PROJ,
    PROJ_SEED,
    SCALE_FRONT,
    SCALE_TYPE,
    ApolloRule,
    apollo_multiplier,
    apollo_update,
    next_seed,
    random_projection,
)


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
    without ``rank`` and 1-D parameters are plain AdamW, by default torch's fused kernel where
    it serves them (as GaLoreAdamW's ``foreach``/``fused``: ``foreach=False`` gives torch's
    single-tensor loop, which would dominate APOLLO's step on a language model's embeddings and
    head; docs/benchmarks.md measures both). The rank is clipped to min(m, n)
    (apollo-torch would draw more rows than the matrix has).

    Differences from apollo-torch, none of which changes a run it can do: ``proj_type`` other than
    ``std`` with channel-wise scaling, which apollo-torch computes along the wrong axis (a shape
    error unless the rank is 1), scales the unprojected dimension's channels here; a float64 weight
    gets a float32 draw cast to float64, as there. FSDP2 (DTensor) parameters work as for every
    galorex optimizer.
    """

    rule = ApolloRule()

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
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            proj=proj,
            scale_type=scale_type,
            scale_front=scale_front,
            disable_nl=disable_nl,
            **galore_options,
        )

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


__all__ = [
    "PROJ",
    "PROJ_SEED",
    "SCALE_FRONT",
    "SCALE_TYPE",
    "ApolloAdamW",
    "apollo_multiplier",
    "apollo_update",
    "next_seed",
    "random_projection",
]
