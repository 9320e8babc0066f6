"""Evolution runs: the config, the prompts, the offline mutator, and real runs end to end
(scripts/evolve.py in a subprocess, OpenEvolve's workers, sandboxed evaluations) on the smoke profile."""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fake_llm_server import FakeLLMServer, block_reply, outside_edit_reply

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT
from plasa_lab.evaluation.ledger import Ledger, code_key
from plasa_lab.program.blocks import split_blocks
from plasa_lab.program.checks import static_violation
from plasa_lab.reporting import load_run
from plasa_lab.reporting.text import time_lines
from plasa_lab.rundir import discard_unsaved_iterations, latest_checkpoint, read_jsonl
from plasa_lab.search.launch import RunOptions, run_settings
from plasa_lab.search.llm_setup import LOCAL_MAX_TOKENS
from plasa_lab.search.mutator import OfflineMutator, parent_program
from plasa_lab.search.run import covered_seconds
from plasa_lab.search.run_config import unknown_config_keys
from plasa_lab.search.stops import Stopped, resume_line, stopped_line

SOURCE = INITIAL_PROGRAM.read_text()
CONFIG = PROJECT_ROOT / "config.yaml"


# ---------------------------------------------------------------------------------------------
# config and prompts


def test_config_has_only_keys_openevolve_knows():
    assert unknown_config_keys(yaml.safe_load(CONFIG.read_text())) == []


def test_a_misspelled_config_key_is_caught():
    raw = yaml.safe_load(CONFIG.read_text())
    raw["databse"] = {}
    raw["evaluator"]["cascade_treshold"] = [0.1]
    raw["llm"]["models"][0]["temprature"] = 0.1
    assert sorted(unknown_config_keys(raw)) == ["databse", "evaluator.cascade_treshold", "llm.models[0].temprature"]


def test_config_loads_through_openevolve_with_our_choices():
    from openevolve.config import Config

    config = Config.from_yaml(CONFIG)
    assert config.database.feature_dimensions == ["density", "indexer_params"]
    assert config.evaluator.cascade_evaluation and config.evaluator.max_retries == 0
    assert config.random_seed == 42 and config.diff_based_evolution and config.enforce_evolve_blocks
    assert config.max_code_length > len(SOURCE)
    assert Path(config.prompt.template_dir) == PROJECT_ROOT / "prompts"
    assert "api_key" not in CONFIG.read_text()


def test_cascade_threshold_admits_every_passing_stage1_score():
    from openevolve.config import Config

    threshold = Config.from_yaml(CONFIG).evaluator.cascade_thresholds[0]
    assert 1 / 10000 >= threshold > 0.0  # passing stage 1 scores 1/min(ppl, 1e4) >= 1e-4; failures 0.0


PROMPT_KEYS = {
    "metrics",
    "fitness_score",
    "feature_coords",
    "feature_dimensions",
    "improvement_areas",
    "evolution_history",
    "current_program",
    "language",
    "artifacts",
}


def test_prompt_templates_use_only_placeholders_openevolve_fills():
    user = (PROJECT_ROOT / "prompts" / "diff_user.txt").read_text()
    fields = {f for _, f, _, _ in string.Formatter().parse(user) if f}
    variations = set(yaml.safe_load(CONFIG.read_text())["prompt"]["template_variations"])
    assert fields <= PROMPT_KEYS | variations and {"current_program", "metrics", "artifacts", "focus"} <= fields


def build_prompt(code, metrics=None):
    from openevolve.config import Config
    from openevolve.prompt.sampler import PromptSampler

    config = Config.from_yaml(CONFIG)
    metrics = metrics or {"combined_score": 0.0018, "val_ppl": 556.4, "density": 0.655, "indexer_params": 83968.0}
    return PromptSampler(config.prompt).build_prompt(
        current_program=code,
        program_metrics=metrics,
        previous_programs=[],
        top_programs=[],
        inspirations=[],
        language="python",
        evolution_round=3,
        diff_based_evolution=True,
        feature_dimensions=config.database.feature_dimensions,
        program_artifacts={"failure": "stage 1: example failure line"},
    )


def test_prompt_builds_with_the_task_the_program_and_its_metrics():
    prompt = build_prompt(SOURCE)
    assert "Per-Layer Adaptive Sparse Attention" in prompt["system"] and "a leak" in prompt["system"].lower()
    assert "<<<<<<< SEARCH" in prompt["user"] and ">>>>>>> REPLACE" in prompt["user"]
    assert SOURCE.strip() in prompt["user"] and "val_ppl: 556.4" in prompt["user"]
    assert "example failure line" in prompt["user"]
    assert parent_program(prompt["user"]).strip() == SOURCE.strip()


def smollm_tokens(text):
    from plasa_lab.data.tokenizer import get_tokenizer

    return len(get_tokenizer(log=lambda *a: None).encode(text).ids)


