"""What several benchmarks share: a relative error, and a Llama trained a few steps on real text."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F, in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def warm_llama(
    model: str, batch: int, seq_len: int, steps: int, seed: int, lr: float
) -> tuple[torch.nn.Module, torch.Tensor]:
    """A ``model`` Llama (seeded) trained ``steps`` AdamW steps on one batch of ``batch`` windows of
    ``seq_len + 1`` tokens from the embedded corpus, and that batch: at initialisation activations
    and gradients have no structure at all, a few steps on real text give them some."""
    from ..models.llama import Llama, get_config
    from ..train.data import default_corpus_path, load_tokenizer, prepare_tokens

    torch.manual_seed(seed)
    net = Llama(get_config(model))
    tokens = prepare_tokens(default_corpus_path(), load_tokenizer(None), None)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=gen).tolist()
    seq = torch.stack([torch.as_tensor(tokens[s : s + seq_len + 1].astype("int64")) for s in starts])
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    for _ in range(steps):
        _, loss = net(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, seq


def _write(out: Path, name: str, table: str, data: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print(table)
    print(f"\nwritten: {out / (name + '.md')}, {out / (name + '.json')}")


def _env() -> dict[str, Any]:
    import platform

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env
