"""Tables, lineage, diffs, plots and one HTML page of an evolution run (see docs/reports.md).

python scripts/inspect_run.py [RUN_DIR | CHECKPOINT_DIR] [--top N] [--plots] [--html] [--json FILE] [--csv FILE]
                              [--program ID] [--watch [SECONDS]]
"""

import argparse
import signal
import sys
from pathlib import Path

from plasa_lab.cli import fail
from plasa_lab.reporting import (
    ReportError,
    export_csv,
    export_json,
    find_program,
    follow,
    load_run,
    print_program,
    print_report,
    report_dir,
    write_html,
    write_plots,
)


def write_files(view, args, refresh=None) -> list[Path]:
    """What the options ask for: plots, the page, the exports; the paths written."""
    written = []
    if args.plots or args.html:
        plots = write_plots(view, report_dir(view))
        written += plots.values()
        if args.html:
            written.append(write_html(view, report_dir(view), args.top, plots, refresh))
    if args.json:
        export_json(view, args.json)
        written.append(args.json)
    if args.csv:
        export_csv(view, args.csv)
        written.append(args.csv)
    return written


def watch(args) -> int:
    """Re-render the page (and whatever else was asked for) at each new checkpoint, until Ctrl-C."""
    args.html = True

    def render(view):
        for path in write_files(view, args, refresh=max(1, round(args.watch))):
            print(f"wrote {path} ({view.checkpoint.name}, iteration {view.iteration})", flush=True)

    print(
        f"watching {args.run or 'the newest run'} for new checkpoints every {args.watch:g} s; Ctrl-C stops", flush=True
    )
    # Ctrl-C (SIGINT) stops it even when it was started ignoring SIGINT, as a shell starts a background job
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        follow(args.run, args.watch, render)
    except KeyboardInterrupt:
        print("stopped watching")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Report on an evolution run: the top programs, the lineage of the "
        "best, its diff against the initial program, failures by rule, plots, one HTML page."
    )
    parser.add_argument(
        "run",
        nargs="?",
        type=Path,
        help="a run folder or one of its checkpoints/checkpoint_N (default: the newest run under openevolve_output/)",
    )
    parser.add_argument("--top", type=int, default=10, help="rows of the program table (default 10)")
    parser.add_argument("--plots", action="store_true", help="write PNGs into RUN_DIR/report/")
    parser.add_argument("--html", action="store_true", help="write RUN_DIR/report/report.html (plots included)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="export every program of the table, ranked, as JSON")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="the same as CSV")
    parser.add_argument(
        "--program",
        metavar="ID",
        help="one program (an id or its prefix): its lineage, diffs against its parent and the initial program, "
        "and the prompt and response that made it",
    )
    parser.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=30.0,
        metavar="SECONDS",
        help="re-write the HTML page each time a new checkpoint appears, looking every SECONDS (default 30); "
        "the page then reloads itself. Ctrl-C stops",
    )
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    if args.watch is not None and (args.watch <= 0 or args.program):
        parser.error("--watch takes a positive number of seconds, and no --program")
    try:
        if args.watch is not None:
            return watch(args)
        view = load_run(args.run)
        for warning in view.warnings:  # partly written checkpoints, broken lineage
            print(warning, file=sys.stderr)
        if args.program is not None:
            print_program(view, find_program(view, args.program))
            return 0
        print_report(view, args.top)
        written = write_files(view, args)
    except (ReportError, OSError) as e:
        fail(e)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
