"""The protocol between the trusted judge and a sandboxed worker: JSON header lines and raw arrays.

Each message is one JSON object on one line, optionally followed by raw bytes whose size the
*reader* already knows (the judge computes every size itself from what it asked for; it never
takes a length from the worker beyond a bound it set). The worker's side (`send`, `receive`) is
plain blocking I/O; the judge's side (`Channel`) reads and writes with a deadline, bounds every
line, and turns anything malformed into a ProtocolError: a worker can fail its own evaluation,
never crash or hang the judge.
"""

import json
import math
import os
import select
import time

import numpy as np

MAX_HEADER_BYTES = 1 << 20
MAX_INT_DIGITS = 18


class ProtocolError(Exception):
    """The worker sent something malformed, too large, or nothing in time (one line)."""


class WorkerGone(ProtocolError):
    """The worker's end closed: it exited or was killed."""


class Deadline(ProtocolError):
    """The stage's time ran out while waiting on the worker."""


# ---------------------------------------------------------------------------------------------
# Worker side (inside the sandbox)


def send(stream, header: dict, payload: bytes | memoryview = b""):
    stream.write(json.dumps(header, allow_nan=False).encode() + b"\n")
    if payload:
        stream.write(payload)
    stream.flush()


def receive(stream) -> dict:
    line = stream.readline(MAX_HEADER_BYTES + 1)
    if not line:
        raise EOFError("the judge closed the channel")
    return json.loads(line)


def receive_bytes(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"expected {n} bytes, got {len(data)}")
    return data


# ---------------------------------------------------------------------------------------------
# Judge side (trusted): every read bounded in size and time


def _strict_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"a non-finite number {text[:20]}")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def parse_header(line: bytes) -> dict:
    """A JSON object, strictly: no NaN/Infinity, no huge integers, no deep nesting, nothing but a dict."""
    try:
        value = json.loads(
            line.decode("utf-8"), parse_int=_strict_int, parse_float=_finite_float, parse_constant=_no_constant
        )
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed message ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"malformed message (a JSON {type(value).__name__}, expected an object)")
    return value


class Channel:
    """Talks to one worker over its stdin (we write) and stdout (we read), both non-blocking."""

    def __init__(self, write_fd: int, read_fd: int, deadline: float):
        self.write_fd, self.read_fd, self.deadline = write_fd, read_fd, deadline
        os.set_blocking(write_fd, False)
        os.set_blocking(read_fd, False)
        self.buffer = bytearray()  # read but not yet consumed

    def _wait(self, fd: int, for_write: bool):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Deadline("the stage's time limit ran out")
        ready = (
            select.select([], [fd], [], min(left, 1.0)) if for_write else select.select([fd], [], [], min(left, 1.0))
        )
        return bool(ready[1] if for_write else ready[0])

    def send(self, header: dict, payload: bytes | memoryview = b""):
        data = memoryview(json.dumps(header).encode() + b"\n")
        for part in (data, memoryview(payload).cast("B")):
            while len(part):
                if not self._wait(self.write_fd, True):
                    continue
                try:
                    part = part[os.write(self.write_fd, part[: 1 << 20]) :]
                except BlockingIOError:
                    continue
                except (BrokenPipeError, OSError):
                    raise WorkerGone("the worker stopped reading (it exited)") from None

    def _fill(self):
        """Read whatever is available into the buffer (at least one byte, or raise)."""
        while True:
            if not self._wait(self.read_fd, False):
                continue
            try:
                chunk = os.read(self.read_fd, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                raise WorkerGone("the worker closed its output (it exited)")
            self.buffer += chunk
            return

    def try_receive(self, limit: int = MAX_HEADER_BYTES) -> dict | None:
        """A whole message if one has arrived (reading what is there without waiting), else None."""
        if b"\n" not in self.buffer and select.select([self.read_fd], [], [], 0)[0]:
            try:
                chunk = os.read(self.read_fd, 1 << 20)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                raise WorkerGone("the worker closed its output (it exited)")
            self.buffer += chunk or b""
        if b"\n" not in self.buffer:
            if len(self.buffer) > limit:
                raise ProtocolError(f"a message line longer than {limit} bytes")
            return None
        return self.receive(limit)

    def receive(self, limit: int = MAX_HEADER_BYTES) -> dict:
        while b"\n" not in self.buffer:
            if len(self.buffer) > limit:
                raise ProtocolError(f"a message line longer than {limit} bytes")
            self._fill()
        end = self.buffer.index(b"\n")
        if end > limit:
            raise ProtocolError(f"a message line longer than {limit} bytes")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        return parse_header(line)

    def receive_array(self, shape: tuple, dtype, into: np.ndarray | None = None) -> np.ndarray:
        """Exactly prod(shape) items of dtype (little-endian), read straight into `into` when it has
        that shape and dtype (a buffer reused between answers: no page faults for a fresh 50 MB), else
        into a new array."""
        dtype = np.dtype(dtype).newbyteorder("<")
        fits = into is not None and into.shape == tuple(shape) and into.dtype == dtype and into.flags.c_contiguous
        out = into if fits else np.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        taken = min(len(self.buffer), len(view))
        view[:taken] = self.buffer[:taken]
        del self.buffer[:taken]
        while taken < len(view):
            if not self._wait(self.read_fd, False):
                continue
            try:
                n = os.readv(self.read_fd, [view[taken:]])
            except BlockingIOError:
                continue
            if n == 0:
                raise WorkerGone(f"the worker ended after {taken} of {len(view)} bytes of an answer")
            taken += n
        return out

    def receive_bytes(self, n: int) -> bytes:
        return self.receive_array((n,), np.uint8).tobytes()
