"""Corpora of any size: sharded, compressed text tokenised in parallel into one memory-mapped file.

A corpus is a file or a folder of ``.txt``, ``.jsonl`` and ``.parquet`` files (``.txt`` and
``.jsonl`` possibly compressed as ``.gz`` or ``.zst``), taken in the order of their paths. Its
text is defined as the non-blank documents joined by ``"\\n\\n"``: a ``.txt`` file is one
document, a ``.jsonl`` line or a ``.parquet`` row is one (its ``text_field``). That text is never
held in memory: each file is read as a stream and cut into pieces of about ``piece_chars``
characters, each piece is tokenised on its own, and its tokens are appended to a per-file shard.

Exactness of the cuts. A piece ends only where a non-space character is followed by a space,
tab, newline or carriage return. A byte-level BPE with GPT-2's pre-tokenisation (the one
``galorex-train tokenizer`` trains, and the byte tokenizer trivially) never lets a pre-token
span such a point, so the pieces' tokens are the tokens of the whole text. The few characters
around the boundary between two files (the end of one, the separator, the start of the next)
are tokenised together when the shards are joined, for the same reason. Tokenizers whose
pre-tokenisation crosses whitespace (SentencePiece-style ``Metaspace``) may tokenise about one
boundary per piece differently from the whole text; the tokens are still deterministic.

Resumability. Each file's shard records after every piece how many pieces and tokens it holds
(the tokens first, then the record, atomically): a killed tokenisation continues at the last
recorded piece, re-reading but not re-tokenising what was done. Finished shards are joined into
``<name>-<digest>.tok.bin`` (``digest``: a sha256 of the tokenizer and the tokens), named by a
sidecar ``<name>-<key>.tok.json`` whose ``key`` hashes the files (path, size, mtime), the
tokenizer and these settings; then the shards are deleted.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .tokens import DataError, Tokenizer, _one_line

__all__ = ["TEXT_KINDS", "COMPRESSIONS", "corpus_files", "iter_text", "iter_pieces", "tokenize_corpus"]

TEXT_KINDS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".zst")
# Bumped whenever the cached token format or the tokenisation recipe changes.
CACHE_FORMAT = 2
PIECE_CHARS = 1 << 20
_READ_BYTES = 1 << 18
_SEP = "\n\n"
# A cut goes before a space/tab/newline/return that follows a non-space character.
_CUT = re.compile(r"(?<=\S)[ \t\n\r]")
_NON_SPACE = re.compile(r"\S")


def _kind(path: Path) -> tuple[str, str] | None:
    """``(kind, compression)`` of a corpus file by its name, or None for other files."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        if len(suffixes) == 2 and suffixes[0] in (".txt", ".jsonl"):
            return suffixes[0], suffixes[1]
        return None
    if suffixes and suffixes[-1] in TEXT_KINDS:
        return suffixes[-1], ""
    return None


def corpus_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files that make up a corpus, in the order their documents are joined.

    A file is used as is (its kind by its name; an unknown name is read as plain text); a folder
    contributes every ``.txt``, ``.jsonl``, ``.parquet``, ``.txt.gz``, ``.txt.zst``,
    ``.jsonl.gz`` and ``.jsonl.zst`` below it, sorted by relative path so the order does not
    depend on the filesystem.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: data path not found")
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: data path is neither a file nor a folder")
    files = [p for p in root.rglob("*") if _kind(p) is not None and p.is_file()]
    if not files:
        raise DataError(f"{root}: folder contains no .txt files (nor .jsonl or .parquet, plain or as .gz/.zst)")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@contextlib.contextmanager
