"""The evaluation pipeline: static checks here, then each stage in a sandbox, through the ledger.

    stage 1: syntax, EVOLVE-BLOCK integrity, block code allow-lists (here, before any child code
             runs); then in the sandbox: import, MODEL_CONFIG, build, parameter budget, schedule,
             behavioural probes on random and real tokens, a short training that must learn.
    stage 2: the same checks, the profile's full training and validation, the probes again.

Every result holds every metric of CONTRACT.md section 4; a failure scores 0.0 and says why in
one line (artifact `failure`).
"""

import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import INITIAL_PROGRAM, data
from .checks import static_violation
from .ledger import Ledger, code_sha256
from .profiles import DEFAULT_SEED, PPL_CAP, get_profile

HARNESS_VERSION = "2"  # part of the ledger key: bump when the harness's numbers would change
METRIC_KEYS = ("combined_score", "val_ppl", "val_loss", "val_acc", "train_loss", "density", "indexer_params",
               "nonembed_params", "train_seconds", "stage1_passed", "stage2_passed")
DESCRIPTIVE_KEYS = ("density", "indexer_params", "nonembed_params", "train_seconds", "stage1_passed")  # kept on failure
STDERR_ARTIFACT_CHARS = 4000


@dataclass
class Evaluation:
    metrics: dict
    artifacts: dict = field(default_factory=dict)
    from_ledger: bool = False

    @property
    def passed(self):
        return self.metrics["combined_score"] > 0


@dataclass
class Settings:
    """How to evaluate: one value each, from arguments, else the environment, else defaults."""
    profile: str = None
    seed: int = DEFAULT_SEED
    corpus: str = None
    device: str = None
    threads: int = None
    memory_gb: float = None
    ledger: str | None = None
    runner: str = None
    allow_uniform_schedule: bool = False  # baselines (DENSE, UNIFORM) only; children must adapt k
    whole_validation: bool = False  # stage 2 validates on every window of the split (replay), not the profile's

    def __post_init__(self):
        env = os.environ.get
        self.profile = get_profile(self.profile).name
        self.corpus = self.corpus or env("PLASA_CORPUS") or "auto"
        self.device = self.device or env("PLASA_DEVICE") or "auto"
        self.runner = self.runner or env("PLASA_RUNNER") or "local"
        # Threads per evaluation: locally the cores shared by the parallel evaluations; on a Ray
        # cluster the CPUs each task asks of a node.
        workers = max(1, int(env("PLASA_PARALLEL", "1")))
        local_share = max(1, (os.cpu_count() or 1) // workers)
        self.threads = int(self.threads or env("PLASA_THREADS") or (2 if self.runner == "ray" else local_share))
        self.memory_gb = float(self.memory_gb or env("PLASA_MEMORY_GB") or 6)
        self.ledger = self.ledger if self.ledger is not None else env("PLASA_LEDGER")
        if self.runner not in ("local", "ray"):
            raise ValueError(f"unknown runner {self.runner!r}: choose local or ray")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}: choose auto, cpu or cuda")


def score(val_ppl: float) -> float:
    return 1.0 / min(val_ppl, PPL_CAP)


def failure_metrics(measured: dict | None = None) -> dict:
    """A failure: score 0, the worst quality values, and what was measured before it failed."""
    metrics = dict.fromkeys(METRIC_KEYS, 0.0)
    metrics.update(val_ppl=PPL_CAP, val_loss=math.log(PPL_CAP))
    metrics.update({k: float(v) for k, v in (measured or {}).items() if k in DESCRIPTIVE_KEYS})
    return metrics


@functools.lru_cache(maxsize=None)
def _corpus_summary(corpus: str):
    """(name, fingerprint, description, validation tokens) of the corpus, built or loaded once per process."""
    c = data.prepare_corpus(corpus, log=lambda line: print(line, file=sys.stderr, flush=True))
    m = c.manifest
    description = (f"{c.name} ({m.get('tokenizer')}; train {m.get('train_tokens')} tokens, "
                   f"val {m.get('val_tokens')} tokens; fingerprint {c.fingerprint[:16]})")
    return c.name, c.fingerprint, description, len(c.val)


@functools.lru_cache(maxsize=None)
def _reference_text():
    return INITIAL_PROGRAM.read_text()


def validation_windows(profile, val_tokens: int, whole: bool) -> int:
    """How many windows stage 2 validates on: the profile's first ones, or every window of the split."""
    return val_tokens // (profile.seq_len + 1) if whole else profile.val_batches * profile.batch_size


