"""``galorex-train --recipe NAME``: the settings of a published run, as defaults that flags override.

``galore-paper-*``: the GaLore paper's C4 pre-training (Zhao et al., 2024, arXiv:2403.03507,
Table 2 for 60M-1B and Table 3 for 7B), with the hyper-parameters of the authors' scripts
(``scripts/benchmark_c4/llama_*.sh`` in jiaweizzhao/GaLore): GaLore-AdamW, scale 0.25, a
basis refresh every 200 steps (500 for 7B), learning rate 0.01 (0.005 for 7B), 512 sequences
of 256 tokens a step (131,072 tokens), 10% linear warm-up then a cosine to 10%, no weight
decay, bf16, evaluation every 1000 steps on C4's validation split, and the T5 tokenizer the
paper uses. ``paper_perplexity`` is the C4 validation perplexity the paper reports.

``cpu-tiny``: a run this library's CPU tests and the convergence benchmark can afford, so
optimizers are compared on the same data, seeds and tokens.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RECIPES", "recipe_settings", "recipe_table"]

_C4 = {
    "dataset": "allenai/c4",
    "dataset_config": "en",
    "val_split": "validation",
    "tokenizer": "t5-base",
    "vocab_size": 32100,  # T5's 32,000 pieces and 100 sentinels (the paper's configs say 32,000)
    "text_field": "text",
    "optimizer": "galore",
    "scale": 0.25,
    "proj_type": "std",
    "seq_len": 256,
    "batch_size": 512,
    "weight_decay": 0.0,
    "min_lr_ratio": 0.1,
    "dtype": "bf16",
    "eval_every": 1000,
    "save_every": 1000,
    # The paper refreshes every basis together; staggered (galorex-train's default) is measured on
    # llama-tiny only, so the published runs keep their own schedule.
    "refresh_schedule": "together",
    # The authors evaluate on 10M tokens of C4's validation split: 80 batches of 512 x 256 tokens,
    # from ~50M characters (T5 averages ~4.3 characters a C4 token).
    "eval_batches": 80,
    "val_max_chars": 50_000_000,
}


def _paper(model: str, rank: int, gap: int, lr: float, steps: int, grad_clip: float, **extra: Any) -> dict[str, Any]:
    tokens = steps * 512 * 256
    settings = dict(
        _C4,
        model=model,
        rank=rank,
        update_proj_gap=gap,
        lr=lr,
        steps=steps,
        warmup=steps // 10,
        grad_clip=grad_clip,
        # T5's SentencePiece averages ~4.3 characters a C4 token; 5 leaves room.
        dataset_max_chars=5 * tokens,
        **extra,
    )
    return settings


RECIPES: dict[str, dict[str, Any]] = {
    "galore-paper-60m": {
        "settings": _paper("llama-60m", 128, 200, 0.01, 10_000, 0.0),
        "paper_perplexity": {"GaLore": 34.88, "Full-Rank (AdamW)": 34.06},
        "paper_tokens": "1.1B",
        "hardware": "1 x A100 80GB (the authors' script)",
    },
    "galore-paper-130m": {
        "settings": _paper("llama-130m", 256, 200, 0.01, 20_000, 0.0),
        "paper_perplexity": {"GaLore": 25.36, "Full-Rank (AdamW)": 25.08},
        "paper_tokens": "2.2B",
        "hardware": "1 x A100 80GB",
    },
    "galore-paper-350m": {
        "settings": _paper("llama-350m", 256, 200, 0.01, 60_000, 0.0),
        "paper_perplexity": {"GaLore": 18.95, "Full-Rank (AdamW)": 18.80},
        "paper_tokens": "6.4B",
        "hardware": "4 x A100 80GB",
    },
    "galore-paper-1b": {
        # Table 2 lists r = 512 for 1B; the authors' script (what produced the run) uses 1024.
        "settings": _paper("llama-1b", 512, 200, 0.01, 100_000, 0.0),
        "paper_perplexity": {"GaLore": 15.64, "Full-Rank (AdamW)": 15.56},
        "paper_tokens": "13.1B",
        "hardware": "8 x A100 80GB",
    },
    "galore-paper-7b": {
        # Table 3: 8-bit GaLore (8-bit Adam moments), clipped at 1.0, 150K steps.
        "settings": _paper("llama-7b", 1024, 500, 0.005, 150_000, 1.0, optim_bits=8),
        "paper_perplexity": {"8-bit GaLore": 14.65, "8-bit Adam": 14.61},
        "paper_tokens": "19.7B",
        "hardware": "64 x A100 80GB (8 nodes)",
    },
    "cpu-tiny": {
        # What `python -m galorex.bench convergence` runs for every optimizer (it overrides the
        # optimizer, lr and seed): the same data, seeds and tokens for each.
        "settings": {
            "model": "llama-tiny",
            "optimizer": "galore",
            "rank": 32,
            "update_proj_gap": 100,
            "scale": 0.25,
            "lr": 3e-3,
            "warmup": 20,
            "batch_size": 16,
            "seq_len": 128,
            "steps": 300,
            "eval_every": 30,
            "dtype": "fp32",
            "seed": 0,
            "tokenizer": None,  # bytes
            "data": None,  # the embedded Shakespeare
        },
        "paper_perplexity": {},
        "paper_tokens": f"{300 * 16 * 128:,} tokens (embedded Shakespeare, byte-level)",
        "hardware": "a laptop CPU",
    },
}


def recipe_settings(name: str) -> dict[str, Any]:
    """The flag values of recipe ``name`` (keys are :class:`TrainConfig` fields)."""
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r}: unknown; available: {', '.join(RECIPES)}")
    return dict(RECIPES[name]["settings"])


def recipe_table() -> str:
    """A Markdown table of the paper recipes (for docs/recipes.md)."""
    rows = [
        "| recipe | model | rank | gap | lr | steps | warm-up | tokens | paper perplexity (C4 val.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in RECIPES.items():
        if not name.startswith("galore-paper"):
            continue
        s = r["settings"]
        ppl = ", ".join(f"{k} {v}" for k, v in r["paper_perplexity"].items())
        rows.append(
            f"| `{name}` | {s['model']} | {s['rank']} | {s['update_proj_gap']} | {s['lr']} | {s['steps']:,} | "
            f"{s['warmup']:,} | {r['paper_tokens']} | {ppl} |"
        )
    return "\n".join(rows)
