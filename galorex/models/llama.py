"""A compact Llama, readable top to bottom.

This is the model the GaLore paper pre-trains (Touvron et al., 2023, "LLaMA: Open and Efficient
Foundation Language Models": pre-norm RMSNorm, rotary embeddings, SwiGLU, no biases), written so
that the parameter names are predictable:
the optimizer's param-group helper picks the low-rank targets by the
substrings ``attn`` and ``mlp`` and leaves ``embed``, ``lm_head`` and
``norm`` parameters to a plain optimizer.

    layers.{i}.attn.{q,k,v,o}_proj.weight
    layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.{attn,mlp}_norm.weight
    embed.weight, norm.weight, lm_head.weight

Only APIs available since torch 2.6 are used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = [
    "LlamaConfig",
    "MODEL_CONFIGS",
    "get_config",
    "RMSNorm",
    "rotary_tables",
    "apply_rotary",
    "Rotary",
    "Attention",
    "MLP",
    "Block",
    "Llama",
    "build_llama",
    "materialize_",
]


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    """The shape of a :class:`Llama`; validated at construction (a bad field raises a ValueError
    naming it).

    Attributes:
        vocab_size: tokens in the vocabulary (rows of the embedding and the head).
        hidden_size: width of the residual stream, a multiple of ``num_heads``.
        intermediate_size: width of the SwiGLU MLP.
        num_layers: decoder blocks.
        num_heads: query heads; head_dim = hidden_size / num_heads must be even (rotary pairs).
        num_kv_heads: key/value heads, dividing ``num_heads`` (fewer: grouped-query attention).
        max_seq_len: the longest sequence (the rotary tables' length).
        rope_theta: the rotary base θ.
        norm_eps: ε of every RMSNorm.
        tie_embeddings: the head shares the embedding's weight.
        init_std: standard deviation of the initial weights (init_std/√(2·num_layers) for the
            two projections that write into the residual stream).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # Fail at construction with the field's name rather than deep inside a
        # reshape with a message about tensor sizes.
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_seq_len",
        ):
            value = getattr(self, name)
            # bool is an int subclass; True layers is certainly a mistake.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"LlamaConfig.{name} must be finite, got {value!r}")
            setattr(self, name, float(value))
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"LlamaConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"LlamaConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 2 != 0:
            # Rotary embeddings rotate pairs of channels.
            raise ValueError(
                f"LlamaConfig.hidden_size / num_heads (head_dim = {self.head_dim}) must be even for rotary embeddings"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"LlamaConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        if not isinstance(d, dict):
            raise ValueError(f"LlamaConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        # A typo such as "num_layer" would otherwise silently fall back to a
        # default, or surface as an opaque TypeError.
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig keys: {unknown}; known keys: {sorted(known)}")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"missing LlamaConfig keys: {missing}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LlamaConfig:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read Llama config file {os.fspath(path)!r}: {e}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"Llama config file {os.fspath(path)!r} is not valid JSON: {e}") from e
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"invalid Llama config file {os.fspath(path)!r}: {e}") from e

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def _paper_config(hidden: int, intermediate: int, layers: int, heads: int) -> LlamaConfig:
    # The GaLore paper trains with full multi-head attention, a 32k
    # sentencepiece vocabulary and contexts of 256 to 1024 tokens.
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        max_seq_len=1024,
    )


MODEL_CONFIGS: dict[str, LlamaConfig] = {
    # Byte-level and small enough to train on a laptop CPU; two kv heads so
    # that the grouped-query path is exercised too.
    "llama-tiny": LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=352,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=256,
    ),
    "llama-60m": _paper_config(512, 1376, 8, 8),
    "llama-130m": _paper_config(768, 2048, 12, 12),
    "llama-350m": _paper_config(1024, 2736, 24, 16),
    "llama-1b": _paper_config(2048, 5461, 24, 32),
    "llama-7b": _paper_config(4096, 11008, 32, 32),
}


