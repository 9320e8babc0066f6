"""The fitness rule: what a program's stage 2 counts for in a run, and the entry points.

    seeds    in an evolution run (settings.noise_aware), a stage-2 result that could be the best is
             confirmed on every seed of the run before it can win (see `noise_aware_stage2`).
    screen   with settings.screen (not none), stage 2 first trains on that cheaper profile, and only a program
             ranked within the best share of those screened goes on (see `screened_stage2`).
    entry    `evaluate_code` and `evaluate_file`: stage 1, stage 2, or the cascade of both.

One stage of one program (static checks, ledger, judge) is evaluation.stage's.
"""

import dataclasses
import math
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..contract import SCREENED_OUT, clamped_ppl
from ..settings import Settings
from .ledger import Ledger, code_key
from .sandbox import gpu_device_nodes
from .stage import Evaluation, _reference_text, corpus_of, evaluate_stage, failure_metrics, ledger_key, score

CONFIDENCE_Z = 1.0  # the score is a one-sided 84% lower bound on 1/ppl: mean loss + z * noise_sd / sqrt(seeds)


# ---------------------------------------------------------------------------------------------
# Stage 2 in an evolution run: noise-aware


def noise_sd(settings: Settings, ledger: Ledger, fingerprint: str) -> float | None:
    """The run's noise: the sd of the initial program's val_loss over the run's seeds (None until
    every seed is in the ledger)."""
    rows = ledger.seed_rows(ledger_key(_reference_text(), 2, settings, fingerprint))
    losses = [rows[s]["val_loss"] for s in settings.seeds if s in rows and rows[s].get("combined_score", 0) > 0]
    return statistics.stdev(losses) if len(losses) == len(settings.seeds) >= 2 else None


def pessimistic_loss(mean_loss: float, sd: float, n: int) -> float:
    return mean_loss + CONFIDENCE_Z * sd / math.sqrt(n)


def aggregate(per_seed: dict[int, dict], sd: float, all_seeds) -> dict:
    """One program's metrics over the seeds it was trained on: means, the per-seed losses, and the
    conservative score exp(-(mean loss + z sd / sqrt(n))) (capped like every score)."""
    seeds = sorted(per_seed)
    mean = lambda k: statistics.fmean(per_seed[s][k] for s in seeds)
    metrics = dict(per_seed[seeds[0]])
    for k in ("val_loss", "val_acc", "train_loss", "density", "train_seconds"):
        metrics[k] = mean(k)
    metrics["val_ppl"] = clamped_ppl(metrics["val_loss"])
    metrics["combined_score"] = score(clamped_ppl(pessimistic_loss(metrics["val_loss"], sd, len(seeds))))
    metrics.update({f"val_loss_seed{s}": per_seed[s]["val_loss"] for s in seeds})
    metrics.update(seeds=float(len(seeds)), confirmed=float(set(seeds) >= set(all_seeds)), noise_sd=sd)
    return metrics


def best_confirmed_loss(settings: Settings, ledger: Ledger, fingerprint: str) -> float | None:
    """The lowest mean val_loss of any program that passed on every seed of the run."""
    key = ledger_key("", 2, settings, fingerprint)  # the conditions; every program's rows under them
    means = [
        statistics.fmean(m["val_loss"] for m in by_seed.values())
        for by_seed in ledger.programs_with_seeds(key, settings.seeds).values()
        if all(m.get("combined_score", 0) > 0 for m in by_seed.values())
    ]
    return min(means) if means else None


def confirmation_count(settings: Settings, ledger: Ledger, fingerprint: str) -> tuple[int, int]:
    """(confirmation trainings, stage-2 trainings) in the ledger: a confirmation is a training of a
    program other than the initial one on a seed other than the run's first."""
    trainings = ledger.trainings(ledger_key("", 2, settings, fingerprint))
    initial = code_key(_reference_text())
    return sum(1 for code, seed in trainings if seed != settings.seed and code != initial), len(trainings)


