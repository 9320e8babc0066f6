"""OpenEvolve evaluator for PLASA programs, and its command line.

OpenEvolve calls evaluate_stage1 / evaluate_stage2 (cascade) or evaluate. Each runs the program
through the trusted pipeline (static checks, then the judge, whose sandboxed workers run the
program's code while every score is computed outside them) and returns every metric of
docs/contract.md; the logic lives in plasa_lab.evaluation (fitness, stage, judge).

    python evaluator.py PROGRAM [--stage 1|2|all] [--profile full|quick|smoke] [--seed N]
"""

import argparse
import json
import sys

from openevolve.evaluation_result import EvaluationResult

from plasa_lab.cli import profile_help
from plasa_lab.evaluation.fitness import evaluate_code, evaluate_file
from plasa_lab.evaluation.sandbox import UNISOLATED_WARNING, SandboxUnavailable, require_isolation
from plasa_lab.evaluation.stage import failure_metrics
from plasa_lab.settings import Settings
from plasa_lab.util import first_line, one_line


def _evaluate(program_path, stage):
    """Never raises: OpenEvolve drops a child whose metrics lack a feature dimension, and
    counts an exception as a crash of the program. A set-up error is a failure with its reason."""
    try:
        evaluation = evaluate_file(program_path, stage, Settings())
        return EvaluationResult(metrics=evaluation.metrics, artifacts=evaluation.artifacts)
    except Exception as e:
        return EvaluationResult(
            metrics=failure_metrics(), artifacts={"failure": f"evaluator set-up error: {first_line(e)}"}
        )


def evaluate_stage1(program_path):
    return _evaluate(program_path, 1)


def evaluate_stage2(program_path):
    return _evaluate(program_path, 2)


def evaluate(program_path):
    return _evaluate(program_path, "all")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate one PLASA program; prints its metrics as JSON on the last line."
    )
    parser.add_argument("program", help="the program file to evaluate")
    parser.add_argument(
        "--stage", choices=["1", "2", "all"], default="all", help="1, 2, or all: stage 1, then stage 2 if it passed"
    )
    parser.add_argument("--profile", choices=["full", "quick", "smoke"], help=profile_help("$PLASA_PROFILE or full"))
    parser.add_argument("--seed", type=int, default=42, help="the training seed (default 42)")
    parser.add_argument(
        "--corpus", help="auto, wikitext2, wiki-summaries or text:PATH (default: $PLASA_CORPUS or auto)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: $PLASA_DEVICE or auto")
    parser.add_argument("--ledger", help="SQLite ledger to answer from and record into (default: $PLASA_LEDGER, none)")
    parser.add_argument("--runner", choices=["local", "ray"], help="default: $PLASA_RUNNER or local")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    try:
        with open(args.program, encoding="utf-8") as f:
            code = f.read()
        settings = Settings(
            profile=args.profile,
            seed=args.seed,
            corpus=args.corpus,
            device=args.device,
            ledger=args.ledger,
            runner=args.runner,
        )
    except UnicodeDecodeError as e:
        parser.exit(2, f"evaluator.py: error: {args.program}: not a UTF-8 text file ({e.reason} at byte {e.start})\n")
    except (OSError, ValueError) as e:
        parser.exit(2, f"evaluator.py: error: {first_line(e).split(': ', 1)[-1]}\n")
    if settings.runner == "local":  # a Ray node checks its own
        try:
            require_isolation(settings.sandbox)
        except SandboxUnavailable as e:
            parser.exit(1, f"evaluator.py: error: cannot isolate the program: {e}\n")
    if settings.sandbox != "bwrap":
        print(f"WARNING: {UNISOLATED_WARNING}", file=sys.stderr)
    progress = None if args.quiet else (lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    try:
        evaluation = evaluate_code(code, args.stage, settings, on_line=progress)
    except Exception as e:  # the machine's problem (no sandbox, unusable ledger, no corpus), not the program's
        parser.exit(1, f"evaluator.py: error: {first_line(e)}\n")
    if "failure" in evaluation.artifacts:  # the child's words, as printable characters only
        print(f"FAILED {one_line(evaluation.artifacts['failure'], 2000)}", file=sys.stderr)
    print(json.dumps(evaluation.metrics))


if __name__ == "__main__":
    main()