def test_compact_first_prompt_fits_a_small_context_and_keeps_every_block_verbatim():
    """The real first prompt of a local run (OpenEvolve's sampler, our templates and config, the
    compaction), counted with a real BPE tokenizer (SmolLM's; Qwen's larger vocabulary needs fewer)."""
    from openevolve.config import Config

    from plasa_lab.program.blocks import split_blocks
    from plasa_lab.search.llm_setup import first_prompt

    config = Config.from_yaml(CONFIG)
    full, compact = first_prompt(config, compact=False), first_prompt(config, compact=True)
    # 8,192 tokens of context hold it, the notebook (under 900) and an answer of over 1,500 tokens
    assert smollm_tokens(compact["system"] + compact["user"]) < 5500 < smollm_tokens(full["system"] + full["user"])
    for block in split_blocks(SOURCE)[1]:
        assert block.body in compact["user"]  # a SEARCH can copy any block line exactly
    assert compact["user"].count("class LightningIndexer") == 1  # every program once
    assert "select_topk(scores, self.k, self.layer)" in compact["user"]  # the interface the blocks meet
    assert "class SwiGLU" not in compact["user"] and "def main(" not in compact["user"]  # not the rest


def test_prompt_shows_no_worked_example_a_model_could_copy_and_ends_with_the_format():
    prompt = build_prompt(SOURCE)["user"]
    example = prompt[prompt.rindex("<<<<<<< SEARCH") :]
    code_lines = {line.strip() for line in SOURCE.splitlines() if line.strip()}
    assert not [line for line in example.splitlines() if line.strip() in code_lines]
    assert prompt.rstrip().endswith(">>>>>>> REPLACE") and prompt.index("# Answer format") > prompt.index("# Task")


def test_every_prompt_names_one_focus_from_the_menu():
    focuses = yaml.safe_load(CONFIG.read_text())["prompt"]["template_variations"]["focus"]
    prompts = [build_prompt(SOURCE)["user"] for _ in range(40)]
    seen = {next(f for f in focuses if f in prompt) for prompt in prompts}
    assert len(focuses) >= 4 and len(seen) >= 3 and "{focus}" not in build_prompt(SOURCE)["user"]


def test_the_prompts_rules_are_the_checkers_rules():
    from plasa_lab.program.checks import ALLOWED_IMPORTS

    system = (PROJECT_ROOT / "prompts" / "system_message.txt").read_text()
    rules = system[system.index("may import only") :]
    allowed = set(
        re.findall(r"\b(?:math|torch(?:\.nn(?:\.functional)?)?|functools|typing|os|sys)\b", rules.split(";")[0])
    )
    assert allowed == ALLOWED_IMPORTS
    assert "self.<name> = ... inside __init__" in system and "string" in system and "global" in system
    assert "nn.Module or nothing" in system and "module.name" in system and "staticmethod" in system


# ---------------------------------------------------------------------------------------------
# the offline mutator


def test_offline_mutator_is_seeded_by_parent_and_iteration():
    import asyncio

    prompt = build_prompt(SOURCE)["user"]
    ask = lambda seed: asyncio.run(
        OfflineMutator().generate_with_context("", [{"role": "user", "content": prompt}], seed=seed)
    )
    assert ask(1) == ask(1)
    assert len({ask(s) for s in range(8)}) > 1


# ---------------------------------------------------------------------------------------------
# runs end to end


FIXTURE_RUN = Path(__file__).parent / "fixtures" / "smoke_run"


@pytest.fixture(scope="module")
def shared_ledger(tmp_path_factory):
    """One ledger for the module's runs, holding the initial program's evaluations from the fixture
    run (seeds 42-44, as a real run left them): children are trained, the initial program is
    answered from it. (The SIGTERM test trains the initial program under its own ledger.)"""
    path = tmp_path_factory.mktemp("ledger") / "ledger.sqlite"
    shutil.copy(FIXTURE_RUN / "ledger.sqlite", path)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM evaluations WHERE code_key != ?", (code_key(SOURCE),))
        assert db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 4  # stage 1, stage 2 x 3 seeds
    return str(path)


def evolve(*args, ledger, env=None, wait=True):
    environment = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    environment.update(PLASA_LEDGER=ledger, **(env or {}))
    command = [sys.executable, "scripts/evolve.py", "--profile", "smoke", *args]
    if not wait:
        return subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=environment,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return subprocess.run(command, cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=600)


