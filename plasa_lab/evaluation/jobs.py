"""What crosses module and process boundaries: a stage to evaluate (Job) and its outcome (StageResult).

Both are plain data that travel as JSON (to a Ray node and back), so every runner speaks the same
shape and no module builds, renames or extends a dict of its own.
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class Job:
    """One stage of one program, with everything needed to run it anywhere."""

    code: str
    stage: int  # 1 (screening) or 2 (the benchmark)
    profile: str
    seed: int
    corpus: str  # the concrete corpus name (never "auto")
    fingerprint: str  # of the token cache: a node with other tokens refuses the job
    device: str  # auto | cpu | cuda
    threads: int
    memory_gb: float
    time_limit: float  # wall seconds for the whole stage: a backstop, the CPU limits answer first
    time_limit_reason: str  # how the limit was set, for the failure line
    val_windows: int  # windows of the validation split that stage 2 scores
    sandbox: str = "bwrap"  # bwrap | none
    allow_uniform_schedule: bool = False
    check_every: int | None = None  # training steps between host syncs (None: the worker's default); not in the score
    compile: bool = False  # torch.compile the fixed model's pure parts (falls back to eager); not in the score
    cpu_limits: dict | None = None  # process role -> CPU seconds (None: the judge's defaults)
    cpu_limit_reason: str | None = None  # how they were set, for the failure line

    @classmethod
    def of(cls, code: str, stage: int, settings, corpus, seed: int, limits, val_windows: int) -> "Job":
        """The one way to make a job: a stage of `code` under `settings` (plasa_lab.settings.Settings)
        on a resolved corpus, with its limits (evaluation.StageLimits) and the reasons they were set."""
        return cls(
            code=code,
            stage=stage,
            profile=settings.profile,
            seed=seed,
            corpus=corpus.name,
            fingerprint=corpus.fingerprint,
            device=settings.device,
            threads=settings.threads,
            memory_gb=settings.memory_gb,
            time_limit=limits.wall_seconds,
            time_limit_reason=limits.wall_reason,
            cpu_limits=limits.cpu_seconds,
            cpu_limit_reason=limits.cpu_reason,
            val_windows=val_windows,
            sandbox=settings.sandbox,
            allow_uniform_schedule=settings.allow_uniform_schedule,
            compile=settings.compile,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Job":
        raw = json.loads(text)
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


@dataclass
class StageResult:
    ok: bool
    failure: str | None = None  # one line: the rule broken and the fix
    metrics: dict = field(default_factory=dict)  # finite floats only
    stderr: str = ""  # what the sandboxed processes printed (head and tail)
    seconds: float = 0.0
    retry_later: bool = False  # the machine's fault, maybe (timeout, lost worker): the ledger does not keep it
    usage: dict = field(default_factory=dict)  # cpu_seconds per process role, peak_rss_mib of the stage

    def __post_init__(self):
        self.metrics = {
            k: float(v)
            for k, v in self.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "StageResult":
        raw = json.loads(text)
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})

    @classmethod
    def infrastructure_failure(cls, message: str) -> "StageResult":
        return cls(ok=False, failure=message, retry_later=True)