def describe_validation(profile, whole: bool) -> str:
    if whole:
        return "the whole validation split"
    return (f"{profile.val_batches} val batches (the first {profile.val_batches * profile.batch_size} windows of "
            f"{profile.seq_len + 1} tokens)")


def _run_stage(code, stage, settings, corpus_name, fingerprint, val_windows, on_line):
    from .runners import get_runner, stage_timeout
    profile = get_profile(settings.profile)
    if stage == 2:
        timeout = stage_timeout(2, profile.steps, val_batches=-(-val_windows // profile.batch_size))
    else:
        timeout = stage_timeout(1, 0)
    job = dict(code=code, stage=stage, profile=profile.name, seed=settings.seed, corpus=corpus_name,
               fingerprint=fingerprint, device=settings.device, threads=settings.threads,
               memory_gb=settings.memory_gb, timeout=timeout, val_windows=val_windows,
               allow_uniform_schedule=settings.allow_uniform_schedule)
    return get_runner(settings.runner)(job, on_line)


def evaluate_stage(code: str, stage: int, settings: Settings, on_line=None) -> Evaluation:
    """One stage of one program: from the ledger if known, else checked and run in a sandbox."""
    corpus_name, fingerprint, corpus_text, val_tokens = _corpus_summary(settings.corpus)
    profile = get_profile(settings.profile)
    whole = settings.whole_validation and stage == 2  # stage 1 always scores one batch
    artifacts = dict(profile=f"{profile.name}: {profile.steps} steps, batch {profile.batch_size}, seq {profile.seq_len}, "
                             f"{describe_validation(profile, whole)}, seed {settings.seed}", corpus=corpus_text)
    key = dict(code_sha256=code_sha256(code) + ("+uniform" if settings.allow_uniform_schedule else ""),
               stage=stage, profile=profile.name + ("+whole-val" if whole else ""), seed=settings.seed,
               fingerprint=fingerprint, harness_version=HARNESS_VERSION)
    ledger = Ledger(settings.ledger) if settings.ledger else None
    if ledger and (known := ledger.get(key)):
        return Evaluation(known[0], known[1], from_ledger=True)

    start = time.monotonic()
    failure = static_violation(code, _reference_text())
    if failure:
        metrics, result = failure_metrics(), {}
    else:
        result = _run_stage(code, stage, settings, corpus_name, fingerprint,
                            validation_windows(profile, val_tokens, whole), on_line)
        failure = None if result["ok"] else result["failure"]
        metrics = failure_metrics(result["metrics"]) if failure else _passed_metrics(result["metrics"], stage)
    if failure:
        artifacts["failure"] = f"stage {stage}: {failure}"
        if result.get("stderr"):  # what the child printed before it failed (a passing one's is only progress)
            artifacts["stderr"] = result["stderr"][-STDERR_ARTIFACT_CHARS:]
    seconds = time.monotonic() - start
    if ledger and not result.get("retry_later"):  # a timeout or a lost worker: try again next time
        ledger.put(key, metrics, artifacts, seconds)
    return Evaluation(metrics, artifacts)


def _passed_metrics(measured: dict, stage: int) -> dict:
    metrics = failure_metrics()
    metrics.update({k: float(v) for k, v in measured.items() if k in METRIC_KEYS})
    metrics["combined_score"] = score(metrics["val_ppl"])
    metrics["stage1_passed"] = 1.0  # stage 2 runs every check of stage 1 before it trains
    metrics["stage2_passed"] = 1.0 if stage == 2 else 0.0
    return metrics


def evaluate_code(code: str, stage: str | int, settings: Settings, on_line=None) -> Evaluation:
    """stage 1, 2, or "all" (stage 1, then stage 2 if stage 1 passed: the cascade)."""
    if str(stage) != "all":
        return evaluate_stage(code, int(stage), settings, on_line)
    first = evaluate_stage(code, 1, settings, on_line)
    if not first.passed:
        return first
    second = evaluate_stage(code, 2, settings, on_line)
    return Evaluation(second.metrics, {**first.artifacts, **second.artifacts}, first.from_ledger and second.from_ledger)


def evaluate_file(path: str | Path, stage: str | int = "all", settings: Settings | None = None, on_line=None) -> Evaluation:
    settings = settings or Settings()
    try:
        code = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        metrics = failure_metrics()
        return Evaluation(metrics, dict(failure=f"cannot read the program {path}: {e.strerror or e}"))
    return evaluate_code(code, stage, settings, on_line)
