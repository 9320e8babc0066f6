"""The trusted judge: one stage of one program, scored outside every process that runs its code.

Four sandboxed processes per stage (each its own bubblewrap sandbox, process group and limits):

    trunk           sandboxed.trunk, our code only: the fixed model (the initial program's fixed text,
                    which every program shares), trained by the recipe on the train split and
                    validated on windows of the validation split; it computes every metric.
    training        sandboxed.worker, mode train: the program's EVOLVE-BLOCKs. Per layer it gets the
                    hidden states (plain arrays) and answers which keys each query keeps; it trains
                    its indexers on the attention it is sent. No process of the trunk's is
                    reachable from it: a block cannot touch a fixed weight, an optimiser or a graph.
    validation A/B  sandboxed.worker, mode serve: fresh imports of the program that load the trained
                    indexer weights and answer the selections of validation (two of them, for the
                    cut checks: sandboxed.validation).

The blocks processes talk only to the trunk, over pipes the judge makes and hands over; they cannot
create processes nor share a kernel object with another process (sandbox.blocks_filter). The cut
checks compare A's answers with B's, so A and B must not be able to exchange a bit: B is started
only once A and the training process have exited (the trunk asks for it; the judge kills and reaps
them first), and nothing writable is shared. The judge talks only to the trunk and keeps the stage's
limits, none of them set by the program: CPU seconds per process (what it computed, whatever else
loads the machine), the resident memory of the stage's processes together, a stall (no process
computing for STALL_SECONDS: a blocks process that stopped answering) and a wall-clock backstop.
`run_local` is the `local` runner: the judge here, with this machine's token cache.
"""

import os
import re
import select
import sys
import time
from dataclasses import dataclass, field

from .. import INITIAL_PROGRAM
from ..contract import STAGE1_TRAINING_STEPS, coverage_rounds, get_profile, windows_to_run
from ..data import corpora
from ..data.tokens import CorpusError, load_corpus
from ..util import first_line, one_line
from .jobs import Job, StageResult
from .ledger import normalised_code, original_line
from .sandbox import Limits, SandboxedProcess, SandboxUnavailable, gpu_device_nodes
from .sandboxed import wire

STAGE1_WINDOWS = 8  # stage 1 scores 4 batches (and runs more windows for the cut checks)
TRAIN_FILE_INSIDE, VAL_FILE_INSIDE = "/data/train.bin", "/data/val.bin"
BLOCKS_PROCESSES = ("training", "validation A", "validation B")
STARTED_LATER = "validation B"  # once every other blocks process is gone
ROLES = ("trunk", *BLOCKS_PROCESSES)
REPORT_LIMIT = 1 << 20
# The stage's memory (job.memory_gb) split into address-space limits: the trunk and at most two blocks
# processes are alive at once (training and A, then A, then B), so the limits of those alive sum to it.
MEMORY_SHARE = {"trunk": 0.5, "training": 0.25, "validation A": 0.25, "validation B": 0.25}
STALL_SECONDS = 60.0  # no process of the stage computed STALL_CPU_SECONDS in this long: it is stuck
STALL_CPU_SECONDS = 0.2
WATCH_SECONDS = 0.25  # how often the limits are read


def default_cpu_limits(stage: int, profile_name: str, val_windows: int, threads: int) -> dict[str, float]:
    """CPU seconds per process before anything is measured here: about 4x the initial program's on this
    2-core machine (quick stage 2, one thread: trunk 61.5, training 5.4, validation A 1.6 and B 1.5),
    and a minute each for starting Python and torch; the trunk's per thread (threads that wait spin)."""
    profile = get_profile(profile_name)
    steps = STAGE1_TRAINING_STEPS if stage == 1 else profile.steps
    windows = windows_to_run(STAGE1_WINDOWS if stage == 1 else val_windows, profile.seq_len, profile.cuts_per_position)
    return {
        "trunk": 60.0 + max(1, threads) * (1.0 * steps + 0.2 * windows),
        "training": 60.0 + 0.1 * steps,
        "validation A": 60.0 + 0.05 * windows,
        "validation B": 60.0 + 0.05 * windows,
    }


class Overrun(Exception):
    """A limit of the stage ran out (one line; the program's failure, to try again another time)."""


