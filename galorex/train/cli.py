"""``galorex-train``: command-line entry point (also ``python -m galorex.train``).

With no arguments: pretrain ``llama-tiny`` on the embedded Shakespeare corpus with GaLore, on
whatever device is there, then print the validation loss, perplexity, a sample and the outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..optim.factory import available as available_optimizers
from . import allocator
from .config import option_flags
from .recipes import RECIPES, recipe_settings
from .tracking import REPORT_TO
from .trainer import TrainConfig, TrainError, train


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="galorex-train",
        description="Pretrain a Llama from scratch with a galorex optimizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a(
        "--model",
        default=d.model,
        help="llama-tiny, llama-60m, llama-130m, llama-350m, llama-1b, llama-7b, or a JSON config file",
    )
    a(
        "--optimizer",
        default=d.optimizer,
        help=" | ".join(available_optimizers())
        + " (apollo-mini: rank 1, tensor-wise, scale 128 of its own; --rank and --scale do not apply)",
    )
    # The optimizer's settings (rank, update_proj_gap, proj_type, optim_bits …): one flag per field of
    # galorex.optim.config's dataclasses, with their types, help and choices (galorex.train.config).
    for name, options in option_flags():
        a(name, **options)
    a(
        "--lr",
        type=float,
        default=d.lr,
        help="peak learning rate (default: the optimizer's own, galorex.optim.factory.DEFAULT_LR, "
        "chosen by a sweep on llama-tiny: see docs/benchmarks.md)",
    )
    a("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr of the cosine, as a fraction of --lr")
    a("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--beta1", type=float, default=d.beta1)
    a("--beta2", type=float, default=d.beta2)
    a("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm clip (0: off)")
    a("--batch-size", type=int, default=d.batch_size)
    a("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    a("--seq-len", type=int, default=d.seq_len)
    a("--dtype", default=d.dtype, choices=("fp32", "bf16", "fp64"), help="parameter dtype")
    a("--steps", type=int, default=d.steps, help="optimizer steps")
    a("--eval-every", type=int, default=d.eval_every, help="steps between validations (0: only at the end)")
    a("--eval-batches", type=int, default=d.eval_batches, help="validation batches per evaluation")
    a("--log-every", type=int, default=d.log_every, help="steps between lines of metrics.jsonl")
    a("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: none)")
    a("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept")
    a("--out", default=d.out, help="output folder (default: runs/galorex-<date>-<time>)")
    a(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue the run in --out from its latest checkpoint, or from the checkpoint file given",
    )
    a("--seed", type=int, default=d.seed)
    a("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    a("--data", default=d.data, help="a text file or a folder of .txt files (default: embedded Shakespeare)")
    a("--cache-dir", default=d.cache_dir, help="token cache folder (default: $XDG_CACHE_HOME/galorex/tokens)")
    a("--dataset", default=d.dataset, help="a Hugging Face dataset name, streamed (needs `datasets` and a network)")
    a("--dataset-max-chars", type=int, default=d.dataset_max_chars)
    a(
        "--init-from",
        default=d.init_from,
        help="start from these weights (a .safetensors file such as an earlier run's model.safetensors, or a .pt)",
    )
    a("--tokenizer", default=d.tokenizer, help="byte (default) or a tokenizer.json")
    a(
        "--halo",
        type=int,
        default=d.halo,
        choices=(0, 1, 2),
        help="HALO: linear layers (not the head) with FP8/INT8 GEMMs; Hadamard rotations at level 1 "
        "(forward) and 2 (+ input gradient)",
    )
    a("--halo-format", default=d.halo_format, choices=("fp8", "int8"), help="--halo's format (default fp8)")
    a(
        "--halo-save-quantized",
        action="store_true",
        help="--halo with per-tensor scales, quantising X, W and E_Y once and keeping the 8-bit X (1 byte an "
        "element) for backward instead of X itself (save_quantized=True)",
    )
    a("--sample-tokens", type=int, default=d.sample_tokens, help="tokens generated at the end")
    a("--threads", type=int, default=d.threads, help="torch CPU threads")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a(
        "--layerwise",
        action="store_true",
        help="step each parameter as soon as its gradient is ready and free it (saves the gradients' memory); "
        "--grad-clip then clips each parameter's gradient on its own",
    )
    a(
        "--distributed",
        default=d.distributed,
        choices=("none", "ddp", "fsdp2"),
        help="data parallel under torchrun: ddp (replicated) or fsdp2 (sharded weights and optimizer state); "
        "--batch-size is the global batch",
    )
    # Data at scale, tracking, compile and recipes (galorex.train.corpus/.data/.tracking/.recipes).
    a(
        "--dataset-config",
        default=d.dataset_config,
        help="--dataset's configuration (e.g. en for allenai/c4)",
    )
    a("--text-field", default=d.text_field, help="the .jsonl field / .parquet column / dataset field with the text")
    a(
        "--workers",
        type=int,
        default=d.workers,
        help="processes tokenising a corpus's files in parallel (default: one per file up to the CPUs and 8, "
        "for corpora over 64 MiB)",
    )
    a("--val-data", default=d.val_data, help="a separate validation corpus (file or folder) for every evaluation")
    a("--val-split", default=d.val_split, help="with --dataset: the split evaluated on (e.g. validation)")
    a("--val-max-chars", type=int, default=d.val_max_chars, help="characters of --val-split streamed")
    a(
        "--report-to",
        default=d.report_to,
        choices=REPORT_TO,
        help="also log metrics to TensorBoard (OUT/tensorboard) or Weights & Biases (offline without a key)",
    )
    a("--compile", action="store_true", help="torch.compile the model")
    a(
        "--recipe",
        default=d.recipe,
        choices=tuple(RECIPES),
        help="a published run's settings as defaults (flags given override them); see docs/recipes.md",
    )
    a(
        "--vocab-size",
        type=int,
        default=d.vocab_size,
        help="the model's embedding size (default: --model's, 32000 for the paper's configs); at least the tokenizer's",
    )
    a(
        "--activation-checkpointing",
        action="store_true",
        help="keep only each decoder block's input for backward and recompute the block there (less memory, "
        "about one more forward of compute; the same gradients)",
    )
    a(
        "--force",
        action="store_true",
        help="build the model even when the memory estimate says the run does not fit",
    )
    a("--no-save-model", dest="save_model", action="store_false", help="do not write OUT/model.safetensors")
    a(
        "--weight-bits",
        type=int,
        default=d.weight_bits,
        help="8: keep the attention and MLP weights as INT8 codes with one scale per --weight-group-size "
        "elements, dequantised for each matmul and written with --weight-rounding (stochastic by default)",
    )
    a("--weight-group-size", type=int, default=d.weight_group_size, help="elements per INT8 weight scale")
    return p


def main(argv: list[str] | None = None) -> int:
    """``galorex-train`` (and ``python -m galorex.train``). Run as the command (``argv`` None: the
    process's own arguments), it first has the C allocator return freed blocks to the system
    (``galorex.train.allocator``: the peak the run's memory estimate counts), before anything is
    built; called with an argument list (tests, notebooks) it leaves the process's allocator alone."""
    if argv is None:
        allocator.configure()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tokenizer"]:  # galorex-train tokenizer --data DIR --vocab-size N --out tok.json
        from .tokenizer import main as tokenizer_main

        return tokenizer_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.recipe is not None:  # the recipe's values become the defaults; flags given still win
        parser = build_parser()
        parser.set_defaults(**recipe_settings(args.recipe))
        args = parser.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        s = train(cfg)
    except TrainError as e:
        print(f"galorex-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "galorex-train: interrupted; every checkpoint written so far is complete (continue with --resume)",
            file=sys.stderr,
        )
        return 130
    if s.get("rank", 0) != 0:
        return 0  # under torchrun, rank 0 reports
    gib = 1024**3
    print(
        f"validation loss {s['final_val_loss']:.4f} nats/token, perplexity {s['val_perplexity']:.2f} "
        f"(unigram entropy of the corpus: {s['unigram_entropy']:.3f})"
    )
    print(
        f"{s['steps']} steps, {s['tokens']:,} tokens in {s['wall_s']:.1f} s "
        f"({s['tokens_per_s']:,.0f} tokens/s); optimizer state {s['optimizer_state_bytes'] / 2**20:.2f} MiB, "
        f"peak memory {s['peak_memory_bytes'] / gib:.2f} GiB"
    )
    if s.get("mfu") is not None:
        print(
            f"model FLOPs utilisation {100 * s['mfu']:.1f}% of {s['peak_flops'] / 1e12:.3g} TFLOP/s "
            f"({s['peak_flops_source']})"
        )
    if s["sample"]:
        print("sample:\n" + s["sample"].strip() + "\n")
    outputs = ["metrics.jsonl", "summary.json"] + (["model.safetensors"] if s.get("model_file") else [])
    if (Path(s["out"]) / "checkpoints").is_dir():
        outputs.append("checkpoints/")
    if s["loss_png"]:
        outputs.append("loss.png")
    elif s["steps"] > 0:
        outputs.append("(install matplotlib for loss.png)")
    print(f"outputs in {s['out']}: {', '.join(outputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
