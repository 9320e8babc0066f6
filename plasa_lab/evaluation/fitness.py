"""The fitness rule: what a program's stage 2 counts for in a run, and the entry points.

    seeds    in an evolution run (settings.noise_aware), a stage-2 result that could be the best is
             confirmed seed by seed, compared paired with the best and the initial program on the
             seeds they share, before it can win (see `noise_aware_stage2`).
    screen   with settings.screen (not none), stage 2 first trains on that cheaper profile, and only a program
             ranked within the best share of those screened goes on (see `screened_stage2`).
    entry    `evaluate_code` and `evaluate_file`: stage 1, stage 2, or the cascade of both.

One stage of one program (static checks, ledger, judge) is evaluation.stage's.
"""

import dataclasses
import math
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..contract import SCREENED_OUT, clamped_ppl
from ..settings import Settings
from ..stats import pooled_paired_sd, verdict
from .ledger import Ledger, code_key
from .sandbox import gpu_device_nodes
from .stage import Evaluation, _reference_text, corpus_of, evaluate_stage, failure_metrics, ledger_key, score

CONFIDENCE_Z = 1.0  # the score is a one-sided 84% lower bound on 1/ppl (see `RunNoise.pessimistic_loss`)
MIN_PAIRED_DF = 4  # the run's own pairs replace the seed sd once they hold this many degrees of freedom


# ---------------------------------------------------------------------------------------------
# Stage 2 in an evolution run: noise-aware, every comparison paired by seed


@dataclass(frozen=True)
class RunNoise:
    """What a run knows of its noise, from its ledger. Every program trains on a seed from the same
    trunk initialisation, batches and dropout masks, so two programs compared on the seeds both were
    trained on share most of their noise; `paired_sd` is the sd of such a difference on one seed."""

    initial: dict[int, float]  # the initial program's val_loss per seed of the run
    seed_sd: float  # its sd over the seeds: what a seed moves one program's loss by
    paired_sd: float  # of a paired difference on one seed (the seed sd until the run has enough pairs)
    pairs_df: int  # the degrees of freedom behind paired_sd (0: the seed sd stands in)

    @property
    def initial_mean(self) -> float:
        return statistics.fmean(self.initial.values())

    def effect(self, losses: dict[int, float]) -> float:
        """A program's mean val_loss difference from the initial program on the seeds both have."""
        return statistics.fmean(losses[s] - self.initial[s] for s in losses)

    def pessimistic_loss(self, losses: dict[int, float]) -> float:
        """The score's loss: the initial program's mean over the run's seeds, plus the program's paired
        effect, plus z seed sds over sqrt(its seeds). On every seed of the run the first two are its
        own mean; on fewer they estimate it, and a single seed pays a full seed sd.

        The penalty takes the seed sd, fixed once the noise floor is in, not the paired sd, which the
        run re-estimates as pairs come in: OpenEvolve keeps each program's score from the moment it
        was evaluated, so a penalty that moved would rank programs scored at different times on
        different scales, and could let an unconfirmed program outrank the confirmed best's older
        score. The paired sd decides what is trained (`can_lead`), where a moment's estimate is right."""
        return self.initial_mean + self.effect(losses) + CONFIDENCE_Z * self.seed_sd / math.sqrt(len(losses))


def passed_losses(by_seed: dict[int, dict], seeds) -> dict[int, float]:
    return {s: by_seed[s]["val_loss"] for s in seeds if s in by_seed and by_seed[s].get("combined_score", 0) > 0}


def run_noise(settings: Settings, ledger: Ledger, fingerprint: str) -> RunNoise | None:
    """The run's noise from its ledger; None until the initial program passed on every seed. The
    paired sd is pooled over every other program trained on two or more of the run's seeds."""
    programs = ledger.programs(ledger_key("", 2, settings, fingerprint))
    initial_key = code_key(_reference_text())
    initial = passed_losses(programs.pop(initial_key, {}), settings.seeds)
    if len(initial) != len(settings.seeds) or len(initial) < 2:
        return None
    differences = [
        [loss - initial[s] for s, loss in passed_losses(by_seed, settings.seeds).items()]
        for by_seed in programs.values()
    ]
    seed_sd = statistics.stdev(initial.values())
    paired, df = pooled_paired_sd(differences)
    if paired is None or df < MIN_PAIRED_DF:
        return RunNoise(initial, seed_sd, seed_sd, 0)
    return RunNoise(initial, seed_sd, paired, df)


