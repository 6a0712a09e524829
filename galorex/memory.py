"""Optimizer-state memory: measured from a live optimizer, and predicted analytically.

The analytic count follows galorex's state layout exactly, so the two agree to the byte once every
parameter has taken a step: a projected (m×n) weight at rank r holds two Adam moments of the
low-rank shape and its basis (or two, for ``full``) in float32 (float64 for float64 weights), plus
two float32 scalars (``step``, ``proj_step``); every other parameter holds AdamW's two moments in its
own dtype and a float32 ``step``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import projection as proj
from .optim import codec, registry
from .optim.config import compute_dtype
from .optim.dense import DENSE_8BIT_CHUNK

_SCALAR_BYTES = 4  # float32 step counters


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` (each storage counted once).

    Args:
        optimizer: any ``torch.optim.Optimizer``, after at least one step for the full count.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
                if value.device.type != "meta" and key in seen:
                    continue
                seen.add(key)
                total += value.numel() * value.element_size()
    return total


def parameter_state_bytes(
    shape: Iterable[int],
    dtype: torch.dtype = torch.float32,
    rank: int | None = None,
    proj_type: str = "std",
    optimizer: str = "galore",
    natural_history: int = 0,
    optim_bits: int = 32,
    basis_bits: int = 32,
    first_moment: bool = False,
    **group: Any,
) -> int:
    """State bytes of one parameter under galorex's layout, as the optimizer's rule counts them
    (``Rule.state_bytes``), plus its stored bases (``basis_bits``: 32, or 4/8 with a float32 scale
    per 64 entries; none for a generated projection) and two float32 step counters; an unprojected
    parameter holds its rule's state and one counter. ``optimizer`` is a registered name
    (``galore``, ``natural-galore``, ``gradnorm-lorp``, ``galore-adafactor``, ``fira``, ``apollo``…)
    or ``adamw`` (torch's AdamW). ``natural_history`` is NaturalGaLoreAdamW's s; ``optim_bits=8``
    stores Adam moments of 4096 or more entries in one byte each plus a float32 scale per 256;
    ``first_moment`` says GaLoreAdafactor keeps one (``beta1`` set; with ``optim_bits=8`` it and a
    vector's second moment are coded like Adam's, the factored row and column statistics stay
    float32); other group keys (``proj``…) as keywords.
    """
    settings = {
        "rank": rank,
        "proj_type": proj_type,
        "natural_history": natural_history,
        "optim_bits": optim_bits,
        "basis_bits": basis_bits,
        "beta1": 0.9 if first_moment else None,
        **group,
    }
    return _parameter_bytes(optimizer, settings, tuple(int(s) for s in shape), dtype)


def _rule_and_settings(optimizer: str, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    if optimizer == "galore" and settings.get("natural_history", 0) > 0:
        optimizer = "natural-galore"  # GaLoreAdamW's groups with NaturalGaLoreAdamW's window
    rule = registry.rule_for(optimizer)
    return rule, {**rule.defaults, **{k: v for k, v in settings.items() if v is not None or k == "beta1"}}


def _parameter_bytes(optimizer: str, settings: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype) -> int:
    rule, group = _rule_and_settings(optimizer, settings)
    rank = settings.get("rank")
    if optimizer == "adamw" or rank is None or len(shape) < 2 or math.prod(shape) == 0:
        return rule.state_bytes(group, shape, dtype) + _SCALAR_BYTES
    m, n = proj.matrix_shape(shape)
    side = proj.projection_side(group.get("proj_type", "std"), m, n)
    low_shape = proj.lowrank_shape(side, m, n, rank)
    bases = 0
    if not rule.basis_is_generated(group):
        bases = codec.bases_nbytes(side, m, n, rank, group.get("basis_bits", 32), compute_dtype(dtype))
    return rule.state_bytes(group, shape, dtype, low_shape) + bases + 2 * _SCALAR_BYTES


def estimate_optimizer_state_bytes(
    model_or_groups: nn.Module | list[dict[str, Any]] | Iterable[Any],
    optimizer: str = "galore",
    **group_defaults: Any,
) -> int:
    """Analytic optimizer-state bytes for a model (every parameter on AdamW) or for param groups as
    given to ``GaLoreAdamW`` (``rank``/``proj_type`` read per group; ``group_defaults`` fill keys a
    group lacks, e.g. ``proj_type``). Works on the meta device: nothing is allocated.
    With ``optimizer="adamw"`` every parameter is counted as torch.optim.AdamW holds it. For
    NaturalGaLoreAdamW pass ``natural_history=s`` (or have the key in the groups): its window of s
    low-rank gradients per matrix is counted too. For GaLoreAdafactor pass
    ``optimizer="adafactor"`` (and ``beta1`` when it keeps a first moment). Any registered
    optimizer name works: its rule counts its own state.
    """
    if isinstance(model_or_groups, nn.Module):
        groups = [{"params": list(model_or_groups.parameters())}]
    else:
        groups = list(model_or_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
    total = 0
    for group in groups:
        settings = {**group_defaults, **{k: v for k, v in group.items() if k != "params"}}
        settings.setdefault("natural_history", 0)
        for p in group["params"]:
            if isinstance(p, tuple):
                p = p[1]
            if not p.requires_grad:
                continue
            total += _parameter_bytes(optimizer, settings, tuple(p.shape), p.dtype)
    return total


# ----------------------------------------------------------------------------- a training run's peak
GiB = 1024**3

# Bytes of a fresh interpreter with torch imported, before galorex-train builds anything: an
# allowance in the breakdown (docs/benchmarks.md, "Peak memory of a training run", sets the
# breakdown against measured peaks).
CPU_RUNTIME_BYTES = int(0.4 * GiB)


def _saved_bytes(model_cfg: Any, batch_size: int, seq_len: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """Distinct storages (parameters excluded) autograd saves in one training forward, counted
    under FakeTensorMode: CPU kernels are chosen as on the CPU (its fused attention, which keeps no
    T×T matrix), but nothing is allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.autograd.graph import saved_tensors_hooks

    from .models.llama import Llama

    seen: dict[int, int] = {}
    with torch.device("meta"):  # structure only: no initialisation runs on real (or fake) storage
        model = Llama(model_cfg, activation_checkpointing=checkpointing).to(dtype)
    model.train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        own = {p.untyped_storage()._cdata for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st._cdata not in own:
                seen[st._cdata] = st.nbytes()
            return t

        idx = torch.zeros(batch_size, seq_len, dtype=torch.long)
        with saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx)
    return sum(seen.values())


@functools.lru_cache(maxsize=64)
def _activation_bytes(cfg_items: tuple, batch_size: int, seq_len: int, dtype: torch.dtype, ckpt: bool) -> int:
    import dataclasses

    from .models.llama import LlamaConfig

    cfg = LlamaConfig(**dict(cfg_items))
    # Every block saves the same: count models of 1 and 2 blocks and extrapolate (exact).
    one = _saved_bytes(dataclasses.replace(cfg, num_layers=1), batch_size, seq_len, dtype, ckpt)
    two = _saved_bytes(dataclasses.replace(cfg, num_layers=2), batch_size, seq_len, dtype, ckpt)
    total = one + (cfg.num_layers - 1) * (two - one)
    if ckpt:  # backward recomputes one block at a time, saving what it saves without checkpointing
        plain_one = _saved_bytes(dataclasses.replace(cfg, num_layers=1), batch_size, seq_len, dtype, False)
        plain_two = _saved_bytes(dataclasses.replace(cfg, num_layers=2), batch_size, seq_len, dtype, False)
        total += plain_two - plain_one
    return total


def activation_bytes(
    model_cfg: Any,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
) -> int:
    """Bytes autograd keeps for backward during a training forward of ``model_cfg`` (a
    :class:`~galorex.models.llama.LlamaConfig`), counted by running the forward under
    ``FakeTensorMode`` with a ``saved_tensors_hooks`` that sums the distinct storages saved
    (parameters excluded): nothing is allocated, and the kernels are the CPU's. Models of one and
    two blocks are counted and the difference scaled to ``num_layers`` (the blocks are identical).
    With ``activation_checkpointing`` each block keeps only its input, and backward recomputes one
    block at a time: the count is what the checkpointed forward saves plus one block's own saved
    activations (the peak while that block is recomputed).

    Args:
        model_cfg: the model's ``LlamaConfig``.
        batch_size, seq_len: the training batch.
        dtype: the model's dtype.
        activation_checkpointing: as ``galorex-train --activation-checkpointing``.
    """
    items = tuple(sorted(model_cfg.to_dict().items()))
    return _activation_bytes(items, int(batch_size), int(seq_len), dtype, bool(activation_checkpointing))


def training_memory_breakdown(
    model_cfg: Any,
    *,
    dtype: torch.dtype = torch.float32,
    optimizer: str = "galore",
    rank: int = 128,
    proj_type: str = "std",
    optim_bits: int = 32,
    basis_bits: int = 32,
    natural_history: int = 0,
    layerwise: bool = False,
    activation_checkpointing: bool = False,
    batch_size: int = 1,
    seq_len: int = 256,
    beta1: float = 0.9,
    weight_bits: int | None = None,
    weight_group_size: int = 256,
    weight_rounding: str | None = None,
) -> dict[str, int]:
    """The analytic peak of a ``galorex-train`` step, in bytes, by part:

    - ``weights``: every parameter in ``dtype``; with ``weight_bits=8`` the attention and MLP
      weights as one byte an element (their INT8 codes),
    - ``weight_scales``: and a float32 scale per ``weight_group_size`` of those elements (0 without
      ``weight_bits``);
    - ``gradients``: every gradient at once, or with ``layerwise`` the largest live one (each is
      stepped and freed as soon as it is complete);
    - ``optimizer_state``: :func:`estimate_optimizer_state_bytes` on the groups ``galorex-train``
      builds (attention and MLP weights projected at ``rank``, the rest on AdamW; ``adamw`` alone
      keeps its moments in ``dtype``, in 8 bits with ``optim_bits=8``);
    - ``activations``: :func:`activation_bytes` for the batch;
    - ``step_workspace``: float32 temporaries of the optimizer's largest single update: for the
      largest projected weight, its low-rank step and its float32 copies — the gradient cast to
      float32 (freed after the projection unless the rule keeps it: Fira, APOLLO, GradNormLoRP)
      and the weight's float32 working copy when its storage is below float32 (bf16, INT8 codes),
      with the rounding write's chunk temporaries for INT8 or stochastically rounded weights — or
      the float32 temporaries of one slice of the largest unprojected weight when ``optim_bits=8``
      (stepped ``DENSE_8BIT_CHUNK`` elements at a time; GaLoreAdafactor's whole weight at once),
      whichever is larger;
    - ``runtime``: the interpreter and torch themselves (:data:`CPU_RUNTIME_BYTES`).

    ``total`` is their sum. Built on the meta device: nothing is allocated.

    Args:
        model_cfg: the model's ``LlamaConfig``.
        dtype: the weights' dtype.
        optimizer: a registered optimizer name, or ``adamw``.
        rank, proj_type, optim_bits, basis_bits, natural_history: the projected group's settings,
            as the ``galorex-train`` flags of the same names.
        layerwise, activation_checkpointing: as ``galorex-train --layerwise`` and
            ``--activation-checkpointing``.
        batch_size, seq_len: the training batch.
        beta1: the first moment's β₁ of an optimizer for which it is optional (0: none kept).
        weight_bits, weight_group_size: INT8 attention and MLP weights (``--weight-bits 8``).
        weight_rounding: as the group key (stochastic rounding writes bf16 weights on a copy).
    """
    from .models.llama import Llama
    from .optim.groups import galore_param_groups
    from .weights import codes as weight_codes
    from .weights.convert import quantized_linear_names
    from .weights.write import BF16_DEFAULT_ROUNDING

    with torch.device("meta"):
        model = Llama(model_cfg).to(dtype)
    params = list(model.parameters())
    sizes = [p.numel() * p.element_size() for p in params]
    quantized: set[int] = set()
    if weight_bits is not None:
        modules = dict(model.named_modules())
        quantized = {id(modules[n].weight) for n in quantized_linear_names(model)}
    weights = sum(p.numel() if id(p) in quantized else size for p, size in zip(params, sizes))
    scales = sum(4 * weight_codes.num_groups(p.numel(), weight_group_size) for p in params if id(p) in quantized)
    gradients = max(sizes) if layerwise else sum(sizes)
    name = registry.ALIASES.get(optimizer, optimizer)  # one spelling per optimizer from here on
    if optimizer == "apollo-mini":
        rank = 1  # ApolloAdamW.mini sets rank 1 on every projected group
    if name == "adamw":
        # 8 bits: a galorex optimizer with no rank group (its moments packed), else torch's AdamW.
        if optim_bits == 8:
            state = estimate_optimizer_state_bytes(model, optimizer="galore", optim_bits=8)
        else:
            state = estimate_optimizer_state_bytes(model, optimizer="adamw")
        projected: set[int] = set()
    else:
        groups = galore_param_groups(model, rank=rank, proj_type=proj_type)
        state = estimate_optimizer_state_bytes(
            groups,
            optimizer=name,
            optim_bits=optim_bits,
            basis_bits=basis_bits,
            natural_history=natural_history if name == "natural-galore" else 0,
            beta1=beta1 if beta1 > 0 else None,
        )
        projected = {id(p) for _, p in groups[-1]["params"]}
    cbytes = 8 if dtype == torch.float64 else 4
    below = dtype not in (torch.float32, torch.float64)  # gradient cast, weight on a float32 copy
    stochastic = (weight_rounding or BF16_DEFAULT_ROUNDING) == "stochastic"
    keeps_gradient = name in ("fira", "apollo", "gradnorm-lorp")  # the rule's record is the gradient
    workspace = 0
    for p in params:
        if id(p) in projected:
            m, n = proj.matrix_shape(p.shape)
            side = proj.projection_side(proj_type, m, n)
            lm, ln = proj.lowrank_shape(side, m, n, rank)
            # Float32 copies of the gradient (cast, while it is projected; kept through the write
            # when the rule needs it) and of the weight (written on a copy), three low-rank tensors
            # (projected gradient, m, v), and the rounding write's chunk temporaries.
            copies = int(below) * (2 if keeps_gradient else 1) + int(id(p) in quantized and not below)
            rounding = id(p) in quantized or (below and stochastic)
            chunk = weight_codes.WRITE_TEMPORARIES * min(p.numel(), weight_codes.chunk_elements(weight_group_size))
            step = copies * p.numel() * cbytes + 3 * lm * ln * cbytes + (chunk * 4 if rounding else 0)
            workspace = max(workspace, step)
        elif optim_bits == 8 and name == "galore-adafactor":
            # Adafactor's dense step is not elementwise (row and column means, the update's RMS), so
            # it takes the whole weight at once: the decoded first moment and the three float32
            # temporaries of the factored update (R² + ε₁, the update and its next value).
            workspace = max(workspace, 4 * p.numel() * cbytes)
        elif optim_bits == 8:
            # Stepped DENSE_8BIT_CHUNK elements at a time: about 8 float32 temporaries of a slice.
            workspace = max(workspace, 8 * min(p.numel(), DENSE_8BIT_CHUNK) * cbytes)
        else:
            workspace = max(workspace, p.numel() * cbytes)
    parts = {
        "weights": weights,
        "weight_scales": scales,
        "gradients": gradients,
        "optimizer_state": state,
        "activations": activation_bytes(model_cfg, batch_size, seq_len, dtype, activation_checkpointing),
        "step_workspace": workspace,
        "runtime": CPU_RUNTIME_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts
