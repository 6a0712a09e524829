"""The import graph of galorex and triton_kernels, read from the source (function-level imports
included): no cycles, triton_kernels knows nothing of galorex, galorex.optim keeps its layers, and no
module of galorex.optim grows past 450 lines.

The layers of galorex.optim, lowest first; a module may import only from its own layer or below:

    0  config, keys, blocks, basis_codes, state8bit, code_lut, plan, adam_math, schedule
                                            settings, 8-bit and 4-bit codes, typed records, Adam's maths,
                                            the refresh schedule
    1  codec, dense                            state storage around rules; AdamW for unprojected params
    2  rules.*                                 what runs inside the subspace (knows no optimizer)
    3  checkpointing, layerwise, fused, sharded.*, writes  what the loop mixes in or hands a step to
    4  lowrank                                 the one step loop
    5  galore, natural_galore, gradnorm_lorp, adafactor, fira, apollo, base
                                            thin bindings (and the 0.1 import path)
    6  registry, groups, factory, __init__     names, parameter groups, building by name
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("galorex", "triton_kernels")

OPTIM_LAYERS = {
    "config": 0,
    "blocks": 0,
    "basis_codes": 0,
    "state8bit": 0,
    "code_lut": 0,
    "plan": 0,
    "adam_math": 0,
    "keys": 0,
    "schedule": 0,
    "codec": 1,
    "dense": 1,
    "rules": 2,
    "checkpointing": 3,
    "layerwise": 3,
    "fused": 3,
    "sharded": 3,
    "writes": 3,
    "lowrank": 4,
    "galore": 5,
    "natural_galore": 5,
    "gradnorm_lorp": 5,
    "adafactor": 5,
    "fira": 5,
    "apollo": 5,
    "base": 5,
    "registry": 6,
    "groups": 6,
    "factory": 6,
    "__init__": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours a dotted name refers to (a module, or a package's __init__)."""
    while name:
        if name in MODULES:
            return name
        if name + ".__init__" in MODULES:
            return name + ".__init__"
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module[: -len(".__init__")] if module.endswith("__init__") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import name``: the module pkg.name if there is one, else pkg itself.
            names = [
                f"{prefix}.{alias.name}"
                if f"{prefix}.{alias.name}" in MODULES or f"{prefix}.{alias.name}.__init__" in MODULES
                else prefix
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                targets.add(target)
    return targets


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_the_imports_it_should():
    assert "galorex.optim.lowrank" in GRAPH["galorex.optim.galore"]
    assert "galorex.optim.codec" in GRAPH["galorex.optim.lowrank"]  # `from . import codec`
    assert "galorex.projection" in GRAPH["galorex.optim.rules.base"]  # `from ... import projection`
    # function-level imports count too
    assert "galorex.optim.sharded.__init__" in GRAPH["galorex.optim.lowrank"]  # a package


def test_there_are_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_triton_kernels_knows_nothing_of_galorex():
    offenders = {m: sorted(t for t in ts if t.startswith("galorex")) for m, ts in GRAPH.items()}
    assert {m: t for m, t in offenders.items() if m.startswith("triton_kernels") and t} == {}


def _optim_layer(module: str) -> int | None:
    if not module.startswith("galorex.optim."):
        return None
    first = module[len("galorex.optim.") :].split(".")[0]
    return OPTIM_LAYERS[first]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("galorex.optim.")))
def test_galorex_optim_keeps_its_layers(module):
    layer = _optim_layer(module)
    assert layer is not None, f"{module} is in no layer: add it to OPTIM_LAYERS"
    above = sorted(t for t in GRAPH[module] if (_optim_layer(t) or -1) > layer)
    assert above == [], f"{module} (layer {layer}) imports from a higher layer: {above}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("galorex.optim.")))
def test_no_module_of_galorex_optim_is_over_450_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= 450, f"{module} has {lines} lines"