def aggregate(per_seed: dict[int, dict], noise: RunNoise, all_seeds) -> dict:
    """One program's metrics over the seeds it was trained on: means, the per-seed losses, its paired
    change against the initial program, and the conservative score exp(-pessimistic loss) (capped
    like every score)."""
    seeds = sorted(per_seed)
    mean = lambda k: statistics.fmean(per_seed[s][k] for s in seeds)
    metrics = dict(per_seed[seeds[0]])
    for k in ("val_loss", "val_acc", "train_loss", "density", "train_seconds"):
        metrics[k] = mean(k)
    losses = {s: per_seed[s]["val_loss"] for s in seeds}
    metrics["val_ppl"] = clamped_ppl(metrics["val_loss"])
    metrics["combined_score"] = score(clamped_ppl(noise.pessimistic_loss(losses)))
    metrics.update({f"val_loss_seed{s}": per_seed[s]["val_loss"] for s in seeds})
    metrics.update(seeds=float(len(seeds)), confirmed=float(set(seeds) >= set(all_seeds)))
    metrics.update(
        vs_initial_pct=100 * math.expm1(noise.effect(losses)), noise_sd=noise.seed_sd, paired_sd=noise.paired_sd
    )
    return metrics


def best_confirmed(settings: Settings, ledger: Ledger, fingerprint: str) -> dict[int, float]:
    """The val_loss per seed of the confirmed program (passed on every seed of the run) with the
    lowest mean; the initial program is one, so a run with a noise floor always has one."""
    confirmed = [
        passed_losses(by_seed, settings.seeds)
        for by_seed in ledger.programs_with_seeds(ledger_key("", 2, settings, fingerprint), settings.seeds).values()
    ]
    confirmed = [losses for losses in confirmed if len(losses) == len(settings.seeds)]
    return min(confirmed, key=lambda losses: statistics.fmean(losses.values()))


def confirmation_count(settings: Settings, ledger: Ledger, fingerprint: str) -> tuple[int, int]:
    """(confirmation trainings, stage-2 trainings) in the ledger: a confirmation is a training of a
    program other than the initial one on a seed other than the run's first."""
    trainings = ledger.trainings(ledger_key("", 2, settings, fingerprint))
    initial = code_key(_reference_text())
    return sum(1 for code, seed in trainings if seed != settings.seed and code != initial), len(trainings)


def confirmed_gains(settings: Settings, ledger: Ledger, fingerprint: str) -> list[str]:
    """code_keys of the programs confirmed on every seed of the run and better than the initial
    program beyond noise (paired t-test over those seeds)."""
    noise = run_noise(settings, ledger, fingerprint)
    if noise is None:
        return []
    programs = ledger.programs_with_seeds(ledger_key("", 2, settings, fingerprint), settings.seeds)
    gains = []
    for code, by_seed in programs.items():
        losses = passed_losses(by_seed, settings.seeds)
        if len(losses) == len(settings.seeds) and verdict(losses, noise.initial)[0] == "better beyond noise":
            gains.append(code)
    return gains


def can_lead(losses: dict[int, float], best: dict[int, float], noise: RunNoise, margin: float) -> bool:
    """Whether a program is still a contender on the seeds it has: its paired difference from the best
    confirmed program, on those seeds, at most `margin` paired sds of their mean; or its score on them
    would already outrank the best's (no unconfirmed program may lead the run)."""
    seeds = sorted(losses)
    difference = statistics.fmean(losses[s] - best[s] for s in seeds)
    near = difference <= margin * noise.paired_sd / math.sqrt(len(seeds))
    return near or noise.pessimistic_loss(losses) < noise.pessimistic_loss(best)