@dataclass
class Watch:
    """The stage's limits, read every WATCH_SECONDS from /proc: each process's CPU seconds against its
    own limit, the processes' resident memory together, progress (a stall), and the wall clock."""

    cpu_limits: dict
    cpu_reason: str
    memory_bytes: int | None
    deadline: float
    wall_reason: str
    cpu: dict = field(default_factory=dict)  # role -> CPU seconds, the last reading (kept after exit)
    peak_rss: int = 0

    def __post_init__(self):
        self.progress_at, self.progress = time.monotonic(), 0.0

    def read(self, name: str, process) -> int:
        """Note a process's CPU seconds (the last reading stays once it is gone); its resident bytes."""
        usage = process.usage()
        if usage.cpu_seconds:
            self.cpu[name] = max(self.cpu.get(name, 0.0), usage.cpu_seconds)
        return usage.rss_bytes

    def check(self, processes: dict):
        now, rss = time.monotonic(), 0
        for name, process in processes.items():
            rss += self.read(name, process)
            limit = self.cpu_limits.get(name)
            if limit is not None and self.cpu.get(name, 0.0) > limit:
                raise Overrun(
                    f"the {name} process computed for more than {limit:.0f} CPU-seconds ({self.cpu_reason}); "
                    f"the whole sandbox was killed: make it faster or stop looping"
                )
        self.peak_rss = max(self.peak_rss, rss)
        if self.memory_bytes and rss > self.memory_bytes:
            raise Overrun(
                f"the stage's processes held {rss / (1 << 30):.1f} GiB together, over its limit of "
                f"{self.memory_bytes / (1 << 30):.1f} GiB: use less memory"
            )
        total = sum(self.cpu.values())
        if total - self.progress >= STALL_CPU_SECONDS:
            self.progress, self.progress_at = total, now
        elif now - self.progress_at > STALL_SECONDS:
            raise Overrun(
                f"no process of the stage computed anything for {STALL_SECONDS:.0f} s: a blocks process "
                f"stopped answering; the whole sandbox was killed"
            )
        if now > self.deadline:
            raise Overrun(self.past_deadline())

    def past_deadline(self) -> str:
        """The one line of a stage that ran past its wall-clock backstop (seen here or by the trunk)."""
        return f"took more than {self.wall_reason}; the whole sandbox was killed: make it faster or stop looping"


def _process(job: Job, role: str, module: str, threads: int, limit_seconds: float, cpu: float, **options):
    gpu = job.device != "cpu" and bool(gpu_device_nodes())
    limits = Limits(
        wall_seconds=max(1.0, limit_seconds),
        memory_bytes=None if gpu else int(job.memory_gb * MEMORY_SHARE[role] * (1 << 30)),
        cpu_seconds=cpu + 30,  # the kernel's backstop: Watch answers first, with the reason
    )
    hide_gpus = {"CUDA_VISIBLE_DEVICES": ""} if job.device == "cpu" else {}  # nothing probes a GPU it may not use
    return SandboxedProcess(
        [sys.executable, "-I", "-m", module],
        limits,
        threads,
        isolation=job.sandbox,
        gpu=gpu,
        env_extra={**hide_gpus, "MALLOC_ARENA_MAX": "2"},  # fewer malloc arenas: address space the work uses
        **options,
    )


def exit_reason(name: str, process: SandboxedProcess, doing: str) -> str:
    """Why a process ended before answering, in one line."""
    process.wait()
    stderr = process.stderr_text()
    if process.output_exceeded:
        return f"wrote over {process.budget.total >> 10} KiB to stdout/stderr (limit 1 MiB), stopped: remove the prints"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        limit = process.limits.memory_bytes
        return f"ran out of memory{f' (limit {limit / (1 << 30):.1f} GiB)' if limit else ''}: use less memory"
    how = f"killed by {process.signal_name}" if process.signal_name else f"exited with code {process.proc.returncode}"
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [""]
    return f"{doing}: the {name} process {how} before answering: {one_line(tail[0], 200)}".rstrip(": ")


def child_lines(code: str, failure: str) -> str:
    """A failure line with the blocks processes' line numbers (of the normalised text they run) made
    the child's own."""

    def mapped(match):
        line = original_line(code, int(match[1]))
        return f"at line {line} of the program" if line else match[0]

    return re.sub(r"at line (\d{1,6}) of the program", mapped, failure)


