"""How to evaluate, in one object: explicit values, else the PLASA_* environment, else defaults.

This is the only module that reads PLASA_* variables. They exist because OpenEvolve calls the
evaluator in worker processes with nothing but a program path: `evolve.py` resolves a Settings
once, hands it to its workers with `to_env()`, and records `record()` in run.json, so a run can be
reproduced from its folder.
"""

import os
from dataclasses import dataclass, fields
from pathlib import Path

from . import PROJECT_ROOT
from .contract import DEFAULT_SEED, PROFILES, get_profile
from .evaluation.hardware import MEASUREMENT_FILE, RAM_MIB_PER_EVALUATION, evaluation_slots

ENVIRONMENT = {  # field -> variable
    "profile": "PLASA_PROFILE",
    "corpus": "PLASA_CORPUS",
    "device": "PLASA_DEVICE",
    "runner": "PLASA_RUNNER",
    "parallel": "PLASA_PARALLEL",
    "threads": "PLASA_THREADS",
    "memory_gb": "PLASA_MEMORY_GB",
    "ledger": "PLASA_LEDGER",
    "time_limit": "PLASA_TIME_LIMIT",
    "sandbox": "PLASA_SANDBOX",
    "seeds": "PLASA_SEEDS",
    "noise_aware": "PLASA_NOISE_AWARE",
    "confirm_margin": "PLASA_CONFIRM_MARGIN",
    "confirm_share": "PLASA_CONFIRM_SHARE",
    "screen": "PLASA_SCREEN",
    "screen_share": "PLASA_SCREEN_SHARE",
    "slot_dir": "PLASA_SLOT_DIR",
}
DEFAULT_CONFIRM_MARGIN = 0.0  # noise sds; see docs/statistics.md
DEFAULT_CONFIRM_SHARE = 0.3  # of a run's stage-2 trainings that confirmations may take (docs/statistics.md)
DEFAULT_SCREEN_SHARE = 0.5  # of the programs screened, the best this share go on to the full budget
CACHE_VARIABLE = "PLASA_CACHE"  # where token caches, the tokenizer and downloaded wheels live
CHOICES = dict(device=("auto", "cpu", "cuda"), runner=("local", "ray"), sandbox=("bwrap", "none"))


