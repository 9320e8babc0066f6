"""replay.py: the verdict rule, the baselines, what a replay plans, a real two-seed replay of the
smoke fixture run through the sandboxed evaluator and its ledger, and bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT
from plasa_lab.evaluation.fitness import evaluate_code
from plasa_lab.program.blocks import load_program, split_blocks
from plasa_lab.program.checks import static_violation
from plasa_lab.replay import (
    REPLAYS_ROOT,
    VERDICTS,
    Candidate,
    Plan,
    ReplayError,
    SeedRun,
    plan_replay,
    schedule_variant,
    summarise,
    verdict,
    write_reports,
)
from plasa_lab.settings import Settings

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_run"
SOURCE = INITIAL_PROGRAM.read_text()


def replay(*args, timeout=500, env=None):
    return subprocess.run(
        [sys.executable, "scripts/replay.py", *map(str, args)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ---------------------------------------------------------------------------------------------
# the rule


def test_verdict_words_are_exactly_the_three_of_the_contract():
    assert VERDICTS == ("better beyond noise", "within noise", "worse beyond noise")


def test_clearly_lower_loss_across_seeds_is_better_beyond_noise_and_higher_is_worse():
    reference = [6.30, 6.32, 6.31]
    assert verdict([6.00, 6.02, 6.01], reference)[0] == "better beyond noise"
    assert verdict([6.60, 6.62, 6.61], reference)[0] == "worse beyond noise"
    word, p = verdict([6.60, 6.62, 6.61], reference)
    assert p < 0.05


def test_overlapping_seeds_are_within_noise():
    word, p = verdict([6.29, 6.35, 6.27], [6.30, 6.32, 6.31])
    assert word == "within noise" and p >= 0.05


def test_one_seed_or_no_variance_is_within_noise():
    assert verdict([5.0], [6.0]) == ("within noise", None)
    assert verdict([5.0, 5.0], [6.0, 6.0]) == ("within noise", None)


def seed_runs(losses, failed=()):
    return [
        SeedRun(
            42 + i, math.exp(loss), loss, 0.1, i not in failed, "stage 2: boom" if i in failed else None, False, 1.0
        )
        for i, loss in enumerate(losses)
    ]


def test_a_program_that_failed_on_a_seed_is_flagged_and_never_better():
    plan = Plan(
        [Candidate("initial", "initial", SOURCE, "here"), Candidate("child", "program", SOURCE + "#", "there")],
        [42, 43, 44],
        "smoke",
        None,
        Path("ledger"),
        Path("out"),
        "test",
    )
    summary = summarise(
        plan,
        {"initial": seed_runs([10.1, 10.12, 10.11]), "child": seed_runs([9.0, 9.01, math.log(10000)], failed=(2,))},
    )
    child = summary["programs"][1]
    assert child["failed_seeds"] == [44] and child["verdict"] == "within noise"
    assert summary["programs"][0]["verdict"] == "within noise" and summary["programs"][0]["change_vs_initial_pct"] == 0
    assert "Welch" in summary["rule"] and "never called better" in summary["rule"]


# ---------------------------------------------------------------------------------------------
# baselines and plans


def block_bodies(code):
    return {b.name: b.body for b in split_blocks(code)[1]}


@pytest.mark.parametrize("schedule, k", [("DENSE", 128), ("UNIFORM", 64)])
def test_dense_and_uniform_baselines_change_only_the_k_schedule(schedule, k, tmp_path):
    code = schedule_variant(SOURCE, schedule)
    before, after = block_bodies(SOURCE), block_bodies(code)
    assert [name for name in before if before[name] != after[name]] == ["k_schedule"]
    assert static_violation(code, SOURCE) is None
    comments = [line for line in before["k_schedule"].splitlines() if line.startswith("#")]
    assert after["k_schedule"].splitlines()[: len(comments)] == comments  # what must hold still says so
    (tmp_path / "baseline.py").write_text(code)
    assert load_program(tmp_path / "baseline.py").layer_k_schedule(4, 128) == [k] * 4


def test_baselines_of_a_run_are_made_from_the_runs_own_initial_program():
    """The fixture run predates the current initial program: its baselines come from its own code."""
    initial = json.loads((FIXTURE / "evolution_trace.jsonl").read_text().splitlines()[0])["parent_code"]
    plan = plan_replay([FIXTURE], top=1, seeds=[42], baselines=True)
    assert plan.candidates[0].code == initial
    for candidate in plan.candidates[1:3]:
        before, after = block_bodies(initial), block_bodies(candidate.code)
        assert [name for name in before if before[name] != after[name]] == ["k_schedule"]


def test_a_program_without_a_k_schedule_block_has_no_baseline():
    without = SOURCE.replace("# EVOLVE-BLOCK-START k_schedule", "# EVOLVE-BLOCK-START schedule")
    with pytest.raises(ReplayError, match="no EVOLVE-BLOCK 'k_schedule'"):
        schedule_variant(without, "UNIFORM")


def test_uniform_baseline_passes_stage_1_only_as_a_baseline():
    code = schedule_variant(SOURCE, "UNIFORM")
    as_baseline = evaluate_code(code, 1, Settings(profile="smoke", allow_uniform_schedule=True, ledger=""))
    assert as_baseline.passed, as_baseline.artifacts.get("failure")
    as_child = evaluate_code(code, 1, Settings(profile="smoke", ledger=""))
    assert not as_child.passed


def test_a_run_replay_plans_the_initial_program_first_then_the_top_programs():
    plan = plan_replay([FIXTURE], top=2, seeds=[42, 43], baselines=True)
    names = [c.name for c in plan.candidates]
    assert names[:3] == ["initial", "DENSE", "UNIFORM"] and len(names) == 5
    assert [c.uniform for c in plan.candidates[:3]] == [False, True, True]
    assert plan.profile == "smoke" and plan.corpus and plan.ledger == FIXTURE / "ledger.sqlite"
    assert plan.out_dir == FIXTURE / "report"
    assert len({c.code for c in plan.candidates}) == 5


def test_program_files_replay_into_the_replays_folder_each_under_its_own_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [tmp_path / "a" / "child.py", tmp_path / "b" / "child.py", tmp_path / "same.py"]
    files[0].write_text(SOURCE.replace("INDEXER_LOSS_WEIGHT = 0.1", "INDEXER_LOSS_WEIGHT = 0.2"))
    files[1].write_text(SOURCE.replace("INDEXER_LOSS_WEIGHT = 0.1", "INDEXER_LOSS_WEIGHT = 0.3"))
    files[2].write_text(SOURCE)
    plan = plan_replay(files, seeds=[42], profile="smoke")
    assert [c.name for c in plan.candidates] == ["initial", "child.py", "child.py#2"]
    assert plan.ledger == REPLAYS_ROOT / "ledger.sqlite" and plan.out_dir == REPLAYS_ROOT / "report"
    assert any("same.py is the initial program" in note for note in plan.notes)


def test_an_unsandboxed_run_puts_its_warning_first_in_the_replay_reports(tmp_path):
    run_dir = Path(shutil.copytree(FIXTURE, tmp_path / "run"))
    record = json.loads((run_dir / "run.json").read_text())
    record["sandbox"] = dict(isolation="none", warning="PLASA_SANDBOX=none was set")
    (run_dir / "run.json").write_text(json.dumps(record))
    plan = plan_replay([run_dir], top=1, seeds=[42, 43])
    assert "not isolated" in plan.sandbox_warning and "PLASA_SANDBOX=none was set" in plan.sandbox_warning
    summary = summarise(plan, {c.name: seed_runs([10.1, 10.2]) for c in plan.candidates})
    md, js = write_reports(summary, tmp_path / "report")
    assert md.read_text().splitlines()[2] == f"> **{plan.sandbox_warning}**"
    assert json.loads(js.read_text())["sandbox_warning"] == plan.sandbox_warning

    assert plan_replay([FIXTURE], top=1, seeds=[42]).sandbox_warning is None  # the fixture does not say


# ---------------------------------------------------------------------------------------------
# a real replay


def test_smoke_replay_with_two_seeds_writes_report_and_verdicts_then_resumes_from_the_ledger(tmp_path):
    run_dir = Path(shutil.copytree(FIXTURE, tmp_path / "run"))
    done = replay(run_dir, "--top", "1", "--seeds", "42,43")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run_dir / "report" / "replay.json").read_text())
    assert report["seeds"] == [42, 43] and report["profile"] == "smoke"
    programs = report["programs"]
    assert [p["kind"] for p in programs] == ["initial", "program"]
    for p in programs:
        assert p["verdict"] in VERDICTS and [r["seed"] for r in p["runs"]] == [42, 43]
        assert p["val_ppl_mean"] > 0 and p["val_ppl_sd"] is not None and 0 <= p["val_acc_mean"] <= 1
    markdown = (run_dir / "report" / "replay.md").read_text()
    assert "Welch" in markdown and programs[1]["verdict"] in markdown and "± " in markdown
    assert "val_ppl" in done.stdout and programs[1]["verdict"] in done.stdout
    assert "initial seed 43" in done.stderr  # progress names the evaluation in flight
    # the run itself trained seed 42 of both programs: replay reads those from the run's ledger
    assert [r["from_ledger"] for p in programs for r in p["runs"]] == [True, False, True, False]

    again = replay(run_dir, "--top", "1", "--seeds", "42,43")  # an interrupted replay resumes like this
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((run_dir / "report" / "replay.json").read_text())
    assert all(r["from_ledger"] for p in rerun["programs"] for r in p["runs"])
    assert [p["val_ppl_mean"] for p in rerun["programs"]] == [p["val_ppl_mean"] for p in programs]


def small_text_corpus() -> str:
    """A generated text: corpus whose validation split is a few windows longer than the smoke
    profile's 8, so validating on all of it is quick (a fixed path: its token cache is reused)."""
    import random

    rng = random.Random(0)
    words = SOURCE.replace("\n", " ").split()[:400]
    documents = [" ".join(rng.choice(words) for _ in range(120)) for _ in range(100)]
    text, path = "\n\n".join(documents), PROJECT_ROOT / ".cache" / "test-corpora" / "whole_val.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return f"text:{path}"


