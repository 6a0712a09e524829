"""What the data pipeline's modules share (``data`` reads corpora into token caches, ``corpus``
streams and tokenises files): its error type, the tokenizer protocol and the byte tokenizer, and
the token dtype of a vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class DataError(ValueError):
    """A user-facing data problem (bad path, empty corpus, too little data...)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer.

    ``name`` must identify the exact token mapping: it keys the token cache.
    """

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); needs no files and never fails."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Sampled byte sequences are often not valid UTF-8.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