@dataclass
class Settings:
    profile: str = None  # full | quick | smoke (NAME@STEPS: that profile at another step count)
    seed: int = DEFAULT_SEED  # the training seed of a single evaluation
    corpus: str = None  # auto | wikitext2 | wiki-summaries | text:PATH
    device: str = None  # auto | cpu | cuda (resolved inside the sandbox)
    runner: str = None  # local | ray
    parallel: int = None  # evaluations at once on this machine (OpenEvolve's parallel_evaluations)
    threads: int = None  # threads per evaluation (default: the cores shared by the parallel evaluations)
    memory_gb: float = None  # what one evaluation's processes may hold together (evaluation.judge)
    ledger: str | None = None  # SQLite file that answers repeats and records results
    time_limit: float = None  # a stage may take this many times what the initial program needed
    sandbox: str = None  # bwrap (isolated by the OS) | none (an explicit, recorded opt-out)
    seeds: tuple = None  # noise floor and confirmation seeds; the first is the search's own seed
    noise_aware: bool = None  # stage 2 confirms contenders on every seed (an evolution run sets it)
    confirm_margin: float = None  # a contender's first-seed loss is at most this many noise sds above the best
    confirm_share: float = None  # confirmations stop while they hold this share of the stage-2 trainings
    screen: str = None  # none | a cheaper profile every child trains on first (evaluation.screened_stage2)
    screen_share: float = None  # of the programs screened, the best this share go on to the full profile
    slot_dir: str | None = None  # trainings take one of `parallel` slots here first (evaluation.slots; None: no gate)
    allow_uniform_schedule: bool = False  # baselines (DENSE, UNIFORM) only; children must adapt k
    whole_validation: bool = False  # stage 2 validates on every window of the split (replay)
    compile: bool = None  # torch.compile the fixed model's pure parts, eager where that fails (PLASA_COMPILE=1)
    time_reference: str | None = None  # code whose measured time sets the limits (default: the initial program)

    def __post_init__(self):
        env = os.environ.get
        self.profile = self.profile or env("PLASA_PROFILE") or "full"
        self.corpus = self.corpus or env("PLASA_CORPUS") or "auto"
        self.device = self.device or env("PLASA_DEVICE") or "auto"
        self.runner = self.runner or env("PLASA_RUNNER") or "local"
        self.sandbox = self.sandbox or env("PLASA_SANDBOX") or "bwrap"
        get_profile(self.profile)  # an unknown name (or NAME@STEPS with bad steps) fails here
        for name in ("device", "runner", "sandbox"):
            if getattr(self, name) not in CHOICES[name]:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(CHOICES[name])}")
        asked_parallel = max(1, int(p)) if (p := self.parallel or env("PLASA_PARALLEL")) else None
        asked_threads = max(1, int(t)) if (t := self.threads or env("PLASA_THREADS")) else None
        if self.runner == "ray":  # the cluster's size decides (launch.plan_run asks it); a task asks 2 CPUs of a node
            self.parallel, self.threads = asked_parallel or 1, asked_threads or 2
            self.slots_reason = f"ray: {self.threads} thread(s) per evaluation; the cluster's CPUs set how many at once"
        else:  # this machine's GPU memory and cores, or its measured best CPU split (plasa_lab.evaluation.hardware)
            self.parallel, self.threads, self.slots_reason = evaluation_slots(
                self.device, asked_parallel, asked_threads, measurement_path=measurement_path()
            )
        self.memory_gb = float(self.memory_gb or env("PLASA_MEMORY_GB") or RAM_MIB_PER_EVALUATION / 1024)
        self.compile = bool(self.compile) if self.compile is not None else env("PLASA_COMPILE", "") == "1"
        self.ledger = self.ledger if self.ledger is not None else env("PLASA_LEDGER")
        self.slot_dir = self.slot_dir or env("PLASA_SLOT_DIR") or None
        self.time_limit = float(self.time_limit or env("PLASA_TIME_LIMIT") or 3.0)
        if self.time_limit < 1:
            raise ValueError(
                f"PLASA_TIME_LIMIT must be at least 1 (a multiple of the initial program's time), got {self.time_limit}"
            )
        seeds = self.seeds if self.seeds is not None else env("PLASA_SEEDS") or "42,43,44"
        self.seeds = tuple(dict.fromkeys(int(s) for s in (seeds.split(",") if isinstance(seeds, str) else seeds)))
        if not self.seeds:
            raise ValueError("PLASA_SEEDS must name at least one seed")
        if self.noise_aware is None:
            self.noise_aware = env("PLASA_NOISE_AWARE", "0") not in ("", "0", "false")
        if self.confirm_margin is None:
            self.confirm_margin = float(env("PLASA_CONFIRM_MARGIN") or DEFAULT_CONFIRM_MARGIN)
        if self.confirm_margin < 0:  # below the best confirmed mean would let lucky unconfirmed seeds win
            raise ValueError(f"PLASA_CONFIRM_MARGIN must be at least 0 (noise sds), got {self.confirm_margin:g}")
        if self.confirm_share is None:
            self.confirm_share = float(env("PLASA_CONFIRM_SHARE") or DEFAULT_CONFIRM_SHARE)
        if not 0 < self.confirm_share <= 1:
            raise ValueError(f"PLASA_CONFIRM_SHARE must be in (0, 1], got {self.confirm_share:g}")
        self.screen = self.screen or env("PLASA_SCREEN") or "none"
        if self.screen not in ("none", *PROFILES):
            raise ValueError(f"unknown screen {self.screen!r}: choose none or one of {', '.join(PROFILES)}")
        if self.screen != "none" and PROFILES[self.screen].steps >= get_profile(self.profile).steps:
            raise ValueError(f"a screen must train for fewer steps than the {self.profile} profile, not {self.screen}")
        if self.screen_share is None:
            self.screen_share = float(env("PLASA_SCREEN_SHARE") or DEFAULT_SCREEN_SHARE)
        if not 0 < self.screen_share <= 1:
            raise ValueError(f"PLASA_SCREEN_SHARE must be in (0, 1], got {self.screen_share:g}")

    def threads_for(self, parallel: int) -> int:
        """Threads per evaluation: $PLASA_THREADS, else on a Ray cluster 2 (the CPUs a task asks of a
        node), else this machine's cores shared by `parallel` evaluations (plasa_lab.evaluation.hardware)."""
        if os.environ.get("PLASA_THREADS"):
            return max(1, int(os.environ["PLASA_THREADS"]))
        return (
            2
            if self.runner == "ray"
            else evaluation_slots(self.device, max(1, parallel), measurement_path=measurement_path()).threads
        )

    def to_env(self) -> dict:
        """The variables that give OpenEvolve's worker processes these settings."""
        values = {name: getattr(self, name) for name in ENVIRONMENT}
        values["seeds"] = ",".join(map(str, self.seeds))
        values["noise_aware"] = "1" if self.noise_aware else "0"
        return {ENVIRONMENT[name]: str(v) for name, v in values.items() if v is not None}

    def record(self) -> dict:
        """What run.json keeps: every resolved value."""
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in fields(self)
            if f.name != "time_reference"
        }


def cache_root() -> Path:
    """The data cache: $PLASA_CACHE, else the project's .cache/ folder."""
    return Path(os.environ.get(CACHE_VARIABLE) or PROJECT_ROOT / ".cache")


def measurement_path() -> Path:
    """Where bench_throughput.py --save records this machine's best split (plasa_lab.evaluation.hardware)."""
    return cache_root() / MEASUREMENT_FILE