def test_whole_val_replay_validates_on_the_whole_split_under_its_own_ledger_key(tmp_path):
    corpus = small_text_corpus()
    program = tmp_path / "program.py"
    program.write_text(SOURCE)
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "out"
    done = replay(
        program,
        "--seeds",
        "42",
        "--profile",
        "smoke",
        "--whole-val",
        "--ledger",
        ledger,
        "--out",
        out,
        env=dict(os.environ, PLASA_CORPUS=corpus),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "replay.json").read_text())
    assert report["validation"] == "the whole validation split"
    assert "validated on the whole validation split" in (out / "replay.md").read_text()

    # The same training (seed 42), validated on the profile's first 8 windows instead: another number,
    # recorded beside it, so neither answers for the other.
    whole = evaluate_code(
        SOURCE, 2, Settings(profile="smoke", corpus=corpus, ledger=str(ledger), whole_validation=True)
    )
    first_windows = evaluate_code(SOURCE, 2, Settings(profile="smoke", corpus=corpus, ledger=str(ledger)))
    assert whole.from_ledger and not first_windows.from_ledger
    assert (
        "the whole validation split" in whole.artifacts["profile"]
        and "4 val batches" in first_windows.artifacts["profile"]
    )
    assert whole.metrics["train_loss"] == first_windows.metrics["train_loss"]
    assert whole.metrics["val_loss"] != first_windows.metrics["val_loss"]
    assert whole.metrics["val_ppl"] == report["programs"][0]["runs"][0]["val_ppl"]
    from plasa_lab.evaluation.ledger import Ledger

    rows = [(r["profile"], r["validation"]) for r in Ledger(ledger).rows() if r["stage"] == 2]
    assert sorted(rows) == [("smoke", "profile"), ("smoke", "whole")]


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/run"], "no such file or folder"),
        (["EMPTY"], "is not a run folder"),
        (["FIXTURE", "PROGRAM"], "not both"),
        (["FIXTURE", "--top", "0"], "--top must be at least 1"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(args, message, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "program.py").write_text(SOURCE)
    names = {"EMPTY": tmp_path / "empty", "FIXTURE": FIXTURE, "PROGRAM": tmp_path / "program.py"}
    done = replay(*[names.get(a, a) for a in args])
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


def test_malformed_seeds_are_refused_before_anything_runs():
    done = replay(FIXTURE, "--seeds", "42,x")
    assert done.returncode == 2 and "seeds must be integers" in done.stderr
