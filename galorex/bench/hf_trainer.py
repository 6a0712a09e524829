"""``python -m galorex.bench hf-trainer``: a tiny Hugging Face ``LlamaForCausalLM`` trained through
``transformers.Trainer`` on the embedded corpus, with torch AdamW and with galorex GaLoreAdamW.

Both runs share the initial weights (same seed), the data order (the Trainer's seeded sampler over
the same windows), the schedule (linear warmup, then cosine to zero) and the step budget; only the
optimizer (and its learning rate, picked from a small grid by final validation loss) differs. The
model is built from a config (no download); tokens are the corpus' UTF-8 bytes, split 90/10 into
training and validation streams exactly as galorex-train does.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..optim import GaLoreAdamW, galore_param_groups
from ..train.data import ByteTokenizer, eval_batches, prepare_tokens, split_tokens, unigram_entropy

QUICK = {
    "steps": 12,
    "hidden_size": 32,
    "intermediate_size": 64,
    "layers": 2,
    "rank": 8,
    "batch_size": 4,
    "seq_len": 32,
    "update_proj_gap": 5,
    "eval_batches": 2,
    "tail": 4,
    "adamw_lrs": [3e-3],
    "galore_lrs": [2e-2],
}


def add_parser(sub) -> None:
    h = sub.add_parser("hf-trainer", help="HF LlamaForCausalLM through transformers.Trainer: AdamW vs GaLoreAdamW")
    h.add_argument("--steps", type=int, default=300)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--hidden-size", type=int, default=128)
    h.add_argument("--intermediate-size", type=int, default=352)
    h.add_argument("--layers", type=int, default=4)
    h.add_argument("--heads", type=int, default=4)
    h.add_argument("--kv-heads", type=int, default=2)
    h.add_argument("--batch-size", type=int, default=8)
    h.add_argument("--seq-len", type=int, default=64)
    h.add_argument("--rank", type=int, default=32, help="GaLore rank on the attention and MLP projections")
    h.add_argument("--scale", type=float, default=0.25)
    h.add_argument("--update-proj-gap", type=int, default=50)
    h.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup fraction, then cosine to 0")
    h.add_argument("--adamw-lrs", nargs="+", type=float, default=[1e-3, 3e-3, 6e-3])
    h.add_argument("--galore-lrs", nargs="+", type=float, default=[1e-2, 2e-2, 4e-2])
    h.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush subnormal floats to zero on CPU (torch AdamW then runs ~10x slower here)",
    )
    h.add_argument("--eval-batches", type=int, default=20, help="validation batches for the val loss")
    h.add_argument("--tail", type=int, default=20, help="final train loss: mean of the last TAIL logged steps")


def _import_hf():
    try:
        import accelerate  # noqa: F401  (the Trainer needs it)
        import transformers
    except ImportError as exc:
        return None, f"hf-trainer needs transformers and accelerate (pip install 'galorex[hf]'): {exc}"
    return transformers, None


class _Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens (cut as in galorex-train's TokenBatcher);
    the model shifts labels itself, so each window gives ``seq_len`` next-token targets."""

    def __init__(self, tokens, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_len
        w = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype("int64"))
        return {"input_ids": w, "labels": w}


@torch.no_grad()
def _val_loss(model, tokens, args) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, args.batch_size, args.seq_len, args.eval_batches):
        logits = model(input_ids=x).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def _run(transformers, name: str, lr: float, train_set, val_tokens, args) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len + 1,
    )
    model = transformers.LlamaForCausalLM(config)
    initial_val = _val_loss(model, val_tokens, args)
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        groups = galore_param_groups(model, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale)
        opt = GaLoreAdamW(groups, lr=lr, weight_decay=0.0)
    warmup = math.ceil(args.warmup_ratio * args.steps)
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        targs = transformers.TrainingArguments(
            output_dir=tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            save_strategy="no",
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            seed=args.seed,
            data_seed=args.seed,
            max_grad_norm=1.0,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=train_set, optimizers=(opt, sched))
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # no per-step dicts on stdout
        t = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tail = losses[-min(args.tail, len(losses)) :]
    result = {
        "lr": lr,
        "initial_train_loss": losses[0],
        "final_train_loss": sum(tail) / len(tail),
        "initial_val_loss": initial_val,
        "final_val_loss": _val_loss(model, val_tokens, args),
        "train_losses": losses,
        "wall_s": wall,
        "projected": sum(1 for s in opt.state.values() if "basis" in s) if name == "galore" else 0,
    }
    print(
        f"{name} lr={lr:g}: train {result['final_train_loss']:.4f}, val {result['final_val_loss']:.4f} ({wall:.0f} s)",
        file=sys.stderr,
    )
    return result


