"""rundir: the run folder's layout and the rules for reading it back, on real folders (copies of
tests/fixtures/smoke_run and small ones made here)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plasa_lab import PROJECT_ROOT, rundir
from plasa_lab.rundir import RunDirError, latest_checkpoint, newest_run, read_jsonl, read_run_record, read_trace

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_run"


@pytest.fixture
def run_copy(tmp_path):
    return Path(shutil.copytree(FIXTURE, tmp_path / "run"))


def add_checkpoint(run_dir, n, metadata: str | None):
    """checkpoint_n as a copy of checkpoint_4, with metadata.json holding `metadata` (None: no file)."""
    path = Path(shutil.copytree(run_dir / "checkpoints" / "checkpoint_4", run_dir / "checkpoints" / f"checkpoint_{n}"))
    (path / "metadata.json").unlink()
    if metadata is not None:
        (path / "metadata.json").write_text(metadata)
    return path


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_latest_checkpoint_is_the_newest_whose_metadata_is_complete(run_copy):
    assert latest_checkpoint(run_copy) == (run_copy / "checkpoints" / "checkpoint_4", 4)
    add_checkpoint(run_copy, 6, json.dumps(dict(last_iteration=6)))
    assert latest_checkpoint(run_copy) == (run_copy / "checkpoints" / "checkpoint_6", 6)


def test_partly_written_checkpoints_are_passed_over_and_named(run_copy):
    add_checkpoint(run_copy, 5, None)  # killed before metadata.json: OpenEvolve writes it after every program
    add_checkpoint(run_copy, 6, '{"last_iteration": 6, "isla')  # killed while writing it
    add_checkpoint(run_copy, 7, json.dumps(dict(islands=[])))  # no last_iteration
    skipped = []
    assert latest_checkpoint(run_copy, skipped) == (run_copy / "checkpoints" / "checkpoint_4", 4)
    assert skipped[0] == "checkpoint_7: metadata.json unreadable (KeyError: 'last_iteration')"
    assert skipped[1].startswith("checkpoint_6: metadata.json unreadable (JSONDecodeError: ")
    assert skipped[2] == "checkpoint_5: metadata.json missing (partly written?)"
    assert len(skipped) == 3


def test_no_complete_checkpoint_gives_none(tmp_path, run_copy):
    assert latest_checkpoint(tmp_path) is None
    (run_copy / "checkpoints" / "checkpoint_4" / "metadata.json").unlink()
    skipped = []
    assert latest_checkpoint(run_copy, skipped) is None
    assert skipped == ["checkpoint_4: metadata.json missing (partly written?)"]


# ---------------------------------------------------------------------------------------------
# records


def test_read_jsonl_skips_a_torn_last_line_and_a_missing_file_is_empty(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"iteration": 1}\n{"iteration": 2}\n{"iteration": 3, "child_co')
    assert read_jsonl(path) == [{"iteration": 1}, {"iteration": 2}]
    assert read_jsonl(tmp_path / "none.jsonl") == []


def test_read_trace_keeps_what_a_checkpoint_can_hold_and_counts_the_rest(run_copy):
    (run_copy / rundir.TRACE_FAILURES).write_text(
        '{"iteration": 2, "error": "no diff"}\n{"iteration": 5, "error": "llm error"}\n'
    )
    whole = read_trace(run_copy)
    assert sorted(r["iteration"] for r in whole.children) == [1, 2, 3, 4] and len(whole.failures) == 2
    assert whole.left_out == 0
    upto = read_trace(run_copy, up_to_iteration=3)
    assert sorted(r["iteration"] for r in upto.children) == [1, 2, 3]
    assert [r["iteration"] for r in upto.failures] == [2]
    assert upto.left_out == 2  # the child of iteration 4 and the failure of iteration 5


def test_llm_responses_are_read_up_to_an_iteration(tmp_path):
    (tmp_path / rundir.LLM_RESPONSES).write_text(
        "".join(json.dumps(dict(iteration=i, model="m", outcome="passed", seconds=1.0)) + "\n" for i in (1, 2, 3))
    )
    assert [r["iteration"] for r in rundir.read_llm_responses(tmp_path, up_to_iteration=2)] == [1, 2]
    assert rundir.read_llm_responses(tmp_path / "elsewhere") == []


def test_run_record_missing_is_none_and_unreadable_is_a_one_line_error(run_copy, tmp_path):
    assert read_run_record(run_copy)["profile"]["name"] == "smoke"
    assert read_run_record(tmp_path) is None
    (tmp_path / "run.json").write_text('{"config": ')
    with pytest.raises(RunDirError, match=r"run.json is unreadable: JSONDecodeError: ") as e:
        read_run_record(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="is not a JSON object"):
        read_run_record(tmp_path)


def make_runs(root: Path) -> dict[str, Path]:
    """Three real run folders, their run.json written in this order: a finished run, a run stopped while
    its initial program was evaluated (run.json and a ledger, no checkpoint), and a finished run again.
    Then a report is written into the first, as inspect_run.py --html would: its folder is now the most
    recently modified, but no run.json changed."""
    runs = dict(
        finished=Path(shutil.copytree(FIXTURE, root / "run-a")),
        aborted=root / "run-b",
        newest=Path(shutil.copytree(FIXTURE, root / "run-c")),
    )
    runs["aborted"].mkdir()
    (runs["aborted"] / "run.json").write_text((FIXTURE / "run.json").read_text())
    (runs["aborted"] / "ledger.sqlite").write_bytes(b"")
    for n, run in enumerate(runs.values()):  # run.json written a minute apart, in order
        os.utime(run / "run.json", ns=(1_000_000_000_000_000_000 + n * 60_000_000_000,) * 2)
    (root / "notes").mkdir()  # a folder without run.json is no run, however new
    (runs["finished"] / "report").mkdir()
    (runs["finished"] / "report" / "report.html").write_text("<html></html>")
    return runs


def test_the_newest_run_is_the_one_whose_run_json_was_written_last(tmp_path, monkeypatch):
    runs = make_runs(tmp_path)
    assert newest_run(tmp_path) == runs["newest"]
    os.utime(runs["aborted"] / "run.json")  # the stopped run resumed: now it is the newest
    assert newest_run(tmp_path) == runs["aborted"]
    monkeypatch.setattr(rundir, "OUTPUT_ROOT", tmp_path)
    assert newest_run() == runs["aborted"]
    assert newest_run(tmp_path / "empty") is None


def test_every_script_takes_the_same_newest_run(tmp_path, monkeypatch):
    """evolve.py --resume without --output, inspect_run.py and replay.py without a folder."""
    from plasa_lab.replay import plan_replay
    from plasa_lab.reporting import load_run
    from plasa_lab.search.launch import RunOptions, run_folder

    runs = make_runs(tmp_path)
    monkeypatch.setattr(rundir, "OUTPUT_ROOT", tmp_path)
    assert run_folder(RunOptions(resume=True)) == runs["newest"]
    assert load_run(None).run_dir == runs["newest"]
    assert plan_replay([]).title == f"run {runs['newest']}"


# ---------------------------------------------------------------------------------------------
# the read side stays light


def imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_rundir_imports_only_the_standard_library_and_the_package_leaves():
    modules = imported_by("plasa_lab.rundir")
    assert {m for m in modules if m.startswith("plasa_lab")} == {"plasa_lab", "plasa_lab.rundir", "plasa_lab.util"}
    assert not {"torch", "openevolve", "numpy", "yaml"} & modules


def test_reading_a_run_never_imports_the_orchestrator_or_the_evaluator():
    modules = imported_by("plasa_lab.reporting")
    assert not {"plasa_lab.search", "plasa_lab.evaluation", "openevolve", "torch"} & modules
