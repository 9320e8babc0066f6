"""The `ray` runner: each stage is a Ray task that runs the same sandboxed subprocess on a node.

    PLASA_RUNNER=ray RAY_ADDRESS=<head>:6379 python evaluator.py PROGRAM ...

The job (the program's code, the corpus name and fingerprint, the settings) travels through Ray;
the node builds or loads its own token cache and checks the fingerprint (runners.local_corpus).
A stage asks for one GPU where the cluster has GPUs and the stage trains (stage 2), else for
its threads in CPUs. A worker lost mid-evaluation is retried once by Ray; a second loss, or no
answer within the stage's limit, gives a one-line failure that is not recorded in the ledger
(the machine's fault, not the program's). Ray never hangs the caller.

Why a driver subprocess: OpenEvolve forks its worker processes, and a process that has joined a
Ray cluster does not survive a fork. So each call starts `python -m plasa_lab.ray_runner` (a
short-lived Ray driver) and reads its answer from a file; what that costs is measured in the
README (a few seconds per stage).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

CONNECT_TIMEOUT = 5.0
DRIVER_MARGIN = 120.0  # seconds beyond the stage's own limit for connecting, scheduling, a retry's start


def run_ray(job: dict, on_line=None) -> dict:
    """The runner interface (see runners.py): run one stage on the Ray cluster."""
    with tempfile.TemporaryDirectory(prefix="plasa-ray-") as workdir:
        Path(workdir, "job.json").write_text(json.dumps(job))
        proc = subprocess.Popen([sys.executable, "-m", "plasa_lab.ray_runner", "job.json", "result.json"], cwd=workdir,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=2 * job["timeout"] + DRIVER_MARGIN)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        try:
            return json.loads(Path(workdir, "result.json").read_text())
        except (OSError, ValueError):
            tail = [line for line in (log or "").splitlines() if line.strip()][-1:] or ["no output"]
            return _infrastructure_failure(f"the Ray driver ended without an answer (exit {proc.returncode}): {tail[0][:200]}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _infrastructure_failure(message: str) -> dict:
    return dict(ok=False, failure=f"ray: {message}", metrics={}, stderr="", stdout="", seconds=0.0, retry_later=True)


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


def _remote_stage(job: dict) -> dict:
    """Runs on a node: the same sandboxed local runner, after checking this node runs our code."""
    from .evaluation import HARNESS_VERSION
    from .runners import run_local
    if job["harness_version"] != HARNESS_VERSION:
        return dict(ok=False, failure=f"this node runs harness version {HARNESS_VERSION}, the driver "
                    f"{job['harness_version']}: install the same commit on every node", metrics={}, stderr="",
                    stdout="", seconds=0.0, retry_later=True)
    return run_local(job)


def drive(job: dict) -> dict:
    """In the driver subprocess: submit the stage, wait for it, turn Ray's errors into one line."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError, RayTaskError
    from .evaluation import HARNESS_VERSION
    connect()
    resources = ray.cluster_resources()
    wants_gpu = job["stage"] == 2 and job["device"] in ("auto", "cuda") and resources.get("GPU", 0) >= 1
    if job["device"] == "cuda" and not wants_gpu and job["stage"] == 2:
        return _infrastructure_failure("--device cuda but the cluster has no GPU")
    job = dict(job, harness_version=HARNESS_VERSION, device="cuda" if wants_gpu else ("cpu" if job["device"] == "auto"
                                                                                        else job["device"]))
    task = ray.remote(_remote_stage).options(num_cpus=job["threads"], num_gpus=1 if wants_gpu else 0,
                                             max_retries=1, retry_exceptions=False)
    ref = task.remote(job)
    try:
        return ray.get(ref, timeout=2 * job["timeout"] + DRIVER_MARGIN / 2)  # room for one retry
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        return _infrastructure_failure(f"no answer within {2 * job['timeout'] + DRIVER_MARGIN / 2:.0f} s; task cancelled")
    except RayTaskError as e:  # our code raised on the node: a bug or a broken node set-up
        return _infrastructure_failure(f"the node raised {_first_line(e.cause if e.cause else e)}")
    except RayError as e:  # worker or node died, object lost ...
        return _infrastructure_failure(f"the worker was lost twice ({type(e).__name__}: {_first_line(e)})")
    finally:
        ray.shutdown()


def parallel_evaluations(threads: int) -> int:
    """How many evaluations the cluster runs at once: one per GPU, else one per `threads` CPUs.
    Asked in a subprocess, so that the caller (which OpenEvolve forks later) never joins Ray."""
    run = subprocess.run([sys.executable, "-m", "plasa_lab.ray_runner", "--capacity"], capture_output=True,
                         text=True, timeout=120)
    try:
        resources = json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConnectionError(f"cannot use the Ray cluster at {os.environ.get('RAY_ADDRESS') or 'auto'}: {tail}")
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    return max(1, gpus if gpus else cpus // max(1, threads))


def main(argv=None):
    argv = argv or sys.argv[1:]
    if argv == ["--capacity"]:
        print(json.dumps(cluster_resources()))
        return
    job_path, result_path = argv[:2]
    try:
        result = drive(json.loads(Path(job_path).read_text()))
    except Exception as e:  # cannot connect, bad address ...
        result = _infrastructure_failure(f"cannot use the cluster at {os.environ.get('RAY_ADDRESS') or 'auto'}: {_first_line(e)}")
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)


if __name__ == "__main__":
    main()