class Stage:
    """The processes of one stage, the pipes between them, and the order they live in."""

    def __init__(self, job: Job, corpus, cpu_limits: dict, on_line):
        self.job, self.corpus, self.cpu_limits, self.on_line = job, corpus, cpu_limits, on_line
        self.processes: dict[str, SandboxedProcess] = {}
        self.retired: dict[str, SandboxedProcess] = {}
        self.child_ends, self.trunk_ends = {}, {}
        for name in BLOCKS_PROCESSES:  # child's stdin, child's stdout; the trunk's ends
            to_child, from_child = os.pipe(), os.pipe()
            self.child_ends[name] = (to_child[0], from_child[1])
            self.trunk_ends[name] = [to_child[1], from_child[0]]

    def remaining(self, deadline: float) -> float:
        return deadline - time.monotonic()

    def start_blocks(self, name: str, deadline: float):
        stdin, stdout = self.child_ends.pop(name)
        try:
            self.processes[name] = _process(
                self.job,
                name,
                "plasa_lab.evaluation.sandboxed.worker",
                1,
                self.remaining(deadline),
                self.cpu_limits[name],
                confined=True,
                stdio=(stdin, stdout),
            )
        finally:
            os.close(stdin)
            os.close(stdout)

    def start_trunk(self, deadline: float):
        binds = {
            str(self.corpus.dir / "train.bin"): TRAIN_FILE_INSIDE,
            str(self.corpus.dir / "val.bin"): VAL_FILE_INSIDE,
        }
        fds = tuple(fd for pair in self.trunk_ends.values() for fd in pair)
        try:
            self.processes["trunk"] = _process(
                self.job,
                "trunk",
                "plasa_lab.evaluation.sandboxed.trunk",
                self.job.threads,
                self.remaining(deadline),
                self.cpu_limits["trunk"],
                binds=binds,
                on_stderr_line=self.on_line,
                pass_fds=fds,
            )
        finally:
            for fd in fds:
                os.close(fd)
            self.trunk_ends = {}

    def retire(self, name: str):
        """Kill a blocks process and reap it (with everything it started): gone for good."""
        process = self.processes.pop(name, None)
        if process is not None:
            process.close()
            self.retired[name] = process

    def start_later(self, name: str, deadline: float):
        if name != STARTED_LATER or name in self.processes or self.processes.keys() & set(BLOCKS_PROCESSES):
            raise wire.ProtocolError(f"the trunk asked to start {name!r} while {sorted(self.processes)} run")
        self.start_blocks(name, deadline)

    def all(self) -> dict:
        return {**self.retired, **self.processes}

    def close(self):
        for process in self.processes.values():
            process.close()
        for pair in [*self.child_ends.values(), *self.trunk_ends.values()]:  # ends no process took
            for fd in pair:
                os.close(fd)
        self.child_ends, self.trunk_ends = {}, {}


def trunk_request(job: Job, trunk: SandboxedProcess, corpus, fds: dict) -> dict:
    profile = get_profile(job.profile)
    return dict(
        reference=INITIAL_PROGRAM.read_text(),
        code=normalised_code(job.code),  # what the blocks processes run is what the ledger key names
        stage=job.stage,
        seed=job.seed,
        device=job.device if job.device != "auto" else ("cuda" if gpu_device_nodes() else "cpu"),
        threads=job.threads,
        steps=STAGE1_TRAINING_STEPS if job.stage == 1 else profile.steps,
        batch_size=profile.batch_size,
        seq_len=profile.seq_len,
        n_scored=STAGE1_WINDOWS if job.stage == 1 else job.val_windows,
        allow_uniform_schedule=job.allow_uniform_schedule,
        check_every=job.check_every or 50,
        compile=job.compile,
        train_path=trunk.path_inside(str(corpus.dir / "train.bin")),
        val_path=trunk.path_inside(str(corpus.dir / "val.bin")),
        links=fds,
        seconds=max(1.0, job.time_limit),  # the trunk's own bound on a wait; the judge keeps the limits
    )


def _serve_trunk(stage: Stage, channel: wire.Channel, watch: Watch, deadline: float) -> dict:
    """The trunk's requests (retire a blocks process, start B) until its report; the limits read
    between messages."""
    trunk = stage.processes["trunk"]
    while True:
        message = channel.try_receive(REPORT_LIMIT)
        if message is None:
            watch.check(stage.processes)
            select.select([channel.read_fd], [], [], WATCH_SECONDS)
            continue
        op = message.get("op")
        if op == "retire" and message.get("name") in BLOCKS_PROCESSES:
            if process := stage.processes.get(message["name"]):
                watch.read(message["name"], process)
            stage.retire(message["name"])
        elif op == "start" and isinstance(message.get("name"), str):
            stage.start_later(message["name"], deadline)
        elif op == "report":
            return message
        else:
            raise wire.ProtocolError(f"unknown request {str(op)[:40]!r}")
        if trunk.proc.poll() is not None:
            raise wire.WorkerGone("the trunk exited")
        channel.send(dict(ok=True))


