"""``QuantizedWeight``: a linear layer's weight held as INT8 codes and group scales, that autograd and
optimizers see as a float parameter of the compute dtype.

It is a wrapper tensor subclass (shape, dtype and device of the weight it replaces; no storage of its
own) around ``codes`` (int8, the weight's shape) and ``scales`` (float32, one per group of
``group_size`` consecutive elements: :mod:`galorex.weights.codes`). What it does:

- ``F.linear(x, W, b)`` (``nn.Linear.forward``, Hugging Face's layers) runs :class:`QuantizedLinearFunction`:
  W is dequantised to the compute dtype for the forward GEMM and again in backward, so only the codes
  are kept for backward. The weight's gradient is a plain dense tensor of the compute dtype, delivered
  as any parameter's gradient (post-accumulate-grad hooks included, so layer-wise mode works).
- ``detach``, ``clone``, ``.to(device)``, ``deepcopy`` and pickling keep it quantised; ``.to(dtype)``
  with another floating dtype keeps the codes and changes the compute dtype (``model.float()``
  computes in float32 from the same codes; ``galorex.dequantize_weights`` gives float weights back).
- ``copy_`` from another ``QuantizedWeight`` copies codes and scales; from a float tensor it quantises
  to nearest (``load_state_dict`` of float weights into a quantised model).
- Any other operation sees the dequantised weight and returns plain tensors (reading works
  everywhere); an in-place operation other than ``copy_`` raises a TypeError, since rounding an
  update into the codes is the optimizer's write (:mod:`galorex.weights.write`), which galorex's
  optimizers run for every rule.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from . import codes as C

aten = torch.ops.aten

# Operations that make a new tensor of the weight's shape from nothing but its metadata: answered
# with a plain tensor, without dequantising.
_LIKE = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default}


class QuantizedLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with W = dequantise(codes, scales) in the compute dtype, for a
    :class:`QuantizedWeight` W: backward gives ∂L/∂x = g W, ∂L/∂W = gᵀ x (dense, the compute
    dtype), ∂L/∂b = Σ g, dequantising W again rather than keeping it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight.dequantize(), bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.dequantize()
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = rows.mT @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(dim=0)
        return grad_x, grad_w, grad_b


class QuantizedWeight(torch.Tensor):
    """A weight stored as INT8 codes with float32 group scales (module docstring).

    Args:
        codes: int8 codes, the weight's shape, contiguous.
        scales: float32 scales, ``codes.numel() / group_size`` rounded up.
        group_size: elements per scale (a positive multiple of 32).
        dtype: the compute dtype the weight is dequantised to (bf16, float32 …).
        requires_grad: as for a parameter.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @staticmethod
    def __new__(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        dtype: torch.dtype,
        requires_grad: bool = False,
    ) -> QuantizedWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls, codes.shape, dtype=dtype, device=codes.device, requires_grad=requires_grad
        )

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        dtype: torch.dtype,
        requires_grad: bool = False,
    ) -> None:
        if codes.dtype != torch.int8 or not codes.is_contiguous():
            raise ValueError(f"QuantizedWeight: codes must be a contiguous int8 tensor, got {codes.dtype}")
        if scales.dtype != torch.float32 or scales.numel() != C.num_groups(codes.numel(), group_size):
            raise ValueError(
                f"QuantizedWeight: {C.num_groups(codes.numel(), group_size)} float32 scales expected for "
                f"{codes.numel()} codes in groups of {group_size}, got {scales.numel()} {scales.dtype}"
            )
        if not dtype.is_floating_point:
            raise ValueError(f"QuantizedWeight: the compute dtype must be floating point, got {dtype}")
        self.codes, self.scales, self.group_size = codes, scales, int(group_size)

    # ------------------------------------------------------------------ values
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a plain tensor in ``dtype`` (default: the compute dtype)."""
        return C.dequantize(self.codes, self.scales, self.group_size, dtype or self.dtype)

    @property
    def storage_bytes(self) -> int:
        """Bytes held: one per code plus four per group scale."""
        return self.codes.numel() + 4 * self.scales.numel()

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return (
            f"QuantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"int8 codes, group_size={self.group_size}, requires_grad={self.requires_grad})"
        )

    def __reduce_ex__(self, protocol: int):
        # Pickle and deepcopy rebuild it from its parts (plain tensors).
        return _rebuild, (self.codes, self.scales, self.group_size, self.dtype, self.requires_grad)

    # ------------------------------------------------------------------ torch.compile / FSDP protocol
    def __tensor_flatten__(self):
        return ["codes", "scales"], (self.group_size, self.dtype)

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, torch.Tensor], meta: tuple, outer_size: Any, outer_stride: Any):
        return cls(inner["codes"], inner["scales"], meta[0], meta[1])

    # ------------------------------------------------------------------ dispatch
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, QuantizedWeight) and not isinstance(x, QuantizedWeight):
                return QuantizedLinearFunction.apply(x, weight, bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            (w,) = args
            return QuantizedWeight(w.codes, w.scales, w.group_size, w.dtype)
        if func is aten.clone.default:
            w = args[0]
            return QuantizedWeight(w.codes.clone(), w.scales.clone(), w.group_size, w.dtype)
        if func is aten._to_copy.default:
            return _to_copy(args[0], **kwargs)
        if func is aten.copy_.default:
            return _copy_into(args[0], args[1])
        if func in _LIKE:
            w = args[0]
            kwargs.setdefault("dtype", w.dtype)
            kwargs.setdefault("device", w.device)
            return func(torch.empty(w.shape, dtype=w.dtype, device="meta"), *args[1:], **kwargs)
        if func._schema.is_mutable and args and isinstance(args[0], QuantizedWeight):
            raise TypeError(
                f"{func}: a QuantizedWeight (INT8 codes) cannot be updated in place; galorex optimizers "
                "write it (dequantise, update in float32, requantise with stochastic rounding), other "
                "optimizers cannot"
            )
        plain = tree_map(lambda t: t.dequantize() if isinstance(t, QuantizedWeight) else t, (args, kwargs))
        return func(*plain[0], **plain[1])


def _rebuild(codes, scales, group_size, dtype, requires_grad) -> QuantizedWeight:
    return QuantizedWeight(codes, scales, group_size, dtype, requires_grad)


def _to_copy(w: QuantizedWeight, **kwargs: Any) -> torch.Tensor:
    dtype = kwargs.pop("dtype", None) or w.dtype
    device = kwargs.pop("device", None) or w.device
    kwargs.pop("layout", None)
    kwargs.pop("memory_format", None)
    non_blocking = kwargs.pop("non_blocking", False)
    if not dtype.is_floating_point:
        return w.dequantize(torch.float32).to(dtype=dtype, device=device, non_blocking=non_blocking)
    codes = w.codes.to(device=device, non_blocking=non_blocking, copy=True)
    scales = w.scales.to(device=device, non_blocking=non_blocking, copy=True)
    return QuantizedWeight(codes, scales, w.group_size, dtype)


def _copy_into(dst: QuantizedWeight, src: torch.Tensor) -> QuantizedWeight:
    if isinstance(src, QuantizedWeight):
        if src.group_size != dst.group_size or src.shape != dst.shape:
            raise ValueError(
                f"copy_: a QuantizedWeight of shape {tuple(src.shape)} in groups of {src.group_size} cannot be "
                f"copied into one of shape {tuple(dst.shape)} in groups of {dst.group_size}"
            )
        dst.codes.copy_(src.codes)
        dst.scales.copy_(src.scales)
        return dst
    if src.shape != dst.shape:
        raise ValueError(f"copy_: values of shape {tuple(src.shape)} into a QuantizedWeight of {tuple(dst.shape)}")
    C.quantize_(src.to(dst.device), dst.codes, dst.scales, dst.group_size, "nearest")
    return dst


__all__ = ["QuantizedLinearFunction", "QuantizedWeight"]
