"""Data pipeline for language-model training.

Corpus text -> tokenizer -> cached token file (memory-mapped) -> packed
``(x, y)`` batches with a resumable, seeded order.

Every user-facing problem raises :class:`DataError` with a one-line message
that names the offending file or folder.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .tokens import ByteTokenizer, DataError, Tokenizer, _one_line

__all__ = [
    "DataError",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "default_corpus_path",
    "corpus_files",
    "read_corpus_texts",
    "prepare_tokens",
    "split_tokens",
    "TokenBatcher",
    "eval_batches",
    "unigram_entropy",
    "load_hf_dataset_stream",
]


# --------------------------------------------------------------------------
# default corpus
# --------------------------------------------------------------------------

# Keeps an extracted copy alive for the whole process when the package is
# imported from a zip (resources.as_file would otherwise delete it).
_RESOURCE_STACK = contextlib.ExitStack()
atexit.register(_RESOURCE_STACK.close)


@functools.cache
def default_corpus_path() -> Path:
    """Path of the embedded tinyshakespeare corpus (package data)."""
    ref = resources.files("galorex") / "data" / "tinyshakespeare.txt"
    if not ref.is_file():
        raise DataError(f"{ref}: embedded corpus is missing (broken galorex installation?)")
    if isinstance(ref, Path):
        return ref
    return Path(_RESOURCE_STACK.enter_context(resources.as_file(ref)))


# --------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` loaded through the ``tokenizers`` package."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: tokenizer file not found")
        try:
            import tokenizers
        except ImportError:
            raise DataError(
                f"{self.path}: loading a tokenizer.json needs the `tokenizers` package (pip install tokenizers)"
            ) from None
        raw = self.path.read_bytes()
        try:
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:
            raise DataError(f"{self.path}: not a valid tokenizer.json ({_one_line(exc)})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        # Content hash, not path: the token cache must change when the file does.
        self.name = "hf:" + hashlib.sha256(raw).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS from post-processors: training consumes one packed stream.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"


def load_tokenizer(spec: str | os.PathLike[str] | None = None) -> Tokenizer:
    """``None``/``"byte"`` -> :class:`ByteTokenizer`; a path -> :class:`HFTokenizer`.

    A directory containing ``tokenizer.json`` (a saved Hugging Face tokenizer) is accepted as
    well, and so is a Hugging Face model id (``t5-base``) whose ``tokenizer.json`` is in the local
    HF cache (looked up without network access).
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "byte"):
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"{path}: folder has no tokenizer.json")
        path = path / "tokenizer.json"
    if not path.exists():
        cached = _hub_cached_tokenizer(str(spec))
        if cached is None:
            raise DataError(
                f"{path}: tokenizer not found (expected 'byte', a tokenizer.json, a folder holding one, or a "
                "Hugging Face model id already in the local HF cache: huggingface-cli download ID tokenizer.json)"
            )
        path = cached
    return HFTokenizer(path)


def _hub_cached_tokenizer(repo_id: str) -> Path | None:
    """``tokenizer.json`` of a Hugging Face model id from the local HF cache (no network), or None."""
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/")) or repo_id.endswith(".json"):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "tokenizer.json")
    except Exception:  # an id the hub library rejects: not a model id
        return None
    return Path(found) if isinstance(found, str) else None


# --------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------


