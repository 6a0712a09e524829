"""Blockwise Walsh–Hadamard transform along the last dimension, and its torch twin.

y = x · (I ⊗ H_b / √b) with H_b the Sylvester-ordered Hadamard matrix, H_{2k} = [[H_k, H_k],
[H_k, −H_k]]: an orthonormal rotation of every block of b consecutive entries. HALO (Ashkboos et al.,
"HALO: Hadamard-Assisted Lower-Precision Optimization for LLMs", 2025) rotates GEMM operands with it
so that FP8/INT8 quantisation sees no outliers.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from ._helpers import fwht_rows, round_to_bf16
from ._jit import LazyKernel, tl
from .dispatch import select_backend

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_BLOCK = 16384  # one block lives in one program's registers


def check_block_size(x: torch.Tensor, block_size: int | None) -> int:
    """The block size to use for ``x``: ``block_size``, or x's whole last dimension for None.

    Raises:
        TypeError: x is not a floating-point tensor, or ``block_size`` not an int.
        ValueError: a 0-dim x, a block that is not a power of two or does not divide the last
            dimension, or (for None) a last dimension that is not a power of two.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the transform runs along the last)")
    n = x.shape[-1]
    if block_size is None:
        if n < 1 or n & (n - 1):
            raise ValueError(
                f"block_size=None transforms the whole last dimension, which must then be a power "
                f"of two; x.shape[-1] is {n}"
            )
        return n
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int or None, got {type(block_size).__name__}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if n % block_size:
        raise ValueError(f"block_size={block_size} must divide x.shape[-1]={n}")
    return block_size


def hadamard_matrix(size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalised Sylvester Hadamard matrix H_size (entries ±1); H[i, j] = (−1)^popcount(i & j).

    Args:
        size: the order, a power of two.
        dtype: of the result (on the CPU).
    """
    if size < 1 or size & (size - 1):
        raise ValueError(f"size must be a power of two, got {size}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < size:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _fwht(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The transform in float32 (float64 for float64 input), not cast back: the butterfly
    (a, c) -> (a + c, a − c) on bit 0, 1, … of the in-block index, then one scale by 1/√b."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = rearrange(x.to(work), "... (n b) -> ... n b", b=block_size)
    h = 1
    while h < block_size:
        # Entry i of each group of 2h pairs with entry i + h.
        pairs = rearrange(y, "... (g two h) -> ... g two h", two=2, h=h)
        a, c = pairs[..., 0, :], pairs[..., 1, :]
        y = rearrange(torch.stack((a + c, a - c), dim=-2), "... g two h -> ... (g two h)")
        h *= 2
    # The scale rounded to the working precision once, as the kernel receives it.
    return rearrange(y, "... n b -> ... (n b)") * torch.tensor(block_size**-0.5, dtype=work)


def hadamard_transform_reference(x: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """Torch twin of :func:`hadamard_transform` (fast Walsh–Hadamard butterflies, fp32 inside, fp64
    for fp64 input, rounded once to x's dtype); arguments as :func:`hadamard_transform`."""
    b = check_block_size(x, block_size)
    return _fwht(x, b).to(x.dtype)


def _hadamard_kernel(
    x_ptr,
    y_ptr,
    n_blockrows,
    n_blocks,
    stride_row,
    stride_col,
    inv_sqrt_b,
    B: tl.constexpr,
    LOG2B: tl.constexpr,
    OUT_BF16: tl.constexpr,
    TILE: tl.constexpr,
):
    # A "block-row" is one block of B entries of one row; each program rotates ROWS of them.
    ROWS: tl.constexpr = (TILE + B - 1) // B
    q = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    live = q < n_blockrows
    row = q // n_blocks
    blk = q % n_blocks
    col = tl.arange(0, B)
    src = row[:, None] * stride_row + (blk[:, None] * B + col[None, :]) * stride_col
    x = tl.load(x_ptr + src, mask=live[:, None], other=0.0).to(tl.float32)
    x = fwht_rows(x, ROWS, B, LOG2B)
    x = x * inv_sqrt_b
    if OUT_BF16:
        x = round_to_bf16(x)
    dst = q[:, None] * B + col[None, :]
    tl.store(y_ptr + dst, x.to(y_ptr.dtype.element_ty), mask=live[:, None])


_HADAMARD = LazyKernel(
    _hadamard_kernel,
    configs=[
        {"TILE": 2048, "num_warps": 4},
        {"TILE": 4096, "num_warps": 8},
        {"TILE": 8192, "num_warps": 8},
    ],
    key=["B", "OUT_BF16"],
    interpret_config={"TILE": 1024},
    helpers=(fwht_rows, round_to_bf16),
)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D (rows, n) tensor, a view whenever reshape allows (strides are passed on)."""
    return x.reshape(-1, x.shape[-1])


def hadamard_transform(x: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """y = x · (I ⊗ H_b/√b) along the last dimension (Sylvester order, orthonormal), same dtype.

    Any leading dimensions; the Triton path works in fp32 and rounds once on the way out.
    Dispatch: :func:`triton_kernels.select_backend` (op ``hadamard``).

    Args:
        x: a floating-point tensor (fp32, fp16 or bf16 on the Triton path).
        block_size: b, a power of two dividing ``x.shape[-1]`` (None: the whole last dimension);
            at most 16384 on the Triton path.

    Raises:
        TypeError, ValueError: as :func:`check_block_size`, or an input the Triton path cannot
            take once it was chosen.
    """
    b = check_block_size(x, block_size)
    if select_backend(x.device, "hadamard") != "triton":
        return hadamard_transform_reference(x, b)
    return _hadamard_triton(x, b)


def _check_triton_input(x: torch.Tensor, b: int) -> None:
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 on the Triton path, got {x.dtype}")
    if b > MAX_TRITON_BLOCK:
        raise ValueError(f"block_size={b} is above the Triton kernel's limit of {MAX_TRITON_BLOCK}")


def _hadamard_triton(x: torch.Tensor, b: int) -> torch.Tensor:
    _check_triton_input(x, b)
    x2 = _as_rows(x)
    rows, n = x2.shape
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    n_blockrows = rows * (n // b)
    if n_blockrows:
        _HADAMARD.launch(
            lambda meta: (_cdiv(n_blockrows, max(1, meta["TILE"] // b)),),
            x2,
            out,
            n_blockrows,
            n // b,
            x2.stride(0),
            x2.stride(1),
            b**-0.5,
            B=b,
            LOG2B=int(math.log2(b)),
            OUT_BF16=x.dtype == torch.bfloat16,
        )
    return out.reshape(x.shape)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
