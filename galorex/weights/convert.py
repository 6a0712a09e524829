"""Converting a model's linear layers to INT8 weights, and their state dicts.

:func:`quantize_weights` replaces the ``weight`` of chosen ``nn.Linear`` modules by a
:class:`~galorex.weights.tensor.QuantizedWeight` parameter (the modules themselves stay, so a
Hugging Face model keeps its classes and names); :func:`dequantize_weights` undoes it. A converted
module's ``state_dict()`` holds ``<name>.weight_codes`` (int8, the weight's shape) and
``<name>.weight_scales`` (float32, one per group) instead of ``<name>.weight``, plain tensors that
``torch.load(weights_only=True)`` and safetensors take; ``load_state_dict`` accepts those, or a
float ``<name>.weight``, which it quantises to nearest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from . import codes as C
from .tensor import QuantizedWeight

WEIGHT_BITS = (8,)
DEFAULT_GROUP_SIZE = 256
CODES_SUFFIX = "weight_codes"
SCALES_SUFFIX = "weight_scales"


def check_bits(bits: object, what: str = "bits") -> int:
    """``bits`` as an int, or a ValueError naming ``what``: only 8 is implemented."""
    if isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise ValueError(f"{what} must be one of {WEIGHT_BITS} (INT8 weights), got {bits!r}")
    return int(bits)


def quantized_linear_names(model: nn.Module, target_modules: str | Sequence[str] = ("attn", "mlp")) -> list[str]:
    """Names of the ``nn.Linear`` modules whose weights :func:`quantize_weights` converts: those
    ``galore_param_groups`` projects (``target_modules`` as there: substrings, a regular
    expression, or ``"all-linear"``; never an embedding or the output head)."""
    from ..optim.groups import select_galore_parameters  # the projection's own choice of weights

    selected = set(select_galore_parameters(model, target_modules))
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (f"{name}.weight" if name else "weight") in selected
    ]


def _empty_quantized(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    codes = torch.zeros(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.zeros(C.num_groups(weight.numel(), group_size), dtype=torch.float32, device=weight.device)
    return QuantizedWeight(codes, scales, group_size, weight.dtype)


def quantize_linear_(module: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE, values: bool = True) -> None:
    """Replace one ``nn.Linear``'s weight by a :class:`QuantizedWeight` of the same dtype, device and
    ``requires_grad`` (codes rounded to nearest; ``values=False`` or a meta weight: zero codes, for
    weights about to be loaded), and install the state-dict hooks (module docstring)."""
    w = module.weight
    if isinstance(w, QuantizedWeight):
        return
    if values and w.device.type != "meta":
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"quantize_weights: the weight of {module} holds non-finite values")
        q = QuantizedWeight(*C.quantize(w.detach(), group_size), group_size, w.dtype)
    else:
        q = _empty_quantized(w, group_size)
    module.weight = nn.Parameter(q, requires_grad=w.requires_grad)
    if not getattr(module, "_galorex_quantized_hooks", False):
        _register(module, "state_dict_post", _state_dict_hook)
        _register(module, "load_pre", _load_hook)
        module._galorex_quantized_hooks = True


def quantize_weights(
    model: nn.Module,
    bits: int = 8,
    group_size: int = DEFAULT_GROUP_SIZE,
    target_modules: str | Sequence[str] = ("attn", "mlp"),
) -> int:
    """Convert the chosen ``nn.Linear`` weights of ``model`` to INT8 codes with one float32 scale per
    group of ``group_size`` consecutive elements (symmetric, rounded to nearest), in place.

    Build the optimizer afterwards: it must hold the new parameters. Every galorex optimizer then
    writes them by dequantising, updating in float32 and requantising (stochastic rounding by
    default: the group key ``weight_rounding``).

    Args:
        model: galorex's ``Llama``, a Hugging Face ``LlamaForCausalLM``, or any module.
        bits: 8 (the only width implemented).
        group_size: elements per scale, a positive multiple of 32.
        target_modules: which layers (:func:`quantized_linear_names`); by default those GaLore
            projects (attention and MLP weights).

    Returns:
        How many weights were converted (weights already quantised are not counted again).

    Raises:
        ValueError: a bad ``bits`` or ``group_size``, a weight with non-finite values, or no
            ``nn.Linear`` matching ``target_modules`` (the error lists the candidates).
    """
    check_bits(bits)
    C.check_group_size(group_size)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_weights: model must be an nn.Module, got {type(model).__name__}")
    try:
        names = quantized_linear_names(model, target_modules)
    except ValueError as e:
        raise ValueError(f"quantize_weights: {e}") from None
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"quantize_weights: no nn.Linear of {type(model).__name__} matches target_modules={target_modules!r}; "
            f"its linear layers: {linears[:12]}{' …' if len(linears) > 12 else ''}"
        )
    modules = dict(model.named_modules())
    converted = 0
    for name in names:
        if not isinstance(modules[name].weight, QuantizedWeight):
            quantize_linear_(modules[name], group_size)
            converted += 1
    return converted


def dequantize_weights(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every :class:`QuantizedWeight` of ``model`` by a plain parameter of its dequantised
    values (in ``dtype``, default the compute dtype) and remove the state-dict hooks; returns how
    many. The model's state dict then has plain ``weight`` entries again."""
    count = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, QuantizedWeight):
            module.weight = nn.Parameter(w.dequantize(dtype), requires_grad=w.requires_grad)
            for handle in getattr(module, "_galorex_quantized_handles", []):
                handle.remove()
            module._galorex_quantized_handles = []
            module._galorex_quantized_hooks = False
            count += 1
    return count


