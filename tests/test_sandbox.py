"""The sandbox: a child process that cannot outlive, outgrow or overhear its parent."""

import os
import sys
import time

from plasa_lab.sandbox import Limits, run_sandboxed


def processes_with(marker):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_environment_is_scrubbed_of_keys_and_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    monkeypatch.setenv("SOME_PASSWORD", "hunter2")
    run = run_sandboxed([sys.executable, "-c", "import os; print(sorted(os.environ.items()))"], str(tmp_path), Limits(30))
    assert run.returncode == 0
    assert "secret" not in run.stdout and "hunter2" not in run.stdout
    assert f"'HOME', '{tmp_path}'" in run.stdout


def test_timeout_kills_the_whole_process_group(tmp_path):
    marker = f"sleep-marker-{os.getpid()}"
    code = (f"import subprocess, time; subprocess.Popen(['sh', '-c', 'sleep 300 # {marker}']); "
            f"time.sleep(300)")
    start = time.monotonic()
    run = run_sandboxed([sys.executable, "-c", code], str(tmp_path), Limits(wall_seconds=2))
    assert run.timed_out and run.signal_name == "SIGKILL"
    assert time.monotonic() - start < 10
    time.sleep(0.2)
    assert processes_with(marker) == []


def test_grandchildren_are_killed_when_the_child_exits_normally(tmp_path):
    marker = f"orphan-marker-{os.getpid()}"
    code = f"import subprocess; subprocess.Popen(['sh', '-c', 'sleep 300 # {marker}'])"
    run = run_sandboxed([sys.executable, "-c", code], str(tmp_path), Limits(wall_seconds=30))
    assert run.returncode == 0 and not run.timed_out
    time.sleep(0.2)
    assert processes_with(marker) == []


def test_memory_bomb_hits_the_address_space_limit_quickly(tmp_path):
    code = "x = []\nwhile True: x.append(bytearray(50 << 20))"
    run = run_sandboxed([sys.executable, "-c", code], str(tmp_path), Limits(wall_seconds=60, memory_bytes=1 << 30))
    assert run.returncode != 0 and "MemoryError" in run.stderr
    assert run.seconds < 20


def test_output_flood_is_stopped_and_truncated_without_hanging(tmp_path):
    code = "import sys\nwhile True: sys.stdout.write('y' * 65536)"
    run = run_sandboxed([sys.executable, "-c", code], str(tmp_path), Limits(wall_seconds=60))
    assert run.output_exceeded and run.seconds < 10
    assert len(run.stdout) < 10_000 and "bytes cut" in run.stdout


def test_small_output_comes_back_whole(tmp_path):
    run = run_sandboxed([sys.executable, "-c", "print('a' * 5000); print('end')"], str(tmp_path), Limits(30))
    assert run.stdout == "a" * 5000 + "\nend\n"


def test_file_size_limit_stops_a_disk_filler(tmp_path):
    code = "f = open('big', 'wb')\nwhile True: f.write(b'x' * (1 << 20))"
    run = run_sandboxed([sys.executable, "-c", code], str(tmp_path), Limits(wall_seconds=30, file_bytes=8 << 20))
    assert run.returncode != 0 and (tmp_path / "big").stat().st_size <= 8 << 20


def test_stderr_lines_are_streamed_as_they_come(tmp_path):
    lines = []
    code = "import sys\nfor i in range(3): print(f'step {i}', file=sys.stderr)"
    run_sandboxed([sys.executable, "-c", code], str(tmp_path), Limits(30), on_stderr_line=lines.append)
    assert lines == ["step 0", "step 1", "step 2"]