def _open_binary(path: Path, compression: str) -> Iterator[io.BufferedIOBase]:
    if compression == ".gz":
        with gzip.open(path, "rb") as f:
            yield f
    elif compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{path}: reading .zst files needs the `zstandard` package (pip install zstandard, "
                "or pip install galorex[train])"
            ) from None
        with open(path, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with io.BufferedReader(reader, _READ_BYTES) as f:
                yield f
    else:
        with open(path, "rb") as f:
            yield f


def _decode_error(path: Path, compression: str, offset: int) -> DataError:
    where = "decompressed offset" if compression else "offset"
    return DataError(f"{path}: not valid UTF-8 (bad byte at {where} {offset}); re-encode the file as UTF-8")


def _txt_text(path: Path, compression: str) -> Iterator[str]:
    """A ``.txt`` file's text in blocks; nothing at all when it is blank."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0
    seen_text = False
    leading: list[str] = []  # whitespace before the first character (kept unless the file is blank)
    with _open_binary(path, compression) as f:
        while True:
            block = f.read(_READ_BYTES)
            final = not block
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as exc:
                raise _decode_error(path, compression, consumed + exc.start) from None
            consumed += len(block)
            if text:
                if not seen_text:
                    if _NON_SPACE.search(text) is None:
                        leading.append(text)
                        text = ""
                    else:
                        seen_text = True
                        text = "".join(leading) + text
                        leading = []
                if text:
                    yield text
            if final:
                return


def _jsonl_docs(path: Path, compression: str, text_field: str) -> Iterator[str]:
    with _open_binary(path, compression) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8; re-encode the file as UTF-8") from None
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({_one_line(exc)})") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path}:{lineno}: record has no {text_field!r} field (it has: {fields}); "
                    "choose the field with --text-field"
                )
            text = record[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not text")
            yield text


def _parquet_docs(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading .parquet files needs the `pyarrow` package (pip install pyarrow, "
            "or pip install galorex[train])"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({_one_line(exc)})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); choose it with --text-field")
    # One record batch at a time: a row group is never materialised beyond batch_size rows.
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        column = batch.column(0)
        for text in column.to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
            yield text


def iter_text(path: Path, text_field: str = "text") -> Iterator[str]:
    """The text a corpus file contributes, as a stream of blocks: its non-blank documents joined
    by ``"\\n\\n"`` (a ``.txt`` file is one document). Nothing when every document is blank."""
    kind, compression = _kind(path) or (".txt", "")
    try:
        if kind == ".txt":
            yield from _txt_text(path, compression)
            return
        docs = _parquet_docs(path, text_field) if kind == ".parquet" else _jsonl_docs(path, compression, text_field)
        first = True
        for doc in docs:
            if _NON_SPACE.search(doc) is None:
                continue
            yield doc if first else _SEP + doc
            first = False
    except DataError:
        raise
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read it ({_one_line(exc)})") from None
    except Exception as exc:  # zstandard.ZstdError and other decoder failures
        if type(exc).__module__.startswith(("zstandard", "pyarrow")):
            raise DataError(f"{path}: cannot read it ({_one_line(exc)})") from None
        raise


def _last_cut(buf: str) -> int:
    """Index of the last cut point in ``buf`` (0, its start, when there is none)."""
    window = 4096
    while True:
        lo = max(0, len(buf) - window)
        last = None
        for m in _CUT.finditer(buf, lo):  # the look-behind sees the character before lo
            last = m
        if last is not None:
            return last.start()
        if lo == 0:
            return 0
        window *= 8


def iter_pieces(blocks: Iterator[str], piece_chars: int = PIECE_CHARS) -> Iterator[tuple[str, str]]:
    """Cut a file's text into ``("head", text)``, ``("body", text)``... and ``("tail", text)``.

    The head runs to the first cut point and the tail from the last one (the end of the text is
    one when the text ends in a non-space character): each body piece starts and ends at a cut
    point and holds at least ``piece_chars`` characters unless it is the last. A text with no cut
    point comes as one ``("whole", text)``. Only about two pieces are ever in memory.
    """
    parts: list[str] = []
    size = 0
    head_done = False
    for block in blocks:
        parts.append(block)
        size += len(block)
        if size < piece_chars:
            continue
        buf = "".join(parts)
        if not head_done:
            m = _CUT.search(buf)
            if m is None:
                parts, size = [buf], len(buf)
                continue
            yield "head", buf[: m.start()]
            head_done = True
            buf = buf[m.start() :]
        cut = _last_cut(buf) if len(buf) >= piece_chars else 0
        if cut > 0:
            yield "body", buf[:cut]
            buf = buf[cut:]
        parts, size = [buf], len(buf)
    buf = "".join(parts)
    if not head_done:
        m = _CUT.search(buf)
        if m is None:
            yield "whole", buf
            return
        yield "head", buf[: m.start()]
        buf = buf[m.start() :]
    cut = len(buf) if buf and _NON_SPACE.match(buf[-1]) else _last_cut(buf)
    if cut > 0:
        yield "body", buf[:cut]
    yield "tail", buf[cut:]


# --------------------------------------------------------------------------- encoding
def _encoder(tokenizer: Tokenizer) -> Callable[[str], np.ndarray]:
    from .tokens import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer) and type(tokenizer).encode is ByteTokenizer.encode:
        # Same ids as ByteTokenizer.encode, without a Python int per byte.
        return lambda text: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return lambda text: np.asarray(tokenizer.encode(text), dtype=np.int64)


def _checked(ids: np.ndarray, tokenizer: Tokenizer, dtype: np.dtype, where: str) -> np.ndarray:
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= int(tokenizer.vocab_size):
            raise DataError(
                f"{where}: tokenizer {tokenizer.name} produced id {hi if hi >= 0 else lo} "
                f"outside its vocab_size {tokenizer.vocab_size}"
            )
    return ids.astype(dtype, copy=False)


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj).encode("utf-8")))


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _tokenize_file(job: dict) -> dict:
    """Tokenise one corpus file into ``work/NNNNNN.bin``; resumes from ``NNNNNN.progress.json``.

    Returns (and writes to ``NNNNNN.done.json``) ``{head, tail, has_body, n_tokens, empty}``.
    """
    path, work, index = Path(job["path"]), Path(job["work"]), job["index"]
    tokenizer: Tokenizer = job["tokenizer"]
    dtype = np.dtype(job["dtype"])
    on_piece = job.get("on_piece")
    stem = f"{index:06d}"
    bin_path, progress_path = work / f"{stem}.bin", work / f"{stem}.progress.json"
    done_path = work / f"{stem}.done.json"
    done = _read_json(done_path)
    if done is not None and bin_path.is_file() and bin_path.stat().st_size == done["n_tokens"] * dtype.itemsize:
        return done

    progress = _read_json(progress_path) or {"pieces": 0, "tokens": 0}
    skip, n_tokens = int(progress["pieces"]), int(progress["tokens"])
    if not bin_path.is_file() or bin_path.stat().st_size < n_tokens * dtype.itemsize:
        skip, n_tokens = 0, 0  # the record outlived its tokens: start this file again
    encode = _encoder(tokenizer)
    head, tail, has_body, empty = "", "", False, True
    with open(bin_path, "r+b" if bin_path.is_file() else "wb") as out:
        out.truncate(n_tokens * dtype.itemsize)  # drop tokens written after the last record
        out.seek(0, os.SEEK_END)
        piece = 0
        for part, text in iter_pieces(iter_text(path, job["text_field"]), job["piece_chars"]):
            if text:
                empty = False
            if part in ("head", "whole"):
                head = text
                has_body = part == "head"
            elif part == "tail":
                tail = text
            else:
                piece += 1
                if piece <= skip:
                    continue
                ids = _checked(encode(text), tokenizer, dtype, str(path))
                out.write(ids.tobytes())
                out.flush()
                n_tokens += int(ids.size)
                _write_json(progress_path, {"pieces": piece, "tokens": n_tokens})
                if on_piece is not None:
                    on_piece(index, piece)
    result = {"head": head, "tail": tail, "has_body": has_body, "n_tokens": n_tokens, "empty": empty}
    _write_json(done_path, result)
    with contextlib.suppress(OSError):
        progress_path.unlink()
    return result


def _cache_key(root: Path, files: list[Path], tokenizer: Tokenizer, dtype: np.dtype, settings: dict) -> str:
    h = hashlib.sha256()
    listing = []
    for f in files:
        st = f.stat()
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        listing.append([rel, st.st_size, st.st_mtime_ns])
    key = [CACHE_FORMAT, str(tokenizer.name), dtype.name, str(root.resolve()), settings, listing]
    h.update(json.dumps(key, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def _cache_stem(source: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.stem or source.name)[:40]
    return stem or "corpus"


def _valid_entry(cache: Path, meta_path: Path, dtype: np.dtype, name: str) -> tuple[Path, int] | None:
    meta = _read_json(meta_path)
    try:
        bin_path = cache / str(meta["tokens_file"])
        n = int(meta["n_tokens"])
        ok = (
            meta.get("format") == CACHE_FORMAT
            and meta.get("dtype") == dtype.name
            and meta.get("tokenizer") == name
            and n > 0
            and bin_path.stat().st_size == n * dtype.itemsize
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (bin_path, n) if ok else None


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (flock on the folder itself, where the platform has it):
    processes preparing the same cache (the ranks of a torchrun, two runs started together) take
    turns, and the later ones find the finished entry."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        # A filesystem without flock (some network mounts): atomic renames still protect each file.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _default_workers(files: list[Path]) -> int:
    total = sum(f.stat().st_size for f in files)
    if len(files) < 2 or total < (64 << 20):
        return 1  # starting processes costs more than it saves
    return max(1, min(len(files), os.cpu_count() or 1, 8))


def tokenize_corpus(
    data_path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike[str],
    *,
    text_field: str = "text",
    workers: int | None = None,
    piece_chars: int = PIECE_CHARS,
    on_piece: Callable[[int, int], None] | None = None,
    log: Callable[[str], object] | None = None,
) -> np.memmap:
    """Tokenise a corpus (see the module docstring) once and return its tokens, memory-mapped.

    Args:
        data_path: a corpus file or folder.
        tokenizer: any :class:`~galorex.train.data.Tokenizer`; ``name`` keys the cache.
        cache_dir: the token cache folder.
        text_field: the field (``.jsonl``) or column (``.parquet``) holding the text.
        workers: processes tokenising files in parallel (None: one per file up to the CPU count
            and 8 for corpora over 64 MiB, else 1). The tokens do not depend on it.
        piece_chars: characters per tokenised piece (memory per worker is a few times this).
        on_piece: called as ``on_piece(file_index, piece)`` after each piece is recorded
            (in-process only, ``workers=1``); for progress reports and tests.
        log: where to say that a tokenisation starts or resumes.
    """
    root = Path(data_path)
    files = corpus_files(root)
    if int(piece_chars) < 1:
        raise DataError(f"piece_chars must be >= 1, got {piece_chars}")
    if workers is not None and int(workers) < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if on_piece is not None and workers not in (None, 1):
        raise DataError("on_piece needs workers=1 (it runs in the tokenising process)")
    from .tokens import _token_dtype

    dtype = _token_dtype(int(tokenizer.vocab_size))
    name = str(tokenizer.name)
    settings = {"text_field": text_field, "piece_chars": int(piece_chars)}
    key = _cache_key(root, files, tokenizer, dtype, settings)
    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{cache}: cannot create token cache folder ({_one_line(exc)})") from None
    stem = _cache_stem(root)
    meta_path = cache / f"{stem}-{key[:20]}.tok.json"
    found = _valid_entry(cache, meta_path, dtype, name)
    if found is None:
        with locked(cache):
            found = _valid_entry(cache, meta_path, dtype, name)  # another process may have made it
            if found is None:
                found = _tokenize(root, files, tokenizer, cache, stem, key, meta_path, dtype, name, settings,
                                  workers, on_piece, log)  # fmt: skip
    return np.memmap(found[0], dtype=dtype, mode="r", shape=(found[1],))


def _tokenize(root, files, tokenizer, cache, stem, key, meta_path, dtype, name, settings, workers, on_piece, log):
    """Tokenise every file (resuming), join the shards, write the cache entry: ``(path, n_tokens)``."""
    text_field, piece_chars = settings["text_field"], settings["piece_chars"]

    work = cache / f"{stem}-{key[:20]}.work"
    try:
        resumed = work.is_dir() and any(work.iterdir())
        work.mkdir(exist_ok=True)
    except OSError as exc:
        raise DataError(f"{cache}: cannot write token cache ({_one_line(exc)})") from None
    n_workers = int(workers) if workers is not None else _default_workers(files)
    n_workers = min(n_workers, len(files))
    if log is not None and (resumed or sum(f.stat().st_size for f in files) >= (16 << 20)):
        what = "resuming the tokenisation of" if resumed else "tokenising"
        log(f"{what} {root} ({len(files)} file(s), {n_workers} worker(s)) into {cache}")
    jobs = [
        {
            "path": str(f),
            "work": str(work),
            "index": i,
            "tokenizer": tokenizer,
            "dtype": dtype.name,
            "text_field": text_field,
            "piece_chars": int(piece_chars),
            "on_piece": on_piece,
        }
        for i, f in enumerate(files)
    ]
    try:
        if n_workers <= 1:
            results = [_tokenize_file(job) for job in jobs]
        else:
            import concurrent.futures
            import multiprocessing

            # spawn: a fork of a process running torch's (or tokenizers') threads can deadlock.
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                results = list(pool.map(_tokenize_file, jobs))
    except OSError as exc:
        raise DataError(f"{cache}: cannot write token cache ({_one_line(exc)})") from None
    if all(r["empty"] for r in results):
        raise DataError(f"{root}: file is empty" if root.is_file() else f"{root}: all files in the folder are empty")

    # Join the shards; the text around each boundary between files is tokenised here, whole.
    encode = _encoder(tokenizer)
    digest = hashlib.sha256(f"galorex-tokens-v{CACHE_FORMAT}\0{name}\0{dtype.name}\0".encode())
    n_total = 0

    def join(f) -> None:
        nonlocal n_total

        def emit(ids: np.ndarray) -> None:
            nonlocal n_total
            data = _checked(ids, tokenizer, dtype, str(root)).tobytes()
            f.write(data)
            digest.update(data)
            n_total += len(data) // dtype.itemsize

        pending, first = "", True
        for i, r in enumerate(results):
            if r["empty"]:
                continue
            pending += ("" if first else _SEP) + r["head"]
            first = False
            if r["has_body"]:
                if pending:
                    emit(encode(pending))
                with open(work / f"{i:06d}.bin", "rb") as shard:
                    while block := shard.read(1 << 20):
                        f.write(block)
                        digest.update(block)
                        n_total += len(block) // dtype.itemsize
                pending = r["tail"]
        if pending:
            emit(encode(pending))

    joined = cache / f".{stem}-{key[:20]}.joining"
    try:
        with open(joined, "wb") as f:
            join(f)
            f.flush()
            os.fsync(f.fileno())
        if n_total == 0:
            raise DataError(f"{root}: tokenizer {name} produced no tokens")
        tokens_file = f"{stem}-{digest.hexdigest()[:20]}.tok.bin"
        os.replace(joined, cache / tokens_file)
        meta = {
            "format": CACHE_FORMAT,
            "dtype": dtype.name,
            "n_tokens": n_total,
            "tokenizer": name,
            "source": str(root.resolve()),
            "files": len(files),
            "text_field": text_field,
            "piece_chars": int(piece_chars),
            "sha256": digest.hexdigest(),
            "tokens_file": tokens_file,
        }
        # Tokens before sidecar: a sidecar only ever describes a complete file.
        _write_json(meta_path, meta)
    except OSError as exc:
        raise DataError(f"{cache}: cannot write token cache ({_one_line(exc)})") from None
    finally:
        with contextlib.suppress(OSError):
            joined.unlink()
    shutil.rmtree(work, ignore_errors=True)
    return cache / tokens_file, n_total
