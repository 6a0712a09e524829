"""What the Triton test modules share: the interpreter switch, poisoned allocations, the leak check.

The interpreter is switched on only inside the tests that launch kernels (``interpreted()``), never
for the process: galorex's dispatch picks Triton for CPU tensors while ``TRITON_INTERPRET=1``, which
would send every optimizer test through the (slow) interpreter. The kernels are built per mode on
first launch (``triton_kernels._jit``), so nothing decorated here is reused outside.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import pytest
import torch

from triton_kernels import BACKEND_ENV, select_backend

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install 'galorex[triton]')")

# What the process had before any Triton test ran; the leak checks compare against it.
INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")

_real_empty = torch.empty


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
    """TRITON_INTERPRET=1 and no backend override for the duration of the block, then restored."""
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", BACKEND_ENV)}
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.pop(BACKEND_ENV, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _poisoned_empty(*args, **kwargs) -> torch.Tensor:
    t = _real_empty(*args, **kwargs)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t.view(torch.uint8).fill_(0x7F)  # NaN in both formats
    elif t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).min)  # -128 for int8: a quantiser never writes it
    return t


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Every torch.empty inside the block comes back filled with NaN (or the integer minimum), so
    an output element a kernel forgets to write cannot pass for a right answer."""
    torch.empty = _poisoned_empty
    try:
        yield
    finally:
        torch.empty = _real_empty


def run_kernel(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under the interpreter with poisoned allocations."""
    with interpreted(), poisoned_outputs():
        return fn(*args, **kwargs)


def assert_interpreter_did_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert os.environ.get("TRITON_INTERPRET") == INTERPRET_AT_START
    if INTERPRET_AT_START != "1":
        assert select_backend("cpu", "hadamard") == "torch"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of an fp8 tensor, for bit-exact comparisons (NaN != NaN otherwise)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def compile_for_hopper(
    kernel, signature: dict, constexprs: dict, *, num_warps: int = 4, num_stages: int = 3, aligned=()
):
    """PTX of a triton_kernels LazyKernel compiled ahead of time for sm_90 (no GPU needed).

    ``signature`` maps runtime arguments to Triton types ("*fp32", "i32", ...); ``aligned`` names
    the arguments a launch would specialise as 16-divisible (pointers from torch, even sizes), and
    a stride passed in ``constexprs`` as 1 stands for the unit stride a launch specialises too.
    Skips where this Triton has no such API or no ptxas.
    """
    pytest.importorskip("triton")
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from triton_kernels._jit import _decorate
    except ImportError as exc:  # pragma: no cover - older or newer Triton layouts
        pytest.skip(f"no ahead-of-time compile API in this Triton: {exc}")
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        fn = _decorate(kernel.fn, False, kernel.helpers)
        names = list(fn.arg_names)
        full = {**signature, **{k: "constexpr" for k in constexprs}}
        full = {k: full[k] for k in names}
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        src = ASTSource(fn, full, constexprs=dict(constexprs), attrs=attrs)
        try:
            compiled = triton.compile(
                src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
            )
        except Exception as exc:
            if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
                pytest.skip(f"no ptxas for an sm_90 compile: {exc}")
            raise
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return compiled.asm["ptx"]
