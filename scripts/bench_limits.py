"""How fast the judge answers a child that never finishes, on a machine other work loads.

    python scripts/bench_limits.py [--profile smoke|quick|full] [--load N] [--ledger FILE]

Starts N spinning processes (the load, default: one per core), then evaluates with evaluator.py:
the initial program (it must pass under the load), a program looping forever when imported, and
one looping forever inside a training step, and stops the load. With --ledger the initial program's
measured CPU seconds set the limits (as in a run); without, the judge's fixed defaults do. Prints
one line per case: seconds to the answer, passed or the failure line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT

SOURCE = INITIAL_PROGRAM.read_text()
ANCHOR = "def init_indexer(indexer, layer):\n"
STEP = "    T = scores.shape[-1]\n"
CASES = {
    "initial program": SOURCE,
    "endless loop at import": SOURCE.replace(ANCHOR, "while True:\n    pass\n\n\n" + ANCHOR, 1),
    "endless loop inside a step": SOURCE.replace(STEP, STEP + "    while T > 0:\n        T = T + 1\n", 1),
}


def evaluate(code: str, profile: str, ledger: str | None, stage: str) -> tuple[float, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    command = [sys.executable, "evaluator.py", f.name, "--profile", profile, "--stage", stage]
    command += ["--ledger", ledger] if ledger else []
    start = time.monotonic()
    run = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - start
    os.unlink(f.name)
    failed = [line for line in run.stderr.splitlines() if line.startswith("FAILED")]
    if run.returncode != 0 or not run.stdout.strip():
        return seconds, f"evaluator exited {run.returncode}: {run.stderr.strip()[-200:]}"
    metrics = json.loads(run.stdout.strip().splitlines()[-1])
    return seconds, failed[0] if failed else f"passed, val_loss {metrics['val_loss']:.4f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile",
        choices=["smoke", "quick", "full"],
        default="smoke",
        help="the evaluations' profile (default smoke)",
    )
    parser.add_argument("--load", type=int, default=os.cpu_count() or 1, help="spinning processes (default: cores)")
    parser.add_argument("--ledger", help="a ledger holding the initial program's measured CPU seconds")
    args = parser.parse_args()
    if args.ledger:  # the reference measured first, without the load, as a run does at its start
        evaluate(SOURCE, args.profile, args.ledger, "all")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        print(f"load: {args.load} spinning processes on {os.cpu_count()} cores; profile {args.profile}", flush=True)
        for name, code in CASES.items():
            stage = "all" if name == "initial program" else "2"
            seconds, outcome = evaluate(code, args.profile, args.ledger, stage)
            print(f"{name}: {seconds:.0f} s: {outcome}", flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


if __name__ == "__main__":
    main()
