"""hadamard_transform: the torch twin against the explicit matrix, the kernel against the twin.

Kernel tests run under the Triton interpreter (switched on per test, see triton_support).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_support import (
    assert_interpreter_did_not_leak,
    compile_for_hopper,
    interpreted,
    needs_triton,
    run_kernel,
)

import triton_kernels.hadamard as had
from triton_kernels import BACKEND_ENV, hadamard_transform, hadamard_transform_reference

ROOT = Path(__file__).resolve().parents[1]


def _explicit(x: torch.Tensor, b: int) -> torch.Tensor:
    h = had.hadamard_matrix(b) / b**0.5
    return (x.double().reshape(*x.shape[:-1], -1, b) @ h).reshape(x.shape)


@settings(max_examples=20)
@given(log2b=st.integers(0, 8), n_blocks=st.integers(1, 3), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_reference_is_the_sylvester_matrix_in_float64(log2b, n_blocks, rows, seed):
    b = 2**log2b
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2, n_blocks * b, generator=g, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform_reference(x, b), _explicit(x, b), rtol=1e-12, atol=1e-12)


def test_matrix_entries_are_popcount_signs():
    h = had.hadamard_matrix(16)
    i = torch.arange(16)
    popcount = torch.zeros(16, 16, dtype=torch.long)
    for bit in range(4):
        popcount += ((i[:, None] & i[None, :]) >> bit) & 1
    assert torch.equal(h, (1 - 2 * (popcount % 2)).double())


def test_reference_is_orthonormal_and_its_own_inverse():
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = hadamard_transform_reference(x, 64)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)
    torch.testing.assert_close(hadamard_transform_reference(y, 64), x, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    ("shape", "block_size", "message"),
    [((6,), None, "power of two"), ((8,), 3, "power of two"), ((8,), 16, "divide"), ((8,), 0, "power of two")],
)
def test_bad_block_size_is_named(shape, block_size, message):
    with pytest.raises(ValueError, match=message):
        hadamard_transform(torch.ones(shape), block_size)


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="block_size"):
        hadamard_transform(torch.ones(8), 4.0)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        hadamard_transform(torch.ones(8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="at least one dimension"):
        hadamard_transform(torch.tensor(1.0))


# Exact agreement is expected: kernel and twin run the same butterflies in fp32 in the same order and
# round once (bf16 rounding done in integer arithmetic, see _helpers.round_to_bf16). The tolerance
# is one unit in the last place of the output dtype, for a GPU's freedom in fusing the final scale.
TOL = {torch.float32: (1.3e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 2, 16, 128, 1024, 4096])
def test_kernel_matches_twin(dtype, block_size):
    g = torch.Generator().manual_seed(block_size)
    # 3 leading rows × odd block count where it fits, so the last program is partly masked.
    n = block_size * (3 if block_size <= 1024 else 1)
    x = torch.randn(3, 3, n, generator=g).to(dtype)
    y = run_kernel(hadamard_transform, x, block_size)
    ref = hadamard_transform_reference(x, block_size)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)
    # And within the dtype's rounding of the float64 truth.
    torch.testing.assert_close(y.double(), _explicit(x, block_size), rtol=4 * rtol, atol=4 * atol)


@needs_triton
def test_kernel_whole_dimension_and_non_contiguous_input():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(256, 7, generator=g)
    x = base.t()  # (7, 256) with strides (1, 7): read through strides, not copied
    assert not x.is_contiguous()
    y = run_kernel(hadamard_transform, x)
    torch.testing.assert_close(y, hadamard_transform_reference(x.contiguous(), None), rtol=1.3e-6, atol=1e-6)
    sliced = torch.randn(5, 2, 64, generator=g)[:, 1, :]  # row stride 128
    torch.testing.assert_close(
        run_kernel(hadamard_transform, sliced, 32), hadamard_transform_reference(sliced, 32), rtol=1.3e-6, atol=1e-6
    )


@needs_triton
def test_block_above_the_kernel_limit_is_named():
    with interpreted(), pytest.raises(ValueError, match="block_size=32768"):
        hadamard_transform(torch.ones(32768), 32768)


@needs_triton
def test_forced_torch_backend_uses_the_twin(monkeypatch):
    def boom(*_):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr(had, "_hadamard_triton", boom)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    with interpreted():
        os.environ[BACKEND_ENV] = "torch"
        y = hadamard_transform(x, 16)
    assert torch.equal(y, hadamard_transform_reference(x, 16))


def test_package_imports_and_falls_back_without_triton():
    # A fresh interpreter where `import triton` fails: the package and its twins still work, and
    # forcing the Triton backend says what is missing.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, triton_kernels as tk\n"
        "assert not tk.triton_available()\n"
        "x = torch.randn(4, 32)\n"
        "assert torch.equal(tk.hadamard_transform(x, 8), tk.hadamard_transform_reference(x, 8))\n"
        "q, s = tk.quantize_fp8(x)\n"
        "import os; os.environ['GALOREX_BACKEND'] = 'triton'\n"
        "try:\n"
        "    tk.hadamard_transform(x, 8)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton cannot be imported' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_importing_the_package_does_not_import_triton():
    code = "import sys, triton_kernels; print('triton' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@needs_triton
@pytest.mark.parametrize("block_size", [2, 16, 128, 4096])
def test_kernel_compiles_for_hopper_without_spills(block_size):
    # The interpreter accepts code a GPU compile rejects: build the real sm_90 kernel (ptxas, no GPU).
    ptx = compile_for_hopper(
        had._HADAMARD,
        {
            "x_ptr": "*bf16",
            "y_ptr": "*bf16",
            "n_blockrows": "i32",
            "n_blocks": "i32",
            "stride_row": "i32",
            "inv_sqrt_b": "fp32",
        },
        {"stride_col": 1, "B": block_size, "LOG2B": block_size.bit_length() - 1, "OUT_BF16": True, "TILE": 4096},
        num_warps=8,
        aligned=("x_ptr", "y_ptr", "stride_row"),
    )
    assert "st.local" not in ptx  # no register spills


def test_interpreter_did_not_leak(monkeypatch):
    assert_interpreter_did_not_leak(monkeypatch)
    # The twin answers for CPU tensors again, though kernels were built under the interpreter above.
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(hadamard_transform(x, 16), hadamard_transform_reference(x, 16))