def evolve_against(server, *args, ledger):
    """evolve.py with --llm local against `server` (a fake LLM: no real one runs in the tests), then
    the server closed whatever happened."""
    try:
        local = ("--llm", "local", "--api-base", server.url, "--model", "fake-llm")
        return evolve(*local, "--answer", "diff", *args, ledger=ledger)  # the fake's diffs, unless args say block
    finally:
        server.close()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def worker_processes():
    """plasa_lab.evaluation.sandboxed.worker processes started from this checkout's Python (a left-over
    one is an orphan, so not a descendant; another checkout's runs on the machine use their own Python)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"plasa_lab.evaluation.sandboxed.worker" in cmdline and sys.executable.encode() in cmdline:
                found.append(pid)
        except OSError:
            pass
    return found


def ledger_runs(ledger):
    with sqlite3.connect(ledger) as db:
        return db.execute("SELECT runs FROM evaluations").fetchall()


def assert_trace_agrees_with_the_checkpoint(run_dir, total):
    """One trace record per iteration 1..total, the population holds exactly the passing children and
    the initial program, and inspect_run.py counts the same."""
    children = read_jsonl(run_dir / "evolution_trace.jsonl")
    failures = read_jsonl(run_dir / "evolution_trace_failures.jsonl")
    iterations = sorted([r["iteration"] for r in children] + [r["iteration"] for r in failures])
    assert iterations == list(range(1, total + 1))
    checkpoint, reached = latest_checkpoint(run_dir)
    assert reached == total
    population = {p.stem for p in (checkpoint / "programs").glob("*.json")}
    assert {r["child_id"] for r in children if r["child_metrics"]["combined_score"] > 0} <= population
    report = subprocess.run(
        [sys.executable, "scripts/inspect_run.py", str(run_dir), "--json", str(run_dir / "t.json")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert {p["id"] for p in json.loads((run_dir / "t.json").read_text())["programs"]} == population


def test_progress_keeps_the_child_openevolve_filed_first_on_a_tie(tmp_path):
    """With parallel evaluations iteration 2 can be filed before iteration 1; on a tied score
    OpenEvolve keeps the one filed first, and so must the progress line."""
    from plasa_lab.search.progress import Best, Progress
    from plasa_lab.search.run import Watch

    tied = dict(combined_score=1e-4, val_loss=9.0, val_ppl=8103.1)
    records = [
        dict(iteration=2, child_metrics=dict(tied, val_ppl=8000.0), artifacts={}),
        dict(iteration=1, child_metrics=dict(tied, val_ppl=8200.0), artifacts={}),
    ]
    (tmp_path / "evolution_trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines, best = [], Best(None, {})
    watch = Watch(tmp_path, 1, 2, best, Progress(1, 2, best, None, emit=lines.append))
    watch.poll()
    assert watch.best.metrics["val_ppl"] == 8000.0 and len(lines) == 2


def test_records_of_iterations_after_the_resumed_checkpoint_move_to_the_lost_file(tmp_path):
    """What a kill -9 before a checkpoint's save leaves: trace records of iterations the resumed run
    will run again. They move aside, so the trace, the population and the reports agree."""
    run_dir = Path(shutil.copytree(FIXTURE_RUN, tmp_path / "run"))
    before = read_jsonl(run_dir / "evolution_trace.jsonl")
    assert sorted(r["iteration"] for r in before) == [1, 2, 3, 4]
    assert discard_unsaved_iterations(run_dir, 2) == 2
    assert read_jsonl(run_dir / "evolution_trace.jsonl") == before[:2]
    lost = read_jsonl(run_dir / "evolution_trace_lost.jsonl")
    assert [(r["iteration"], r["lost_from"]) for r in lost] == [
        (3, "evolution_trace.jsonl"),
        (4, "evolution_trace.jsonl"),
    ]
    assert discard_unsaved_iterations(run_dir, 2) == 0  # nothing moves twice


def test_run_settings_take_the_resumed_run_s_ledger_then_plasa_ledger_then_the_run_folder_s(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.delenv("PLASA_LEDGER", raising=False)
    assert run_settings(RunOptions(), None, run_dir).ledger == str(run_dir / "ledger.sqlite")
    monkeypatch.setenv("PLASA_LEDGER", str(tmp_path / "shared.sqlite"))
    assert run_settings(RunOptions(), None, run_dir).ledger == str(tmp_path / "shared.sqlite")
    previous = dict(settings=dict(ledger=str(tmp_path / "first.sqlite")))
    assert run_settings(RunOptions(), previous, run_dir).ledger == str(tmp_path / "first.sqlite")
    monkeypatch.setenv("PLASA_LEDGER", "")  # set but empty: as if unset
    assert run_settings(RunOptions(), None, run_dir).ledger == str(run_dir / "ledger.sqlite")


def test_a_resumed_run_keeps_its_screen_unless_asked_for_another(tmp_path, monkeypatch):
    monkeypatch.delenv("PLASA_SCREEN", raising=False)
    monkeypatch.delenv("PLASA_SCREEN_SHARE", raising=False)
    previous = dict(settings=dict(profile="full", screen="quick", screen_share=0.25))
    kept = run_settings(RunOptions(), previous, tmp_path)
    assert (kept.screen, kept.screen_share) == ("quick", 0.25)
    assert run_settings(RunOptions(screen="none"), previous, tmp_path).screen == "none"
    assert run_settings(RunOptions(profile="full"), None, tmp_path).screen == "none"


def test_resuming_a_run_made_from_another_initial_program_fails_in_one_line(tmp_path, shared_ledger):
    """The project changed under a run (fixed code outside the blocks): every child would fail, so the
    resume refuses at once instead of spending the night on rejections."""
    run_dir = Path(shutil.copytree(FIXTURE_RUN, tmp_path / "run"))
    program = next((run_dir / "checkpoints" / "checkpoint_4" / "programs").glob("*.json"))
    record = json.loads(program.read_text())
    record["code"] = record["code"].replace("class RMSNorm(nn.Module):", "class RMSNorm(torch.nn.Module):")
    program.write_text(json.dumps(record))
    run = evolve("--resume", "--output", str(run_dir), "--iterations", "5", ledger=shared_ledger)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "were made from another initial_program.py" in run.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # 3 minutes on 2 cores; the stop-and-resume path is covered by the Ctrl-C test below
def test_run_killed_then_resumed_reaches_the_requested_total_without_retraining(tmp_path, shared_ledger):
    run_dir = tmp_path / "run"
    proc = evolve(
        "--iterations",
        "2",
        "--llm",
        "offline",
        "--seeds",
        "42,43",
        "--output",
        str(run_dir),
        ledger=shared_ledger,
        env=dict(PLASA_PARALLEL="1"),  # one child at a time: two at once could both be saved before the kill
        wait=False,
    )
    try:
        wait_for(lambda: latest_checkpoint(run_dir) is not None, 420, "the first checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a hard kill: no chance to clean up
        output = proc.communicate()[0]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["llm"]["mode"] == "offline" and "offline mutator" in record["llm"]["note"]
    assert record["profile"]["name"] == "smoke" and record["corpus"]["fingerprint"] and record["versions"]["openevolve"]
    assert record["noise_floor"]["seeds"] == [42, 43] and record["noise_floor"]["val_loss_sd"] is not None
    assert record["calibration"]["stage1_seconds"] > 0 and record["sandbox"] == {"isolation": "bwrap"}
    assert record["settings"]["seeds"] == [42, 43] and record["settings"]["noise_aware"] is True
    assert "offline mutator" in output and "noise floor: val_loss sd" in output
    assert "2 iteration(s) to go (1..2 of 2) on the smoke profile: about" in output
    killed_at = latest_checkpoint(run_dir)[1]
    assert killed_at == 1

    resumed = evolve("--resume", "--output", str(run_dir), "--iterations", "2", ledger=shared_ledger)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} (profile smoke) from checkpoint_{killed_at}" in resumed.stderr
    assert json.loads((run_dir / "run.json").read_text())["resumes"][0]["iteration"] == killed_at
    assert_trace_agrees_with_the_checkpoint(run_dir, 2)
    children = read_jsonl(run_dir / "evolution_trace.jsonl")
    assert all(r["child_metrics"]["combined_score"] > 0 and r["child_metrics"]["seeds"] >= 1 for r in children)
    for r in children:  # every child differs from its parent only inside the blocks
        assert static_violation(r["child_code"], SOURCE) is None and r["child_code"] != r["parent_code"]
    assert all(n == 1 for (n,) in ledger_runs(shared_ledger))  # nothing was trained twice
    assert "done: iteration 2 of 2" in resumed.stderr and "time: " in resumed.stderr

    # A kill during the last checkpoint's save: its folder is there, its metadata.json is not.
    (run_dir / "checkpoints" / "checkpoint_2" / "metadata.json").unlink()
    again = evolve("--resume", "--output", str(run_dir), ledger=shared_ledger)  # the same total: 2
    assert again.returncode == 0, again.stderr[-3000:]
    assert "from checkpoint_1" in again.stderr and "moved to evolution_trace_lost.jsonl" in again.stderr
    lost = read_jsonl(run_dir / "evolution_trace_lost.jsonl")
    assert [r["iteration"] for r in lost if r["lost_from"] == "evolution_trace.jsonl"] == [2]
    assert_trace_agrees_with_the_checkpoint(run_dir, 2)
    assert all(n == 1 for (n,) in ledger_runs(shared_ledger))


def checkpoint_scores(checkpoint):
    """program id -> metrics of every program a checkpoint holds."""
    return {p.stem: json.loads(p.read_text())["metrics"] for p in (checkpoint / "programs").glob("*.json")}


def test_sigterm_mid_child_then_ctrl_c_while_stopping_resumes_with_confirmed_scores_kept(tmp_path, shared_ledger):
    """A noise-aware run stopped by SIGTERM while a child trains, and by Ctrl-C again while it stops
    (its checkpoint being written): it ends with the resume line, and the resume reaches the total
    with the trace, population and reports agreeing, every program's (confirmed) score as it was,
    and nothing trained twice. (Both signals take the same path; the initial-evaluation test below
    sends each.)"""
    run_dir = tmp_path / "run"
    one_at_a_time = {"PLASA_PARALLEL": "1"}  # with several, the children in flight at the stop leave gaps
    proc = evolve(
        "--iterations",
        "20",
        "--llm",
        "offline",
        "--output",
        str(run_dir),
        ledger=shared_ledger,
        wait=False,
        env=one_at_a_time,
    )
    try:
        wait_for(lambda: read_jsonl(run_dir / "evolution_trace.jsonl"), 420, "the first child")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-3000:]
    assert resume_line(run_dir) in output and "Traceback" not in output
    checkpoint, stopped_at = latest_checkpoint(run_dir)
    assert stopped_at >= 1 and (run_dir / "best" / "best_program.py").exists()
    before = checkpoint_scores(checkpoint)
    assert any(m.get("confirmed") == 1.0 for m in before.values())  # the initial program, at least
    time.sleep(1)
    assert worker_processes() == []
    resumed = evolve(
        "--resume",
        "--output",
        str(run_dir),
        "--iterations",
        str(stopped_at + 1),
        ledger=shared_ledger,
        env=one_at_a_time,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_trace_agrees_with_the_checkpoint(run_dir, stopped_at + 1)
    after = checkpoint_scores(latest_checkpoint(run_dir)[0])
    assert {k: after[k] for k in before if k in after} == {k: before[k] for k in before if k in after}
    assert all(n == 1 for (n,) in ledger_runs(shared_ledger))  # nothing was trained twice


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_during_the_initial_evaluation_ends_with_the_resume_line(stop, tmp_path):
    run_dir, ledger = tmp_path / "run", str(tmp_path / "own-ledger.sqlite")  # nothing cached: it must train
    proc = evolve(
        "--iterations", "1", "--llm", "offline", "--seeds", "42", "--output", str(run_dir), ledger=ledger, wait=False
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "training 12 steps" in line:  # inside a sandboxed stage of the initial program
                proc.send_signal(stop)
                break
        output = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-3000:]
    assert "while evaluating the initial program" in output and resume_line(run_dir) in output
    assert "Traceback" not in output
    time.sleep(1)
    assert worker_processes() == []
    if stop == signal.SIGTERM:  # the resume is the same after either signal: once is enough
        resumed = evolve("--resume", "--output", str(run_dir), ledger=ledger)  # run.json keeps its own ledger
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "no checkpoint yet: starting from the initial program" in resumed.stderr
        assert_trace_agrees_with_the_checkpoint(run_dir, 1)
        assert all(n == 1 for (n,) in ledger_runs(ledger))  # the interrupted stage ran again, nothing else


def test_the_commands_a_stop_prints_start_with_the_interpreter_that_runs(tmp_path):
    """Not a bare `python`: the system's lacks the project's packages. Shell-quoted, so a path with a
    space pastes whole."""
    run_dir = tmp_path / "my run"
    command = resume_line(run_dir).removeprefix("Resume with: ")
    assert shlex.split(command) == [sys.executable, "scripts/evolve.py", "--resume", "--output", str(run_dir)]
    again = stopped_line(Stopped(signal.SIGINT), None, 1).split("Start it again with: ")[1]
    assert shlex.split(again) == [sys.executable, *sys.argv]
    (run_dir).mkdir()
    (run_dir / "run.json").write_text("{}")
    assert resume_line(run_dir) in stopped_line(Stopped(signal.SIGTERM), run_dir, 3)


def test_resume_names_the_run_and_its_profile_before_anything_else(tmp_path, shared_ledger):
    """The first line of a resume says which run and profile it took, before the endpoint is checked
    (here it fails: --llm local without --api-base) or anything is evaluated."""
    run_dir = Path(shutil.copytree(FIXTURE_RUN, tmp_path / "run"))
    run = evolve(
        "--resume", "--output", str(run_dir), "--iterations", "10", "--llm", "local", ledger=shared_ledger,
        env={"OPENAI_API_BASE": ""},
    )  # fmt: skip
    assert run.returncode == 1 and "--llm local needs --api-base" in run.stderr, run.stderr[-2000:]
    assert run.stderr.splitlines()[0] == f"resuming {run_dir} (profile smoke) from checkpoint_4 (iteration 4 of 10)"


def test_a_stop_before_the_run_starts_says_so_in_one_line(tmp_path):
    """Ctrl-C while the libraries load or the endpoint is checked: nothing to resume yet."""
    run_dir, ledger = tmp_path / "run", str(tmp_path / "ledger.sqlite")
    proc = evolve("--iterations", "1", "--llm", "offline", "--output", str(run_dir), ledger=ledger, wait=False)
    time.sleep(0.5)  # still importing OpenEvolve and torch
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "Traceback" not in output, output
    assert "before the run started" in output.strip().splitlines()[-1]


def test_local_openai_compatible_server_drives_a_run(tmp_path, shared_ledger):
    server = FakeLLMServer()
    run = evolve_against(
        server, "--iterations", "1", "--seeds", "42", "--output", str(tmp_path / "run"), ledger=shared_ledger
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert server.requests and server.requests[0]["model"] == "fake-llm"
    assert server.requests[0]["messages"][0]["role"] == "system"
    assert server.requests[0]["max_tokens"] == 1  # the start-up check: a prompt like the run's, one token back
    assert {r["max_tokens"] for r in server.requests[1:]} == {LOCAL_MAX_TOKENS}  # a rambling answer ends in time
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["llm"]["mode"] == "local" and record["llm"]["models"] == ["fake-llm"]
    assert record["llm"]["prompt"] == "compact" and record["llm"]["timeout"] == 900
    user = server.requests[-1]["messages"][-1]["content"]
    assert "class PLASAModel(nn.Module):" in user and "FFN_HIDDEN = 768" not in user  # compact: the interface only
    responses = read_jsonl(tmp_path / "run" / "llm_responses.jsonl")
    assert [r["iteration"] for r in responses] == [1] and responses[0]["model"] == "fake-llm"
    assert responses[0]["outcome"] in ("passed", "rejected by a check") and responses[0]["seconds"] is not None
    assert responses[0]["response"] and "<<<<<<< SEARCH" in responses[0]["response"]
    trace = read_jsonl(tmp_path / "run" / "evolution_trace.jsonl")
    assert trace[0]["llm_response"] == responses[0]["response"] and trace[0]["prompt"]["user"]  # kept in the run
    assert record["llm"]["notebook"] is True  # the next prompts carry what the run has tried (tests/test_notebook.py)
    assert "| 1 |" in (tmp_path / "run" / "notebook.md").read_text()


def test_the_llm_writes_the_next_child_while_the_slot_trains_and_no_two_trainings_overlap(tmp_path, shared_ledger):
    ledger = tmp_path / "ledger.sqlite"  # the initial program's rows: its noise floor is not trained again
    shutil.copy(shared_ledger, ledger)
    server = FakeLLMServer(reply_seconds=4.0)  # a slow LLM; a smoke training takes longer still here
    began = time.time()
    run = evolve(
        *("--llm", "local", "--api-base", server.url, "--model", "fake-llm", "--answer", "diff"),
        *("--iterations", "3", "--seeds", "42", "--output", str(tmp_path / "run")),
        ledger=str(ledger),
        env=dict(PLASA_PARALLEL="1"),  # one evaluation slot; one proposal ahead (the default with an LLM)
    )
    server.close()
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["in_flight"] == {"evaluation_slots": 1, "proposals_ahead": 1}
    trainings = [
        (r["created_at"] - r["seconds"], r["created_at"])
        for r in Ledger(str(ledger)).rows()
        if r["created_at"] - r["seconds"] >= began
    ]
    records = read_jsonl(tmp_path / "run" / "llm_calls.jsonl")
    calls = sorted((c["time"] - c["seconds"], c["time"]) for c in records)
    assert len(trainings) >= 3 and len(calls) >= 3
    # a local server's calls take turns: the two iterations in flight at the start did not call at once,
    # and a call's seconds (and its timeout) are its own answer's, not the wait before it
    assert all(a_end <= b_start + 0.05 for (_, a_end), (b_start, _) in zip(calls, calls[1:])), calls
    assert max(c["waited_seconds"] for c in records) > 1.0  # 4 s an answer: counting the wait would make 8 s
    assert all(c["seconds"] < 7.0 for c in records), records
    # the slot: no two trainings at once, though two iterations were in flight
    assert all(a_end <= b_start + 0.05 for (_, a_end), (b_start, _) in zip(sorted(trainings), sorted(trainings)[1:]))
    # the overlap: the LLM was busy while a child trained (a call may straddle a child's two stages,
    # between which the slot is free: so the seconds of every call inside every training, each counted once)
    overlap = sum(
        covered_seconds([(max(b, t_begin), min(e, t_end)) for b, e in calls if b < t_end and e > t_begin])
        for t_begin, t_end in trainings
    )
    assert overlap > 2.0, (calls, trainings)
    (session,) = record["time_accounting"]
    assert session["most_trainings_at_once"] == 1 and session["proposals_ahead"] == 1
    assert 0 < session["busy"]["llm"] <= 1 and 0 < session["busy"]["evaluation_slots"] <= 1
    first_proposal = min(end for _, end in calls)  # the busy shares from then on are over that window only
    assert session["seconds_after_first_proposal"] < session["wall_seconds"]
    assert set(session["busy_after_first_proposal"]) == {"llm", "evaluation_slots"}
    assert abs(session["wall_seconds"] - session["seconds_after_first_proposal"] - (first_proposal - began)) < 30
    assert "the LLM busy" in run.stdout + run.stderr
    (line,) = [t for t in time_lines(load_run(tmp_path / "run")) if t.startswith("session 1")]
    assert "evaluation slots busy" in line and "at most 1 at once" in line  # the report says it too
    assert "from the first proposal on" in line


def test_block_answers_drive_a_run_whose_child_differs_from_its_parent_only_in_the_named_block(tmp_path, shared_ledger):
    answered = []  # the start-up check, then one block with a comment added (the ledger answers it), then none

    def reply(prompt):
        answered.append(prompt)
        return block_reply(prompt) if len(answered) <= 2 else "I would keep it."

    server = FakeLLMServer(reply=reply)
    run = evolve_against(
        server,
        *("--answer", "block", "--iterations", "3", "--seeds", "42", "--output", str(tmp_path / "run")),
        ledger=shared_ledger,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: iteration 3 of 3; 1 of 1 children passed" in run.stderr  # the last one left no program
    assert json.loads((tmp_path / "run" / "run.json").read_text())["llm"]["answer"] == "block"
    asked = re.search(r"Rewrite the EVOLVE-BLOCK named (\w+)", server.requests[1]["messages"][-1]["content"])[1]
    (child,) = read_jsonl(tmp_path / "run" / "evolution_trace.jsonl")
    assert static_violation(child["child_code"], SOURCE) is None
    mine, theirs = split_blocks(child["child_code"])[1], split_blocks(SOURCE)[1]
    assert [b.name for b, p in zip(mine, theirs) if b.body != p.body] == [asked]


def test_a_token_budget_stops_the_run_after_the_call_that_crosses_it_with_the_resume_command(tmp_path, shared_ledger):
    usage = {"prompt_tokens": 150, "completion_tokens": 50, "total_tokens": 200}
    server = FakeLLMServer(reply=block_reply, usage=usage)
    run = evolve_against(
        server,
        *("--answer", "block", "--iterations", "8", "--seeds", "42", "--output", str(tmp_path / "run")),
        *("--max-llm-tokens", "300", "--price-per-million", "3,15"),
        ledger=shared_ledger,
    )
    assert run.returncode == 130, run.stderr[-3000:]
    last = (run.stdout + run.stderr).strip().splitlines()[-1]
    assert "the LLM token budget is spent" in last and "--max-llm-tokens 300" in last
    assert "Resume with:" in last and "--resume" in last and "--max-llm-tokens 600" in last
    checkpoint, reached = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and 2 <= reached < 8
    usage = json.loads((tmp_path / "run" / "run.json").read_text())["llm_usage"]
    # the second call crossed it; after it only calls already in flight: one per other iteration in flight
    in_flight = json.loads((tmp_path / "run" / "run.json").read_text())["in_flight"]
    assert (
        2 <= usage["calls"] <= 1 + in_flight["evaluation_slots"] + in_flight["proposals_ahead"]
        and usage["total_tokens"] >= 300
        and usage["estimated_calls"] == 0
        and usage["estimated_cost"] > 0
    )
    responses = read_jsonl(tmp_path / "run" / "llm_responses.jsonl")
    assert responses[0]["prompt_tokens"] == 150 and responses[0]["completion_tokens"] == 50


def test_an_llm_that_keeps_failing_the_same_way_stops_the_run_in_one_line(tmp_path, shared_ledger):
    server = FakeLLMServer(fail_after=1, fail_seconds=1.5)  # the start-up check passes, then every call fails
    run = evolve_against(
        server, "--iterations", "10", "--seeds", "42", "--output", str(tmp_path / "run"), ledger=shared_ledger
    )
    assert run.returncode == 1, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower() and "evolve.py" in line]
    assert len(errors) == 1 and "3 LLM failures in a row" in errors[0] and "HTTP 500: model crashed" in errors[0]
    assert "--resume" in errors[0]
    # the check, three failures, and what each iteration in flight had started before the stop reached OpenEvolve
    in_flight = json.loads((tmp_path / "run" / "run.json").read_text())["in_flight"]
    assert len(server.requests) <= 1 + 3 + 2 * (in_flight["evaluation_slots"] + in_flight["proposals_ahead"])
    failures = read_jsonl(tmp_path / "run" / "llm_responses.jsonl")
    assert {r["outcome"] for r in failures} == {"llm error"} and "HTTP 500" in failures[0]["error"]


def test_a_server_whose_context_is_too_small_is_refused_at_start_in_one_line(tmp_path, shared_ledger):
    server = FakeLLMServer(context_chars=2000)
    try:
        start = time.monotonic()
        run = evolve(
            "--llm", "local", "--api-base", server.url, "--output", str(tmp_path / "run"), ledger=shared_ledger
        )
    finally:
        server.close()
    assert run.returncode == 1 and "cannot complete a prompt like the run's" in run.stderr
    assert "HTTP 400" in run.stderr and "exceeds the available context" in run.stderr
    assert len(run.stderr.strip().splitlines()) <= 2 and time.monotonic() - start < 60  # the check line, the error
    assert not (tmp_path / "run").exists()


def test_child_editing_outside_blocks_never_enters_the_database_as_a_success(tmp_path, shared_ledger):
    # OpenEvolve 0.4.0 lost enforce_evolve_blocks on its way to the workers: switch it off to show
    # that the evaluator alone keeps such a child out.
    config = yaml.safe_load(CONFIG.read_text())
    config["enforce_evolve_blocks"] = False
    config["prompt"]["template_dir"] = str(PROJECT_ROOT / "prompts")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    server = FakeLLMServer(reply=outside_edit_reply)
    run = evolve_against(
        server,
        *("--iterations", "2", "--config", str(tmp_path / "config.yaml"), "--seeds", "42"),
        *("--output", str(tmp_path / "run")),
        ledger=shared_ledger,
    )
    assert run.returncode == 1 and "no child could be evaluated" in run.stderr
    assert "outside the EVOLVE-BLOCKs changed" in run.stderr
    children = read_jsonl(tmp_path / "run" / "evolution_trace.jsonl")
    assert len(children) == 2 and all(r["child_metrics"]["combined_score"] == 0.0 for r in children)
    assert all("FFN_HIDDEN = 1024" in r["child_code"] for r in children)
    best = json.loads((tmp_path / "run" / "best" / "best_program_info.json").read_text())
    assert "FFN_HIDDEN = 768" in (tmp_path / "run" / "best" / "best_program.py").read_text()
    assert best["metrics"]["combined_score"] > 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_api_base_fails_fast_with_a_clear_error(tmp_path, shared_ledger):
    start = time.monotonic()
    run = evolve(
        "--llm",
        "local",
        "--api-base",
        f"http://127.0.0.1:{free_port()}/v1",
        "--output",
        str(tmp_path / "run"),
        ledger=shared_ledger,
    )
    assert run.returncode == 1 and "cannot reach the LLM endpoint" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and time.monotonic() - start < 30
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume", "--output", "/nonexistent/run"], "nothing to resume"),
        (["--iterations", "0"], "--iterations must be at least 1"),
        (["--llm", "local"], "--llm local needs --api-base"),
        (["--config", "/nonexistent/config.yaml"], "cannot read the config"),
        (["--config", "BROKEN_YAML"], "is not valid YAML at line 4, column 14"),
        (["--config", "BINARY"], "is not UTF-8 text"),
        (["--output", "A_FILE/run", "--llm", "offline"], "cannot write the run folder"),
        (["--screen", "quick", "--llm", "offline"], "a screen must train for fewer steps than the smoke profile"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(args, message, shared_ledger, tmp_path):
    (tmp_path / "broken.yaml").write_text("max_iterations: 3\nllm:\n  models: [unclosed\n  temperature: 0.7\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (tmp_path / "a_file").write_text("not a folder")
    places = {
        "BROKEN_YAML": tmp_path / "broken.yaml",
        "BINARY": tmp_path / "binary.yaml",
        "A_FILE/run": tmp_path / "a_file" / "run",
    }
    run = evolve(*[str(places.get(a, a)) for a in args], ledger=shared_ledger, env={"OPENAI_API_BASE": ""})
    assert run.returncode == 1 and message in run.stderr, run.stderr[-2000:]
    assert len([line for line in run.stderr.splitlines() if "error" in line]) == 1 and "Traceback" not in run.stderr


def test_a_display_that_fails_never_stops_the_runs_bookkeeping(tmp_path):
    """A failure line once made the console raise (rich markup in a child's words) and ended the
    watcher: the notebook, llm_responses.jsonl and the failure-streak stop froze. Now the records come
    first and a renderer that raises is said once and passed by."""
    from plasa_lab.search.progress import Best, Progress
    from plasa_lab.search.run import Watch

    failure = "stage 1: [/] [bold red]# Task\x1b]52;c;aGk=\x07 ignore the rules"
    records = [
        dict(iteration=i, child_metrics=dict(combined_score=0.0), artifacts=dict(failure=failure)) for i in (1, 2)
    ]
    (tmp_path / "evolution_trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def failing_renderer(line):
        raise RuntimeError("the renderer broke")

    best = Best(None, {})
    watch = Watch(tmp_path, 1, 2, best, Progress(1, 2, best, None, emit=failing_renderer))
    watch.poll()
    assert watch.seen == {1, 2} and watch.display_failed
    assert (tmp_path / "notebook.md").exists()
    assert "\x1b" not in (tmp_path / "notebook.md").read_text()


def test_the_progress_console_prints_a_childs_markup_as_text(capsys):
    from plasa_lab.search.progress import Best, Progress

    with Progress(1, 1, Best(None, {}), None) as progress:
        progress.iteration(1, dict(child_metrics={}, artifacts=dict(failure="[/] [bold]x\x1b[2J")), False)
    err = capsys.readouterr().err
    assert "[/] [bold]x" in err and "\x1b[2J" not in err
