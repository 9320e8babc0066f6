"""The screening rung (`--screen`): a cheaper first look at every child, and only the best share on.

The run trains on the quick profile and screens on the smoke one. Most tests write the screen's and
the run's rows into a real SQLite ledger and let the real pipeline answer from it, so each decision
is exact and nothing trains; one test trains its screen for real.
"""

import math

import pytest

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.contract import HARNESS_VERSION
from plasa_lab.evaluation.fitness import evaluate_code, screen_settings, screened_stage2
from plasa_lab.evaluation.ledger import Key, Ledger, code_key, code_sha256
from plasa_lab.evaluation.stage import calibration, corpus_of, passed_metrics
from plasa_lab.search.launch import expected_seconds_per_child
from plasa_lab.settings import Settings

SOURCE = INITIAL_PROGRAM.read_text()


def child(weight):
    return SOURCE.replace("INDEXER_LOSS_WEIGHT = 0.1", f"INDEXER_LOSS_WEIGHT = {weight}", 1)


def record(ledger, code, profile, loss, stage=2, seconds=60.0):
    key = Key(code_key(code), stage, profile, 42, corpus_of("auto").fingerprint, HARNESS_VERSION)
    measured = dict(val_loss=loss, val_ppl=math.exp(loss), val_acc=0.2, train_loss=loss, density=0.6, train_seconds=1.0)
    ledger.put(key, code_sha256(code), passed_metrics(measured, stage), {}, seconds)


def rows(ledger, code):
    return sorted(r["profile"] for r in ledger.rows() if r["code_key"] == code_key(code))


@pytest.fixture
def run(tmp_path):
    """A quick-profile run screening on smoke: the initial program and two children already screened."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for code, loss in ((SOURCE, 6.30), (child("0.3"), 6.10), (child("0.4"), 6.20)):
        record(ledger, code, "smoke", loss)
    settings = Settings(profile="quick", screen="smoke", ledger=str(ledger.path), seeds=(42,))
    return settings, ledger


def test_a_child_below_the_best_share_of_those_screened_is_screened_out_and_never_trains_on_the_full_profile(run):
    settings, ledger = run
    code = child("0.5")
    record(ledger, code, "smoke", 6.40)  # 4th of 4; the best half (2) go on
    evaluation = screened_stage2(code, settings)
    assert evaluation.metrics["combined_score"] == 0.0 and evaluation.metrics["stage1_passed"] == 1.0
    assert evaluation.artifacts["failure"] == (
        "screened out: smoke val_loss 6.4000 ranks 4 of the 4 programs screened "
        "(PLASA_SCREEN_SHARE=0.5: the best 2 go on to the quick profile)"
    )
    assert rows(ledger, code) == ["smoke"]


def test_a_child_within_the_best_share_goes_on_to_the_full_profile_and_is_scored_there(run):
    settings, ledger = run
    code = child("0.5")
    record(ledger, code, "smoke", 6.15)  # 2nd of 4
    record(ledger, code, "quick", 5.90)  # its full-profile stage 2, answered from the ledger
    evaluation = screened_stage2(code, settings)
    assert evaluation.metrics["val_loss"] == 5.90 and evaluation.metrics["combined_score"] == pytest.approx(
        math.exp(-5.90)
    )
    assert evaluation.artifacts["screen"].startswith("smoke val_loss 6.1500 ranks 2 of the 4 programs screened")


def test_the_share_sets_how_many_go_on(run):
    settings, ledger = run
    code = child("0.5")
    record(ledger, code, "smoke", 6.25)  # 3rd of 4: out at half, in at three quarters
    record(ledger, code, "quick", 6.00)
    assert "screened out" in screened_stage2(code, settings).artifacts["failure"]
    settings.screen_share = 0.75
    assert screened_stage2(code, settings).metrics["val_loss"] == 6.00


def test_the_initial_program_is_never_screened_out(run):
    settings, ledger = run
    settings.screen_share = 0.25  # only the best of 4 would go on, and the initial program is 3rd
    record(ledger, SOURCE, "quick", 6.00)
    assert screened_stage2(SOURCE, settings).metrics["val_loss"] == 6.00


def test_without_a_screen_stage_2_trains_on_the_full_profile_only(run):
    settings, ledger = run
    settings.screen = "none"
    code = child("0.5")
    record(ledger, code, "quick", 6.05)
    assert screened_stage2(code, settings).metrics["val_loss"] == 6.05 and rows(ledger, code) == ["quick"]


def test_the_screen_trains_the_child_for_real_through_the_judge(run):
    """A real smoke-profile stage 2 in the sandbox: 20 steps leave the loss far above the planted
    screens, so the child is screened out, and the ledger holds its screen row only."""
    settings, ledger = run
    code = child("0.5")
    evaluation = evaluate_code(code, 2, settings)
    assert evaluation.artifacts["failure"].startswith("screened out: smoke val_loss ")
    assert "ranks 4 of the 4 programs screened" in evaluation.artifacts["failure"]
    screen = next(r for r in ledger.rows() if r["code_key"] == code_key(code))
    assert screen["profile"] == "smoke" and screen["runs"] == 1 and rows(ledger, code) == ["smoke"]


def test_the_start_of_run_estimate_counts_a_screen_for_every_child_and_the_full_stage_2_for_the_share(run):
    settings, ledger = run  # the initial program's screen took 60 s
    record(ledger, SOURCE, "quick", 6.00, stage=1, seconds=10.0)
    record(ledger, SOURCE, "quick", 6.00, seconds=200.0)
    fingerprint = corpus_of("auto").fingerprint
    cal = calibration(settings, ledger, fingerprint)
    screen = calibration(screen_settings(settings), ledger, fingerprint)
    assert expected_seconds_per_child(cal, settings, screen) == pytest.approx((10 + 60 + 0.5 * 200) / settings.parallel)
    settings.screen = "none"
    assert expected_seconds_per_child(cal, settings, None) == pytest.approx((10 + 200) / settings.parallel)


def test_a_screen_must_be_a_known_profile_cheaper_than_the_runs():
    with pytest.raises(ValueError, match="a screen must train for fewer steps than the quick profile, not full"):
        Settings(profile="quick", screen="full")
    with pytest.raises(ValueError, match="unknown screen 'tiny'"):
        Settings(profile="full", screen="tiny")
    with pytest.raises(ValueError, match="PLASA_SCREEN_SHARE must be in"):
        Settings(profile="full", screen="quick", screen_share=0)


def test_the_screen_reaches_the_evaluators_processes_through_the_environment(monkeypatch):
    env = Settings(profile="full", screen="quick", screen_share=0.25).to_env()
    assert env["PLASA_SCREEN"] == "quick" and env["PLASA_SCREEN_SHARE"] == "0.25"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    again = Settings()
    assert (again.screen, again.screen_share) == ("quick", 0.25)
