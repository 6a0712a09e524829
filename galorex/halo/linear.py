"""``HaloLinear``: an ``nn.Linear`` whose three GEMMs run on quantised operands (FP8 or INT8).

For X (T×K tokens × in_features), W (N×K), E_Y = ∂L/∂Y (T×N), Q(·) the scaled quantiser of
:mod:`galorex.lowp.quant`, R_K / R_N block Hadamard rotations of the K / N dimension:

    level 0   Y = Q(X) Q(W)ᵀ             E_X = Q(E_Y) Q(Wᵀ)ᵀ               G = Q(E_Yᵀ) Q(Xᵀ)ᵀ
    level 1   Y = Q(X R_K) Q(W R_K)ᵀ     E_X as level 0                   G as level 0
    level 2   Y as level 1               E_X = Q(E_Y R_N) Q(Wᵀ R_N)ᵀ      G as level 0

(every rotation is on the GEMM's inner dimension, so (A R)(B R)ᵀ = A Bᵀ and nothing needs undoing).
The bias and its gradient stay in high precision; the weight is a high-precision master copy, so
every galorex optimizer trains it unchanged.

Placement against HALO (Ashkboos et al., 2025; code IST-DASLab/HALO, ``qllmt/nn``): level 1 is
the same — its ``HaloFnLevel1`` rotates X and W along in_features for the forward GEMM and runs
both backward GEMMs unrotated. Level 2 differs in one place: ``HaloFnLevel2`` rotates E_Y along its
*token* dimension (an outer dimension of E_X = E_Y W, so it multiplies by Hᵀ again after the GEMM and
quantises W unrotated); galorex rotates E_Y and Wᵀ along out_features, the inner dimension, as the
forward does, which needs no token count divisible by a block and no inverse rotation. Neither
rotates the weight-gradient GEMM (its inner dimension is the tokens). HALO's per-tensor scales are
reduced on the host with ``.item()``; here they stay on the device.

Which level pays depends on the format; the errors of every level, format and scale are measured
by ``python -m galorex.bench halo`` (docs/benchmarks.md, "HALO"). INT8's grid is uniform, so an
outlier channel sets a coarse step for the rest and rotating the GEMM whose inputs carry the
outliers pays (level 1 for Y, level 2 for E_X); FP8 spends its bits on the exponent, so its
relative error hardly depends on the level. Per-row scales were never worse than per-tensor ones
and keep the normal channels of the weight gradient under INT8 (a per-tensor scale set by the
outliers rounds them to zero), hence ``granularity="row"`` by default; with a scale, e5m2's range
is not needed and its lost mantissa bit is, hence ``grad_fp8="e4m3"``. Recommended:
``level=2, fmt="int8"``, or ``level=0, fmt="fp8"`` (rotation buys FP8 nothing there).

Quantise once (``save_quantized=True``, needs ``granularity="tensor"``), as HALO's
``HaloFnLevel1WithQFSDPBackwardXH``: with A = X R_K, B = W R_K, Ẽ = E_Y R_N (R_K = I at level 0,
R_N = I below level 2), A, B and Ẽ are each quantised once, per tensor, and the backward GEMMs reuse
the saved Q(A), Q(B) transposed, un-rotating their outputs:

    Y = Q(A) Q(B)ᵀ        E_X = (Q(Ẽ) Q(B)) R_Kᵀ  (levels 0-1)        G = R_N (Q(Ẽ)ᵀ Q(A)) R_Kᵀ
                          E_X = Q(Ẽ) Q(Wᵀ R_N)ᵀ   (level 2, from the master weight, as above)

Saved for backward: Q(A) (1 byte per element of X instead of its 2 or 4) and, at levels 0-1, Q(B)
— T·K + N·K bytes and two scales against the T·K·2 (bf16) or T·K·4 (fp32) bytes of X, tending to
½ and ¼ as the tokens outnumber the output features; level 2 keeps the master weight (a
parameter, no new memory) instead of Q(B). Layers fed one input one after another (q, k, v; gate,
up) quantise it once and save the same codes (``_quantized_input``); over a whole model, norms,
attention and the MLP's activations hold most of what is saved. A per-row scale of X would lie
along the tokens, the inner dimension of the G GEMM, hence per tensor only. At level 0 this is
exactly the default per-tensor pipeline (same numbers, less memory). With rotation Y is that of the
default per-tensor pipeline and E_X nearly so, but G changes: un-rotating spreads each
quantisation error over all channels, which INT8 gains from (per-row scales remain better) and
FP8, whose error is relative to each element, loses its normal channels to. Use
``level=2, fmt="int8"`` or ``level=0, fmt="fp8"`` with it, when activation memory matters more than
the last digit of G. The saved bytes and errors of every setting are measured by
``python -m galorex.bench halo`` (docs/benchmarks.md, "HALO").
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..lowp.gemm import BACKENDS, scaled_gemm
from ..lowp.hadamard import _check_block, default_block_size, random_signs, unrotate
from ..lowp.quant import GRANULARITIES, quantize, rotate_quantize

__all__ = ["HALO_FORMATS", "HALO_LEVELS", "HaloConfig", "HaloLinear", "convert_to_halo", "halo_linear"]

HALO_LEVELS = (0, 1, 2)
HALO_FORMATS = ("fp8", "int8")
GRAD_FP8_FORMATS = ("e4m3", "e5m2")
# Defaults from the measurements in the module docstring (docs/benchmarks.md, "HALO").
DEFAULT_GRAD_FP8 = "e4m3"
DEFAULT_GRANULARITY = "row"


@dataclass(frozen=True)
class HaloConfig:
    """Settings of one HALO linear layer (immutable; passed through autograd as a constant).

    Attributes:
        level: 0 (no rotation), 1 (rotate the forward GEMM's inner dimension K) or 2 (also the
            input-gradient GEMM's inner dimension N); see the module docstring.
        fmt: "fp8" (e4m3 operands, E_Y in ``grad_fp8``) or "int8" (every operand INT8).
        granularity: "row" (one scale per row of each operand) or "tensor".
        grad_fp8: FP8 format of E_Y when ``fmt="fp8"``: "e4m3" or "e5m2".
        block_in: Hadamard block along in_features (K), a power of two dividing it.
        block_out: Hadamard block along out_features (N), a power of two dividing it.
        backend: the GEMM backend of :func:`galorex.lowp.gemm.scaled_gemm`.
        save_quantized: keep the quantised operands for backward instead of X (per tensor only).
    """

    level: int = 1
    fmt: str = "fp8"
    granularity: str = DEFAULT_GRANULARITY
    grad_fp8: str = DEFAULT_GRAD_FP8
    block_in: int = 1
    block_out: int = 1
    backend: str = "auto"
    save_quantized: bool = False

    @property
    def fwd_format(self) -> str:
        return "int8" if self.fmt == "int8" else "e4m3"

    @property
    def grad_format(self) -> str:
        return "int8" if self.fmt == "int8" else self.grad_fp8


def _check_settings(
    level: Any, fmt: Any, granularity: Any, grad_fp8: Any, backend: Any, save_quantized: Any = False
) -> None:
    if isinstance(level, bool) or level not in HALO_LEVELS:
        raise ValueError(f"level must be one of {HALO_LEVELS}, got {level!r}")
    if fmt not in HALO_FORMATS:
        raise ValueError(f"fmt must be one of {HALO_FORMATS}, got {fmt!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if grad_fp8 not in GRAD_FP8_FORMATS:
        raise ValueError(f"grad_fp8 must be one of {GRAD_FP8_FORMATS}, got {grad_fp8!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(save_quantized, bool):
        raise ValueError(f"save_quantized must be True or False, got {save_quantized!r}")
    if save_quantized and granularity != "tensor":
        raise ValueError(
            f"save_quantized=True needs granularity='tensor', got granularity={granularity!r}: a per-row scale "
            "of X runs along the tokens, the inner dimension of the weight-gradient GEMM, so the forward's "
            "quantised X could not be reused there"
        )


class _HaloFunction(torch.autograd.Function):
    """Forward and backward of :class:`HaloLinear` on 2-D inputs (the module flattens the rest)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg: HaloConfig, signs_in, signs_out):  # type: ignore[override]
        if cfg.save_quantized:
            return _forward_saving_quantized(ctx, x, weight, bias, cfg, signs_in, signs_out)
        block = cfg.block_in if cfg.level >= 1 else None
        qa, sa = rotate_quantize(x, block, signs_in, cfg.fwd_format, cfg.granularity)
        qw, sw = rotate_quantize(weight, block, signs_in, cfg.fwd_format, cfg.granularity)
        y = scaled_gemm(qa, sa, qw, sw, cfg.backend, out_dtype=x.dtype, bias=bias)
        # The master tensors, not their quantised copies: the backward GEMMs quantise other axes.
        ctx.save_for_backward(x, weight, signs_out)
        ctx.cfg = cfg
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.cfg.save_quantized:
            return _backward_from_quantized(ctx, grad_out)
        x, weight, signs_out = ctx.saved_tensors
        cfg: HaloConfig = ctx.cfg
        e = grad_out
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            block = cfg.block_out if cfg.level >= 2 else None
            qe, se = rotate_quantize(e.contiguous(), block, signs_out, cfg.grad_format, cfg.granularity)
            # Rotated, Wᵀ is made contiguous (the rotation runs along its rows); unrotated, the
            # quantiser reads the transposed view directly (tall tiles on the GPU, no copy).
            wt = weight.t().contiguous() if block is not None else weight.t()
            qwt, swt = rotate_quantize(wt, block, signs_out, cfg.fwd_format, cfg.granularity)
            grad_x = scaled_gemm(qe, se, qwt, swt, cfg.backend, out_dtype=x.dtype)
        if ctx.needs_input_grad[1]:
            # Eᵀ and Xᵀ quantised per row straight from the transposed views: no transposed copy
            # (on the GPU the quantiser reads a column-major view in tall tiles).
            qet, set_ = quantize(e.t(), cfg.grad_format, cfg.granularity)
            qxt, sxt = quantize(x.t(), cfg.fwd_format, cfg.granularity)
            grad_w = scaled_gemm(qet, set_, qxt, sxt, cfg.backend, out_dtype=weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = e.to(torch.float32).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _t(q: torch.Tensor) -> torch.Tensor:
    """The transpose of a 2-D quantised tensor, contiguous (FP8 and INT8 alike)."""
    return q.t().contiguous()


# The last Q(X R_K) computed with save_quantized, all weakly held: (input, its version, settings,
# codes, scale). Layers fed the same input one after another (q, k, v; gate, up) then quantise it
# once and save one copy between them. Weak references only: the entry dies with the input or when
# autograd releases the codes, and a tensor modified in place has a new version.
_LAST_INPUT: list[tuple] = []


def _input_owner(x: torch.Tensor) -> torch.Tensor:
    """The tensor whose view ``x`` is (halo_linear hands each layer a fresh reshape of its input)."""
    while x._base is not None:
        x = x._base
    return x


def _quantized_input(x: torch.Tensor, cfg: HaloConfig, signs_in) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q(X R_K), scale) per tensor, reused from the previous layer when it had the same input,
    rotation and format. Not cached for inference tensors (they keep no version counter) nor under
    torch.compile (which traces the computation itself); under no_grad nothing holds the codes, so
    the weak entry dies with the call. A write through ``x.data`` is not seen (autograd does not
    see it either). Layers with random signs hold separate sign buffers, so they never share."""
    if torch.compiler.is_compiling() or x.is_inference():
        return rotate_quantize(x, cfg.block_in if cfg.level >= 1 else None, signs_in, cfg.fwd_format, "tensor")
    key = (
        x.data_ptr(),
        tuple(x.shape),
        tuple(x.stride()),
        x.dtype,
        x._version,
        cfg.level >= 1,
        cfg.block_in,
        cfg.fwd_format,
        None if signs_in is None else signs_in.data_ptr(),
    )
    if _LAST_INPUT:
        owner_ref, last_key, qa_ref, sa_ref = _LAST_INPUT[0]
        qa, sa = qa_ref(), sa_ref()
        if owner_ref() is _input_owner(x) and last_key == key and qa is not None and sa is not None:
            return qa, sa
    qa, sa = rotate_quantize(x, cfg.block_in if cfg.level >= 1 else None, signs_in, cfg.fwd_format, "tensor")
    _LAST_INPUT[:] = [(weakref.ref(_input_owner(x)), key, weakref.ref(qa), weakref.ref(sa))]
    return qa, sa


def _forward_saving_quantized(ctx, x, weight, bias, cfg: HaloConfig, signs_in, signs_out):
    """Y = Q(X R_K) Q(W R_K)ᵀ (+ b) with per-tensor scales, saving the quantised operands (not X)
    for :func:`_backward_from_quantized`; R_K is the identity at level 0."""
    qa, sa = _quantized_input(x, cfg, signs_in)
    qw, sw = rotate_quantize(weight, cfg.block_in if cfg.level >= 1 else None, signs_in, cfg.fwd_format, "tensor")
    y = scaled_gemm(qa, sa, qw, sw, cfg.backend, out_dtype=x.dtype, bias=bias)
    # Keep only what the gradients asked for need: Q(A) for G; Q(B) for E_X at levels 0-1, the
    # master weight (a parameter: no new memory) for E_X at level 2, whose operand is rotated along N.
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    keep_a = need_w
    keep_b = need_x and cfg.level <= 1
    keep_master = need_x and cfg.level >= 2
    ctx.save_for_backward(
        qa if keep_a else None,
        sa if keep_a else None,
        qw if keep_b else None,
        sw if keep_b else None,
        weight if keep_master else None,
        signs_in if cfg.level >= 1 else None,
        signs_out if cfg.level >= 2 else None,
    )
    ctx.cfg = cfg
    ctx.has_bias = bias is not None
    ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
    return y


def _backward_from_quantized(ctx, grad_out):
    """E_X and G from the saved Q(A), Q(B) (A = X R_K, B = W R_K) and one quantisation of Ẽ = E_Y R_N,
    with R_N = I below level 2 and R_K = I at level 0 (≈ marks the quantised operands):

        levels 0-1   E_X = (Ẽ B) R_Kᵀ = E_Y W R_K R_Kᵀ                 (Bᵀ: the saved Q(B) transposed)
        level 2      E_X = Ẽ (Wᵀ R_N)ᵀ = E_Y R_N R_Nᵀ W                (Wᵀ R_N quantised here)
        all          G   = R_N (Ẽᵀ A) R_Kᵀ = R_N R_Nᵀ E_Yᵀ X R_K R_Kᵀ   (R_N M = (Mᵀ R_Nᵀ)ᵀ)
    """
    qa, sa, qw, sw, weight, signs_in, signs_out = ctx.saved_tensors
    cfg: HaloConfig = ctx.cfg
    e = grad_out
    grad_x = grad_w = grad_b = None
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if need_x or need_w:
        block = cfg.block_out if cfg.level >= 2 else None
        qe, se = rotate_quantize(e.contiguous(), block, signs_out, cfg.grad_format, "tensor")  # once, for both
    if need_x:
        if cfg.level == 1:
            z = scaled_gemm(qe, se, _t(qw), sw, cfg.backend)  # E_Y B = E_Y W R_K  (T×K), float32
            grad_x = unrotate(z, cfg.block_in, signs_in)
        elif cfg.level == 0:
            grad_x = scaled_gemm(qe, se, _t(qw), sw, cfg.backend, out_dtype=ctx.x_dtype)
        else:
            # Wᵀ R_N, not Bᵀ R_N = R_Kᵀ Wᵀ R_N: equally accurate (measured) and E_X then needs no
            # inverse rotation of a T×K output.
            qwt, swt = rotate_quantize(weight.t().contiguous(), cfg.block_out, signs_out, cfg.fwd_format, "tensor")
            grad_x = scaled_gemm(qe, se, qwt, swt, cfg.backend, out_dtype=ctx.x_dtype)
        grad_x = grad_x.to(ctx.x_dtype)
    if need_w:
        # Ẽᵀ A (N×K): float32 while un-rotations follow, else straight in the weight's dtype
        z = scaled_gemm(_t(qe), se, _t(qa), sa, cfg.backend, out_dtype=torch.float32 if cfg.level else ctx.w_dtype)
        if cfg.level >= 1:
            z = unrotate(z, cfg.block_in, signs_in)  # · R_Kᵀ
        if cfg.level >= 2:
            z = unrotate(z.t().contiguous(), cfg.block_out, signs_out).t()  # R_N · = (· ᵀ R_Nᵀ)ᵀ
        grad_w = z.contiguous().to(ctx.w_dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = e.to(torch.float32).sum(0).to(ctx.w_dtype)
    return grad_x, grad_w, grad_b, None, None, None


def halo_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: HaloConfig,
    signs_in: torch.Tensor | None = None,
    signs_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y = X Wᵀ + b through the quantised pipeline of ``cfg`` (see the module docstring), for X of
    any leading dimensions (flattened to T rows; an empty X takes a plain matmul).

    Args:
        x: the input (..., in_features), floating point.
        weight: the (out_features, in_features) master weight.
        bias: None or the (out_features,) bias, added in float32 before the output's rounding.
        cfg: the layer's :class:`HaloConfig`.
        signs_in, signs_out: None, or fixed ±1 vectors of length in_features / out_features that
            multiply the Hadamard blocks of K / N (R = D·blockdiag(H)).

    Returns:
        Y of shape (..., out_features) in x's dtype.

    Raises:
        TypeError: x is not a floating-point tensor.
        ValueError: x's last dimension is not in_features.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dimension must be in_features={weight.shape[1]}, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        y = x2 @ weight.t().to(x.dtype)
        return (y + bias.to(x.dtype) if bias is not None else y).reshape(*lead, weight.shape[0])
    y = _HaloFunction.apply(x2, weight, bias, cfg, signs_in, signs_out)
    return y.reshape(*lead, weight.shape[0])


class HaloLinear(nn.Linear):
    """Drop-in ``nn.Linear`` with HALO's quantised forward and backward GEMMs (module docstring;
    Ashkboos et al., 2025). The weight stays a high-precision master copy, so any optimizer
    trains it, and checkpoints are those of ``nn.Linear``.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        level: 0, 1 or 2: which GEMMs have their inner dimension rotated (module docstring).
        fmt: "fp8" or "int8", the operands' format.
        granularity: "row" (default) or "tensor" scales.
        block_size: the Hadamard block, a power of two dividing in_features (and out_features at
            level 2). None: each dimension takes its whole length if it is a power of two, else
            its largest power-of-two factor up to 256.
        grad_fp8: the FP8 format of E_Y with ``fmt="fp8"``: "e4m3" (default) or "e5m2".
        random_signs: multiply the Hadamard blocks by a fixed random ±1 diagonal (seeded; held
            in non-persistent buffers, not in the state dict).
        seed: the seed of those signs (``seed`` for K, ``seed + 1`` for N).
        backend: the GEMM backend: "auto" as ``triton_kernels.select_backend`` decides (torch on
            CUDA unless ``GALOREX_BACKEND=triton``), or "triton", "torch", "emulate": that one,
            or an error (``galorex.lowp.gemm``). Rotation and quantisation follow
            ``select_backend`` alone.
        save_quantized: quantise X, W and E_Y once, per tensor, and keep the 8-bit X R_K (and
            W R_K) for backward instead of X (module docstring, "Quantise once"); needs
            ``granularity="tensor"``.

    Raises:
        ValueError: a setting out of its range, or a block that does not divide its dimension.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        level: int = 1,
        fmt: str = "fp8",
        granularity: str = DEFAULT_GRANULARITY,
        block_size: int | None = None,
        grad_fp8: str = DEFAULT_GRAD_FP8,
        random_signs: bool = False,
        seed: int = 0,
        backend: str = "auto",
        save_quantized: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_settings(level, fmt, granularity, grad_fp8, backend, save_quantized)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if block_size is None:
            block_in, block_out = default_block_size(in_features), default_block_size(out_features)
        else:
            block_in = block_out = block_size
            if level >= 1:
                _check_block(in_features, block_size, "in_features")
            if level >= 2:
                _check_block(out_features, block_size, "out_features")
        self.halo = HaloConfig(level, fmt, granularity, grad_fp8, block_in, block_out, backend, save_quantized)
        self.random_signs = bool(random_signs)
        self.seed = int(seed)
        signs_device = None if device is None or torch.device(device).type == "meta" else device
        self.register_buffer(
            "signs_in", random_signs_or_none(random_signs, in_features, seed, signs_device), persistent=False
        )
        self.register_buffer(
            "signs_out", random_signs_or_none(random_signs, out_features, seed + 1, signs_device), persistent=False
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return halo_linear(input, self.weight, self.bias, self.halo, self.signs_in, self.signs_out)

    def extra_repr(self) -> str:
        c = self.halo
        fmt = c.fmt if c.fmt == "int8" else f"fp8 (e4m3, grad {c.grad_fp8})"
        return (
            f"{super().extra_repr()}, level={c.level}, fmt={fmt}, granularity={c.granularity}, "
            f"blocks=({c.block_in}, {c.block_out}), random_signs={self.random_signs}, "
            f"save_quantized={c.save_quantized}"
        )


def random_signs_or_none(enabled: bool, dim: int, seed: int, device) -> torch.Tensor | None:
    return random_signs(dim, seed, device) if enabled else None


def convert_to_halo(
    model: nn.Module,
    level: int = 1,
    fmt: str = "fp8",
    skip: tuple[str, ...] | list[str] = ("lm_head",),
    **kwargs: Any,
) -> int:
    """Swap every plain ``nn.Linear`` of ``model`` for a :class:`HaloLinear` in place, keeping the
    same weight and bias ``Parameter`` objects (an optimizer built before still holds them).

    Args:
        model: the module to convert; subclasses of ``nn.Linear`` are left alone.
        level, fmt: as :class:`HaloLinear`.
        skip: module names to leave as they are: a module is skipped when a component of its
            dotted name is in ``skip`` (a single string counts as one name).
        **kwargs: the other :class:`HaloLinear` settings (granularity, block_size, grad_fp8,
            random_signs, seed, backend, save_quantized).

    Returns:
        How many modules were swapped.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a bad setting, or a layer whose dimensions the block does not divide (named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    _check_settings(
        level,
        fmt,
        kwargs.get("granularity", DEFAULT_GRANULARITY),
        kwargs.get("grad_fp8", DEFAULT_GRAD_FP8),
        kwargs.get("backend", "auto"),
        kwargs.get("save_quantized", False),
    )
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or any(part in skip for part in name.split(".")):
            continue
        targets.append((name, module))
    for name, module in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        try:
            new = HaloLinear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                level=level,
                fmt=fmt,
                device="meta",
                **kwargs,
            )
        except ValueError as e:
            raise ValueError(f"convert_to_halo: module {name!r}: {e}") from None
        new.weight = module.weight
        new.bias = module.bias
        for key in ("signs_in", "signs_out"):  # built on the CPU (meta was asked for the weights)
            buf = getattr(new, key)
            if buf is not None:
                setattr(new, key, buf.to(module.weight.device))
        new.train(module.training)
        setattr(parent, name.rsplit(".", 1)[-1], new)
    return len(targets)
