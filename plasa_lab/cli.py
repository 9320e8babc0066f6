"""What the command lines in scripts/ share: one way to give up, in one line.

Standard library only: scripts import it before the heavy libraries load."""

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from . import PROJECT_ROOT


def fail(message, status: int = 1) -> NoReturn:
    """Print `<script>: error: <message>` on stderr and exit with `status` (argparse's own errors
    look the same and exit 2)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(status)


def profile_help(default: str) -> str:
    """What --profile says of the three profiles (contract.PROFILES), with the script's default."""
    return (
        "full: the benchmark, 1000 steps; quick: 200 steps, a cheaper first look; smoke: 20 steps, a "
        "plumbing check, not a search: every val_ppl is over the 10000 cap, so every program scores the same "
        f"(default: {default})"
    )


def seed_list(text: str) -> list[int]:
    """argparse's type for --seeds ("42,43,44"): a bad value is argparse's one line, naming the option."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def price_pair(text: str) -> tuple[float, float]:
    """argparse's type for --price-per-million ("3,15": dollars per million prompt and completion tokens)."""
    try:
        prices = tuple(float(p) for p in text.split(","))
    except ValueError:
        prices = ()
    if len(prices) != 2 or any(not p >= 0 for p in prices):
        raise argparse.ArgumentTypeError(f"give two prices, IN,OUT in dollars per million tokens, got {text!r}")
    return prices


MACHINE_SETTINGS = ("PLASA_TIME_LIMIT", "PLASA_CACHE", "PLASA_PARALLEL", "PLASA_THREADS")  # not the science's


def benchmark_env() -> dict:
    """The environment of a benchmark's run: this one without PLASA_ settings other than the machine's
    (how long, where the caches are, how many evaluations at once: a local LLM server may need a core)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PLASA_") or k in MACHINE_SETTINGS}


def run_evolve(run_dir: Path, profile: str, iterations: int, seeds: str, llm=("--llm", "offline"), ledger=None) -> int:
    """A benchmark's run of scripts/evolve.py in run_dir, resumed where it stopped, with its own ledger
    (or the given one); the machine's settings kept (MACHINE_SETTINGS), every other PLASA_ setting the
    benchmark's (and no API key where the run needs none). Returns the run's exit code."""
    env = benchmark_env()
    if "offline" in llm:
        env.pop("OPENAI_API_KEY", None)
    env["PLASA_LEDGER"] = str(ledger or Path(run_dir) / "ledger.sqlite")  # each run pays for its own evaluations
    resume = ["--resume"] if (Path(run_dir) / "run.json").exists() else []
    command = [sys.executable, "scripts/evolve.py", "--profile", profile, "--iterations", str(iterations)]
    command += [*llm, "--seeds", seeds, "--output", str(run_dir), *resume]
    print(f"$ {' '.join(command[1:])}", file=sys.stderr, flush=True)
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env).returncode


def evolve(run_dir: Path, profile: str, iterations: int, seeds: str, llm=("--llm", "offline")) -> Path:
    """run_evolve with the run's own ledger; run_dir, or fail() when the run does not end well."""
    code = run_evolve(run_dir, profile, iterations, seeds, llm)
    if code != 0:
        fail(f"the {Path(run_dir).name} run exited with {code}")
    return Path(run_dir)
