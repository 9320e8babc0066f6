"""The `ray` runner: each stage is a Ray task that runs the same sandboxed subprocess on a node.

    PLASA_RUNNER=ray RAY_ADDRESS=<head>:6379 python evaluator.py PROGRAM ...

The Job (plasa_lab.evaluation.jobs: the program's code, the corpus name and fingerprint, the settings)
travels through Ray as JSON, the StageResult comes back the same way;
the node builds or loads its own token cache and checks the fingerprint (judge.local_corpus).
A stage asks for GPU_SHARE of a GPU where the cluster has GPUs (so several stages share one), and
for its threads in CPUs. A worker lost mid-evaluation is retried once by Ray; a second loss, or no
answer within the stage's limit, gives a one-line failure that is not recorded in the ledger
(the machine's fault, not the program's). Ray never hangs the caller.

Why a driver subprocess: OpenEvolve forks its worker processes, and a process that has joined a
Ray cluster does not survive a fork. So each call starts `python -m plasa_lab.evaluation.ray_runner` (a
short-lived Ray driver) and reads its answer from a file; what that costs is measured in the
README (a few seconds per stage).
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ..contract import HARNESS_VERSION
from ..util import atomic_write, first_line
from .jobs import Job, StageResult

CONNECT_TIMEOUT = 5.0
GPU_SHARE = 0.25  # of a GPU per stage: this 1.5M-parameter model leaves a GPU mostly idle (docs/settings.md)
DRIVER_MARGIN = 120.0  # seconds beyond the stage's own limit for connecting, scheduling, a retry's start


def run_ray(job: Job, on_line=None) -> StageResult:
    """The runner interface (see evaluation.stage.RUNNERS): run one stage on the Ray cluster."""
    with tempfile.TemporaryDirectory(prefix="plasa-ray-") as workdir:
        Path(workdir, "job.json").write_text(job.to_json())
        proc = subprocess.Popen(
            [sys.executable, "-m", "plasa_lab.evaluation.ray_runner", "job.json", "result.json"],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            log, _ = proc.communicate(timeout=2 * job.time_limit + DRIVER_MARGIN)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        try:
            return StageResult.from_json(Path(workdir, "result.json").read_text())
        except (OSError, ValueError, TypeError):
            tail = [line for line in (log or "").splitlines() if line.strip()][-1:] or ["no output"]
            return _infrastructure_failure(
                f"the Ray driver ended without an answer (exit {proc.returncode}): {tail[0][:200]}"
            )


def _infrastructure_failure(message: str) -> StageResult:
    return StageResult.infrastructure_failure(f"ray: {message}")


def connect():
    """Join the cluster at $RAY_ADDRESS (default: the one started on this machine). A host:port that
    does not answer fails in seconds: ray.init itself would keep retrying for minutes."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or "auto"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
        except OSError as e:
            raise ConnectionError(f"nothing answers at {host}:{port} ({e.strerror or e})") from None
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")


def cluster_resources() -> dict:
    import ray

    connect()
    try:
        return dict(ray.cluster_resources())
    finally:
        ray.shutdown()


def _remote_stage(job_json: str, driver_version: str) -> str:
    """Runs on a node: the same local runner, after checking this node runs our code."""
    from .judge import run_local  # here, not above: the driver needs no corpus code (numpy, data)

    if driver_version != HARNESS_VERSION:
        return _infrastructure_failure(
            f"this node runs harness version {HARNESS_VERSION}, the driver "
            f"{driver_version}: install the same commit on every node"
        ).to_json()
    return run_local(Job.from_json(job_json)).to_json()


def drive(job: Job) -> StageResult:
    """In the driver subprocess: submit the stage, wait for it, turn Ray's errors into one line."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError, RayTaskError

    connect()
    resources = ray.cluster_resources()
    wants_gpu = job.device in ("auto", "cuda") and resources.get("GPU", 0) > 0
    if job.device == "cuda" and not wants_gpu:
        return _infrastructure_failure("--device cuda but the cluster has no GPU")
    job = dataclasses.replace(job, device="cuda" if wants_gpu else ("cpu" if job.device == "auto" else job.device))
    # Several stages share a GPU (each takes a fraction), stage 1 and 2 of different children alike.
    task = ray.remote(_remote_stage).options(
        num_cpus=job.threads, num_gpus=GPU_SHARE if wants_gpu else 0, max_retries=1, retry_exceptions=False
    )
    ref = task.remote(job.to_json(), HARNESS_VERSION)
    wait = 2 * job.time_limit + DRIVER_MARGIN / 2  # room for one retry
    try:
        return StageResult.from_json(ray.get(ref, timeout=wait))
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        return _infrastructure_failure(f"no answer within {wait:.0f} s; task cancelled")
    except RayTaskError as e:  # our code raised on the node: a bug or a broken node set-up
        return _infrastructure_failure(f"the node raised {first_line(e.cause if e.cause else e)}")
    except RayError as e:  # worker or node died, object lost ...
        return _infrastructure_failure(f"the worker was lost twice ({first_line(e)})")
    finally:
        ray.shutdown()


def parallel_evaluations(threads: int) -> int:
    """How many evaluations the cluster runs at once: 1/GPU_SHARE per GPU (as far as the CPUs allow),
    else one per `threads` CPUs.
    Asked in a subprocess, so that the caller (which OpenEvolve forks later) never joins Ray."""
    run = subprocess.run(
        [sys.executable, "-m", "plasa_lab.evaluation.ray_runner", "--capacity"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        resources = json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConnectionError(f"cannot use the Ray cluster at {os.environ.get('RAY_ADDRESS') or 'auto'}: {tail}")
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    by_cpu = cpus // max(1, threads)
    return max(1, min(int(gpus / GPU_SHARE), by_cpu) if gpus else by_cpu)


def main(argv=None):
    argv = argv or sys.argv[1:]
    if argv == ["--capacity"]:
        print(json.dumps(cluster_resources()))
        return
    job_path, result_path = argv[:2]
    try:
        result = drive(Job.from_json(Path(job_path).read_text()))
    except Exception as e:  # cannot connect, bad address ...
        result = _infrastructure_failure(
            f"cannot use the cluster at {os.environ.get('RAY_ADDRESS') or 'auto'}: {first_line(e)}"
        )
    atomic_write(Path(result_path), result.to_json())


if __name__ == "__main__":
    main()
