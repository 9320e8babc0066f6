"""Re-evaluate the top programs of a run (or program files) over several seeds, against the initial
program, with a verdict per program (see docs/reports.md).

    python scripts/replay.py [RUN_DIR | PROGRAM ...] [--top K] [--seeds 42,43,44] [--baselines] [--profile ...]
                             [--whole-val] [--steps N] [--ablate]
"""

import argparse
import sys
from pathlib import Path

from plasa_lab.cli import fail, profile_help, seed_list
from plasa_lab.replay import DEFAULT_SEEDS, ReplayError, plan_replay, print_table, run_plan, summarise, write_reports


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Replay the top programs of a run over several seeds; a verdict "
        "per program against the initial program."
    )
    parser.add_argument(
        "targets",
        nargs="*",
        type=Path,
        help="a run folder (default: the newest under openevolve_output/), or program files",
    )
    parser.add_argument("--top", type=int, default=3, help="programs of the run to replay, best first (default 3)")
    parser.add_argument(
        "--seeds",
        type=seed_list,
        default=list(DEFAULT_SEEDS),
        help="training seeds, comma-separated (default 42,43,44)",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also the DENSE and UNIFORM schedules of the initial program (always: the initial program)",
    )
    parser.add_argument(
        "--profile",
        choices=["full", "quick", "smoke"],
        help=profile_help("the run's profile; program files: $PLASA_PROFILE or full"),
    )
    parser.add_argument(
        "--whole-val",
        action="store_true",
        help="validate on the whole validation split, not the profile's first windows (full: 200 "
        "windows); the search's own seed-42 numbers then do not carry over",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="train every candidate this many steps instead of the profile's (does a gain hold at a longer "
        "budget? e.g. --profile full --steps 4000); recorded under the profile NAME@STEPS",
    )
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="also each changed EVOLVE-BLOCK of every replayed program alone in the initial program: which "
        "edit carries the gain",
    )
    parser.add_argument(
        "--ledger",
        type=Path,
        help="SQLite ledger (default: the run's; program files: openevolve_output/replays/ledger.sqlite)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="report folder (default: RUN_DIR/report; program files: openevolve_output/replays/report)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        plan = plan_replay(
            args.targets,
            top=args.top,
            seeds=args.seeds,
            baselines=args.baselines,
            profile=args.profile,
            ledger=args.ledger,
            out_dir=args.out,
            whole_validation=args.whole_val,
            steps=args.steps,
            ablate=args.ablate,
        )
        print(
            f"replaying {len(plan.candidates)} programs x {len(plan.seeds)} seeds of {plan.title} "
            f"(profile {plan.profile}{', whole validation split' if plan.whole_validation else ''}, "
            f"ledger {plan.ledger})",
            file=sys.stderr,
        )
        summary = summarise(plan, run_plan(plan))
        paths = write_reports(summary, plan.out_dir)
    except (ReplayError, ValueError, OSError) as e:
        fail(e)
    except KeyboardInterrupt:
        print(
            "replay.py: interrupted; run the same command again to resume (finished evaluations are in the ledger)",
            file=sys.stderr,
        )
        return 130
    print_table(summary)
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