def run_stage(job: Job, corpus, on_line=None) -> StageResult:
    """Run one stage within the job's limits; always returns, never leaves a process behind."""
    start = time.monotonic()
    deadline = start + job.time_limit
    profile = get_profile(job.profile)
    cpu_limits = job.cpu_limits or default_cpu_limits(job.stage, job.profile, job.val_windows, job.threads)
    watch = Watch(
        cpu_limits,
        job.cpu_limit_reason or "the judge's defaults: nothing measured here yet",
        int(job.memory_gb * (1 << 30)),
        deadline,
        job.time_limit_reason,
    )
    stage, metrics = None, {}

    def result(ok, failure=None, retry_later=False):
        processes = stage.all() if stage else {}
        stderr = "\n".join(f"[{name}]\n{p.stderr_text()}" for name, p in processes.items() if p.stderr_text().strip())
        usage = dict(cpu_seconds={k: round(v, 2) for k, v in watch.cpu.items()}, peak_rss_mib=watch.peak_rss >> 20)
        return StageResult(ok, failure, metrics, stderr, time.monotonic() - start, retry_later, usage)

    try:
        n_scored = STAGE1_WINDOWS if job.stage == 1 else job.val_windows
        available = len(corpus.val) // (profile.seq_len + 1)
        rounds = coverage_rounds(profile.cuts_per_position if job.stage == 2 else 0, available, profile.seq_len)
        if available < windows_to_run(n_scored, profile.seq_len, rounds):
            raise CorpusError(
                f"validation split has {available} windows; stage {job.stage} needs "
                f"{windows_to_run(n_scored, profile.seq_len, rounds)}"
            )
        stage = Stage(job, corpus, cpu_limits, on_line)
        for name in BLOCKS_PROCESSES:
            if name != STARTED_LATER:  # they import and build while the trunk starts
                stage.start_blocks(name, deadline)
        fds = dict(stage.trunk_ends)
        stage.start_trunk(deadline)
        trunk = stage.processes["trunk"]
        channel = wire.Channel(trunk.proc.stdin.fileno(), trunk.proc.stdout.fileno(), deadline)
        channel.send(trunk_request(job, trunk, corpus, fds) | dict(cut_rounds=rounds))
        try:
            report = _serve_trunk(stage, channel, watch, deadline)
        except wire.WorkerGone:
            return result(False, exit_reason("trunk", trunk, "judging"), retry_later=True)
        metrics.update({k: v for k, v in (report.get("metrics") or {}).items() if isinstance(v, (int, float))})
        if report.get("ok") is True:
            return result(True)
        if report.get("deadline"):
            raise wire.Deadline("the trunk's own bound on a wait ran out")
        gone = report.get("gone")
        if gone in BLOCKS_PROCESSES and gone in stage.all():
            process = stage.all()[gone]
            reason = exit_reason(gone, process, one_line(report.get("doing", "running"), 80))
            return result(False, child_lines(job.code, reason))
        return result(
            False, child_lines(job.code, one_line(report.get("error") or "the trunk failed without saying why"))
        )
    except Overrun as e:
        return result(False, str(e), retry_later=True)
    except wire.Deadline:
        return result(False, watch.past_deadline(), retry_later=True)
    except (CorpusError, SandboxUnavailable) as e:
        return StageResult.infrastructure_failure(f"{type(e).__name__}: {e}")
    except wire.ProtocolError as e:
        return result(False, f"the judge's trunk process broke the protocol: {e}", retry_later=True)
    except Exception as e:
        return result(False, f"the judge failed: {first_line(e)}", retry_later=True)
    finally:
        if stage:
            stage.close()


# ---------------------------------------------------------------------------------------------
# The `local` runner: the judge here, its workers sandboxed on this machine. A Ray node runs the
# same (evaluation.ray_runner); evaluation.stage.RUNNERS picks one by name.


def local_corpus(name: str, fingerprint: str):
    """This machine's cache of the corpus, verified against the run's fingerprint; built here
    first if missing (a fresh cluster node builds its own)."""
    try:
        return load_corpus(corpora.corpus_dir(name), fingerprint)
    except CorpusError:
        corpus = corpora.prepare_corpus(name, log=lambda *_: None)
        if corpus.fingerprint != fingerprint:
            raise CorpusError(
                f"the token cache here has fingerprint {corpus.fingerprint[:12]}, the run "
                f"{fingerprint[:12]}: same corpus, different tokens (tokenizer or source version)"
            )
        return corpus


def run_local(job: Job, on_line=None) -> StageResult:
    """Judge one stage of one program on this machine."""
    try:
        corpus = local_corpus(job.corpus, job.fingerprint)
    except (CorpusError, ValueError) as e:
        return StageResult.infrastructure_failure(f"corpus: {e}")
    return run_stage(job, corpus, on_line)
