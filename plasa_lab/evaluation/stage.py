"""One stage of one program: static checks, the ledger, then the stage judged outside the child's code.

    static   syntax, EVOLVE-BLOCK integrity, the block code allow-lists (plasa_lab.program.checks): a quick,
             friendly first filter whose one line teaches the LLM, run before anything else.
    ledger   the same program (by its normalised code) under the same conditions is answered at once.
    stage 1  the judge (plasa_lab.evaluation.judge): build, schedule and budget checks, 12 training steps whose
             loss must fall, behavioural probes and one validation batch, all scored outside the
             sandboxed processes that run the child's code.
    stage 2  the same with the profile's full training and validation.

What a stage 2 result counts for in a run (seeds, the screen) and the entry points are the fitness
rule's (evaluation.fitness).

Every result holds every metric of docs/contract.md section 4; a failure scores 0.0 and says why in one
line (artifact `failure`). Limits are CPU seconds per process, multiples of what the initial program's
processes computed on this machine (`Calibration`): other work does not stretch them, and no limit
comes from the program judged.
"""

import functools
import math
import sys
import time
from dataclasses import dataclass, field

from .. import INITIAL_PROGRAM
from ..contract import (
    DESCRIPTIVE_KEYS,
    HARNESS_VERSION,
    METRIC_KEYS,
    PPL_CAP,
    STAGE1_TRAINING_STEPS,
    get_profile,
    windows_to_run,
)
from ..data import corpora
from ..program.checks import static_violation
from ..settings import Settings
from ..util import one_line, quoted
from .jobs import Job, StageResult
from .judge import run_local
from .ledger import Key, Ledger, code_key, code_sha256
from .ray_runner import run_ray  # imports ray only inside its functions: ray stays optional
from .slots import evaluation_slot

# Where a stage runs (Settings.runner): the judge here, its workers sandboxed on this machine, or the
# same on a Ray node. Both take a Job and return a StageResult.
RUNNERS = {"local": run_local, "ray": run_ray}
STDERR_ARTIFACT_CHARS = 4000
# What the judge checked of the numbers it reports. A cut check needs two processes that never met;
# training has one, so its selections are checked for causality and k at every step, not cut: a leak
# only in training can move train_loss, never val_loss (the validation servers are cut-checked).
TRAINING_CHECKS = (
    "val_loss: selections cut-checked at every query position by two processes that never coexisted; "
    "train_loss: selections checked causal and within k at every step, not cut-checked"
)


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
WALL_BACKSTOP = 2.0  # the wall-clock limit over the measured multiple: CPU seconds are the limit, this a backstop
CPU_FLOOR_SECONDS = 30.0  # a process's CPU limit at least: starting Python and torch alone takes seconds
DEFAULT_SECONDS_PER_STEP = 1.5  # likewise (about 0.3 s here when idle, far less on a GPU)
LIMIT_FLOOR_SECONDS = 30.0  # starting three sandboxed processes alone takes seconds on a busy machine


@dataclass
class StageLimits:
    """What a stage may take: CPU seconds per process (None: the judge's defaults) and a wall-clock
    backstop, with the words that say how each was set. None of it comes from the program judged."""

    wall_seconds: float
    wall_reason: str
    cpu_seconds: dict | None
    cpu_reason: str | None

    def describe(self) -> str:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in self.cpu_seconds.items()) if self.cpu_seconds else "defaults"
        return f"CPU-seconds {cpu} ({self.cpu_reason or 'nothing measured here yet'}); wall {self.wall_seconds:.0f} s"


