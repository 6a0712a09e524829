import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from galorex.train.data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    TokenBatcher,
    default_corpus_path,
    eval_batches,
    load_hf_dataset_stream,
    load_tokenizer,
    prepare_tokens,
    read_corpus_texts,
    split_tokens,
    unigram_entropy,
)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak. é✓\n" * 20


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


class CountingTokenizer(ByteTokenizer):
    """Byte tokenizer that records how often it tokenises."""

    def __init__(self, name="byte", vocab_size=256):
        self.name = name
        self.vocab_size = vocab_size
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return super().encode(text)


# ---------------------------------------------------------------- corpus


def test_default_corpus_path():
    path = default_corpus_path()
    assert isinstance(path, Path) and path.is_file()
    assert path.name == "tinyshakespeare.txt"
    assert path.stat().st_size == 1_115_394


def test_read_corpus_file_and_folder(tmp_path, corpus):
    assert read_corpus_texts(corpus) == TEXT

    folder = tmp_path / "docs"
    (folder / "b" / "deep").mkdir(parents=True)
    (folder / "b" / "deep" / "z.txt").write_text("three", encoding="utf-8")
    (folder / "b" / "a.txt").write_text("two", encoding="utf-8")
    (folder / "a.txt").write_text("one", encoding="utf-8")
    (folder / "blank.txt").write_text("  \n", encoding="utf-8")  # skipped
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    assert read_corpus_texts(folder) == "one\n\ntwo\n\nthree"


def test_read_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        read_corpus_texts(tmp_path / "nope.txt")
    assert "nope.txt" in str(info.value)

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as info:
        read_corpus_texts(empty)
    assert str(empty) in str(info.value)

    no_txt = tmp_path / "no_txt"
    no_txt.mkdir()
    (no_txt / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(DataError, match="no .txt files") as info:
        read_corpus_texts(no_txt)
    assert str(no_txt) in str(info.value)

    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "x.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        read_corpus_texts(blank)

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8") as info:
        read_corpus_texts(latin1)
    msg = str(info.value)
    assert str(latin1) in msg and "offset 3" in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert tok.name == "byte" and tok.vocab_size == 256
    ids = tok.encode("hé✓")
    assert ids == list("hé✓".encode()) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == "hé✓"
    assert tok.decode([0x68, 0xFF]) == "h\ufffd"  # invalid UTF-8 is replaced, not raised


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer(hf_tokenizer_file):
    import hashlib

    tok = load_tokenizer(str(hf_tokenizer_file))
    assert isinstance(tok, HFTokenizer)
    digest = hashlib.sha256(hf_tokenizer_file.read_bytes()).hexdigest()[:16]
    assert tok.name == "hf:" + digest
    assert 256 < tok.vocab_size <= 300
    ids = tok.encode("Before we proceed, é✓")
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == "Before we proceed, é✓"
    # Merges learned from TEXT compress it below one token per byte.
    assert len(tok.encode(TEXT)) < len(TEXT.encode("utf-8")) / 2
    # A folder holding tokenizer.json works too.
    assert load_tokenizer(hf_tokenizer_file.parent).name == tok.name


def test_hf_tokenizer_errors(tmp_path, monkeypatch, hf_tokenizer_file):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}', encoding="utf-8")
    with pytest.raises(DataError, match="not a valid tokenizer.json") as info:
        HFTokenizer(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)

    with pytest.raises(DataError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty_dir")

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import now raises ImportError
    with pytest.raises(DataError, match=r"pip install tokenizers"):
        HFTokenizer(hf_tokenizer_file)


# ---------------------------------------------------------------- token cache


def test_prepare_tokens_and_cache_reuse(tmp_path, corpus):
    cache = tmp_path / "cache"
    tok = CountingTokenizer()
    tokens = prepare_tokens(corpus, tok, cache)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokens.tolist() == list(TEXT.encode("utf-8"))
    calls = tok.calls  # one per piece of the file, plus its edges
    assert calls >= 1

    bins = sorted(cache.glob("*.tok.bin"))
    metas = sorted(cache.glob("*.tok.json"))
    assert len(bins) == 1 and len(metas) == 1
    assert sorted(p.name for p in cache.iterdir()) == sorted([bins[0].name, metas[0].name])  # no temp files
    meta = json.loads(metas[0].read_text())
    assert meta["dtype"] == "uint16" and meta["n_tokens"] == len(tokens)
    assert meta["tokenizer"] == "byte" and meta["source"] == str(corpus.resolve())
    mtime = bins[0].stat().st_mtime_ns

    again = prepare_tokens(corpus, tok, cache)
    assert tok.calls == calls, "second call must reuse the cache"
    assert bins[0].stat().st_mtime_ns == mtime
    assert np.array_equal(again, tokens)

    # A different tokenizer name or changed content gets its own entry.
    prepare_tokens(corpus, CountingTokenizer(name="byte-v2"), cache)
    corpus.write_text(TEXT + "more", encoding="utf-8")
    changed = prepare_tokens(corpus, tok, cache)
    assert tok.calls > calls and len(changed) == len(tokens) + 4
    assert len(list(cache.glob("*.tok.bin"))) == 3


def test_prepare_tokens_rebuilds_damaged_cache(tmp_path, corpus):
    cache = tmp_path / "cache"
    tok = CountingTokenizer()
    tokens = np.array(prepare_tokens(corpus, tok, cache))
    calls = tok.calls
    (bin_path,) = cache.glob("*.tok.bin")
    bin_path.write_bytes(bin_path.read_bytes()[:10])  # truncated, sidecar now disagrees
    assert np.array_equal(prepare_tokens(corpus, tok, cache), tokens)
    assert tok.calls == 2 * calls

    (meta_path,) = cache.glob("*.tok.json")
    meta_path.write_text("{broken", encoding="utf-8")
    assert np.array_equal(prepare_tokens(corpus, tok, cache), tokens)
    assert tok.calls == 3 * calls


def test_prepare_tokens_dtype_and_bad_ids(tmp_path, corpus):
    big = CountingTokenizer(name="big", vocab_size=70_000)
    assert prepare_tokens(corpus, big, tmp_path / "c").dtype == np.uint32

    class Liar(ByteTokenizer):
        name = "liar"
        vocab_size = 100  # but emits bytes up to 255

    with pytest.raises(DataError, match="outside its vocab_size"):
        prepare_tokens(corpus, Liar(), tmp_path / "c")

    with pytest.raises(DataError, match="not found"):
        prepare_tokens(tmp_path / "missing.txt", ByteTokenizer(), tmp_path / "c")


def test_prepare_tokens_folder_corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "1.txt").write_text("ab", encoding="utf-8")
    (folder / "2.txt").write_text("cd", encoding="utf-8")
    tokens = prepare_tokens(folder, ByteTokenizer(), tmp_path / "cache")
    assert bytes(tokens.tolist()) == b"ab\n\ncd"