def get_config(name_or_path: str | os.PathLike, vocab_size: int | None = None) -> LlamaConfig:
    """A named config from MODEL_CONFIGS, or one loaded from a .json file.

    A fresh copy is returned, so callers may edit it freely.

    Args:
        name_or_path: a key of :data:`MODEL_CONFIGS` or the path of a JSON file of
            :class:`LlamaConfig` fields.
        vocab_size: overrides the vocabulary, e.g. to match a tokenizer.

    Raises:
        ValueError: an unknown name, an unreadable or invalid file, or a bad ``vocab_size``.
    """
    key = os.fspath(name_or_path)
    if key in MODEL_CONFIGS:
        cfg = dataclasses.replace(MODEL_CONFIGS[key])
    elif key.endswith(".json") or os.path.isfile(key):
        cfg = LlamaConfig.from_json(key)
    else:
        raise ValueError(
            f"unknown model config {key!r}: expected one of {sorted(MODEL_CONFIGS)} or a path to a .json file"
        )
    if vocab_size is not None:
        # replace() re-runs __post_init__, so a bad override is caught here.
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    return cfg


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / √(mean(x²) + ε) · w over the last dimension (Zhang & Sennrich, 2019, "Root Mean
    Square Layer Normalization"), computed in at least float32 (float64 weights stay float64) and
    returned in x's dtype.

    Args:
        dim: the normalised (last) dimension; w starts at ones.
        eps: ε.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares over thousands of channels loses too much in
        # bf16, so normalise in float32 and only hand back the input dtype (float64 stays float64:
        # a float32 norm would bring float32 rounding into a float64 run).
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(dtype)).to(x.dtype)


