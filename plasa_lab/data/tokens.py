"""Reading a token cache: what every evaluation needs, and all a sandboxed worker imports of the data.

A cache folder holds `train.bin` and `val.bin` (raw little-endian uint16 ids) and `manifest.json`;
`load_corpus` reads and verifies every byte against the manifest's sha256 and fingerprint (numpy
and hashlib only: no tokenizer, no network). `train_batches` and `val_windows` cut the splits into
model inputs. Building a cache is plasa_lab.data.corpora's job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

FORMAT = 1


class CorpusError(Exception):
    """A corpus cannot be built, or a cache is missing, corrupt or not the expected one (one line)."""


@dataclass(repr=False)
class Corpus:
    name: str  # "wikitext2" | "wiki-summaries" | "text:<abs path>"
    dir: Path  # cache folder holding train.bin, val.bin, manifest.json
    manifest: dict
    train: np.ndarray  # uint16 token ids
    val: np.ndarray

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def summary(self) -> dict:
        """What a result records about its data (the `corpus` artifact)."""
        m = self.manifest
        return {
            "corpus": self.name,
            "source": m["source"],
            "tokenizer": m["tokenizer"]["source"],
            "tokenizer_sha256": m["tokenizer"]["sha256"],
            "train_tokens": m["train_tokens"],
            "val_tokens": m["val_tokens"],
            "fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return (
            f"Corpus({self.name!r}, train={len(self.train)}, val={len(self.val)}, fingerprint={self.fingerprint[:12]})"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint_of(tokenizer_sha256: str, train_sha256: str, val_sha256: str) -> str:
    return _sha256(f"plasa-tokens-v{FORMAT}|{tokenizer_sha256}|{train_sha256}|{val_sha256}".encode())


def load_corpus(corpus_dir: Path, expected_fingerprint: str | None = None) -> Corpus:
    """Load a built cache folder and verify every byte against its manifest (and the manifest
    against `expected_fingerprint` if given). Never builds, never touches the network.
    Raises CorpusError (one line) when anything is missing or does not match."""
    d = Path(corpus_dir)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        tokenizer_sha = manifest["tokenizer"]["sha256"]
        counts = {s: int(manifest[f"{s}_tokens"]) for s in ("train", "val")}
        shas = {s: manifest[f"{s}_sha256"] for s in ("train", "val")}
        name, fingerprint = manifest["corpus"], manifest["fingerprint"]
    except FileNotFoundError:
        raise CorpusError(f"no token cache in {d}: run scripts/prepare_data.py") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorpusError(
            f"{d / 'manifest.json'} is unreadable or incomplete ({type(e).__name__}: {e}); "
            f"rebuild with scripts/prepare_data.py"
        ) from None
    arrays = {}
    for split in ("train", "val"):
        path = d / f"{split}.bin"
        try:
            raw = path.read_bytes()
        except OSError:
            raise CorpusError(f"{path} is missing: rebuild with scripts/prepare_data.py") from None
        if len(raw) != 2 * counts[split]:
            raise CorpusError(
                f"{path} holds {len(raw)} bytes but the manifest says {counts[split]} "
                f"uint16 tokens: corrupt cache, rebuild with scripts/prepare_data.py"
            )
        if _sha256(raw) != shas[split]:
            raise CorpusError(
                f"{path} does not match its manifest's sha256: corrupt cache, rebuild with scripts/prepare_data.py"
            )
        arrays[split] = np.frombuffer(raw, dtype="<u2")
    if fingerprint_of(tokenizer_sha, shas["train"], shas["val"]) != fingerprint:
        raise CorpusError(
            f"{d / 'manifest.json'}: fingerprint does not match its data and tokenizer: "
            f"corrupt cache, rebuild with scripts/prepare_data.py"
        )
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise CorpusError(
            f"token cache {d} has fingerprint {fingerprint[:12]}, expected "
            f"{expected_fingerprint[:12]}: the data changed since this run started"
        )
    return Corpus(name=name, dir=d, manifest=manifest, train=arrays["train"], val=arrays["val"])


def train_batches(train: np.ndarray, batch_size: int, seq_len: int, seed: int) -> Iterator[torch.LongTensor]:
    """Endless training batches [batch_size, seq_len + 1] (int64): windows of the train split at
    uniformly random starts (every start with a full window is possible), drawn from a
    torch.Generator seeded with `seed`, so the same seed gives the same batches."""
    import torch

    data = np.asarray(train)
    starts_available = len(data) - seq_len  # start s is valid iff s + seq_len + 1 <= len(data)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if starts_available < 1:
        raise CorpusError(f"train split has {len(data)} tokens, need at least {seq_len + 1}")
    generator = torch.Generator().manual_seed(seed)
    offsets = np.arange(seq_len + 1)

    def batches():
        while True:
            starts = torch.randint(0, starts_available, (batch_size,), generator=generator).numpy()
            yield torch.from_numpy(data[starts[:, None] + offsets].astype(np.int64))

    return batches()


def val_windows(val: np.ndarray, n_windows: int, seq_len: int) -> torch.LongTensor:
    """The first n_windows windows of seq_len + 1 tokens at stride seq_len + 1 (int64,
    [n_windows, seq_len + 1]): window i = val[i*(L+1) : (i+1)*(L+1)]. Windows share no token, so
    no token is predicted twice; the first token of each window is context only (1 token in L+1
    is never a target). Raises CorpusError when the split is too short."""
    import torch

    need = n_windows * (seq_len + 1)
    if n_windows < 1 or seq_len < 1:
        raise ValueError(f"n_windows and seq_len must be positive, got {n_windows} and {seq_len}")
    if len(val) < need:
        raise CorpusError(f"validation split has {len(val)} tokens; {n_windows} windows of {seq_len + 1} need {need}")
    return torch.from_numpy(np.asarray(val[:need]).astype(np.int64).reshape(n_windows, seq_len + 1))
