"""OpenEvolve evaluator for PLASA programs, and its command line.

OpenEvolve calls evaluate_stage1 / evaluate_stage2 (cascade) or evaluate. Each runs the
program in a sandboxed subprocess through the trusted harness and returns every metric of
CONTRACT.md section 4; the logic lives in plasa_lab.evaluation.

    python evaluator.py PROGRAM [--stage 1|2|all] [--profile full|quick|smoke] [--seed N]
"""

import argparse
import json
import sys

from openevolve.evaluation_result import EvaluationResult

from plasa_lab.evaluation import Settings, evaluate_file, failure_metrics


def _evaluate(program_path, stage):
    """Never raises: OpenEvolve drops a child whose metrics lack a feature dimension, and
    counts an exception as a crash of the program. A set-up error is a failure with its reason."""
    try:
        evaluation = evaluate_file(program_path, stage)
        return EvaluationResult(metrics=evaluation.metrics, artifacts=evaluation.artifacts)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return EvaluationResult(metrics=failure_metrics(),
                                artifacts={"failure": f"evaluator set-up error: {type(e).__name__}: {reason}"})


def evaluate_stage1(program_path):
    return _evaluate(program_path, 1)


def evaluate_stage2(program_path):
    return _evaluate(program_path, 2)


def evaluate(program_path):
    return _evaluate(program_path, "all")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate one PLASA program; prints its metrics as JSON on the last line.")
    parser.add_argument("program")
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    parser.add_argument("--profile", choices=["full", "quick", "smoke"], help="default: $PLASA_PROFILE or full")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--corpus", help="auto, wikitext2, wiki-summaries or text:PATH (default: $PLASA_CORPUS or auto)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: $PLASA_DEVICE or auto")
    parser.add_argument("--ledger", help="SQLite ledger to answer from and record into (default: $PLASA_LEDGER, none)")
    parser.add_argument("--runner", choices=["local", "ray"], help="default: $PLASA_RUNNER or local")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    try:
        open(args.program).close()
        settings = Settings(profile=args.profile, seed=args.seed, corpus=args.corpus, device=args.device,
                            ledger=args.ledger, runner=args.runner)
    except (OSError, ValueError) as e:
        parser.exit(2, f"evaluator.py: error: {getattr(e, 'strerror', None) and f'{args.program}: {e.strerror}' or e}\n")
    progress = None if args.quiet else (lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    evaluation = evaluate_file(args.program, args.stage, settings, on_line=progress)
    if "failure" in evaluation.artifacts:
        print(f"FAILED {evaluation.artifacts['failure']}", file=sys.stderr)
    print(json.dumps(evaluation.metrics))


if __name__ == "__main__":
    main()
