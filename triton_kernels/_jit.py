"""Building Triton kernels lazily, once per interpreter mode.

``@triton.jit`` decides at decoration time whether a kernel is compiled or interpreted (it reads
``TRITON_INTERPRET`` then). Decorating at import time would tie every kernel to whatever the
environment held when the package was first imported: a test that turns the interpreter on for
itself would find compiled kernels, and turning it on for the whole process would make galorex's
dispatch pick Triton for every CPU tensor. So the kernel modules keep their kernels as plain
functions, and :class:`LazyKernel` decorates them on first launch, separately for each mode, with
the helpers they call decorated the same way. Importing this module never imports triton.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from typing import Any

import torch

from .dispatch import BACKEND_ENV, triton_available

try:  # the kernel modules need ``tl`` in their globals; a stand-in keeps them importable without it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised by the no-triton subprocess test
    triton = None
    tl = types.SimpleNamespace(constexpr=None)


def interpreting() -> bool:
    """Whether Triton kernels launched now run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton() -> Any:
    """The ``triton`` module, or a RuntimeError that says how to get the torch path instead."""
    if triton is None or not triton_available():
        raise RuntimeError(
            "this triton_kernels function needs Triton, which cannot be imported here; install "
            f"triton (pip install 'galorex[triton]') or set {BACKEND_ENV}=torch for the torch twin"
        )
    return triton


def check_same_device(**tensors: torch.Tensor) -> None:
    """A ValueError naming each tensor's device unless the given tensors (None skipped) share one."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listed}")


def _interpreted_range(*bounds: Any) -> range:
    """``range`` for kernels run by the interpreter, whose runtime integer arguments arrive as
    1-element tensors: their value is read with ``.item()``. Triton 3.6's interpreter converts them
    with ``int()`` on a 1-element 1-D array, which NumPy ≥ 2.4 refuses (3.9 squeezes first); a
    loop ``for k in range(0, K, BK)`` over a runtime ``K`` then fails. Compiled builds keep the
    builtin, which Triton's code generator turns into the loop it pipelines."""
    return range(*(b.handle.data.item() if hasattr(b, "handle") else b for b in bounds))


@functools.cache
def _decorate(fn: Callable, interpret: bool, helpers: tuple[Callable, ...]) -> Any:
    trt = require_triton()
    if interpret != interpreting():  # pragma: no cover - the cache key comes from interpreting()
        raise RuntimeError("TRITON_INTERPRET changed while a kernel was being built")
    if helpers or interpret:
        # A copy of the function whose globals name the helpers' builds for this same mode.
        original = fn
        scope = dict(fn.__globals__)
        for helper in helpers:
            scope[helper.__name__] = _decorate(helper, interpret, ())
        if interpret:
            scope["range"] = _interpreted_range
        fn = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        fn.__module__ = scope.get("__name__", fn.__module__)
        fn.__qualname__ = fn.__name__
        # FunctionType does not carry annotations over, and Triton reads `tl.constexpr` parameters
        # from them (3.6 does; 3.9 tolerated their absence on this path, which hid the bug).
        fn.__annotations__ = dict(original.__annotations__)
        fn.__kwdefaults__ = original.__kwdefaults__
        fn.__doc__ = original.__doc__
    return trt.jit(fn)


class LazyKernel:
    """A kernel function decorated with ``triton.jit`` (and autotuned on a GPU) when first launched.

    ``configs`` are dicts of meta-parameters plus ``num_warps``/``num_stages``; on a GPU they are
    autotuned over ``key``; under the interpreter only ``interpret_config`` is used, without
    autotuning (several configs fail there with no GPU driver).

    Args:
        fn: the kernel as a plain function (``tl.constexpr`` annotations included).
        configs: meta-parameter dicts to autotune over on a GPU.
        key: argument names whose values select a tuned config.
        interpret_config: the meta-parameters used under ``TRITON_INTERPRET=1``.
        helpers: device functions ``fn`` calls, decorated in the same mode.
        restore_value: in-place arguments that autotuning must put back after each trial run.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        configs: list[dict[str, int]],
        key: list[str],
        interpret_config: dict[str, int],
        helpers: tuple[Callable, ...] = (),
        restore_value: list[str] | None = None,
    ) -> None:
        self.fn = fn
        self.configs = configs
        self.key = key
        self.interpret_config = interpret_config
        self.helpers = helpers
        self.restore_value = restore_value or []
        self._tuned: dict[bool, Any] = {}

    def _compiled(self) -> Any:
        interpret = interpreting()
        kernel = _decorate(self.fn, interpret, self.helpers)
        if interpret:
            return kernel
        if interpret not in self._tuned:
            trt = require_triton()
            configs = []
            for cfg in self.configs:
                meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
                configs.append(trt.Config(meta, num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3)))
            self._tuned[interpret] = trt.autotune(
                configs=configs, key=self.key, restore_value=self.restore_value or None
            )(kernel)
        return self._tuned[interpret]

    def launch(self, grid: Callable[[dict[str, int]], tuple[int, ...]], *args: Any, **kwargs: Any) -> None:
        """Run the kernel over ``grid(meta)``; the meta-parameters come from autotuning or the
        interpreter's single config."""
        kernel = self._compiled()
        if interpreting():
            meta = {k: v for k, v in self.interpret_config.items() if k not in ("num_warps", "num_stages")}
            kernel[grid(meta)](*args, **kwargs, **meta)
        else:
            kernel[grid](*args, **kwargs)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