def noise_aware_stage2(code: str, settings: Settings, on_line=None) -> Evaluation:
    """Stage 2. In a noise-aware run the first seed decides whether the program is a contender: a
    first-seed loss within `confirm_margin` noise sds of the best confirmed mean loss. A contender
    is trained on every other seed of the run (ledger first) and scored on all of them; anyone
    else keeps its single-seed score, which counts its one seed's noise in full
    (z * sd / sqrt(1)), so it cannot outrank a confirmed program by a lucky seed."""
    first = evaluate_stage(code, 2, settings, on_line)
    if not (settings.noise_aware and settings.ledger and first.passed):
        return first
    ledger = Ledger(settings.ledger)
    fingerprint = corpus_of(settings.corpus).fingerprint
    sd = noise_sd(settings, ledger, fingerprint)
    if sd is None:  # no noise floor yet (the initial program's seeds are still running)
        return first
    best = best_confirmed_loss(settings, ledger, fingerprint)
    loss = first.metrics["val_loss"]
    artifacts = dict(first.artifacts)
    others = [s for s in settings.seeds if s != settings.seed]
    contender = best is None or loss <= best + settings.confirm_margin * sd
    # One that would lead on its one seed's (full-noise) score is always confirmed: no unconfirmed
    # program may outrank the confirmed best. The budget only skips the near ones.
    would_lead = best is None or pessimistic_loss(loss, sd, 1) < pessimistic_loss(best, sd, len(settings.seeds))
    over_budget = False
    if contender and not would_lead:  # only then is the budget asked (it reads the ledger's rows)
        known = ledger.seed_rows(ledger_key(code, 2, settings, fingerprint))
        spent, trainings = confirmation_count(settings, ledger, fingerprint)
        over_budget = spent >= settings.confirm_share * trainings and any(s not in known for s in others)
    if over_budget:
        artifacts["confirmation"] = (
            f"a contender, not confirmed: confirmations already take {spent} of the run's {trainings} "
            f"stage-2 trainings (PLASA_CONFIRM_SHARE={settings.confirm_share:g}); it keeps its one seed's score"
        )
    elif contender:
        if on_line and others:
            on_line(
                f"contender: seed {settings.seed} val_loss {loss:.4f} against the best confirmed mean "
                f"{'none' if best is None else f'{best:.4f}'}: confirming on seeds {', '.join(map(str, others))}"
            )
        confirm = lambda s: evaluate_stage(code, 2, settings, on_line, seed=s)
        if gpu_device_nodes() and settings.device != "cpu":  # a GPU has room for the seeds side by side
            with ThreadPoolExecutor(max_workers=len(others)) as pool:
                confirmations = dict(zip(others, pool.map(confirm, others)))
        else:  # on CPU the cores are taken: one after the other, stopping at the first failure
            confirmations = {}
            for s in others:
                confirmations[s] = confirm(s)
                if not confirmations[s].passed:
                    break
        failed = next(((s, e) for s, e in confirmations.items() if not e.passed), None)
        if failed:
            failure = f"{failed[1].artifacts.get('failure', 'failed')} (confirmation seed {failed[0]})"
            return Evaluation(
                failure_metrics(failed[1].metrics) | {"stage1_passed": 1.0}, {**artifacts, "failure": failure}
            )
    else:
        artifacts["confirmation"] = (
            f"not a contender: seed-{settings.seed} val_loss {loss:.4f} is more than "
            f"{settings.confirm_margin:g} noise sd ({sd:.4f}) above the best confirmed mean "
            f"loss {best:.4f}"
        )
    # The score comes from the ledger's per-seed rows: whatever seeds this program was ever trained on.
    recorded = ledger.seed_rows(ledger_key(code, 2, settings, fingerprint))
    per_seed = {s: recorded[s] for s in settings.seeds if s in recorded and recorded[s].get("combined_score", 0) > 0}
    per_seed.setdefault(settings.seed, first.metrics)
    return Evaluation(aggregate(per_seed, sd, settings.seeds), artifacts, first.from_ledger, first.seconds)


# ---------------------------------------------------------------------------------------------
# Stage 2 behind a screening rung (settings.screen)


