"""``galorex-train tokenizer``: train a byte-level BPE tokenizer on a corpus with Hugging Face ``tokenizers``.

The model is GPT-2's recipe: text is split into pre-tokens by GPT-2's regular expression over
UTF-8 bytes mapped to printable characters (``ByteLevel``, no prefix space), and BPE merges
are learned on them until the vocabulary holds ``vocab_size`` tokens (the 256 bytes first, so
every text is encodable and ``decode(encode(text)) == text``). The corpus is streamed in the
pieces :mod:`galorex.train.corpus` cuts (at points no pre-token spans), so the statistics are
those of the whole text and memory holds the pre-token counts, not the corpus.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .atomic import atomic_write
from .corpus import corpus_files, iter_pieces, iter_text
from .data import DataError, default_corpus_path

__all__ = ["train_bpe", "main"]


def _corpus_pieces(root: Path, text_field: str) -> Iterator[str]:
    first = True
    for f in corpus_files(root):
        started = False
        for _, text in iter_pieces(iter_text(f, text_field)):
            if not text:
                continue
            if not started and not first:
                text = "\n\n" + text  # the separator between files, as in the token stream
            started = True
            yield text
        first = first and not started


def train_bpe(
    data: str | os.PathLike[str] | None,
    vocab_size: int,
    out: str | os.PathLike[str],
    *,
    text_field: str = "text",
    min_frequency: int = 2,
    special_tokens: tuple[str, ...] = (),
) -> Path:
    """Train a byte-level BPE on a corpus and write it as a ``tokenizer.json``.

    Args:
        data: a corpus file or folder (as ``--data``); None: the embedded Shakespeare.
        vocab_size: tokens in the vocabulary (>= 256 + len(special_tokens)); a small corpus may
            give fewer, when no pair occurs ``min_frequency`` times any more.
        out: the file to write (a folder: ``out/tokenizer.json``), atomically.
        text_field: the ``.jsonl`` field or ``.parquet`` column holding the text.
        min_frequency: pairs seen fewer times are not merged.
        special_tokens: added first (ids 0..), e.g. ``("<|endoftext|>",)``.

    Returns the path written.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DataError("training a tokenizer needs the `tokenizers` package (pip install galorex[train])") from None
    if int(vocab_size) < 256 + len(special_tokens):
        raise DataError(f"--vocab-size must be >= {256 + len(special_tokens)} (the 256 bytes), got {vocab_size}")
    if int(min_frequency) < 1:
        raise DataError(f"--min-frequency must be >= 1, got {min_frequency}")
    root = Path(data) if data is not None else default_corpus_path()
    out = Path(out)
    if out.is_dir():
        out = out / "tokenizer.json"
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: folder {out.parent} does not exist")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_pieces(root, text_field), trainer=trainer)
    text = tok.to_str(pretty=False)
    atomic_write(out, lambda f: f.write(text.encode("utf-8")))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="galorex-train tokenizer",
        description="Train a byte-level BPE tokenizer on a corpus; use it with galorex-train --tokenizer FILE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=None, help="corpus file or folder (default: embedded Shakespeare)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--out", required=True, help="tokenizer.json to write (or a folder for OUT/tokenizer.json)")
    p.add_argument("--text-field", default="text", help="the .jsonl field / .parquet column holding the text")
    p.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are not merged")
    p.add_argument("--special-tokens", default="", help="comma-separated tokens added first, e.g. '<|endoftext|>'")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    specials = tuple(t for t in args.special_tokens.split(",") if t)
    try:
        path = train_bpe(
            args.data,
            args.vocab_size,
            args.out,
            text_field=args.text_field,
            min_frequency=args.min_frequency,
            special_tokens=specials,
        )
    except DataError as e:
        print(f"galorex-train tokenizer: error: {e}", file=sys.stderr)
        return 2
    from .data import HFTokenizer

    print(f"wrote {path} ({HFTokenizer(path).vocab_size} tokens); train with: galorex-train --tokenizer {path}")
    return 0