def corpus_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files that make up a corpus, in the order they are joined (see
    :func:`galorex.train.corpus.corpus_files`: ``.txt``, ``.jsonl``, ``.parquet``, ``.gz``/``.zst``)."""
    from .corpus import corpus_files as files

    return files(path)


def read_corpus_texts(path: str | os.PathLike[str], text_field: str = "text") -> str:
    """Read a (small) corpus as one string: its non-blank documents joined by ``"\\n\\n"``.

    ``path`` is a file, or a folder whose ``.txt``/``.jsonl``/``.parquet`` files (plain or
    ``.gz``/``.zst``; recursive, sorted by relative path) are joined. A ``.txt`` file is one
    document, a ``.jsonl`` line or ``.parquet`` row one more (its ``text_field``). Files must be
    UTF-8: invalid bytes raise :class:`DataError` instead of being replaced, so a mis-encoded
    corpus is never silently trained on. A blank single file or an all-blank folder is an error.
    This holds the whole text in memory; :func:`prepare_tokens` never does.
    """
    from .corpus import iter_text

    root = Path(path)
    files = corpus_files(root)
    texts = [t for t in ("".join(iter_text(f, text_field)) for f in files) if t]
    if not texts:
        raise DataError(f"{root}: file is empty" if root.is_file() else f"{root}: all files in the folder are empty")
    return "\n\n".join(texts)


# --------------------------------------------------------------------------
# token cache
# --------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "galorex" / "tokens"


def prepare_tokens(
    data_path: str | os.PathLike[str] | None,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    text_field: str = "text",
    workers: int | None = None,
    log=None,
) -> np.memmap:
    """Tokenise a corpus once and return the cached token stream, memory-mapped.

    The corpus is streamed, cut into pieces, tokenised (in parallel over its files with
    ``workers``) and joined into one ``uint16`` (vocabulary <= 65536) or ``uint32`` file, resumably;
    see :func:`galorex.train.corpus.tokenize_corpus` for the format, the cache key (the files,
    the tokenizer and the settings) and why the tokens are those of the whole text. A second call
    with the same corpus, tokenizer and settings reads the cache.

    ``data_path=None`` means the embedded tinyshakespeare corpus;
    ``cache_dir=None`` means ``$XDG_CACHE_HOME/galorex/tokens``.
    """
    from .corpus import tokenize_corpus

    source = Path(data_path) if data_path is not None else default_corpus_path()
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return tokenize_corpus(source, tokenizer, cache, text_field=text_field, workers=workers, log=log)


def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into ``(train, val)`` views.

    Validation is the contiguous tail (``floor(n * val_fraction)`` tokens), so
    the split is deterministic and the two never share a window.
    """
    if not (0.0 <= float(val_fraction) < 1.0):
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(tokens)
    n_val = int(math.floor(n * float(val_fraction)))
    cut = n - n_val
    return tokens[:cut], tokens[cut:]


# --------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------


def _n_windows(tokens: np.ndarray, seq_len: int, what: str) -> int:
    if int(seq_len) < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    n = len(tokens)
    # Window i covers tokens[i*seq_len : i*seq_len + seq_len + 1]; consecutive
    # windows share one token so every token is a target exactly once.
    n_windows = (n - 1) // seq_len if n > 0 else 0
    if n_windows < 1:
        raise DataError(
            f"{what} has {n} tokens but seq_len={seq_len} needs at least "
            f"{seq_len + 1}; use more data or a smaller seq_len"
        )
    return n_windows