def _sweeps(transformers, args, train_set, val_tokens) -> dict[str, Any]:
    runs = {"adamw": args.adamw_lrs, "galore": args.galore_lrs}
    labels = {"adamw": "torch AdamW", "galore": f"galorex GaLoreAdamW (rank {args.rank}, scale {args.scale:g})"}
    results: dict[str, Any] = {}
    for name, lrs in runs.items():
        sweep = {lr: _run(transformers, name, lr, train_set, val_tokens, args) for lr in lrs}
        best = min(sweep, key=lambda lr: sweep[lr]["final_val_loss"])
        results[name] = {
            "label": labels[name],
            "best_lr": best,
            **{k: v for k, v in sweep[best].items() if k != "lr"},
            "sweep": {str(lr): {k: v for k, v in r.items() if k != "train_losses"} for lr, r in sweep.items()},
        }
    return results


def bench_hf_trainer(args: argparse.Namespace) -> dict[str, Any]:
    from . import common as bench_main

    transformers, error = _import_hf()
    if transformers is None:
        print(error, file=sys.stderr)
        if getattr(args, "in_all", False):
            print("hf-trainer skipped", file=sys.stderr)
            return {}
        raise SystemExit(2)
    torch.manual_seed(args.seed)
    tokens = prepare_tokens(None, ByteTokenizer())
    train_tokens, val_tokens = split_tokens(tokens, 0.1)
    train_set = _Windows(train_tokens, args.seq_len)
    # Subnormal floats make torch AdamW's CPU run ~10x slower on this model (107 s against GaLore's
    # 9 s for 300 steps); flushing them to zero changes no loss visibly and makes the times comparable.
    flush = not getattr(args, "keep_denormals", False) and torch.set_flush_denormal(True)
    try:
        results = _sweeps(transformers, args, train_set, val_tokens)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    entropy = unigram_entropy(val_tokens)
    rows = []
    for r in results.values():
        sweep_txt = ", ".join(f"{lr}: {s['final_val_loss']:.4f}" for lr, s in r["sweep"].items())
        rows.append(
            f"| {r['label']} | {r['best_lr']:g} | {r['initial_train_loss']:.4f} | {r['final_train_loss']:.4f} | "
            f"{r['final_val_loss']:.4f} | {sweep_txt} | {r['wall_s']:.0f} |"
        )
    table = "\n".join(
        [
            f"transformers.LlamaForCausalLM (hidden {args.hidden_size}, MLP {args.intermediate_size}, "
            f"{args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, byte vocab 256) trained "
            f"with transformers.Trainer for {args.steps} steps on the embedded corpus (batch "
            f"{args.batch_size} × {args.seq_len} tokens, seed {args.seed}, same init and data order), "
            f"warmup {args.warmup_ratio:g} then cosine, grad clip 1.0, no weight decay; GaLore on attention "
            f"and MLP projections, update_proj_gap {args.update_proj_gap}. Final train loss: mean of the "
            f"last {args.tail} logged steps; val loss: {args.eval_batches} batches of the held-out 10 % "
            f"(unigram entropy {entropy:.3f} nats); subnormals {'flushed to zero' if flush else 'kept'}. "
            f"transformers {transformers.__version__}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads.",
            "",
            "| optimizer | lr (best of grid) | first-step loss | final train loss | final val loss | "
            "val loss per lr | train time (s) |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
            *rows,
        ]
    )
    data = {
        "env": {**bench_main._env(), "transformers": transformers.__version__},
        "settings": {k: v for k, v in vars(args).items() if not callable(v)},
        "unigram_entropy": entropy,
        "flush_denormal": bool(flush),
        "results": results,
    }
    bench_main._write(Path(args.out), "hf_trainer", table, data)
    return data
