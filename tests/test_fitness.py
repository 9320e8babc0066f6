"""Noise-aware fitness: what a run's "best" means, from real ledger rows.

Most tests write the per-seed rows into a real SQLite ledger and let the real pipeline answer from
it (static checks, corpus, ledger lookup, confirmation, aggregate): the decisions are exact and
nothing trains. One test trains, to show that common random numbers hold in the worker itself.
"""

import math

import pytest
import torch

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.contract import HARNESS_VERSION
from plasa_lab.evaluation.fitness import CONFIDENCE_Z, confirmed_gains, noise_aware_stage2, run_noise
from plasa_lab.evaluation.ledger import Key, Ledger, code_key, code_sha256
from plasa_lab.evaluation.stage import corpus_of, failure_metrics, passed_metrics
from plasa_lab.settings import Settings

SOURCE = INITIAL_PROGRAM.read_text()
SEEDS = (42, 43, 44)
INITIAL_LOSSES = {42: 6.30, 43: 6.34, 44: 6.26}  # sd 0.04
SD = 0.04


def child(weight="0.2"):
    """A program that differs from the initial one (another indexer loss weight)."""
    return SOURCE.replace("INDEXER_LOSS_WEIGHT = 0.1", f"INDEXER_LOSS_WEIGHT = {weight}", 1)


def record(ledger, code, losses: dict, passed=True):
    fingerprint = corpus_of("auto").fingerprint
    for seed, loss in losses.items():
        key = Key(code_key(code), 2, "smoke", seed, fingerprint, HARNESS_VERSION)
        measured = dict(
            val_loss=loss,
            val_ppl=math.exp(loss),
            val_acc=0.2,
            train_loss=loss,
            density=0.6,
            indexer_params=83968.0,
            nonembed_params=1526912.0,
            train_seconds=1.0,
        )
        metrics = passed_metrics(measured, 2) if passed else failure_metrics(measured)
        # 60 s a row: the time limits of anything that does train here are multiples of the initial program's
        ledger.put(key, code_sha256(code), metrics, {} if passed else {"failure": "stage 2: broken"}, 60.0)


