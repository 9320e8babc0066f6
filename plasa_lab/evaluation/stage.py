"""The evaluation pipeline: static checks, the ledger, then each stage judged outside the child's code.

    static   syntax, EVOLVE-BLOCK integrity, the block code allow-lists (plasa_lab.program.checks): a quick,
             friendly first filter whose one line teaches the LLM, run before anything else.
    ledger   the same program (by its normalised code) under the same conditions is answered at once.
    stage 1  the judge (plasa_lab.evaluation.judge): build, schedule and budget checks, 12 training steps whose
             loss must fall, behavioural probes and one validation batch, all scored outside the
             sandboxed processes that run the child's code.
    stage 2  the same with the profile's full training and validation.
    seeds    in an evolution run (settings.noise_aware), a stage-2 result that could be the best is
             confirmed on every seed of the run before it can win (see `noise_aware_stage2`).
    screen   with settings.screen (not none), stage 2 first trains on that cheaper profile, and only a program
             ranked within the best share of those screened goes on (see `screened_stage2`).

Every result holds every metric of docs/contract.md section 4; a failure scores 0.0 and says why in one
line (artifact `failure`). Time limits are multiples of what the initial program needs on this
machine, now (`Calibration`), so a loaded machine does not fail honest children.
"""

import dataclasses
import functools
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import INITIAL_PROGRAM
from ..contract import (
    DESCRIPTIVE_KEYS,
    HARNESS_VERSION,
    METRIC_KEYS,
    PPL_CAP,
    SCREENED_OUT,
    STAGE1_TRAINING_STEPS,
    clamped_ppl,
    get_profile,
)
from ..data import corpora
from ..program.checks import static_violation
from ..settings import Settings
from .hardware import load_factor
from .jobs import Job, StageResult
from .ledger import Key, Ledger, code_key, code_sha256
from .local_runner import run_local
from .ray_runner import run_ray  # imports ray only inside its functions: ray stays optional
from .sandbox import gpu_device_nodes

# Where a stage runs (Settings.runner): the judge here, its workers sandboxed on this machine, or the
# same on a Ray node. Both take a Job and return a StageResult.
RUNNERS = {"local": run_local, "ray": run_ray}
STDERR_ARTIFACT_CHARS = 4000
CONFIDENCE_Z = 1.0  # the score is a one-sided 84% lower bound on 1/ppl: mean loss + z * noise_sd / sqrt(seeds)


@dataclass
class Evaluation:
    metrics: dict
    artifacts: dict = field(default_factory=dict)
    from_ledger: bool = False
    seconds: float = 0.0  # wall time of this stage when it ran (the ledger's record when it did not)

    @property
    def passed(self):
        return self.metrics["combined_score"] > 0


def score(val_ppl: float) -> float:
    return 1.0 / min(max(val_ppl, 1.0), PPL_CAP)


def failure_metrics(measured: dict | None = None) -> dict:
    """A failure: score 0, the worst quality values, and what was measured before it failed."""
    metrics = dict.fromkeys(METRIC_KEYS, 0.0)
    metrics.update(val_ppl=PPL_CAP, val_loss=math.log(PPL_CAP))
    metrics.update({k: float(v) for k, v in (measured or {}).items() if k in DESCRIPTIVE_KEYS})
    return metrics


def passed_metrics(measured: dict, stage: int) -> dict:
    metrics = failure_metrics()
    metrics.update({k: float(v) for k, v in measured.items() if k in METRIC_KEYS})
    metrics["combined_score"] = score(metrics["val_ppl"])
    metrics["stage1_passed"] = 1.0  # stage 2 runs every check of stage 1 before it scores
    metrics["stage2_passed"] = 1.0 if stage == 2 else 0.0
    return metrics


@functools.lru_cache(maxsize=None)
def corpus_of(name: str):
    """The corpus, built or loaded once per process."""
    return corpora.prepare_corpus(name, log=lambda line: print(line, file=sys.stderr, flush=True))


