"""The README's own-loop example runs as printed (two steps instead of a hundred): it builds a
projected GaLoreAdamW and its loss stays finite."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def own_loop_code() -> str:
    text = README.read_text()
    section = text.split("## Your own loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_own_loop_runs_as_printed():
    code = own_loop_code()
    assert "galorex.build_optimizer(" in code and "range(100)" in code
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code.replace("range(100)", "range(2)"), str(README), "exec"), scope)
    assert math.isfinite(scope["loss"].item())
    assert type(scope["opt"]).__name__ == "GaLoreAdamW"
    assert any(g.get("rank") == 32 for g in scope["opt"].param_groups)