@pytest.fixture
def run(tmp_path):
    """A noise-aware run's settings and ledger, with the initial program's noise floor recorded."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    record(ledger, SOURCE, INITIAL_LOSSES)
    settings = Settings(profile="smoke", ledger=str(ledger.path), seeds=SEEDS, noise_aware=True, confirm_margin=0.0)
    return settings, ledger


def trained_seeds(ledger, code):
    return sorted(r["seed"] for r in ledger.rows() if r["code_key"] == code_key(code))


def test_initial_program_is_scored_over_its_seeds_with_the_confidence_penalty(run):
    settings, ledger = run
    m = noise_aware_stage2(SOURCE, settings).metrics
    mean = sum(INITIAL_LOSSES.values()) / 3
    assert m["confirmed"] == 1.0 and m["seeds"] == 3.0
    assert m["val_loss"] == pytest.approx(mean) and m["noise_sd"] == pytest.approx(SD)
    assert m["combined_score"] == pytest.approx(math.exp(-(mean + CONFIDENCE_Z * SD / math.sqrt(3))))
    assert {s: m[f"val_loss_seed{s}"] for s in SEEDS} == INITIAL_LOSSES


def test_a_contender_is_trained_on_its_missing_seeds_and_scored_from_the_ledgers_rows(run):
    """Seeds 42 and 43 are in the ledger, seed 44 is not: it trains (for real), and the score is the
    aggregate of the three rows the ledger then holds."""
    settings, ledger = run
    code = child()
    record(ledger, code, {42: 6.25, 43: 6.31})  # first seed below the best mean 6.30: a contender
    lines = []
    evaluation = noise_aware_stage2(code, settings, on_line=lines.append)
    m = evaluation.metrics
    assert any("contender" in line and "confirming on seed 44" in line for line in lines)
    assert "confirmation" not in evaluation.artifacts  # neither "not a contender" nor "not confirmed"
    assert trained_seeds(ledger, code) == [42, 43, 44]
    trained = next(r for r in ledger.rows() if r["code_key"] == code_key(code) and r["seed"] == 44)
    assert trained["runs"] == 1 and m["confirmed"] == 1.0 and m["seeds"] == 3.0
    assert [m[f"val_loss_seed{s}"] for s in (42, 43)] == [6.25, 6.31]
    assert m["val_loss"] == pytest.approx((6.25 + 6.31 + m["val_loss_seed44"]) / 3)


def test_confirmations_stop_at_their_share_of_the_trainings_except_for_a_would_be_leader(run):
    """Once confirmations hold PLASA_CONFIRM_SHARE of the stage-2 trainings, a near contender keeps its
    one seed (and its full-noise score, below the confirmed best) instead of training the others; one
    whose single seed would outrank the confirmed best is confirmed all the same."""
    settings, ledger = run
    best = noise_aware_stage2(SOURCE, settings).metrics
    record(ledger, child("0.3"), {42: 6.29, 43: 6.33, 44: 6.31})
    record(ledger, child("0.4"), {42: 6.28, 43: 6.35, 44: 6.30})  # 4 confirmations in 9 trainings
    near = child()
    record(ledger, near, {42: 6.29})  # a contender (below the best on seed 42), not a leader on one seed
    evaluation = noise_aware_stage2(near, settings)
    assert "not confirmed: confirmations already take 4 of the run's 10" in evaluation.artifacts["confirmation"]
    assert evaluation.metrics["confirmed"] == 0.0 and trained_seeds(ledger, near) == [42]
    assert evaluation.metrics["combined_score"] < best["combined_score"]
    leader = child("0.6")
    record(ledger, leader, {42: 6.20, 43: 6.22, 44: 6.24})  # 6.20 + sd would outrank 6.30 + sd/sqrt(3)
    assert noise_aware_stage2(leader, settings).metrics["confirmed"] == 1.0


def test_a_negative_margin_or_a_share_outside_0_to_1_is_refused():
    with pytest.raises(ValueError, match="PLASA_CONFIRM_MARGIN must be at least 0"):
        Settings(profile="smoke", confirm_margin=-0.5)
    with pytest.raises(ValueError, match="PLASA_CONFIRM_SHARE must be in"):
        Settings(profile="smoke", confirm_share=1.5)


def test_a_poor_child_is_not_confirmed_and_pays_its_single_seed_noise_in_full(run):
    settings, ledger = run
    code = child()
    record(ledger, code, {42: 6.50})  # well above the best confirmed mean: not a contender
    evaluation = noise_aware_stage2(code, settings)
    m = evaluation.metrics
    assert m["confirmed"] == 0.0 and m["seeds"] == 1.0 and "not a contender" in evaluation.artifacts["confirmation"]
    assert m["combined_score"] == pytest.approx(math.exp(-(6.50 + CONFIDENCE_Z * SD)))
    assert trained_seeds(ledger, code) == [42]  # nothing else was trained


def test_one_lucky_seed_cannot_replace_a_confirmed_best(run):
    settings, ledger = run
    best = noise_aware_stage2(SOURCE, settings).metrics
    lucky = child("0.3")
    record(ledger, lucky, {42: 6.22, 43: 6.36, 44: 6.35})  # seed 42 two sds lucky; its mean is worse
    m = noise_aware_stage2(lucky, settings).metrics
    assert m["confirmed"] == 1.0 and m["combined_score"] < best["combined_score"]


def test_no_unconfirmed_child_can_outrank_the_confirmed_best(run):
    """Whatever its first seed, a child that is not a contender scores below the best confirmed."""
    settings, ledger = run
    best = noise_aware_stage2(SOURCE, settings).metrics
    for i, loss in enumerate([6.301, 6.35, 6.5, 7.0]):  # every non-contender first seed (margin 0)
        code = child(f"0.{i + 5}")
        record(ledger, code, {42: loss})
        m = noise_aware_stage2(code, settings).metrics
        assert m["confirmed"] == 0.0 and m["combined_score"] < best["combined_score"]


def test_a_child_is_a_contender_by_its_paired_difference_on_the_first_seed_not_by_the_best_mean(tmp_path):
    """The initial program's seed 42 is its worst of three: a child better than it on seed 42 but
    above its 3-seed mean is a contender (the unpaired rule turned it away) and, confirmed, outranks it."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    record(ledger, SOURCE, {42: 6.36, 43: 6.28, 44: 6.26})  # mean 6.30
    settings = Settings(profile="smoke", ledger=str(ledger.path), seeds=SEEDS, noise_aware=True, confirm_margin=0.0)
    initial = noise_aware_stage2(SOURCE, settings).metrics
    code = child()
    record(ledger, code, {42: 6.33, 43: 6.25, 44: 6.23})  # 0.03 better on every seed
    evaluation = noise_aware_stage2(code, settings)
    m = evaluation.metrics
    assert "confirmation" not in evaluation.artifacts and m["confirmed"] == 1.0
    assert m["combined_score"] > initial["combined_score"]
    assert m["vs_initial_pct"] == pytest.approx(100 * math.expm1(-0.03))


def test_a_clear_loser_stops_at_the_seed_that_shows_it(run):
    """Seed 42 (in the ledger) makes it a contender; seed 43 trains for real, on the smoke profile,
    far above the recorded losses: it can no longer lead, and seed 44 is never trained."""
    settings, ledger = run
    code = child()
    record(ledger, code, {42: 6.25})
    lines = []
    evaluation = noise_aware_stage2(code, settings, on_line=lines.append)
    assert any("confirming on seeds 43, 44 while it can still lead" in line for line in lines)
    assert evaluation.artifacts["confirmation"].startswith("stopped after seed 43: it can no longer lead")
    assert trained_seeds(ledger, code) == [42, 43]
    assert evaluation.metrics["seeds"] == 2.0 and evaluation.metrics["confirmed"] == 0.0


