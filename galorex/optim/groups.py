"""Parameter groups for GaLore: which weights are projected, which stay on AdamW."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# Names of output heads in common models (ours, Hugging Face, Meta's reference Llama).
_HEAD_NAMES = ("lm_head", "output", "embed_out")


def _is_head(module_name: str) -> bool:
    return module_name.split(".")[-1] in _HEAD_NAMES


def select_galore_parameters(model: nn.Module, target_modules: str | Sequence[str] = ("attn", "mlp")) -> list[str]:
    """Names of the parameters GaLore should project.

    ``target_modules`` is a sequence of substrings of module names (galore-torch's convention), a
    regular expression (a single string, matched with ``re.search`` against the module name), or
    ``"all-linear"`` for every ``nn.Linear`` except the output head. Only weights with ≥ 2
    dimensions are candidates; embeddings, the output head (also when tied to the embedding) and
    norms are never projected.

    Args:
        model: the model.
        target_modules: substrings, a regular expression, or ``"all-linear"`` (above).

    Returns:
        Parameter names (as ``model.named_parameters()`` gives them), in module order.

    Raises:
        ValueError: an invalid regular expression, or an empty or non-string sequence.
    """
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {e}") from e
        matches = lambda name: pattern.search(name) is not None
    elif isinstance(target_modules, str):
        matches = None
    else:
        keys = list(target_modules)
        if not keys or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"target_modules must be non-empty strings, got {target_modules!r}")
        matches = lambda name: any(k in name for k in keys)

    excluded: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or _is_head(module_name):
            excluded.update(id(p) for p in module.parameters(recurse=False))

    selected = []
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in excluded or p.dim() < 2 or not p.requires_grad:
                continue
            if matches is None:
                ok = isinstance(module, nn.Linear)
            else:
                ok = matches(module_name)
            if ok:
                selected.append(f"{module_name}.{pname}" if module_name else pname)
    return selected


def galore_param_groups(
    model: nn.Module,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: str | Sequence[str] = ("attn", "mlp"),
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Two groups: the weights selected by ``target_modules`` (see :func:`select_galore_parameters`)
    with the GaLore keys, and everything else as a plain AdamW group.

    Parameters are given with their names, so optimizer errors name them. Parameters that do not
    require gradients are left out.

    Args:
        model: the model.
        rank, update_proj_gap, scale, proj_type: the projected group's keys (``scale`` 0.25, the
            GaLore paper's α).
        target_modules: as :func:`select_galore_parameters`.
        **group_options: further keys of the projected group (``refresh_method``,
            ``moment_policy``, ``weight_decay`` …).

    Returns:
        ``[plain group, projected group]`` (the plain one only when there is something in it).

    Raises:
        ValueError: ``target_modules`` matches no weight (the error lists candidate modules).
    """
    names = set(select_galore_parameters(model, target_modules))
    if not names:
        available = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.dim() >= 2})
        raise ValueError(
            f"target_modules={target_modules!r} matches no weight of {type(model).__name__}; "
            f"modules with matrix weights: {available[:12]}{' …' if len(available) > 12 else ''}"
        )
    projected: list[tuple[str, torch.Tensor]] = []
    regular: list[tuple[str, torch.Tensor]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (projected if name in names else regular).append((name, p))
    groups: list[dict[str, Any]] = []
    if regular:
        groups.append({"params": regular})
    groups.append(
        {
            "params": projected,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": proj_type,
            **group_options,
        }
    )
    return groups