def noise_aware_stage2(code: str, settings: Settings, on_line=None) -> Evaluation:
    """Stage 2. In a noise-aware run each seed decides whether the program goes on to the next: it
    does while it can still lead (`can_lead`: paired against the best confirmed program on the seeds
    both have), so a contender is confirmed seed by seed and a clear loser stops early. Scored on
    every seed it was trained on (ledger first), paired against the initial program, with a penalty
    that shrinks with its seeds (`RunNoise.pessimistic_loss`), so a lucky first seed cannot outrank
    a confirmed program."""
    first = evaluate_stage(code, 2, settings, on_line)
    if not (settings.noise_aware and settings.ledger and first.passed):
        return first
    ledger = Ledger(settings.ledger)
    fingerprint = corpus_of(settings.corpus).fingerprint
    noise = run_noise(settings, ledger, fingerprint)
    if noise is None:  # no noise floor yet (the initial program's seeds are still running)
        return first
    best = best_confirmed(settings, ledger, fingerprint)
    key = ledger_key(code, 2, settings, fingerprint)
    losses = passed_losses(ledger.seed_rows(key), settings.seeds) | {settings.seed: first.metrics["val_loss"]}
    artifacts = dict(first.artifacts)
    others = [s for s in settings.seeds if s not in losses]
    contender = can_lead(losses, best, noise, settings.confirm_margin)
    # The budget only holds back a contender that would not lead on the seeds it has.
    leader = noise.pessimistic_loss(losses) < noise.pessimistic_loss(best)
    spent, trainings = confirmation_count(settings, ledger, fingerprint) if contender and others else (0, 0)
    if contender and others and not leader and spent >= settings.confirm_share * trainings:
        artifacts["confirmation"] = (
            f"a contender, not confirmed: confirmations already take {spent} of the run's {trainings} "
            f"stage-2 trainings (PLASA_CONFIRM_SHARE={settings.confirm_share:g}); it keeps the score of its seeds"
        )
    elif contender and others:
        if on_line:
            on_line(
                f"contender: {_against_best(losses, best, noise)}: confirming on seed"
                f"{'s' * (len(others) > 1)} {', '.join(map(str, others))} while it can still lead"
            )
        confirm = lambda s: evaluate_stage(code, 2, settings, on_line, seed=s)
        confirmations = {}
        if gpu_device_nodes() and settings.device != "cpu":  # a GPU has room for the seeds side by side
            with ThreadPoolExecutor(max_workers=len(others)) as pool:
                confirmations = dict(zip(others, pool.map(confirm, others)))
        else:  # on CPU the cores are taken: seed by seed, stopping once it cannot lead or fails
            for s in others:
                confirmations[s] = confirm(s)
                if not confirmations[s].passed:
                    break
                losses[s] = confirmations[s].metrics["val_loss"]
                if s != others[-1] and not can_lead(losses, best, noise, settings.confirm_margin):
                    artifacts["confirmation"] = (
                        f"stopped after seed {s}: it can no longer lead ({_against_best(losses, best, noise)})"
                    )
                    break
        failed = next(((s, e) for s, e in confirmations.items() if not e.passed), None)
        if failed:
            failure = f"{failed[1].artifacts.get('failure', 'failed')} (confirmation seed {failed[0]})"
            return Evaluation(
                failure_metrics(failed[1].metrics) | {"stage1_passed": 1.0}, {**artifacts, "failure": failure}
            )
    elif others:
        artifacts["confirmation"] = f"not a contender: {_against_best(losses, best, noise)}"
    # The score comes from the ledger's per-seed rows: whatever seeds this program was ever trained on.
    recorded = ledger.seed_rows(key)
    per_seed = {s: recorded[s] for s in settings.seeds if s in recorded and recorded[s].get("combined_score", 0) > 0}
    per_seed.setdefault(settings.seed, first.metrics)
    return Evaluation(aggregate(per_seed, noise, settings.seeds), artifacts, first.from_ledger, first.seconds)


def _against_best(losses: dict[int, float], best: dict[int, float], noise: RunNoise) -> str:
    seeds = sorted(losses)
    difference = statistics.fmean(losses[s] - best[s] for s in seeds)
    return (
        f"val_loss {difference:+.4f} against the best confirmed program on seed{'s' * (len(seeds) > 1)} "
        f"{', '.join(map(str, seeds))} (paired; noise sd of a difference {noise.paired_sd:.4f})"
    )


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