def describe_corpus(corpus) -> str:
    m = corpus.manifest
    return (
        f"{corpus.name} ({m.get('tokenizer', {}).get('source')}; train {m.get('train_tokens')} tokens, "
        f"val {m.get('val_tokens')} tokens; fingerprint {corpus.fingerprint[:16]})"
    )


def validation_windows(profile, val_tokens: int, whole: bool) -> int:
    """How many windows stage 2 validates on: the profile's first ones, or every window of the split."""
    return val_tokens // (profile.seq_len + 1) if whole else profile.val_windows


def describe_validation(profile, whole: bool) -> str:
    if whole:
        return "the whole validation split"
    return (
        f"{profile.val_batches} val batches (the first {profile.val_windows} windows of {profile.seq_len + 1} tokens)"
    )


# ---------------------------------------------------------------------------------------------
# Time limits: multiples of what the initial program needs here, now

DEFAULT_STAGE1_SECONDS = 300.0  # before anything is measured: generous for a loaded 2-core machine
DEFAULT_SECONDS_PER_STEP = 1.5  # likewise (about 0.3 s here when idle, far less on a GPU)
LIMIT_FLOOR_SECONDS = 30.0  # starting three sandboxed processes alone takes seconds on a busy machine


@dataclass
class Calibration:
    """What the reference program (the initial program) needed on this machine, from the ledger."""

    multiple: float
    stage1_seconds: float | None = None  # its stage 1, wall
    step_seconds: float | None = None  # its seconds per training step (from stage 1)
    stage2_seconds: float | None = None  # its stage 2 on the profile's windows, wall

    def limit(self, stage: int, profile, val_windows: int) -> tuple[float, str]:
        """(seconds, how they were set: the failure line's words)."""
        m = self.multiple
        if stage == 1:
            if self.stage1_seconds is None:
                return (
                    DEFAULT_STAGE1_SECONDS * m / 3,
                    f"the default limit of {DEFAULT_STAGE1_SECONDS * m / 3:.0f} s (nothing measured here yet)",
                )
            return self._floor(
                m * self.stage1_seconds
            ), f"{m:g}x the initial program's time here ({self.stage1_seconds:.0f} s)"
        extra_batches = max(0, val_windows - profile.val_windows) / profile.batch_size
        if self.stage2_seconds is not None:
            per_batch = (self.step_seconds or DEFAULT_SECONDS_PER_STEP) / 2  # a forward: well under a step
            estimate = self.stage2_seconds + extra_batches * per_batch
            return self._floor(m * estimate), f"{m:g}x the initial program's time here ({estimate:.0f} s)"
        if self.step_seconds is not None:  # the initial program's own stage 2: estimated from its stage 1
            overhead = max(0.0, self.stage1_seconds - STAGE1_TRAINING_STEPS * self.step_seconds)
            batches = val_windows / profile.batch_size * 1.3  # and the re-run checked copies
            estimate = overhead + self.step_seconds * (profile.steps + batches / 2)
            return self._floor(m * estimate), f"{m:g}x the time its stage 1 implies here ({estimate:.0f} s)"
        default = (120.0 + profile.steps * DEFAULT_SECONDS_PER_STEP + val_windows / profile.batch_size * 0.5) * m / 3
        return default, f"the default limit of {default:.0f} s (nothing measured here yet)"

    @staticmethod
    def _floor(seconds):
        return max(LIMIT_FLOOR_SECONDS, seconds)

    def record(self, profile, val_windows: int) -> dict:
        limits = {f"stage{s}": round(self.limit(s, profile, val_windows)[0], 1) for s in (1, 2)}
        return dict(
            multiple=self.multiple,
            stage1_seconds=self.stage1_seconds,
            step_seconds=self.step_seconds,
            stage2_seconds=self.stage2_seconds,
            limits_seconds=limits,
        )


