"""Run untrusted code in a child process that cannot outlive, outgrow or overhear its parent.

The child gets: its own process group (killed as a whole on timeout or when done), a fresh
working directory, an environment built from an allow-list (no API keys, tokens or secrets),
resource limits (address space, CPU seconds, file size, processes, no core dumps), the death
signal if the parent dies, and pipes whose output is drained in threads and capped, so a
flood neither hangs the parent nor fills its memory.
"""

import ctypes
import os
import resource
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

# Variables the child may inherit: what Python, torch and a GPU driver need, nothing else.
ENV_ALLOWLIST = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
)
OUTPUT_LIMIT = 1 << 20  # bytes of stdout + stderr before the child is stopped
KEEP_HEAD = KEEP_TAIL = 4096  # what the artifacts keep of each stream


@dataclass
class Limits:
    wall_seconds: float
    memory_bytes: int | None = 8 << 30  # None: no address-space limit (CUDA maps huge virtual ranges)
    cpu_seconds: int | None = None  # default: wall_seconds x threads, with margin
    file_bytes: int = 64 << 20
    processes: int = 4096  # bounds a fork bomb; not enforced for root


@dataclass
class SandboxResult:
    returncode: int | None
    timed_out: bool
    output_exceeded: bool
    seconds: float
    stdout: str
    stderr: str
    output_bytes: int = 0
    signal_name: str | None = field(default=None)


def scrubbed_env(workdir: str, threads: int, extra: dict | None = None) -> dict:
    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    env.update(
        HOME=workdir, TMPDIR=workdir, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra or {})
    return env


def _child_setup(limits: Limits, cpu_seconds: int):
    """Runs in the child between fork and exec (no Python threads there yet)."""
    def setup():
        try:  # die with the parent: PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        if limits.memory_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    return setup


class _OutputBudget:
    """Bytes written to both streams together; sets `exceeded` past OUTPUT_LIMIT."""

    def __init__(self):
        self.total, self.lock, self.exceeded = 0, threading.Lock(), threading.Event()

    def add(self, n):
        with self.lock:
            self.total += n
            if self.total > OUTPUT_LIMIT:
                self.exceeded.set()


class _Drain(threading.Thread):
    """Reads a pipe to its end, keeping its head and tail and counting every byte."""

    def __init__(self, pipe, budget, on_line=None):
        super().__init__(daemon=True)
        self.pipe, self.budget, self.on_line = pipe, budget, on_line
        self.head, self.tail, self.partial, self.bytes = bytearray(), bytearray(), b"", 0

    def run(self):
        for chunk in iter(lambda: self.pipe.read1(65536), b""):
            self.bytes += len(chunk)
            self.budget.add(len(chunk))
            room = max(0, KEEP_HEAD - len(self.head))
            self.head += chunk[:room]
            self.tail = (self.tail + chunk[room:])[-KEEP_TAIL:]
            if self.on_line:
                *lines, self.partial = (self.partial + chunk).split(b"\n")
                for line in lines:
                    self.on_line(line.decode(errors="replace"))
        self.pipe.close()

    def text(self):
        cut = self.bytes - len(self.head) - len(self.tail)
        marker = f"\n[... {cut} bytes cut ...]\n".encode() if cut else b""
        return (self.head + marker + self.tail).decode(errors="replace")


def kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_sandboxed(argv: list[str], workdir: str, limits: Limits, threads: int = 1,
                  env_extra: dict | None = None, on_stderr_line=None) -> SandboxResult:
    """Run argv in workdir under the limits; always returns, never leaves the group behind."""
    cpu_seconds = limits.cpu_seconds or int(limits.wall_seconds * max(1, threads) * 1.5) + 30
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=workdir, env=scrubbed_env(workdir, threads, env_extra), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=_child_setup(limits, cpu_seconds), close_fds=True,
    )
    budget = _OutputBudget()
    out, err = _Drain(proc.stdout, budget), _Drain(proc.stderr, budget, on_stderr_line)
    out.start(), err.start()
    timed_out = False
    deadline = start + limits.wall_seconds
    try:
        while proc.poll() is None and not budget.exceeded.is_set():
            if time.monotonic() > deadline:
                timed_out = True
                break
            budget.exceeded.wait(0.05)
    finally:  # Ctrl-C in the parent too: the group goes
        kill_group(proc.pid)  # the child may have left grandchildren in its group, finished or not
        proc.wait()
    out.join(5), err.join(5)
    rc = proc.returncode
    return SandboxResult(
        returncode=rc, timed_out=timed_out, output_exceeded=budget.exceeded.is_set(),
        seconds=time.monotonic() - start, stdout=out.text(), stderr=err.text(), output_bytes=budget.total,
        signal_name=signal.Signals(-rc).name if rc is not None and rc < 0 and -rc in signal.Signals._value2member_map_ else None,
    )
