"""The lazily built kernels keep their ``tl.constexpr`` parameters (Triton reads them from annotations)."""

from __future__ import annotations

import inspect
import os

import pytest

pytest.importorskip("triton")

from triton_kernels import _jit, gemm, hadamard, lowrank, quant

KERNELS = [
    (mod.__name__, name, obj)
    for mod in (gemm, hadamard, lowrank, quant)
    for name, obj in vars(mod).items()
    if isinstance(obj, _jit.LazyKernel)
]


@pytest.mark.parametrize(
    "label,kernel", [(f"{m}.{n}", k) for m, n, k in KERNELS], ids=lambda v: v if isinstance(v, str) else ""
)
def test_compiled_build_keeps_constexpr_parameters(label, kernel, monkeypatch):
    # A helper-carrying kernel is rebuilt with types.FunctionType, which drops __annotations__;
    # Triton 3.6 then treats BLOCK sizes as runtime ints and tl.arange fails to compile on a GPU.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    built = _jit._decorate(kernel.fn, False, kernel.helpers)
    wanted = [n for n, p in inspect.signature(kernel.fn).parameters.items() if "constexpr" in str(p.annotation)]
    assert wanted, label
    assert [p.name for p in built.params if p.is_constexpr] == wanted, label
    assert os.environ.get("TRITON_INTERPRET") is None


def test_every_kernel_family_is_covered():
    assert {m.split(".")[-1] for m, _, _ in KERNELS} == {"gemm", "hadamard", "lowrank", "quant"}