def _gather(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = np.asarray(window_ids, dtype=np.int64) * seq_len
    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    w = torch.from_numpy(np.asarray(tokens)[idx].astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class TokenBatcher:
    """Shuffled, packed ``(x, y)`` training batches with a resumable order.

    Each epoch visits every window exactly once, in the order of a permutation
    drawn from ``numpy.random.Generator(PCG64(seed + epoch))``. A batch that
    runs past the end of an epoch continues with the next epoch's permutation,
    so every batch is full even when there are fewer windows than
    ``batch_size``. The whole order is a function of ``(seed, epoch,
    position)``, which is exactly what :meth:`state_dict` stores.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> None:
        if int(batch_size) < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if int(seed) < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.tokens = tokens
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.n_windows = _n_windows(tokens, self.seq_len, "training token stream")
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.Generator(np.random.PCG64(self.seed + self.epoch))
            self._perm = rng.permutation(self.n_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next ``(x, y)``, each an int64 tensor of shape ``(batch_size, seq_len)``."""
        picked = []
        need = self.batch_size
        while need:
            perm = self._permutation()
            take = perm[self.position : self.position + need]
            picked.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= self.n_windows:
                self.epoch += 1
                self.position = 0
        return _gather(self.tokens, np.concatenate(picked), self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def batches_per_epoch(self) -> float:
        return self.n_windows / self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": int(self.seed)}

    def load_state_dict(self, state: dict) -> None:
        """Resume the exact batch order saved by :meth:`state_dict`.

        The saved seed wins over the constructor's, since the order it
        produced is what must be continued.
        """
        try:
            epoch, position, seed = (int(state[k]) for k in ("epoch", "position", "seed"))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"invalid batcher state {state!r} ({_one_line(exc)})") from None
        if epoch < 0 or seed < 0 or not (0 <= position < self.n_windows):
            raise DataError(
                f"batcher state {state!r} does not fit this data ({self.n_windows} "
                "windows); was it saved for a different corpus or seq_len?"
            )
        self.epoch, self.position, self.seed = epoch, position, seed
        self._perm_epoch = -1


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic ``(x, y)`` batches over a (validation) stream, in order.

    Windows are cut as in :class:`TokenBatcher`; the last batch may be smaller.
    At most ``max_batches`` are produced. Returns a fresh iterator; call again
    for another pass. Argument errors are raised here, not on first ``next``.
    """
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    seq_len = int(seq_len)
    n_windows = _n_windows(tokens, seq_len, "validation token stream")
    n_batches = math.ceil(n_windows / int(batch_size))
    if max_batches is not None:
        n_batches = min(n_batches, max(int(max_batches), 0))

    def gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(n_batches):
            ids = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows))
            yield _gather(tokens, ids, seq_len)

    return gen()


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy of the token frequency distribution, in nats.

    A model whose loss is not clearly below this has learned no more than
    token frequencies.
    """
    arr = np.asarray(tokens).ravel()
    if arr.size == 0:
        raise DataError("cannot compute unigram entropy of an empty token stream")
    # In chunks: a memory-mapped corpus larger than memory is never copied whole.
    counts = np.zeros(0, dtype=np.int64)
    step = 1 << 24
    for lo in range(0, arr.size, step):
        c = np.bincount(np.asarray(arr[lo : lo + step], dtype=np.int64))
        if c.size > counts.size:
            c[: counts.size] += counts
            counts = c
        else:
            counts[: c.size] += c
    p = counts[counts > 0] / arr.size
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------


def _hf_offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def load_hf_dataset_stream(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    max_chars: int = 10_000_000,
    text_field: str = "text",
    config: str | None = None,
    split: str = "train",
    shard_chars: int = 256 << 20,
) -> Path:
    """Stream up to ``max_chars`` characters of a HF dataset into a cached folder of text shards.

    Records' ``text_field`` values (non-blank) are written as they arrive, never held together
    in memory, into ``part-NNNNN.txt`` files of about ``shard_chars`` characters (a record is
    never split; the last one is cut at ``max_chars``), joined by ``"\\n\\n"`` inside a shard
    and, as a corpus, between shards: the folder's text is the records' text. The shards are
    what :func:`prepare_tokens` tokenises in parallel. The folder is named by a hash of the
    arguments and reused once complete, so a second run needs no network; a killed download
    keeps its finished shards and continues after their records. Offline (``HF_DATASETS_OFFLINE=1``
    or ``HF_HUB_OFFLINE=1``) the dataset is read, memory-mapped, from the local Hugging Face cache
    (where an earlier ``datasets.load_dataset`` put it) instead of streamed.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(
            "--dataset needs the `datasets` package (pip install datasets, or galorex[train]) and network "
            "access or a copy in the local Hugging Face cache"
        ) from None
    if int(max_chars) < 1:
        raise DataError(f"max_chars must be >= 1, got {max_chars}")
    if int(shard_chars) < 1:
        raise DataError(f"shard_chars must be >= 1, got {shard_chars}")

    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir().parent / "datasets"
    key = json.dumps([name, config, split, text_field, int(max_chars), int(shard_chars)])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    out = cache / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:40]}-{digest}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{cache}: cannot write dataset cache ({_one_line(exc)})") from None
    from .corpus import locked

    with locked(cache):  # torchrun's ranks (or two runs) take turns; the later ones find it complete
        return _stream_dataset(datasets, name, out, max_chars, text_field, config, split, shard_chars)


def _stream_dataset(datasets, name, out, max_chars, text_field, config, split, shard_chars) -> Path:
    progress_path = out / "progress.json"
    progress = {"shards": 0, "records": 0, "chars": 0, "complete": False}
    with contextlib.suppress(OSError, ValueError):
        progress.update(json.loads(progress_path.read_text("utf-8")))
    if progress["complete"]:
        return out

    offline = _hf_offline()

    def records() -> Iterator[str | None]:
        args = (name, config) if config is not None else (name,)
        try:
            if offline:  # the local HF cache, memory-mapped Arrow files: nothing is downloaded
                stream = datasets.load_dataset(*args, split=split)
            else:
                stream = datasets.load_dataset(*args, split=split, streaming=True)
            for i, record in enumerate(stream):
                if i < progress["records"]:
                    continue  # in a finished shard already
                if text_field not in record:
                    raise DataError(
                        f"dataset {name}: records have no {text_field!r} field (fields: {', '.join(sorted(record))})"
                    )
                yield record[text_field]
        except DataError:
            raise
        except Exception as exc:
            how = "read it from the local Hugging Face cache (offline)" if offline else "stream it"
            hint = "" if offline else "; offline, set HF_DATASETS_OFFLINE=1 to read the local Hugging Face cache"
            raise DataError(f"dataset {name}: cannot {how} ({_one_line(exc)}){hint}") from None

    f, in_shard = None, 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        total, n_records, shard = progress["chars"], progress["records"], progress["shards"]

        def finish_shard() -> None:
            nonlocal f, shard, in_shard
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(out / f".part-{shard:05d}.txt.tmp", out / f"part-{shard:05d}.txt")
            shard, in_shard, f = shard + 1, 0, None
            progress.update(shards=shard, records=n_records, chars=total)
            atomic_write(progress_path, lambda g: g.write(json.dumps(progress).encode("utf-8")))

        for text in records():
            n_records += 1
            if not isinstance(text, str) or not text.strip():
                continue
            sep = 2 if total else 0
            room = int(max_chars) - total - sep
            if room <= 0:
                break
            if f is None:
                f = open(out / f".part-{shard:05d}.txt.tmp", "wb")  # noqa: SIM115 (closed by finish_shard)
            piece = text[:room]
            f.write((("\n\n" if in_shard else "") + piece).encode("utf-8"))
            in_shard += (2 if in_shard else 0) + len(piece)
            total += sep + len(piece)
            if in_shard >= int(shard_chars):
                finish_shard()
            if total >= int(max_chars):
                break
        if f is not None:
            finish_shard()
        if total == 0:
            raise DataError(f"dataset {name}: no non-empty {text_field!r} text in split {split!r}")
        progress["complete"] = True
        atomic_write(progress_path, lambda g: g.write(json.dumps(progress).encode("utf-8")))
    except OSError as exc:
        raise DataError(f"{out}: cannot write dataset cache ({_one_line(exc)})") from None
    finally:
        if f is not None and not f.closed:
            f.close()
    return out


# --------------------------------------------------------------------------
# a run's data
# --------------------------------------------------------------------------


class RunData:
    """The token streams a training run uses (see :func:`prepare_run_data`)."""

    def __init__(self, tokenizer, tokens, train, val, source, val_source) -> None:
        self.tokenizer, self.tokens, self.train, self.val = tokenizer, tokens, train, val
        self.source, self.val_source = source, val_source


def prepare_run_data(cfg, log=None) -> RunData:
    """Tokenizer, training and validation tokens for a ``galorex-train`` configuration.

    Training text: ``cfg.data`` (a corpus file or folder), ``cfg.dataset`` (a Hugging Face
    dataset, streamed; ``cfg.dataset_config``) or the embedded Shakespeare. Validation: the
    separate corpus ``cfg.val_data``, or with ``--dataset`` its split ``cfg.val_split``; without
    either, the last 10% of the training tokens. Every evaluation of the run uses this stream.
    """
    tokenizer = load_tokenizer(cfg.tokenizer)
    field = getattr(cfg, "text_field", "text")
    workers = getattr(cfg, "workers", None)
    config = getattr(cfg, "dataset_config", None)
    val_data, val_split = getattr(cfg, "val_data", None), getattr(cfg, "val_split", None)
    if val_data is not None and val_split is not None:
        raise DataError("give either --val-data or --val-split, not both")
    if val_split is not None and cfg.dataset is None:
        raise DataError("--val-split names a split of --dataset; without --dataset use --val-data")
    data_path = cfg.data
    if cfg.dataset is not None:
        data_path = load_hf_dataset_stream(
            cfg.dataset, max_chars=cfg.dataset_max_chars, text_field=field, config=config
        )
    tokens = prepare_tokens(data_path, tokenizer, cfg.cache_dir, text_field=field, workers=workers, log=log)
    source = data_path or default_corpus_path()
    if val_split is not None:
        max_chars = getattr(cfg, "val_max_chars", 5_000_000)
        val_data = load_hf_dataset_stream(
            cfg.dataset, max_chars=max_chars, text_field=field, config=config, split=val_split
        )
    if val_data is None:
        train, val = split_tokens(tokens)
        return RunData(tokenizer, tokens, train, val, source, source)
    val = prepare_tokens(val_data, tokenizer, cfg.cache_dir, text_field=field, workers=workers, log=log)
    return RunData(tokenizer, tokens, tokens, val, source, val_data)