def test_prepare_tokens_with_hf_tokenizer(tmp_path, corpus, hf_tokenizer_file):
    tok = load_tokenizer(hf_tokenizer_file)
    tokens = prepare_tokens(corpus, tok, tmp_path / "cache")
    assert tokens.dtype == np.uint16
    assert tok.decode(tokens.tolist()) == TEXT


# ---------------------------------------------------------------- split / batching


def test_split_tokens():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100
    assert train[-1] == 899 and val[0] == 900  # contiguous tail
    assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)  # views
    train, val = split_tokens(tokens, 0.0)
    assert len(train) == 1000 and len(val) == 0
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(DataError):
            split_tokens(tokens, bad)


def _window(tokens, i, seq_len):
    return np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64)


def test_batcher_windows_and_epochs():
    seq_len, bs = 8, 4
    tokens = np.arange(8 * 16 + 1, dtype=np.uint16)  # exactly 16 windows
    b = TokenBatcher(tokens, bs, seq_len, seed=0)
    assert b.n_windows == 16
    starts = []
    for _ in range(4):  # one epoch
        x, y = b.next_batch()
        assert x.shape == y.shape == (bs, seq_len)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            start = int(row_x[0])
            assert start % seq_len == 0
            w = _window(tokens, start // seq_len, seq_len)
            assert row_x.tolist() == w[:-1].tolist() and row_y.tolist() == w[1:].tolist()
            starts.append(start // seq_len)
    assert sorted(starts) == list(range(16))  # every window exactly once per epoch
    assert b.state_dict() == {"epoch": 1, "position": 0, "seed": 0}

    # The order is the documented PCG64(seed + epoch) permutation.
    expected = np.random.Generator(np.random.PCG64(0)).permutation(16).tolist()
    assert starts == expected
    x, _ = b.next_batch()
    expected1 = np.random.Generator(np.random.PCG64(1)).permutation(16)[:bs]
    assert (x[:, 0] // seq_len).tolist() == expected1.tolist()


def test_batcher_determinism_and_seed():
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)
    a = TokenBatcher(tokens, 3, 16, seed=5)
    b = TokenBatcher(tokens, 3, 16, seed=5)
    c = TokenBatcher(tokens, 3, 16, seed=6)
    xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_batcher_resume_reproduces_batches():
    tokens = np.random.default_rng(1).integers(0, 256, 2000).astype(np.uint16)
    ref = TokenBatcher(tokens, 5, 32, seed=11)  # 62 windows: batches straddle epochs
    for _ in range(7):
        ref.next_batch()
    state = ref.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = [ref.next_batch() for _ in range(40)]  # crosses several epoch boundaries

    resumed = TokenBatcher(tokens, 5, 32, seed=0)  # saved seed wins
    resumed.load_state_dict(state)
    for ex, got in zip(expected, (resumed.next_batch() for _ in range(40))):
        assert torch.equal(ex[0], got[0]) and torch.equal(ex[1], got[1])

    # Round trip through a weights_only checkpoint too.
    import io

    buf = io.BytesIO()
    torch.save({"batcher": state}, buf)
    buf.seek(0)
    again = TokenBatcher(tokens, 5, 32, seed=11)
    again.load_state_dict(torch.load(buf, weights_only=True)["batcher"])
    assert torch.equal(again.next_batch()[0], expected[0][0])

    with pytest.raises(DataError):
        again.load_state_dict({"epoch": 0, "position": 10_000, "seed": 11})
    with pytest.raises(DataError):
        again.load_state_dict({"epoch": 0})


def test_batcher_small_data():
    tokens = np.arange(21, dtype=np.uint16)  # 2 windows of seq_len 10
    b = TokenBatcher(tokens, 5, 10, seed=0)
    x, y = b.next_batch()  # wraps into later epochs to fill the batch
    assert x.shape == (5, 10)
    assert b.state_dict()["epoch"] == 2 and b.state_dict()["position"] == 1

    with pytest.raises(DataError) as info:
        TokenBatcher(np.arange(10, dtype=np.uint16), 2, 10, seed=0)
    msg = str(info.value)
    assert "10 tokens" in msg and "11" in msg
    with pytest.raises(DataError):
        TokenBatcher(tokens, 0, 10, seed=0)


def test_eval_batches():
    seq_len = 4
    tokens = np.arange(4 * 10 + 3, dtype=np.uint16)  # 10 windows, 2 spare tokens
    batches = list(eval_batches(tokens, 3, seq_len))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3, 1]
    starts = [int(s) for x, _ in batches for s in x[:, 0]]
    assert starts == [i * seq_len for i in range(10)]  # in order, all windows
    for x, y in batches:
        assert x.dtype == torch.int64 and torch.equal(y, x + 1)
    again = list(eval_batches(tokens, 3, seq_len))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert len(list(eval_batches(tokens, 3, seq_len, max_batches=2))) == 2

    with pytest.raises(DataError, match="3 tokens"):
        eval_batches(np.arange(3, dtype=np.uint16), 2, 4)  # raised eagerly


def test_unigram_entropy():
    assert unigram_entropy(np.array([7] * 50, dtype=np.uint16)) == 0.0
    assert math.isclose(unigram_entropy(np.arange(4, dtype=np.uint16).repeat(25)), math.log(4))
    assert math.isclose(unigram_entropy(np.array([0, 0, 70_000, 70_000], dtype=np.uint32)), math.log(2))
    with pytest.raises(DataError):
        unigram_entropy(np.array([], dtype=np.uint16))


# ---------------------------------------------------------------- HF datasets


def test_hf_dataset_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError) as info:
        load_hf_dataset_stream("tiny_shakespeare", cache_dir=tmp_path)
    assert str(info.value).startswith("--dataset needs the `datasets` package (pip install datasets")


