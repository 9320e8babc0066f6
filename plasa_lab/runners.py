"""Where a stage runs: `local` (a sandboxed subprocess here) or `ray` (the same, on a cluster node).

A job is plain JSON-able data (the program's code, not its path), so it travels to a Ray
worker as it is; each runner turns it into the harness's result dict:
{ok, failure, metrics, stderr, stdout, seconds, retry_later}, where retry_later marks a
failure that may be the machine's, not the program's (timeout, lost worker): the ledger
does not keep it.
"""

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import data
from .sandbox import Limits, run_sandboxed

STAGE1_TIMEOUT = 180.0
STAGE2_SECONDS_PER_STEP = 1.5  # generous: ~0.3 s/step with 2 CPU threads here, far less on a GPU
SECONDS_PER_VAL_BATCH = 0.5  # generous too: ~0.16 s per batch here (smoke, whole split: 427 batches in ~70 s)


def stage_timeout(stage: int, steps: int, val_batches: int = 0) -> float:
    scale = float(os.environ.get("PLASA_TIMEOUT_SCALE", "1"))
    base = STAGE1_TIMEOUT if stage == 1 else 120.0 + steps * STAGE2_SECONDS_PER_STEP + val_batches * SECONDS_PER_VAL_BATCH
    return base * scale


def may_use_gpu(device: str) -> bool:
    """Whether the child may open a GPU (then no address-space limit: CUDA maps huge ranges).
    Decided without initialising CUDA here: OpenEvolve forks its workers after this process."""
    return device == "cuda" or (device == "auto" and any(Path("/dev").glob("nvidia[0-9]*")))


def local_corpus(name: str, fingerprint: str):
    """This machine's cache of the corpus, verified against the run's fingerprint; built here
    first if missing (a fresh cluster node builds its own)."""
    try:
        return data.load_corpus(data.corpus_dir(name), fingerprint)
    except data.CorpusError:
        corpus = data.prepare_corpus(name, log=lambda *_: None)
        if corpus.fingerprint != fingerprint:
            raise data.CorpusError(f"the token cache here has fingerprint {corpus.fingerprint[:12]}, the run "
                                   f"{fingerprint[:12]}: same corpus, different tokens (tokenizer or source version)")
        return corpus


def run_local(job: dict, on_line=None) -> dict:
    """Run one stage of one program in a fresh sandbox on this machine."""
    try:
        corpus = local_corpus(job["corpus"], job["fingerprint"])
    except data.CorpusError as e:
        return dict(ok=False, failure=f"corpus: {e}", metrics={}, stderr="", stdout="", seconds=0.0)
    workdir = tempfile.mkdtemp(prefix="plasa-eval-")
    try:
        program = Path(workdir, "program.py")
        program.write_text(job["code"])
        harness_job = dict(program=str(program), stage=job["stage"], profile=job["profile"], seed=job["seed"],
                           corpus_dir=str(corpus.dir), fingerprint=corpus.fingerprint, device=job["device"],
                           threads=job["threads"], allow_uniform_schedule=job.get("allow_uniform_schedule", False),
                           val_windows=job.get("val_windows"))
        Path(workdir, "job.json").write_text(json.dumps(harness_job))
        limits = Limits(wall_seconds=job["timeout"],
                        memory_bytes=None if may_use_gpu(job["device"]) else int(job["memory_gb"] * (1 << 30)))
        result_path = Path(workdir, "result.json")
        hide_gpus = {"CUDA_VISIBLE_DEVICES": ""} if job["device"] == "cpu" else None  # nothing probes a GPU it may not use
        run = run_sandboxed([sys.executable, "-I", "-m", "plasa_lab.harness", "job.json", "result.json"],
                            workdir, limits, threads=job["threads"], env_extra=hide_gpus, on_stderr_line=on_line)
        result = _read_result(result_path)
        failure = _sandbox_failure(run, limits) if result is None or run.output_exceeded or run.timed_out else None
        if failure:
            result = dict(ok=False, failure=failure, metrics=(result or {}).get("metrics", {}))
        result.update(stderr=run.stderr, stdout=run.stdout, seconds=run.seconds,
                      retry_later=run.timed_out)  # a timeout may be the machine's fault (load)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _read_result(path: Path):
    """The harness's result, or None when it wrote none (or a damaged one)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("ok"), bool) or not isinstance(result.get("metrics"), dict):
        return None
    result["metrics"] = {k: float(v) for k, v in result["metrics"].items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return result


def _sandbox_failure(run, limits: Limits) -> str:
    if run.timed_out:
        return f"timed out after {limits.wall_seconds:.0f} s (the whole process group was killed): make it faster or stop looping"
    if run.output_exceeded:
        return f"wrote over {run.output_bytes >> 10} KiB to stdout/stderr (limit 1 MiB), stopped: remove the prints"
    tail = [line for line in run.stderr.strip().splitlines() if line.strip()][-1:] or [""]
    if "MemoryError" in run.stderr or "Cannot allocate memory" in run.stderr:
        return f"ran out of memory (limit {limits.memory_bytes >> 30} GiB): use less memory"
    how = f"killed by {run.signal_name}" if run.signal_name else f"exited with code {run.returncode}"
    return f"the evaluation process {how} before writing a result: {tail[0][:200]}".rstrip(": ")


def get_runner(name: str):
    """The runner function for a name: `local` or `ray`."""
    if name == "local":
        return run_local
    if name == "ray":
        from .ray_runner import run_ray
        return run_ray
    raise ValueError(f"unknown runner {name!r}: choose local or ray")
