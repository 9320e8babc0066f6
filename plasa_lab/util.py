"""Small helpers every module shares (one copy each): atomic file writes, one-line errors."""

import os
import tempfile
from pathlib import Path


def atomic_write(path, data: bytes | str) -> Path:
    """Write a file so that a reader (or a crash) sees the old content or the new, never a mix:
    a temporary file in the same folder, flushed to disk, then renamed over the target."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def first_line(exc: BaseException, limit: int = 200) -> str:
    """`TypeName: first line of the message` (just the type when the message is empty)."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror:  # "[Errno 13] ..." reads worse than the file and the reason
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__
