"""The `ray` runner on a real local Ray cluster (127.0.0.1), started and stopped by these tests."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT
from plasa_lab.evaluation.fitness import evaluate_code
from plasa_lab.evaluation.ledger import Ledger
from plasa_lab.settings import Settings

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
SOURCE = INITIAL_PROGRAM.read_text()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node cluster on 127.0.0.1 with 2 CPUs; RAY_ADDRESS points at it for the module."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are long
    start = subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--object-store-memory=200000000",
            f"--temp-dir={temp}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    yield os.environ["RAY_ADDRESS"]
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    os.environ.pop("RAY_ADDRESS") if old is None else os.environ.update(RAY_ADDRESS=old)
    shutil.rmtree(temp, ignore_errors=True)


def evaluator_cli(runner):
    env = dict(os.environ, PLASA_RUNNER=runner, PLASA_THREADS="2")
    run = subprocess.run(
        [sys.executable, "evaluator.py", str(INITIAL_PROGRAM), "--stage", "1", "--profile", "smoke", "--quiet"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_ray_runner_gives_the_same_metrics_as_the_local_runner(ray_cluster):
    on_ray, local = evaluator_cli("ray"), evaluator_cli("local")
    assert on_ray["stage1_passed"] == 1.0
    assert {k: v for k, v in on_ray.items() if k != "train_seconds"} == {
        k: v for k, v in local.items() if k != "train_seconds"
    }


def test_failing_child_is_rejected_through_ray_with_the_same_failure_line(ray_cluster):
    leaky = SOURCE.replace("    return selected & causal\n", "    return selected\n")
    on_ray = evaluate_code(leaky, 1, Settings(profile="smoke", runner="ray", ledger=""))
    assert on_ray.metrics["combined_score"] == 0.0
    assert on_ray.artifacts["failure"].startswith("stage 1: during training: layer 1 selects key")


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def parent_of(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("PPid:")))


def judge_process():
    """The process that runs the judge of a stage: the parent of the outermost sandbox (bwrap) of a
    plasa_lab.evaluation.sandboxed.worker; on the Ray runner, a Ray worker."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = cmdline(pid)
            ours = sys.executable.encode() in command  # not a worker of another checkout's run on the machine
            if (
                ours
                and b"plasa_lab.evaluation.sandboxed.worker" in command
                and b"plasa_lab.evaluation.sandboxed.worker" not in cmdline(parent_of(pid))
            ):
                return parent_of(pid)
        except (OSError, StopIteration):
            pass
    return None


def test_a_killed_ray_worker_is_retried_and_the_ledger_keeps_one_row(ray_cluster, tmp_path):
    settings = Settings(profile="smoke", runner="ray", ledger=str(tmp_path / "ledger.sqlite"))
    result = {}
    worker = threading.Thread(target=lambda: result.update(evaluation=evaluate_code(SOURCE, 1, settings)))
    worker.start()
    deadline = time.monotonic() + 120
    while (ray_worker := judge_process()) is None:
        assert time.monotonic() < deadline, "no evaluation started on the cluster"
        time.sleep(0.2)
    assert b"ray" in cmdline(ray_worker).lower()
    os.kill(ray_worker, signal.SIGKILL)
    worker.join(timeout=400)
    assert not worker.is_alive(), "the evaluation hung after its worker was killed"
    evaluation = result["evaluation"]
    assert evaluation.metrics["stage1_passed"] == 1.0, evaluation.artifacts.get("failure")
    rows = Ledger(tmp_path / "ledger.sqlite").rows()
    assert len(rows) == 1 and rows[0]["runs"] == 1


def test_unreachable_cluster_is_a_clear_failure_not_a_hang(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    start = time.monotonic()
    evaluation = evaluate_code(SOURCE, 1, Settings(profile="smoke", runner="ray", ledger=""))
    assert evaluation.metrics["combined_score"] == 0.0
    assert "cannot use the cluster at 127.0.0.1" in evaluation.artifacts["failure"]
    assert time.monotonic() - start < 120


def test_parallel_evaluations_follow_the_cluster_capacity(ray_cluster):
    from plasa_lab.evaluation.ray_runner import parallel_evaluations

    assert parallel_evaluations(threads=2) == 1 and parallel_evaluations(threads=1) == 2  # 2 CPUs, no GPU
