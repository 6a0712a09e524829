"""triton_kernels.select_backend, the one place that chooses torch or Triton: its defaults (torch on
CUDA for every operation until a GPU run flips one), the override, explicit choices that cannot
run, and what the optimizer and HALO ask it; the layering of the packages around it."""

import ast
import warnings
from pathlib import Path

import pytest
import torch

import galorex
from galorex.halo import HaloLinear
from triton_kernels import BACKEND_ENV, dispatch, select_backend, triton_available


def test_auto_uses_torch_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend("cpu", "hadamard") == "torch"


def test_auto_uses_triton_under_interpreter(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(torch.device("cpu"), "hadamard") == ("triton" if triton_available() else "torch")


def test_force_torch(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("cpu", "hadamard") == "torch"


def test_force_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_backend("cpu", "hadamard")


def test_bad_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        select_backend("cpu", "hadamard")


# ------------------------------------------------------------------- the defaults on CUDA
# No GPU here: torch.device("cuda") is a plain value, and what galorex asks select_backend about a
# CUDA tensor is replayed by pointing the CPU tensors' questions at a CUDA device.


@pytest.fixture
def no_overrides(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("op", dispatch.OPS)
@pytest.mark.parametrize("interpret", ["0", "1"])
def test_auto_takes_torch_on_cuda_for_every_op(op, interpret, no_overrides, monkeypatch):
    # Until a GPU run has shown a kernel correct and faster, even with triton importable.
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert dispatch.CUDA_DEFAULT[op] == "torch"
    assert select_backend(torch.device("cuda"), op) == "torch"
    assert select_backend("cuda:0", op, "auto") == "torch"


def test_a_cuda_default_flips_one_op_at_a_time(no_overrides, monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setitem(dispatch.CUDA_DEFAULT, "scaled_gemm", "triton")
    assert select_backend("cuda", "scaled_gemm") == "triton"
    assert {op: select_backend("cuda", op) for op in dispatch.OPS if op != "scaled_gemm"} == dict.fromkeys(
        set(dispatch.OPS) - {"scaled_gemm"}, "torch"
    )
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert select_backend("cuda", "scaled_gemm") == "torch"  # a default, not an explicit choice


def test_explicit_triton_that_cannot_run_raises(no_overrides, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert select_backend("cuda", "galore_adam_step") == "triton"
    with pytest.raises(RuntimeError, match=r"GALOREX_BACKEND=triton for a cpu tensor \(quantize\)"):
        select_backend("cpu", "quantize")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        select_backend("cuda", "hadamard")


def test_a_choice_argument_overrides_the_environment(no_overrides, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert select_backend("cpu", "scaled_gemm", "torch") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    with pytest.raises(RuntimeError, match="backend=triton for a cpu tensor"):
        select_backend("cpu", "scaled_gemm", "triton")
    with pytest.raises(ValueError, match="backend='cutlass'"):
        select_backend("cpu", "scaled_gemm", "cutlass")
    with pytest.raises(ValueError, match="op must be one of"):
        select_backend("cpu", "matmul")


def _as_if_on_cuda(asked: list[str]):
    """select_backend answering for a CUDA device whatever the tensors' device, recording the ops."""
    real = dispatch.select_backend

    def select(device, op, choice=None):
        asked.append(op)
        return real(torch.device("cuda"), op, choice)

    return select


def _galore_step():
    model = torch.nn.Linear(24, 40)
    model.weight.grad = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    opt = galorex.GaLoreAdamW([{"params": [model.weight], "rank": 4}], lr=1e-2)
    return opt, model.weight


def _work(opt, weight):
    from galorex.optim.plan import Work

    return Work(weight, "right", weight.grad, opt.state[weight])


def test_galore_fused_step_is_not_the_cuda_default(no_overrides, monkeypatch):
    asked: list[str] = []
    monkeypatch.setattr(dispatch, "select_backend", _as_if_on_cuda(asked))
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    opt, weight = _galore_step()
    opt.step()  # initialises the state on the torch path
    item = _work(opt, weight)
    assert not opt._fused_path_applies(opt.param_groups[0], [item])
    assert asked and set(asked) == {"galore_adam_step"}
    monkeypatch.setenv(BACKEND_ENV, "triton")  # one switch away
    assert opt._fused_path_applies(opt.param_groups[0], [item])


def test_galore_with_triton_asked_on_the_cpu_raises(no_overrides, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    opt, _ = _galore_step()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        opt.step()


def _halo_layer_pass(**kw) -> torch.Tensor:
    torch.manual_seed(0)
    layer = HaloLinear(32, 16, level=2, fmt="int8", **kw)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    layer(x).sum().backward()
    return x.grad


def test_halo_takes_the_torch_path_by_default_on_cuda(no_overrides, monkeypatch):
    import galorex.lowp.gemm
    import galorex.lowp.hadamard
    import galorex.lowp.quant

    torch_path = _halo_layer_pass()  # the CPU's path: torch
    asked: list[str] = []
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    for mod in (galorex.lowp.gemm, galorex.lowp.hadamard, galorex.lowp.quant):
        monkeypatch.setattr(mod, "select_backend", _as_if_on_cuda(asked))
    assert torch.equal(_halo_layer_pass(), torch_path)
    assert {"quantize", "scaled_gemm"} <= set(asked)  # every operation asked, every answer torch
    # One switch away: the kernels are called (here they refuse CPU tensors without the
    # interpreter, which shows they were reached and did not fall back).
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _halo_layer_pass()


def test_halo_with_triton_asked_on_the_cpu_raises(no_overrides, monkeypatch):
    with pytest.raises(RuntimeError, match="backend=triton for a cpu tensor"):
        _halo_layer_pass(backend="triton")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="GALOREX_BACKEND=triton for a cpu tensor"):
        _halo_layer_pass()
    from galorex.lowp.hadamard import hadamard_transform

    with pytest.raises(RuntimeError, match="GALOREX_BACKEND=triton"):
        hadamard_transform(torch.randn(2, 8))


# ------------------------------------------------------------------- the one fallback left
def test_torch_scaled_gemm_refusing_operands_warns_once_then_uses_the_reference(no_overrides, monkeypatch):
    import galorex.lowp.gemm as gemm
    from galorex.lowp.quant import quantize

    g = torch.Generator().manual_seed(2)
    qa, sa = quantize(torch.randn(24, 48, generator=g), "e4m3", "row")
    qb, sb = quantize(torch.randn(40, 48, generator=g), "e4m3", "row")

    def refuse(*args, **kwargs):
        raise RuntimeError("Expected both dimensions of mat2 to be divisble by 16")

    monkeypatch.setattr(gemm, "_REFUSED", set())
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    reference = gemm.scaled_gemm(qa, sa, qb, sb, backend="emulate")
    with pytest.warns(gemm.LowPrecisionFallbackWarning, match="divisble by 16"):
        assert torch.equal(gemm.scaled_gemm(qa, sa, qb, sb), reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning
        assert torch.equal(gemm.scaled_gemm(qa, sa, qb, sb), reference)
    with pytest.raises(RuntimeError, match="divisble by 16"):
        gemm.scaled_gemm(qa, sa, qb, sb, backend="torch")  # asked for by name: no fallback


# ------------------------------------------------------------------- layering
ROOT = Path(__file__).resolve().parents[1]
# Lower layers never import higher ones: triton_kernels (knows nothing of galorex) ← galorex.lowp
# (the shared low-precision operations) ← galorex.halo (the layers). Every import counts, those
# inside functions too, and no module of the three packages may sit on an import cycle.
LAYERS = {"triton_kernels": 0, "galorex.lowp": 1, "galorex.halo": 2}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``name`` (at ``path``) imports, at any depth of the file, resolved to modules
    of ``known`` where they are one (``from pkg import sub`` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def _files() -> dict[str, Path]:
    return {_module_name(p): p for pkg in LAYERS for p in (ROOT / pkg.replace(".", "/")).rglob("*.py")}


def _layer(module: str) -> int:
    return max(level for pkg, level in LAYERS.items() if module == pkg or module.startswith(pkg + "."))


def test_low_precision_packages_are_layered_without_cycles():
    files = _files()
    graph = {name: _imports(path, name, set(files)) & set(files) for name, path in files.items()}
    assert {"triton_kernels.dispatch", "galorex.lowp.quant", "galorex.halo.linear"} <= set(graph)
    upward = [(a, b) for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, f"imports from a lower layer into a higher one: {upward}"
    for name, path in files.items():  # triton_kernels names nothing of galorex, at any depth
        if name.startswith("triton_kernels"):
            assert not any(m.split(".")[0] == "galorex" for m in _imports(path, name, set())), name
    # No cycle: a depth-first search that meets a module still on its stack.
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*stack, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