def test_hf_dataset_stream_with_fake_package(monkeypatch, tmp_path):
    calls = []

    def load_dataset(name, *args, split, streaming=False):
        calls.append((name, args, split, streaming))
        if name == "broken":
            raise ConnectionError("no network\nsecond line")
        return iter([{"text": "hello"}, {"text": ""}, {"text": "world wide"}, {"text": "never"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path = load_hf_dataset_stream("some/ds", cache_dir=tmp_path, max_chars=12)
    assert read_corpus_texts(path) == "hello\n\nworld"
    assert calls == [("some/ds", (), "train", True)]
    assert load_hf_dataset_stream("some/ds", cache_dir=tmp_path, max_chars=12) == path
    assert len(calls) == 1  # cached folder reused without streaming again

    # Shards of about shard_chars characters: the folder's text is the records' text.
    sharded = load_hf_dataset_stream("some/ds", cache_dir=tmp_path, max_chars=100, shard_chars=4)
    assert sorted(p.name for p in sharded.glob("*.txt")) == ["part-00000.txt", "part-00001.txt", "part-00002.txt"]
    assert read_corpus_texts(sharded) == "hello\n\nworld wide\n\nnever"

    # Offline: the dataset comes from the local HF cache (not streamed).
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    load_hf_dataset_stream("some/ds", cache_dir=tmp_path, max_chars=7)
    assert calls[-1] == ("some/ds", (), "train", False)

    with pytest.raises(DataError, match="broken") as info:
        load_hf_dataset_stream("broken", cache_dir=tmp_path)
    assert "\n" not in str(info.value) and "no network" in str(info.value)
    with pytest.raises(DataError, match="'body'"):
        load_hf_dataset_stream("other", cache_dir=tmp_path, text_field="body")


def test_hf_dataset_stream_resumes_after_its_finished_shards(monkeypatch, tmp_path):
    served = []

    def records():
        for i in range(6):
            if i == 4 and not served.count("again"):
                raise ConnectionError("lost the network")
            served.append(i)
            yield {"text": f"record {i}"}

    def load_dataset(name, *args, split, streaming=False):
        return records()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DataError, match="lost the network"):
        load_hf_dataset_stream("ds", cache_dir=tmp_path, shard_chars=15)
    served.append("again")
    path = load_hf_dataset_stream("ds", cache_dir=tmp_path, shard_chars=15)
    assert read_corpus_texts(path) == "\n\n".join(f"record {i}" for i in range(6))
    assert len(list(path.glob("part-*.txt"))) == 3
