"""Render as one HTML page: templates/report.html.j2 (Jinja2, autoescaped: a child's code, failure
lines, the LLM's words and the notebook are only ever text on it), filled from the same cells as
the terminal report, the plots inlined."""

import base64
from pathlib import Path

from ..util import atomic_write
from .analyse import best_diffs, failure_groups, replay_report, sandbox_warning, story
from .load import Program, RunView
from .text import (
    FAILURE_COLUMNS,
    LINEAGE_COLUMNS,
    REPLAY_COLUMNS,
    conversation,
    diff_sections,
    failure_cells,
    failure_line,
    failures_title,
    lab_notebook,
    lineage_cells,
    llm_cells,
    llm_columns,
    llm_title,
    making_line,
    program_title,
    replay_cells,
    replay_title,
    settings_sections,
    summary_lines,
    table_cells,
    table_columns,
    time_lines,
)

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined, keep_trailing_newline=True
    )
    env.globals["zip"] = zip
    return env


def diff_lines(text: str) -> list[tuple[str, str]]:
    """(css class, line) of a unified diff: hunk headers, added and removed lines marked."""

    def css(line):
        if line.startswith(("@@", "---", "+++")):
            return "hunk"
        return "add" if line.startswith("+") else "del" if line.startswith("-") else ""

    return [(css(line), line) for line in text.splitlines()]


def _program(view: RunView, program: Program) -> dict:
    """One program's collapsible section: its line, lineage, diffs, and the conversation that made it."""
    s = story(view, program)
    return dict(
        id=program.short_id,
        title=program_title(view, program),
        lines=[line for line in (making_line(s), failure_line(s)) if line],
        lineage=lineage_cells(view, s.chain),
        diffs=[(heading, [diff_lines(d.text) for d in diffs], missing) for heading, diffs, missing in diff_sections(s)],
        conversation=conversation(s),
    )


def write_html(view: RunView, out_dir: Path, top: int, plots: dict[str, Path], refresh: int | None = None) -> Path:
    """report.html in out_dir: tables, diffs, every program of the population, the plots as data
    URIs; with `refresh` (inspect_run.py --watch) the page reloads itself every that many seconds."""
    columns = table_columns(view)
    groups = failure_groups(view)
    report = replay_report(view)
    page = (
        _environment()
        .get_template("report.html.j2")
        .render(
            name=view.name,
            refresh=refresh,
            sandbox_warning=sandbox_warning(view.record),
            warnings=view.warnings,
            summary=summary_lines(view),
            shown=min(top, len(view.population)),
            population=len(view.population),
            program_columns=columns,
            program_rows=[table_cells(view, p, columns) for p in view.population[:top]],
            best=view.best.short_id,
            lineage_columns=LINEAGE_COLUMNS,
            lineage_rows=lineage_cells(view, view.chain),
            diffs=[diff_lines(d.text) for d in best_diffs(view) or []],
            no_diff=(
                "No block changed: the best is the initial program."
                if view.initial
                else "No initial program in the checkpoint or the trace: no diff."
            ),
            plots=[
                dict(title=title, data=base64.b64encode(path.read_bytes()).decode()) for title, path in plots.items()
            ],
            replay=report and dict(title=replay_title(report), rows=replay_cells(report), rule=report.get("rule")),
            replay_columns=REPLAY_COLUMNS,
            failures_title=failures_title(groups),
            failure_columns=FAILURE_COLUMNS,
            failure_rows=failure_cells(groups),
            notebook=lab_notebook(view),
            llm_title=llm_title(view),
            llm_columns=llm_columns(view),
            llm_rows=llm_cells(view),
            programs=[_program(view, p) for p in view.population],
            settings=settings_sections(view),
            time=time_lines(view),
        )
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_dir / "report.html", page)
