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
from plasa_lab.contract import get_profile
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
    reference = {42: 6.30, 43: 6.32, 44: 6.31}
    assert verdict({42: 6.00, 43: 6.02, 44: 6.01}, reference)[0] == "better beyond noise"
    word, p, test = verdict({42: 6.60, 43: 6.62, 44: 6.61}, reference)
    assert word == "worse beyond noise" and p < 0.05 and test == "paired t-test"


def test_overlapping_seeds_are_within_noise():
    word, p, _ = verdict({42: 6.29, 43: 6.35, 44: 6.27}, {42: 6.30, 43: 6.32, 44: 6.31})
    assert word == "within noise" and p >= 0.05


def test_one_seed_or_no_variance_is_within_noise():
    assert verdict({42: 5.0}, {42: 6.0})[:2] == ("within noise", None)
    assert verdict({42: 5.0, 43: 5.0}, {44: 6.0, 45: 6.0})[:2] == ("within noise", None)


def seed_runs(losses, first=42, failed=()):
    return [
        SeedRun(
            first + i, math.exp(loss), loss, 0.1, i not in failed, "stage 2: boom" if i in failed else None, False, 1.0
        )
        for i, loss in enumerate(losses)
    ]


def initial_and_child_plan(seeds):
    """A replay plan of the initial program and one child, for summaries of made-up seed runs."""
    candidates = [Candidate("initial", "initial", SOURCE, "here"), Candidate("child", "program", SOURCE + "#", "there")]
    return Plan(candidates, seeds, "smoke", None, Path("ledger"), Path("out"), "test")


def test_a_program_that_failed_on_a_seed_is_flagged_and_never_better():
    plan = initial_and_child_plan([42, 43, 44])
    summary = summarise(
        plan,
        {"initial": seed_runs([10.1, 10.12, 10.11]), "child": seed_runs([9.0, 9.01, math.log(10000)], failed=(2,))},
    )
    child = summary["programs"][1]
    assert child["failed_seeds"] == [44] and child["verdict"] == "within noise"
    assert summary["programs"][0]["verdict"] == "within noise" and summary["programs"][0]["change_vs_initial_pct"] == 0
    assert "Welch" in summary["rule"] and "never called better" in summary["rule"]


def test_a_program_lower_on_every_shared_seed_is_better_beyond_noise_though_the_seeds_spread_more():
    plan = initial_and_child_plan([42, 43, 44, 45])
    summary = summarise(
        plan, {"initial": seed_runs([6.30, 6.40, 6.20, 6.35]), "child": seed_runs([6.28, 6.385, 6.19, 6.33])}
    )
    child = summary["programs"][1]
    assert child["verdict"] == "better beyond noise" and child["test"] == "paired t-test" and child["paired_seeds"] == 4
    assert child["change_vs_initial_pct"] == pytest.approx(100 * math.expm1(-0.01625))


def test_a_run_programs_claim_stands_beside_its_change_on_unseen_seeds_with_the_share_taken_back(tmp_path):
    """The audit's case: -1.7% on the seeds the run selected it on, -1.1% on seeds no run used."""
    claimed_initial = {42: 6.30, 43: 6.34, 44: 6.26}
    claimed_child = {s: v + math.log1p(-0.017) for s, v in claimed_initial.items()}
    plan = Plan(
        [
            Candidate("initial", "initial", SOURCE, "here", claimed=claimed_initial),
            Candidate("best", "program", SOURCE + "#", "there", claimed=claimed_child),
        ],
        [101, 102, 103],
        "smoke",
        None,
        Path("ledger"),
        tmp_path,
        "test",
    )
    unseen = [6.31, 6.36, 6.28]
    runs = {"initial": seed_runs(unseen, first=101), "best": seed_runs([v + math.log1p(-0.011) for v in unseen], 101)}
    best = summarise(plan, runs)["programs"][1]
    assert best["claimed_change_pct"] == pytest.approx(-1.7) and best["claimed_seeds"] == 3
    assert best["unseen_change_pct"] == pytest.approx(-1.1) and best["unseen_seeds"] == 3
    assert best["shrinkage"] == pytest.approx(1 - 1.1 / 1.7)
    md, _ = write_reports(summarise(plan, runs), tmp_path)
    row = next(line for line in md.read_text().splitlines() if line.startswith("| best "))
    assert "-1.70%" in row and "-1.10% (3 seeds)" in row and "35%" in row


def test_a_run_replay_carries_each_programs_claim_from_the_runs_own_seeds():
    plan = plan_replay([FIXTURE], top=1, seeds=[101, 102])
    initial, program = plan.candidates
    assert set(initial.claimed) == {42, 43, 44} and 42 in program.claimed  # the seeds it was trained on


def test_ablation_replays_each_changed_block_of_a_program_alone_in_the_initial_program(tmp_path):
    both = SOURCE.replace("INDEXER_LOSS_WEIGHT = 0.1", "INDEXER_LOSS_WEIGHT = 0.2")
    both = schedule_variant(both, "DENSE")  # a second block changed
    one = SOURCE.replace("INDEXER_LOSS_WEIGHT = 0.1", "INDEXER_LOSS_WEIGHT = 0.3")
    (tmp_path / "both.py").write_text(both)
    (tmp_path / "one.py").write_text(one)
    plan = plan_replay([tmp_path / "both.py", tmp_path / "one.py"], seeds=[42], profile="smoke", ablate=True)
    ablations = [c for c in plan.candidates if c.kind == "ablation"]
    assert [c.name for c in ablations] == ["both.py:k_schedule", "both.py:indexer_training"] or [
        c.name for c in ablations
    ] == ["both.py:indexer_training", "both.py:k_schedule"]
    for c in ablations:
        changed = [n for n, body in block_bodies(c.code).items() if body != block_bodies(SOURCE)[n]]
        assert changed == [c.name.split(":")[1]] and block_bodies(c.code)[changed[0]] == block_bodies(both)[changed[0]]


def test_steps_train_every_candidate_longer_under_a_profile_of_its_own():
    plan = plan_replay([FIXTURE], top=1, seeds=[42], steps=80)
    assert plan.profile == "smoke@80" and get_profile(plan.profile).steps == 80
    assert get_profile(plan.profile).val_batches == get_profile("smoke").val_batches
    assert any("trained 80 steps" in note for note in plan.notes)
    with pytest.raises(ReplayError, match="--steps must be at least 1"):
        plan_replay([FIXTURE], steps=0)
    with pytest.raises(ValueError, match="positive integer"):
        get_profile("smoke@x")


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
    assert "paired t-test" in markdown and programs[1]["verdict"] in markdown and "± " in markdown
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