@dataclass
class Calibration:
    """What the reference program (the initial program) needed on this machine, from the ledger."""

    multiple: float
    stage1_seconds: float | None = None  # its stage 1, wall
    step_seconds: float | None = None  # its seconds per training step (from stage 1)
    stage2_seconds: float | None = None  # its stage 2 on the profile's windows, wall
    stage1_cpu: dict | None = None  # its stage 1's CPU seconds per process role
    stage2_cpu: dict | None = None

    def limits(self, stage: int, profile, val_windows: int, parallel: int = 1) -> StageLimits:
        """CPU seconds per process: the multiple of the initial program's (stage 2's processes that
        validate scaled to the windows run); the wall backstop: WALL_BACKSTOP times the multiple of its
        wall time, times the evaluations that share the machine (the planner's number, not the load)."""
        wall, reason = self.limit(stage, profile, val_windows)
        wall, reason = wall * WALL_BACKSTOP * parallel, f"{WALL_BACKSTOP:g}x the wall limit {reason}"
        if parallel > 1:
            reason += f", times {parallel} evaluations at once"
        measured = self.stage1_cpu if stage == 1 else self.stage2_cpu
        if not measured:
            return StageLimits(wall, reason, None, None)
        grow = 1.0
        if stage == 2:
            run = lambda n: windows_to_run(n, profile.seq_len, profile.cuts_per_position)
            grow = max(1.0, run(val_windows) / run(profile.val_windows))
        cpu = {
            role: max(CPU_FLOOR_SECONDS, self.multiple * seconds * (1.0 if role == "training" else grow))
            for role, seconds in measured.items()
        }
        return StageLimits(wall, reason, cpu, f"{self.multiple:g}x the initial program's here")

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
        rows = ledger.seed_rows_with_usage(ledger_key(reference, stage, settings, fingerprint))
        passed = [row for row in rows.values() if row[0].get("combined_score", 0) > 0]
        if not passed:
            continue
        slowest = max(passed, key=lambda row: row[1])
        cpu = {}  # per process role, the most any seed took
        for _, _, usage in passed:
            for role, seconds in (usage.get("cpu_seconds") or {}).items():
                cpu[role] = max(cpu.get(role, 0.0), float(seconds))
        if stage == 1:
            cal.stage1_seconds, cal.stage1_cpu = slowest[1], cpu or None
            cal.step_seconds = slowest[0].get("train_seconds", 0) / STAGE1_TRAINING_STEPS or None
        else:
            cal.stage2_seconds, cal.stage2_cpu = slowest[1], cpu or None
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


def recorded(ledger: Ledger | None, key: Key) -> Evaluation | None:
    """The ledger's answer for this key (None: none, or no ledger), with the seconds it cost then."""
    known = ledger.get(key) if ledger else None
    return Evaluation(known[0], known[1], from_ledger=True, seconds=known[2]) if known else None


def evaluate_stage(code: str, stage: int, settings: Settings, on_line=None, seed: int | None = None) -> Evaluation:
    """One stage of one program at one seed: checked statically, then from the ledger if known, else
    judged in the sandbox and recorded."""
    seed = settings.seed if seed is None else seed
    profile = get_profile(settings.profile)
    whole = settings.whole_validation and stage == 2  # stage 1 always scores its few windows
    failure = static_violation(code, _reference_text())
    if failure:  # before the ledger: a rule may have changed since, and the answer costs nothing
        return Evaluation(failure_metrics(), {"failure": one_line(f"stage {stage}: {failure}", 1000)})
    corpus = corpus_of(settings.corpus)
    artifacts = dict(
        profile=f"{profile.name}: {profile.steps} steps, batch {profile.batch_size}, seq {profile.seq_len}, "
        f"{describe_validation(profile, whole)}, seed {seed}",
        corpus=describe_corpus(corpus),
        checks=TRAINING_CHECKS,
    )
    key = ledger_key(code, stage, settings, corpus.fingerprint, seed)
    ledger = Ledger(settings.ledger) if settings.ledger else None
    if known := recorded(ledger, key):
        return known

    val_windows = validation_windows(profile, len(corpus.val), whole)
    limits = calibration(settings, ledger, corpus.fingerprint).limits(stage, profile, val_windows, settings.parallel)
    if on_line:
        on_line(f"stage {stage}: limits {limits.describe()}")
    job = Job.of(code, stage, settings, corpus, seed, limits, val_windows)
    with evaluation_slot(settings.slot_dir, settings.parallel):  # a run with proposals ahead: never past its slots
        if settings.slot_dir and (known := recorded(ledger, key)):  # trained by another while this one waited
            return known
        start = time.monotonic()
        result: StageResult = RUNNERS[settings.runner](job, on_line)
        seconds = time.monotonic() - start
    if result.ok:
        metrics = passed_metrics(result.metrics, stage)
    else:
        metrics = failure_metrics(result.metrics)
        artifacts["failure"] = one_line(f"stage {stage}: {result.failure}", 1000)  # the child's text, as data
        if result.stderr:  # what the child printed before it failed (a passing one's is only progress)
            artifacts["stderr"] = quoted(result.stderr[-STDERR_ARTIFACT_CHARS:], STDERR_ARTIFACT_CHARS)
    if ledger and not result.retry_later:  # a timeout or a lost worker: try again next time
        ledger.put(key, code_sha256(code), metrics, artifacts, seconds, result.usage)
    return Evaluation(metrics, artifacts, seconds=seconds)


@functools.lru_cache(maxsize=None)
def _reference_text():
    return INITIAL_PROGRAM.read_text()