def screen_settings(settings: Settings) -> Settings:
    """The same conditions on the screen's cheaper profile, one seed, no confirmation."""
    return dataclasses.replace(settings, profile=settings.screen, screen="none", noise_aware=False)


def screen_rank(program: str, loss: float, screen: Settings, ledger: Ledger, fingerprint: str) -> tuple[int, int]:
    """(rank, n): where the screen val_loss of `program` (a code_key) falls among every program
    screened under the same conditions (itself included; 1 is the best)."""
    screened = ledger.programs_with_seeds(ledger_key("", 2, screen, fingerprint), (screen.seed,))
    others = [
        by_seed[screen.seed]["val_loss"]
        for other, by_seed in screened.items()
        if other != program and by_seed[screen.seed].get("combined_score", 0) > 0
    ]
    return 1 + sum(1 for other in others if other < loss), len(others) + 1


def screened_stage2(code: str, settings: Settings, on_line=None) -> Evaluation:
    """Stage 2 with a screening rung: the program is first trained on the screen's cheaper profile,
    and goes on to the full stage 2 (and to confirmation) only when its screen val_loss ranks within
    the best `screen_share` of the programs the run has screened (the initial program always does:
    it is the run's reference). One screened out keeps a failure's score, with its rank as the reason,
    so no screen number is ever compared with a full-profile one."""
    if settings.screen == "none" or not settings.ledger:  # ranks need the run's ledger
        return noise_aware_stage2(code, settings, on_line)
    screen = screen_settings(settings)
    screened = evaluate_stage(code, 2, screen, on_line)
    if not screened.passed:
        failure = f"screen ({settings.screen} profile) {screened.artifacts.get('failure', 'failed')}"
        return Evaluation(screened.metrics | {"stage1_passed": 1.0}, {**screened.artifacts, "failure": failure})
    loss = screened.metrics["val_loss"]
    program = code_key(code)
    rank, n = screen_rank(program, loss, screen, Ledger(settings.ledger), corpus_of(settings.corpus).fingerprint)
    promoted = max(1, math.ceil(settings.screen_share * n))
    verdict = (
        f"{settings.screen} val_loss {loss:.4f} ranks {rank} of the {n} programs screened "
        f"(PLASA_SCREEN_SHARE={settings.screen_share:g}: the best {promoted} go on to the {settings.profile} profile)"
    )
    if rank > promoted and program != code_key(_reference_text()):
        return Evaluation(
            failure_metrics(screened.metrics) | {"stage1_passed": 1.0},
            {"failure": SCREENED_OUT + verdict},
            screened.from_ledger,
            screened.seconds,
        )
    if on_line:
        on_line(f"screen: {verdict}")
    full = noise_aware_stage2(code, settings, on_line)
    full.artifacts["screen"] = verdict
    full.seconds += screened.seconds
    return full


# ---------------------------------------------------------------------------------------------
# Entry points


def evaluate_code(code: str, stage: str | int, settings: Settings, on_line=None) -> Evaluation:
    """stage 1, 2, or "all" (stage 1, then stage 2 if stage 1 passed: the cascade)."""
    if str(stage) == "1":
        return evaluate_stage(code, 1, settings, on_line)
    if str(stage) == "2":
        return screened_stage2(code, settings, on_line)
    first = evaluate_stage(code, 1, settings, on_line)
    if not first.passed:
        return first
    second = screened_stage2(code, settings, on_line)
    second.metrics["stage1_passed"] = 1.0
    return Evaluation(
        second.metrics,
        {**first.artifacts, **second.artifacts},
        first.from_ledger and second.from_ledger,
        first.seconds + second.seconds,
    )


def evaluate_file(
    path: str | Path, stage: str | int = "all", settings: Settings | None = None, on_line=None
) -> Evaluation:
    settings = settings or Settings()
    try:
        code = Path(path).read_text(encoding="utf-8")  # UTF-8 whatever the locale, as Python reads a source file
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason} at byte {e.start})"
        return Evaluation(failure_metrics(), dict(failure=f"cannot read the program {path}: {reason}"))
    return evaluate_code(code, stage, settings, on_line)
