"""Small helpers every module shares (one copy each): atomic file writes, one-line errors.

Standard library only: the sandboxed worker imports it too."""

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_writer(path) -> Iterator[BinaryIO]:
    """A file that a reader (or a crash) sees with its old content or the new, never a mix: yields a
    binary file open on a temporary file in the same folder; leaving the block flushes it to disk
    and renames it over `path`. An exception removes it instead, so a check that raises inside the
    block (a hash that does not match) keeps `path` as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path, data: bytes | str) -> Path:
    """Write a whole file at once through atomic_writer."""
    with atomic_writer(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def message_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters ("" when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """`TypeName: first line of the message` (just the type when the message is empty)."""
    text = message_line(exc, limit)
    if isinstance(exc, OSError) and exc.strerror:  # "[Errno 13] ..." reads worse than the file and the reason
        text = (f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror)[:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