def rotary_tables(
    head_dim: int,
    seq_len: int,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, head_dim), rotate-half layout.

    Channel j and channel j + head_dim/2 form one rotating pair with
    frequency theta^(-2j/head_dim), as in the Hugging Face Llama (rotary
    position embedding: Su et al., 2021, "RoFormer: Enhanced Transformer with
    Rotary Position Embedding").

    Args:
        head_dim: channels per head (even).
        seq_len: positions 0 … seq_len − 1.
        theta: the base θ.
        dtype: of the tables (the angles are computed in float64).
        device: of the tables.
    """
    # The angles grow to seq_len radians; build them in float64 so the tables
    # are exact to the precision they are stored in.
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    t = torch.arange(seq_len, dtype=torch.float64, device=device)
    freqs = torch.outer(t, inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (..., T, head_dim) by the tables' first T positions:
    x·cos + rotate_half(x)·sin, in at least float32, returned in x's dtype.

    Args:
        x: queries or keys, (..., T, head_dim).
        cos, sin: tables from :func:`rotary_tables` with at least T rows.
    """
    T = x.shape[-2]
    # Rotate in at least float32: in bf16 the rotation of late positions is
    # visibly off, and q and k would disagree about where they are.
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    cos = cos[:T].to(dtype)
    sin = sin[:T].to(dtype)
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class Rotary(nn.Module):
    """Holds the cos/sin tables (float32, not in the state dict), shared by every layer; they are
    rebuilt whenever the module moves (``.to``, ``.to_empty``).

    Args:
        head_dim, max_seq_len, theta: as :func:`rotary_tables`.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        # Not persistent: the tables are a function of the config, so they do
        # not belong in checkpoints.
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        cos, sin = rotary_tables(self.head_dim, self.max_seq_len, self.theta, device=self.cos.device)
        self.cos, self.sin = cos, sin

    def _apply(self, fn, recurse=True):
        # .to(bf16) would quantise the tables, and .to_empty() after building
        # on the meta device would leave them as garbage. They are cheap and
        # deterministic, so rebuild them in float32 wherever the module lands.
        super()._apply(fn, recurse)
        self.reset_buffers()
        return self

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions and grouped-query attention:
    q, k, v = x W_qᵀ, x W_kᵀ, x W_vᵀ split into heads, q and k rotated, each query head attending
    to kv head i // (num_heads / num_kv_heads), softmax(q kᵀ/√head_dim + causal mask) v, heads
    merged, then W_o.

    Args:
        cfg: the model's :class:`LlamaConfig`.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        # Separate projections (not one fused qkv) so each is its own 2-D
        # matrix for the low-rank optimizer, with the paper's shapes.
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Split the heads: (B, T, heads·head_dim) -> (B, heads, T, head_dim), a view.
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            # Query head i reads kv head i // n_rep. Repeating explicitly
            # (rather than sdpa's enable_gqa) keeps every backend usable.
            n_rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = rearrange(y, "b h t d -> b t (h d)")  # merge the heads
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, 2020, "GLU Variants Improve Transformer"):
    down(silu(gate(x)) ⊙ up(x)).

    Args:
        cfg: the model's :class:`LlamaConfig`.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SwiGLU: the gate decides per channel how much of up_proj passes.
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)).

    Args:
        cfg: the model's :class:`LlamaConfig`.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Pre-norm: the residual stream itself is never normalised, which
        # keeps deep stacks trainable without warmup tricks.
        x = x + self.attn(self.attn_norm(x), cos, sin)
        x = x + self.mlp(self.mlp_norm(x))
        return x


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class Llama(nn.Module):
    """The model: embedding, ``num_layers`` decoder blocks, a final RMSNorm and the head.

    Args:
        cfg: its :class:`LlamaConfig`.
        activation_checkpointing: (an attribute, settable at any time) in training with
            gradients enabled, each decoder block keeps only its input for backward and
            recomputes its activations there (``torch.utils.checkpoint``, non-reentrant), trading
            one more forward of every block for the memory of all but one block's activations.
    """

    def __init__(self, cfg: LlamaConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after ``to_empty()``.

        Only in-place nn.init calls, so it also runs on the meta device.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # Each block adds its attention and MLP outputs to the residual
        # stream, so its variance grows with depth; GPT-2 shrinks the
        # projections that write into it by 1/sqrt(2 * num_layers).
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for block in self.layers:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=out_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=out_std)

    def pieces(self) -> list[tuple[str, nn.Module]]:
        """The model in the order :func:`materialize_` builds it: embedding, each block, the final
        norm, the head (left out when tied to the embedding), the rotary tables."""
        out = [("embed", self.embed)]
        out += [(f"layers.{i}", block) for i, block in enumerate(self.layers)]
        out.append(("norm", self.norm))
        if not self.config.tie_embeddings:
            out.append(("lm_head", self.lm_head))
        out.append(("rotary", self.rotary))
        return out

    @torch.no_grad()
    def init_piece_(self, name: str, module: nn.Module, generator: torch.Generator | None = None) -> None:
        """Initialise one piece of :meth:`pieces` as :meth:`init_weights` does, drawing from
        ``generator``: N(0, init_std) for the embedding, the head and every projection but the two
        that write into the residual stream (N(0, init_std / √(2·num_layers))), ones for norms."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for sub_name, sub in module.named_modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                into_residual = sub_name in ("attn.o_proj", "mlp.down_proj")
                nn.init.normal_(sub.weight, mean=0.0, std=out_std if into_residual else std, generator=generator)
            elif isinstance(sub, RMSNorm):
                nn.init.ones_(sub.weight)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, counting a tied embedding/head once.

        ``exclude_embeddings`` drops the input embedding table (a lookup, not
        compute); an untied lm_head still counts.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the next token at every position, and the mean cross-entropy.

        Args:
            idx: token ids (B, T), T ≤ max_seq_len.
            targets: None, or the ids (B, T) the logits should predict.

        Returns:
            (logits (B, T, vocab_size) in the model's dtype, the loss in float32 (float64 for float64 weights) or None).

        Raises:
            ValueError: T exceeds ``max_seq_len``.
        """
        T = idx.shape[-1]
        if self.config.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rotary(T)
        x = self.embed(idx)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:
                # Non-reentrant: gradients reach the parameters (and their post-accumulate hooks,
                # which --layerwise steps from) exactly as without checkpointing.
                x = _checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            # Softmax over 32k classes in bf16 gives a visibly wrong loss;
            # upcast just for the cross-entropy (to float32 at least: float64 stays float64).
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(wide.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` of shape (B, T).

        No kv-cache: each step re-reads the context (its last max_seq_len tokens).

        Args:
            idx: the prompt's token ids (B, T).
            max_new_tokens: how many tokens to append.
            temperature: divides the logits; 0 is greedy (argmax).
            top_k: None, or sample among the k most likely tokens only.
            generator: a seeded generator for reproducible samples.

        Returns:
            (B, T + max_new_tokens) token ids.

        Raises:
            ValueError: a negative ``temperature`` or a ``top_k`` ≤ 0.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        for _ in range(max_new_tokens):
            # Positions beyond max_seq_len have no rotary table; keep the tail.
            context = idx[:, -self.config.max_seq_len :]
            logits, _ = self(context)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_id.to(idx.dtype)], dim=1)
        return idx


# ---------------------------------------------------------------------------
# Construction without a full-precision copy
# ---------------------------------------------------------------------------


def _piece_seed(seed: int, index: int) -> int:
    # One generator per piece, seeded from (seed, index): a piece's values do not depend on the
    # order the pieces are built in, nor on any global RNG.
    return (int(seed) * 1_000_003 + 7919 * (index + 1)) % (2**63 - 1)


@torch.no_grad()
def materialize_(
    model: Llama,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
    weight_bits: int | None = None,
    weight_group_size: int = 256,
    on_piece: Callable[[str, nn.Module], None] | None = None,
) -> Llama:
    """Give a model built on the meta device storage, one piece at a time, in ``dtype`` on
    ``device``, and initialise each piece there (``seed=None``: leave the storage uninitialised,
    for weights that are about to be loaded).

    Each piece (:meth:`Llama.pieces`) is allocated directly in the target dtype and initialised
    with its own generator on ``device`` seeded from ``(seed, piece index)``, so no float32 copy
    of the model ever exists and the memory used while building is the weights' bytes plus one
    piece's workspace. The same seed gives the same weights on the same device and dtype. A tied
    head is re-tied to the materialised embedding. Rotary tables are rebuilt in float32.

    With ``weight_bits=8`` the attention and MLP weights (those GaLore projects) of each piece are
    converted to INT8 codes (``galorex.weights.quantize_linear_``, rounded to nearest) as soon as
    the piece is initialised, so the model never holds more than one piece in ``dtype``.

    Args:
        model: a :class:`Llama` built under ``torch.device("meta")``.
        device: where its storage is allocated.
        dtype: the parameters' dtype (None: keep the model's); the compute dtype of INT8 weights.
        seed: seeds each piece's generator; None leaves the storage uninitialised (INT8 weights:
            zero codes, to be loaded).
        weight_bits: None, or 8 for INT8 attention and MLP weights.
        weight_group_size: elements per INT8 scale (a positive multiple of 32).
        on_piece: called as ``on_piece(name, module)`` once each piece is materialised,
            initialised and (``weight_bits``) quantised (galorex-train shards it there under FSDP2,
            so that no rank ever holds the whole model).

    Returns:
        ``model`` itself, materialised.
    """
    device = torch.device(device)
    quantized: set[str] = set()
    if weight_bits is not None:
        from ..weights.codes import check_group_size
        from ..weights.convert import check_bits, quantized_linear_names

        check_bits(weight_bits, "weight_bits")
        check_group_size(weight_group_size, "weight_group_size")
        quantized = set(quantized_linear_names(model))
    if dtype is not None:
        model.to(dtype=dtype)  # on the meta device: changes dtypes, allocates nothing
    for index, (name, module) in enumerate(model.pieces()):
        module.to_empty(device=device)
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(_piece_seed(seed, index))
            model.init_piece_(name, module, gen)
        if quantized:
            from ..weights.convert import quantize_linear_

            for sub_name, sub in module.named_modules():
                if (f"{name}.{sub_name}" if sub_name else name) in quantized:
                    quantize_linear_(sub, weight_group_size, values=seed is not None)
        if on_piece is not None:
            on_piece(name, module)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def build_llama(
    cfg: LlamaConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    activation_checkpointing: bool = False,
    weight_bits: int | None = None,
    weight_group_size: int = 256,
    on_piece: Callable[[str, nn.Module], None] | None = None,
) -> Llama:
    """A Llama built on the meta device and materialised piece by piece in ``dtype`` on ``device``
    (:func:`materialize_`): a 7B model in bf16 never passes through float32, and with
    ``weight_bits=8`` its attention and MLP weights never exist whole in bf16.

    Args:
        cfg: the model's :class:`LlamaConfig`.
        device, dtype: where and in which dtype its parameters live.
        seed: the initialisation seed; None leaves the weights uninitialised (load them next).
        activation_checkpointing: as :class:`Llama`.
        weight_bits, weight_group_size: INT8 attention and MLP weights (:func:`materialize_`).
        on_piece: as :func:`materialize_`.
    """
    with torch.device("meta"):
        model = Llama(cfg, activation_checkpointing=activation_checkpointing)
    return materialize_(model, device, dtype, seed, weight_bits, weight_group_size, on_piece)
