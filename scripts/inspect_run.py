"""Tables, lineage, diffs and plots of an evolution run (see README, "In the morning").

python scripts/inspect_run.py [RUN_DIR | CHECKPOINT_DIR] [--top N] [--plots] [--html] [--json FILE] [--csv FILE]
"""

import argparse
import sys
from pathlib import Path

from plasa_lab.cli import fail
from plasa_lab.reporting import (
    ReportError,
    export_csv,
    export_json,
    load_run,
    print_report,
    report_dir,
    write_html,
    write_plots,
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Report on an evolution run: the top programs, the lineage of the "
        "best, its diff against the initial program, plots."
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
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    try:
        view = load_run(args.run)
        for warning in view.warnings:  # partly written checkpoints, broken lineage
            print(warning, file=sys.stderr)
        print_report(view, args.top)
        written = []
        if args.plots or args.html:
            plots = write_plots(view, report_dir(view))
            written += plots.values()
            if args.html:
                written.append(write_html(view, report_dir(view), args.top, plots))
        if args.json:
            export_json(view, args.json)
            written.append(args.json)
        if args.csv:
            export_csv(view, args.csv)
            written.append(args.csv)
    except (ReportError, OSError) as e:
        fail(e)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
