"""Corpora of any size (galorex.train.corpus) and the trained tokenizer (galorex.train.tokenizer)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from galorex.train.corpus import iter_pieces, tokenize_corpus
from galorex.train.data import ByteTokenizer, DataError, HFTokenizer, prepare_tokens
from galorex.train.tokenizer import main as tokenizer_main
from galorex.train.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]


def _documents(n=60, seed=0):
    """Documents with the awkward edges: leading/trailing blanks, tabs, blank lines, non-ASCII."""
    rng = np.random.default_rng(seed)
    words = ["the", "Galore", "rank", "é", "✓", "12345", "low-rank", "it's", "...", "\t", "  ", "\n", "\n\n", " \n"]
    docs = []
    for i in range(n):
        body = "".join(words[j] + (" " if rng.random() < 0.7 else "") for j in rng.integers(0, len(words), 40))
        docs.append(("  " if i % 5 == 0 else "") + body + ("\n" if i % 3 == 0 else ""))
    docs[7] = "   \n"  # blank documents are skipped
    return docs


def _expected_text(docs):
    return "\n\n".join(d for d in docs if d.strip())


def _write_corpora(tmp_path, docs):
    """The same documents as one plain file and as folders of shards in every supported format."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    plain = tmp_path / "plain.txt"
    plain.write_text(_expected_text(docs), encoding="utf-8")

    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    chunks = [docs[:20], docs[20:45], docs[45:]]
    lines = [[json.dumps({"text": d, "id": i}) for i, d in enumerate(c)] for c in chunks]
    (jsonl / "a.jsonl").write_text("\n".join(lines[0]) + "\n", encoding="utf-8")
    with gzip.open(jsonl / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[1]) + "\n")
    (jsonl / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines[2]) + "\n").encode()))

    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for i, c in enumerate(chunks):
        # Small row groups: the reader walks them one batch at a time.
        pq.write_table(pa.table({"body": c}), parquet / f"part-{i:03d}.parquet", row_group_size=7)

    mixed = tmp_path / "mixed"
    (mixed / "sub").mkdir(parents=True)
    (mixed / "0.txt").write_text(_expected_text(chunks[0]), encoding="utf-8")
    with gzip.open(mixed / "1.txt.gz", "wt", encoding="utf-8") as f:
        f.write(_expected_text(chunks[1]))
    (mixed / "2.txt").write_text("  \n\n", encoding="utf-8")  # a blank file adds nothing, not even a separator
    (mixed / "sub" / "3.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(_expected_text(chunks[2]).encode()))
    (mixed / "README.md").write_text("not part of the corpus", encoding="utf-8")
    return plain, jsonl, parquet, mixed


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok.json"
    folder = tmp_path_factory.mktemp("tokdata")
    (folder / "a.txt").write_text(_expected_text(_documents(200, seed=1)), encoding="utf-8")
    return HFTokenizer(train_bpe(folder, 400, out))


def test_pieces_rejoin_and_cut_only_at_whitespace():
    rng = np.random.default_rng(0)
    alphabet = ["a", "é", ".", " ", "\n", "\t", "\x0b", "\n\n", "  "]
    for _ in range(500):
        text = "".join(rng.choice(alphabet, rng.integers(0, 80)))
        cuts = sorted(set(rng.integers(0, len(text) + 1, rng.integers(0, 6)).tolist()) | {0, len(text)})
        blocks = [text[a:b] for a, b in zip(cuts, cuts[1:])]
        pieces = list(iter_pieces(iter(blocks), int(rng.integers(1, 12))))
        assert "".join(t for _, t in pieces) == text
        kinds = [k for k, _ in pieces]
        assert kinds == ["whole"] or (kinds[0] == "head" and kinds[-1] == "tail" and set(kinds[1:-1]) <= {"body"})
        for (_, before), (_, after) in zip(pieces, pieces[1:]):
            if before and after:  # every boundary: a non-space character, then a space/tab/newline/return
                assert not before[-1].isspace() and after[0] in " \t\n\r", (before, after)


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_sharded_compressed_corpora_tokenise_like_one_plain_file(tmp_path, which, request):
    tok = ByteTokenizer() if which == "byte" else request.getfixturevalue("bpe")
    docs = _documents()
    plain, jsonl, parquet, mixed = _write_corpora(tmp_path, docs)
    whole = np.asarray(tok.encode(_expected_text(docs)))
    cache = tmp_path / "cache"
    # Small pieces: hundreds of cuts, each of which must leave the tokens of the whole text.
    for corpus, field in ((plain, "text"), (jsonl, "text"), (parquet, "body"), (mixed, "text")):
        tokens = tokenize_corpus(corpus, tok, cache, text_field=field, piece_chars=50, workers=1)
        assert np.array_equal(np.asarray(tokens), whole), corpus.name
    # Named by their content: the same digest (what a resumed run compares) for all four.
    assert len({p.name.rsplit("-", 1)[1] for p in cache.glob("*.tok.bin")}) == 1
    assert not list(cache.glob("*.work"))  # the shards are gone once joined


def test_parallel_workers_give_the_same_tokens(tmp_path, bpe):
    docs = _documents(120)
    _, jsonl, _, _ = _write_corpora(tmp_path, docs)
    one = np.asarray(tokenize_corpus(jsonl, bpe, tmp_path / "c1", piece_chars=200, workers=1))
    two = np.asarray(tokenize_corpus(jsonl, bpe, tmp_path / "c2", piece_chars=200, workers=2))
    assert np.array_equal(one, two) and np.array_equal(one, bpe.encode(_expected_text(docs)))


def test_corpus_errors_name_the_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid JSON"):
        tokenize_corpus(bad, ByteTokenizer(), cache)
    (bad / "a.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:1: record has no 'text' field \(it has: body\).*--text-field"):
        tokenize_corpus(bad, ByteTokenizer(), cache)
    (bad / "a.jsonl").unlink()
    (bad / "b.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"b\.txt\.gz: cannot read it"):
        tokenize_corpus(bad, ByteTokenizer(), cache)
    (bad / "b.txt.gz").unlink()
    (bad / "c.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(DataError, match=r"c\.txt\.zst: reading \.zst files needs the `zstandard` package"):
        tokenize_corpus(bad, ByteTokenizer(), cache)
    monkeypatch.undo()
    (bad / "c.txt.zst").unlink()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), bad / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: no column 'text' \(columns: content\)"):
        tokenize_corpus(bad, ByteTokenizer(), cache)
    (bad / "d.parquet").unlink()
    (bad / "e.txt").write_bytes(b"ok\xff")
    with pytest.raises(DataError, match=r"e\.txt: not valid UTF-8 \(bad byte at offset 2\)"):
        tokenize_corpus(bad, ByteTokenizer(), cache)
    with pytest.raises(DataError, match="--workers must be >= 1"):
        tokenize_corpus(bad, ByteTokenizer(), cache, workers=0)


_KILLED = """
import os, sys
from galorex.train.data import load_tokenizer
from galorex.train.corpus import tokenize_corpus

def die(index, piece):
    if index == 1 and piece == 3:
        # Half a piece of tokens past the last record, as a kill in the middle of a write leaves.
        with open(os.path.join(sys.argv[2], os.listdir(sys.argv[2])[0], "000001.bin"), "ab") as f:
            f.write(b"\\x01\\x00" * 7)
        os._exit(9)  # no clean-up of any kind, like SIGKILL

tokenize_corpus(sys.argv[1], load_tokenizer(sys.argv[3]), sys.argv[2], piece_chars=300, workers=1, on_piece=die)
"""


def test_killed_tokenisation_resumes(tmp_path, bpe):
    docs = _documents(150)
    _, jsonl, _, _ = _write_corpora(tmp_path, docs)
    cache = tmp_path / "cache"
    run = subprocess.run(
        [sys.executable, "-c", _KILLED, str(jsonl), str(cache), str(bpe.path)], cwd=ROOT, capture_output=True
    )
    assert run.returncode == 9, run.stderr.decode()
    assert not list(cache.glob("*.tok.json")) and len(list(cache.glob("*.work"))) == 1  # shards, no cache

    calls = []

    class Counting(HFTokenizer):
        def encode(self, text):
            calls.append(text)
            return super().encode(text)

    tok = Counting(bpe.path)
    tokens = np.asarray(tokenize_corpus(jsonl, tok, cache, piece_chars=300, workers=1))
    assert np.array_equal(tokens, bpe.encode(_expected_text(docs)))
    resumed_chars = sum(map(len, calls))
    calls.clear()
    tokenize_corpus(jsonl, tok, tmp_path / "fresh", piece_chars=300, workers=1)
    # File 0 and three pieces of file 1 were kept, not tokenised again.
    assert resumed_chars < sum(map(len, calls)) - 3 * 300 - len(_expected_text(docs[:20]))


_MEASURE = """
import os, resource, sys
from galorex.train.data import ByteTokenizer
from galorex.train.corpus import tokenize_corpus

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

tokenize_corpus(sys.argv[3], ByteTokenizer(), sys.argv[2] + "-warm", piece_chars=1 << 16, workers=1)
before = rss_kib("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
    f.write("5")
tokens = tokenize_corpus(sys.argv[1], ByteTokenizer(), sys.argv[2], piece_chars=1 << 16, workers=1)
print(len(tokens), before, rss_kib("VmHWM:"))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_corpus_is_never_read_whole(tmp_path):
    # ~59 MiB in three files (one gzip-compressed), tokenised in pieces of 64 Ki characters.
    rng = np.random.default_rng(0)
    words = ["the", "a", "rank", "low", "GaLore", "gradient", "projection", "é", "✓", "memory", "of", "to"]
    vocab = np.array([w.encode() for w in words])
    corpus = tmp_path / "big"
    corpus.mkdir()
    block = b"".join(vocab[rng.integers(0, len(vocab), 200_000)] + np.where(rng.random(200_000) < 0.1, b"\n", b" "))
    sizes = []
    for i in range(3):
        data = block * 18  # ~20 MiB a file
        sizes.append(len(data))
        if i == 1:
            with gzip.open(corpus / f"{i}.txt.gz", "wb", compresslevel=1) as f:
                f.write(data)
        else:
            (corpus / f"{i}.txt").write_bytes(data)
        del data
    small = tmp_path / "small.txt"
    small.write_text("warm up the code paths once\n" * 1000, encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(corpus), str(tmp_path / "cache"), str(small)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    n, before, peak = map(int, run.stdout.split())
    assert n == sum(sizes) + 2 * 2  # bytes, plus the two "\n\n" separators
    grew_mib = (peak - before) / 1024
    corpus_mib = sum(sizes) / 2**20
    # A few 64 Ki-character pieces (text, UTF-8 bytes, tokens), 256 KiB read blocks and the 1 MiB copy
    # buffer of the join: ~5 MiB measured (2026-12-03) against a 59 MiB corpus; a corpus read whole
    # would add its size.
    assert grew_mib < corpus_mib / 6, (grew_mib, corpus_mib)


def test_trained_tokenizer_round_trips_text(tmp_path, bpe):
    assert bpe.vocab_size == 400
    text = "GaLore  projects\tgradients — é✓ 12345\n\n  indented\r\n" + "\U0001f600"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(bpe.encode(_expected_text(_documents(20, seed=1)))) < len(_expected_text(_documents(20, seed=1)))

    # The command line, and what it says when the input is wrong.
    (tmp_path / "c.txt").write_text(_expected_text(_documents(30)), encoding="utf-8")
    assert tokenizer_main(["--data", str(tmp_path / "c.txt"), "--vocab-size", "300", "--out", str(tmp_path)]) == 0
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert tok.vocab_size == 300 and tok.decode(tok.encode(text)) == text
    tokens = prepare_tokens(tmp_path / "c.txt", tok, tmp_path / "cache")
    assert np.array_equal(tokens, tok.encode((tmp_path / "c.txt").read_text()))
    assert tokenizer_main(["--data", str(tmp_path / "c.txt"), "--vocab-size", "100", "--out", str(tmp_path)]) == 2
    with pytest.raises(DataError, match="not found"):
        train_bpe(tmp_path / "missing", 300, tmp_path / "x.json")


def test_cli_dispatches_the_tokenizer_command(tmp_path, capsys):
    from galorex.train.cli import main

    (tmp_path / "c.txt").write_text(_expected_text(_documents(30)), encoding="utf-8")
    argv = ["tokenizer", "--data", str(tmp_path / "c.txt"), "--vocab-size", "260", "--out", str(tmp_path / "t.json")]
    assert main(argv) == 0
    assert "260 tokens" in capsys.readouterr().out and (tmp_path / "t.json").is_file()


def test_tokenizer_from_a_folder_or_the_local_hf_cache(tmp_path, monkeypatch, bpe):
    import types

    from galorex.train.data import load_tokenizer

    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(bpe.path.read_bytes())
    assert load_tokenizer(folder).name == bpe.name  # named by content: the same cache entries
    # A model id resolves through huggingface_hub's local cache only (no network).
    lookups = []

    def try_to_load_from_cache(repo_id, filename):
        lookups.append((repo_id, filename))
        return str(bpe.path) if repo_id == "org/model" else None

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(try_to_load_from_cache=try_to_load_from_cache)
    )
    assert load_tokenizer("org/model").name == bpe.name
    with pytest.raises(DataError, match=r"not found .*huggingface-cli download ID tokenizer\.json"):
        load_tokenizer("org/absent")
    assert lookups == [("org/model", "tokenizer.json"), ("org/absent", "tokenizer.json")]