def test_the_paired_sd_comes_from_the_runs_own_pairs_once_they_have_enough_degrees_of_freedom(run):
    settings, ledger = run
    fingerprint = corpus_of("auto").fingerprint
    record(ledger, child("0.3"), {42: 6.29, 43: 6.33, 44: 6.31})  # differences -0.01, -0.01, +0.05
    noise = run_noise(settings, ledger, fingerprint)
    assert noise.pairs_df == 0 and noise.paired_sd == pytest.approx(SD)  # 2 df: the seed sd stands in
    record(ledger, child("0.4"), {42: 6.28, 43: 6.35, 44: 6.30})  # differences -0.02, +0.01, +0.04
    noise = run_noise(settings, ledger, fingerprint)
    pooled = math.sqrt(((0.02**2 + 0.02**2 + 0.04**2) + (0.03**2 + 0 + 0.03**2)) / 4)
    assert noise.pairs_df == 4 and noise.paired_sd == pytest.approx(pooled)
    one_seed = child("0.5")
    record(ledger, one_seed, {42: 6.50})
    evaluation = noise_aware_stage2(one_seed, settings)
    m = evaluation.metrics
    assert m["paired_sd"] == pytest.approx(pooled) and m["noise_sd"] == pytest.approx(SD)
    assert f"noise sd of a difference {pooled:.4f}" in evaluation.artifacts["confirmation"]
    # the score's penalty keeps the run's seed sd: scores given before the pairs came in stay comparable
    assert m["combined_score"] == pytest.approx(math.exp(-(6.30 + 0.20 + CONFIDENCE_Z * SD)))


def test_a_confirmed_gain_is_better_than_the_initial_program_beyond_noise_paired(run):
    settings, ledger = run
    fingerprint = corpus_of("auto").fingerprint
    gain, tie = child("0.3"), child("0.4")
    record(ledger, gain, {42: 6.27, 43: 6.305, 44: 6.23})  # 0.03-0.035 better on every seed
    record(ledger, tie, {42: 6.25, 43: 6.37, 44: 6.27})  # better on one seed, worse on two
    record(ledger, child("0.5"), {42: 6.20})  # one seed: never confirmed
    assert confirmed_gains(settings, ledger, fingerprint) == [code_key(gain)]


def test_a_child_failing_a_confirmation_seed_fails(run):
    settings, ledger = run
    code = child()
    record(ledger, code, {42: 6.20})
    record(ledger, code, {43: 6.30}, passed=False)
    evaluation = noise_aware_stage2(code, settings)
    assert evaluation.metrics["combined_score"] == 0.0 and "confirmation seed 43" in evaluation.artifacts["failure"]


def test_without_a_noise_floor_the_first_seed_is_the_score(tmp_path):
    settings = Settings(profile="smoke", ledger=str(tmp_path / "l.sqlite"), seeds=SEEDS, noise_aware=True)
    ledger = Ledger(settings.ledger)
    code = child()
    record(ledger, code, {42: 6.4})
    m = noise_aware_stage2(code, settings).metrics
    assert m["val_loss"] == 6.4 and "confirmed" not in m


def test_training_batches_dropout_and_validation_windows_do_not_depend_on_the_program(tmp_path, monkeypatch):
    """Common random numbers: two programs whose initialisations draw different amounts of
    randomness see the same batches in the same order, the same dropout masks and the same windows."""
    from plasa_lab.data.tokens import train_batches, val_windows
    from plasa_lab.evaluation.recipe import InProcessBlocks
    from plasa_lab.evaluation.sandboxed.trunk import Selections, build_trunk, train

    monkeypatch.chdir(tmp_path)  # the worker writes program.py into its folder
    corpus = corpus_of("auto")
    greedy = SOURCE.replace(
        "def init_indexer(indexer, layer):\n",
        "def init_indexer(indexer, layer):\n    torch.randn(12345 * (layer + 1))\n",
        1,
    )
    seen = {}
    for name, code in (("initial", SOURCE), ("greedy", greedy)):
        device = torch.device("cpu")
        link = InProcessBlocks(code, 42, device, training=True)  # the blocks draw their randomness first
        selections = Selections(link.schedule, device)
        torch.manual_seed(42)  # the trunk's initialisation, as the judge seeds it
        model = build_trunk(SOURCE, selections)
        batches, masks = [], []

        def recorded(it, batches=batches):
            for batch in it:
                batches.append(batch.clone())
                yield batch

        model.blocks[1].dropout.register_forward_hook(lambda m, i, out, masks=masks: masks.append((out == 0).clone()))
        train(model, selections, link, recorded(train_batches(corpus.train, 2, 128, 42)), 2, device, 42, 1)
        seen[name] = (batches, masks)
    assert (
        all(torch.equal(a, b) for a, b in zip(seen["initial"][0], seen["greedy"][0])) and len(seen["initial"][0]) == 2
    )
    assert all(torch.equal(a, b) for a, b in zip(seen["initial"][1], seen["greedy"][1])) and seen["initial"][1]
    assert torch.equal(val_windows(corpus.val, 8, 128), val_windows(corpus.val, 8, 128))
