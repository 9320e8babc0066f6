"""Small helpers every module shares (one copy each): atomic file writes, one-line errors.

Standard library only: the sandboxed worker imports it too."""

import contextlib
import os
import tempfile
import unicodedata
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


def printable(text: str, limit: int | None = None) -> str:
    """Text a child produced, made data: every control or format character (escape sequences,
    carriage returns, bidi overrides, NULs) replaced by U+FFFD except newlines and tabs, and at most
    `limit` characters. What a terminal, a console or a page shows of it is its characters, nothing
    it could mean to them."""
    text = str(text) if limit is None else str(text)[:limit]
    return "".join(c if c in "\n\t" or unicodedata.category(c)[0] != "C" else "\ufffd" for c in text)


def one_line(text: str, limit: int = 300) -> str:
    """A child's text as one printable line: whitespace runs (newlines included) made one space, and
    no backtick (a run of them would close the code fence a prompt shows it in)."""
    return " ".join(printable(text, limit * 4).replace("`", "\u02cb").split())[:limit]


def quoted(text: str, limit: int = 4000) -> str:
    """A child's text (its stderr) as a quotation it cannot close: printable, no backtick, every line
    behind "| ", so no line of it can be a heading, a fence or an instruction where it is shown."""
    lines = printable(text, limit).replace("`", "\u02cb").splitlines()
    return "\n".join(f"| {line}" for line in lines)
