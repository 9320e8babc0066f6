"""Reading a run back, in layers: load (RunView from run.json, the newest complete checkpoint and
the trace), analyse (ranking, each program paired by seed against the initial program, lineage,
block diffs, history, Pareto front, MAP-Elites grid, failures by rule), render (the terminal,
exports, plots, one HTML page).

"Best" means what it means to OpenEvolve: the highest combined_score, and among equals the
checkpoint's best_program_id (the first program to reach that score), so the report's #1 is the
program in best/best_program.py.
"""

import time
from pathlib import Path

from .. import rundir
from .analyse import (
    RANKING_RULE,
    BlockDiff,
    Grid,
    block_diffs,
    failure_groups,
    find_program,
    history,
    lineage,
    map_elites_grid,
    pareto_front,
    prepare,
    rank,
    sandbox_warning,
    story,
    vs_initial,
)
from .console import print_program, print_report
from .exports import export_csv, export_json
from .load import Program, ReportError, RunView, read_checkpoint, resolve_target
from .load import read_run as _read_run
from .page import write_html
from .plots import write_plots
from .text import TABLE_COLUMNS


def load_run(path=None) -> RunView:
    """A run folder (or one of its checkpoints; default: the newest run), loaded and analysed:
    the population ranked, the lineage of the best traced."""
    return prepare(_read_run(path))


def report_dir(view: RunView) -> Path:
    return view.run_dir / rundir.REPORT


def follow(path, seconds: float, render, sleep=time.sleep):
    """render(view) of the run now, then again each time a newer complete checkpoint appears,
    looking every `seconds`; until interrupted (a named checkpoint: its run is followed)."""
    run_dir, _ = resolve_target(path)
    shown = None
    while True:
        latest = rundir.latest_checkpoint(run_dir)
        if latest is not None and latest != shown:
            render(load_run(run_dir))
            shown = latest
        sleep(seconds)