def calibration(settings: Settings, ledger: Ledger | None, fingerprint: str) -> Calibration:
    """The initial program's measured times under these conditions (the slowest seed of each stage)."""
    cal = Calibration(settings.time_limit)
    if ledger is None:
        return cal
    reference = settings.time_reference or _reference_text()
    for stage in (1, 2):
        rows = ledger.seed_rows_with_seconds(ledger_key(reference, stage, settings, fingerprint))
        passed = [(metrics, seconds) for metrics, seconds in rows.values() if metrics.get("combined_score", 0) > 0]
        if not passed:
            continue
        slowest = max(passed, key=lambda row: row[1])
        if stage == 1:
            cal.stage1_seconds = slowest[1]
            cal.step_seconds = slowest[0].get("train_seconds", 0) / STAGE1_TRAINING_STEPS or None
        else:
            cal.stage2_seconds = slowest[1]
    return cal


# ---------------------------------------------------------------------------------------------
# One stage


def ledger_key(code: str, stage: int, settings: Settings, fingerprint: str, seed: int | None = None) -> Key:
    """What an evaluation is recorded under: what runs, and every condition that changes its numbers."""
    whole = settings.whole_validation and stage == 2
    return Key(
        code_key(code),
        stage,
        settings.profile,
        settings.seed if seed is None else seed,
        fingerprint,
        HARNESS_VERSION,
        settings.allow_uniform_schedule,
        "whole" if whole else "profile",
    )


def evaluate_stage(code: str, stage: int, settings: Settings, on_line=None, seed: int | None = None) -> Evaluation:
    """One stage of one program at one seed: checked statically, then from the ledger if known, else
    judged in the sandbox and recorded."""
    seed = settings.seed if seed is None else seed
    profile = get_profile(settings.profile)
    whole = settings.whole_validation and stage == 2  # stage 1 always scores its few windows
    failure = static_violation(code, _reference_text())
    if failure:  # before the ledger: a rule may have changed since, and the answer costs nothing
        return Evaluation(failure_metrics(), {"failure": f"stage {stage}: {failure}"})
    corpus = corpus_of(settings.corpus)
    artifacts = dict(
        profile=f"{profile.name}: {profile.steps} steps, batch {profile.batch_size}, seq {profile.seq_len}, "
        f"{describe_validation(profile, whole)}, seed {seed}",
        corpus=describe_corpus(corpus),
    )
    key = ledger_key(code, stage, settings, corpus.fingerprint, seed)
    ledger = Ledger(settings.ledger) if settings.ledger else None
    if ledger and (known := ledger.get(key)):
        return Evaluation(known[0], known[1], from_ledger=True, seconds=known[2])

    val_windows = validation_windows(profile, len(corpus.val), whole)
    limit, reason = calibration(settings, ledger, corpus.fingerprint).limit(stage, profile, val_windows)
    if settings.parallel > 1:  # measured alone; side by side with others each evaluation is slower
        limit, reason = limit * settings.parallel, f"{reason}, times {settings.parallel} evaluations at once"
    if (busy := load_factor()) > 1.2:  # other work on the machine since the reference was measured
        limit, reason = limit * busy, f"{reason}, times {busy:.1f} for cores loaded {busy:.1f}x over"
    if on_line:
        on_line(f"stage {stage}: time limit {limit:.0f} s ({reason})")
    job = Job.of(code, stage, settings, corpus, seed, (limit, reason), val_windows)
    start = time.monotonic()
    result: StageResult = RUNNERS[settings.runner](job, on_line)
    seconds = time.monotonic() - start
    if result.ok:
        metrics = passed_metrics(result.metrics, stage)
    else:
        metrics = failure_metrics(result.metrics)
        artifacts["failure"] = f"stage {stage}: {result.failure}"
        if result.stderr:  # what the child printed before it failed (a passing one's is only progress)
            artifacts["stderr"] = result.stderr[-STDERR_ARTIFACT_CHARS:]
    if ledger and not result.retry_later:  # a timeout or a lost worker: try again next time
        ledger.put(key, code_sha256(code), metrics, artifacts, seconds)
    return Evaluation(metrics, artifacts, seconds=seconds)


@functools.lru_cache(maxsize=None)
def _reference_text():
    return INITIAL_PROGRAM.read_text()


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