def quantized_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, module) of every module whose weight is a :class:`QuantizedWeight`."""
    return ((n, m) for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), QuantizedWeight))


def has_quantized_weights(model: nn.Module) -> bool:
    return any(isinstance(p, QuantizedWeight) for p in model.parameters())


# ----------------------------------------------------------------------------- loading across storage
def reconcile_keys(
    own: Iterable[str], source: Iterable[str]
) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """How a saved state dict's names meet a model whose weights are stored otherwise.

    Args:
        own: the model's state-dict names.
        source: the saved names.

    Returns:
        (``to_quantize``: a float ``<name>.weight`` in the source for a weight held as INT8 codes
        here → the model's (codes, scales) names it replaces; ``to_dequantize``: a float weight here
        whose source holds INT8 codes → the source's (codes, scales) names.)
    """
    own, source = set(own), set(source)
    to_quantize, to_dequantize = {}, {}
    for name in own:
        if name.endswith("." + CODES_SUFFIX) or name == CODES_SUFFIX:
            prefix = name[: -len(CODES_SUFFIX)]
            if prefix + "weight" in source and name not in source:
                to_quantize[prefix + "weight"] = (name, prefix + SCALES_SUFFIX)
        elif name.endswith(".weight") or name == "weight":
            prefix = name[: -len("weight")]
            pair = (prefix + CODES_SUFFIX, prefix + SCALES_SUFFIX)
            if name not in source and pair[0] in source:
                to_dequantize[name] = pair
    return to_quantize, to_dequantize


def group_size_of(numel: int, num_scales: int, what: str) -> int:
    """The group size that gives ``num_scales`` groups over ``numel`` elements (a saved INT8 weight
    does not store it), or a ValueError naming ``what``."""
    size = -(-int(numel) // max(int(num_scales), 1))
    size = -(-size // 32) * 32
    if num_scales < 1 or C.num_groups(numel, size) != num_scales:
        raise ValueError(f"{what}: {num_scales} scales fit no group size (a multiple of 32) over {numel} codes")
    return size


@torch.no_grad()
def load_across_storage(
    model: nn.Module,
    to_quantize: dict[str, tuple[str, str]],
    to_dequantize: dict[str, tuple[str, str]],
    read: Any,
) -> None:
    """Fill the weights :func:`reconcile_keys` matched across storage, one tensor at a time:
    ``read(name)`` gives a saved tensor; a float weight is quantised to nearest into INT8 codes, a
    saved INT8 weight dequantised into a float one. Raises ValueError naming a mismatched shape."""
    params = dict(model.named_parameters())
    for name in to_quantize:
        values, target = read(name), params[name]
        if tuple(values.shape) != tuple(target.shape):
            raise ValueError(f"{name} has shape {tuple(values.shape)}, the model needs {tuple(target.shape)}")
        target.copy_(values)
    for name, (codes_name, scales_name) in to_dequantize.items():
        codes, scales, target = read(codes_name), read(scales_name).reshape(-1), params[name]
        if tuple(codes.shape) != tuple(target.shape) or codes.dtype != torch.int8:
            raise ValueError(
                f"{codes_name}: int8 codes of shape {tuple(target.shape)} expected, "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )
        size = group_size_of(codes.numel(), scales.numel(), scales_name)
        target.copy_(C.dequantize(codes.contiguous(), scales.to(torch.float32), size, target.dtype))


# ----------------------------------------------------------------------------- state dicts
def _register(module: nn.Module, kind: str, hook: Any) -> None:
    if kind == "state_dict_post":
        register = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
        handle = register(hook)
    else:
        public = getattr(module, "register_load_state_dict_pre_hook", None)
        if public is not None:
            handle = public(hook)
        else:  # torch < 2.5: the private form, with the module passed first
            handle = module._register_load_state_dict_pre_hook(hook, with_module=True)
    module.__dict__.setdefault("_galorex_quantized_handles", []).append(handle)


def _state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    key = prefix + "weight"
    w = state_dict.get(key)
    if isinstance(w, QuantizedWeight):
        del state_dict[key]
        state_dict[prefix + CODES_SUFFIX] = w.codes
        state_dict[prefix + SCALES_SUFFIX] = w.scales


def _load_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    codes_key, scales_key = prefix + CODES_SUFFIX, prefix + SCALES_SUFFIX
    if codes_key not in state_dict and scales_key not in state_dict:
        return  # a float weight (quantised on copy) or nothing: torch reports what is missing
    own = module.weight
    if not isinstance(own, QuantizedWeight):
        raise ValueError(
            f"{codes_key}: the state dict holds INT8 codes for a weight that is not quantised here "
            "(call galorex.quantize_weights on the model first)"
        )
    codes, scales = state_dict.pop(codes_key, None), state_dict.pop(scales_key, None)
    if codes is None or scales is None:
        raise ValueError(f"{prefix}weight: the state dict holds only one of {CODES_SUFFIX} and {SCALES_SUFFIX}")
    if tuple(codes.shape) != tuple(own.shape) or codes.dtype != torch.int8 or scales.numel() != own.scales.numel():
        raise ValueError(
            f"{codes_key}: int8 codes of shape {tuple(own.shape)} with {own.scales.numel()} scales (groups of "
            f"{own.group_size}) expected, got {codes.dtype} {tuple(codes.shape)} with {scales.numel()} scales"
        )
    state_dict[prefix + "weight"] = QuantizedWeight(
        codes.contiguous(), scales.reshape(-1).to(torch.float32), own.group_size, own.dtype
    )


__all__ = [
    "CODES_SUFFIX",
    "DEFAULT_GROUP_SIZE",
    "SCALES_SUFFIX",
    "WEIGHT_BITS",
    "check_bits",
    "dequantize_weights",
    "group_size_of",
    "has_quantized_weights",
    "load_across_storage",
    "quantize_linear_",
    "quantize_weights",
    "quantized_linear_names",
    "quantized_modules",
    "reconcile_keys",
]
