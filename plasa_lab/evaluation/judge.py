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
                    indexer weights and answer the selections of validation (two of them, with
                    different histories, for the cut checks: sandboxed.validation).

The blocks processes talk only to the trunk, over pipes the judge sets up and hands over; they
cannot create processes. The judge talks only to the trunk, holds the deadline, and turns the
trunk's report into a StageResult: a blocks process that died is named with how it died (killed by
a signal, out of memory, an exception's last line). `run_local` is the `local` runner: the judge
here, with this machine's token cache.
"""

import sys
import time

from .. import INITIAL_PROGRAM
from ..contract import STAGE1_TRAINING_STEPS, coverage_rounds, get_profile, windows_to_run
from ..data import corpora
from ..data.tokens import CorpusError, load_corpus
from ..util import first_line
from .jobs import Job, StageResult
from .sandbox import Limits, SandboxedProcess, SandboxUnavailable, gpu_device_nodes
from .sandboxed import wire

STAGE1_WINDOWS = 8  # stage 1 scores 4 batches (and runs more windows for the cut checks)
TRAIN_FILE_INSIDE, VAL_FILE_INSIDE = "/data/train.bin", "/data/val.bin"
BLOCKS_PROCESSES = ("training", "validation A", "validation B")
REPORT_LIMIT = 1 << 20


def one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _process(job: Job, deadline: float, module: str, threads: int, **options) -> SandboxedProcess:
    gpu = job.device != "cpu" and bool(gpu_device_nodes())
    limits = Limits(
        wall_seconds=max(1.0, deadline - time.monotonic()),
        memory_bytes=None if gpu else int(job.memory_gb * (1 << 30)),
    )
    hide_gpus = {"CUDA_VISIBLE_DEVICES": ""} if job.device == "cpu" else None  # nothing probes a GPU it may not use
    return SandboxedProcess(
        [sys.executable, "-I", "-m", module],
        limits,
        threads,
        isolation=job.sandbox,
        gpu=gpu,
        env_extra=hide_gpus,
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
        return f"ran out of memory{f' (limit {limit >> 30} GiB)' if limit else ''}: use less memory"
    how = f"killed by {process.signal_name}" if process.signal_name else f"exited with code {process.proc.returncode}"
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [""]
    return f"{doing}: the {name} process {how} before answering: {tail[0][:200]}".rstrip(": ")


def start_processes(job: Job, corpus, deadline: float, on_line) -> tuple[SandboxedProcess, dict]:
    """The three blocks processes, then the trunk holding their pipes (the judge keeps none)."""
    blocks = {
        name: _process(job, deadline, "plasa_lab.evaluation.sandboxed.worker", 1, no_new_processes=True)
        for name in BLOCKS_PROCESSES
    }
    fds = {name: [p.proc.stdin.fileno(), p.proc.stdout.fileno()] for name, p in blocks.items()}
    binds = {str(corpus.dir / "train.bin"): TRAIN_FILE_INSIDE, str(corpus.dir / "val.bin"): VAL_FILE_INSIDE}
    try:
        trunk = _process(
            job,
            deadline,
            "plasa_lab.evaluation.sandboxed.trunk",
            job.threads,
            binds=binds,
            on_stderr_line=on_line,
            pass_fds=tuple(fd for pair in fds.values() for fd in pair),
        )
    except BaseException:
        for process in blocks.values():
            process.close()
        raise
    for process in blocks.values():  # the trunk's now: a blocks process that dies closes its pipes for good
        process.proc.stdin.close()
        process.proc.stdout.close()
    return trunk, dict(blocks, fds=fds)


def trunk_request(job: Job, trunk: SandboxedProcess, corpus, fds: dict, deadline: float) -> dict:
    profile = get_profile(job.profile)
    return dict(
        reference=INITIAL_PROGRAM.read_text(),
        code=job.code,
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
        seconds=max(1.0, deadline - time.monotonic()),
        links=fds,
    )


def run_stage(job: Job, corpus, on_line=None) -> StageResult:
    """Run one stage under the job's time limit; always returns, never leaves a process behind."""
    start = time.monotonic()
    deadline = start + job.time_limit
    processes, metrics = {}, {}

    def result(ok, failure=None, retry_later=False):
        stderr = "\n".join(f"[{name}]\n{p.stderr_text()}" for name, p in processes.items() if p.stderr_text().strip())
        return StageResult(ok, failure, metrics, stderr, time.monotonic() - start, retry_later)

    try:
        profile = get_profile(job.profile)
        n_scored = STAGE1_WINDOWS if job.stage == 1 else job.val_windows
        available = len(corpus.val) // (profile.seq_len + 1)
        rounds = coverage_rounds(profile.cuts_per_position if job.stage == 2 else 0, available, profile.seq_len)
        if available < windows_to_run(n_scored, profile.seq_len, rounds):
            raise CorpusError(
                f"validation split has {available} windows; stage {job.stage} needs "
                f"{windows_to_run(n_scored, profile.seq_len, rounds)}"
            )
        trunk, blocks = start_processes(job, corpus, deadline, on_line)
        fds = blocks.pop("fds")
        processes.update(blocks, trunk=trunk)
        channel = wire.Channel(trunk.proc.stdin.fileno(), trunk.proc.stdout.fileno(), deadline)
        channel.send(trunk_request(job, trunk, corpus, fds, deadline) | dict(cut_rounds=rounds))
        try:
            report = channel.receive(REPORT_LIMIT)
        except wire.WorkerGone:
            if time.monotonic() >= deadline:
                raise wire.Deadline("the stage's time limit ran out") from None
            return result(False, exit_reason("trunk", trunk, "judging"), retry_later=True)
        metrics.update({k: v for k, v in (report.get("metrics") or {}).items() if isinstance(v, (int, float))})
        if report.get("ok") is True:
            return result(True)
        if report.get("deadline"):
            raise wire.Deadline("the stage's time limit ran out")
        gone = report.get("gone")
        if gone in blocks:
            return result(False, exit_reason(gone, blocks[gone], str(report.get("doing", "running"))))
        return result(False, one_line(report.get("error") or "the trunk failed without saying why"))
    except wire.Deadline:
        return result(
            False,
            f"took more than {job.time_limit_reason}; the whole sandbox was killed: make it faster or stop looping",
            retry_later=True,
        )
    except (CorpusError, SandboxUnavailable) as e:
        return StageResult.infrastructure_failure(f"{type(e).__name__}: {e}")
    except wire.ProtocolError as e:
        return result(False, f"the judge's trunk process broke the protocol: {e}", retry_later=True)
    except Exception as e:
        return result(False, f"the judge failed: {first_line(e)}", retry_later=True)
    finally:
        for process in processes.values():
            process.close()


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
