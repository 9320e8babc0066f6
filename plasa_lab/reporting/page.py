"""Render as one HTML page: templates/report.html.j2 (Jinja2, autoescaped), filled from the same
cells as the terminal report, the plots inlined."""

import base64
from pathlib import Path

from ..util import atomic_write
from .analyse import best_diffs, sandbox_warning
from .load import RunView
from .text import (
    LINEAGE_COLUMNS,
    lineage_cells,
    llm_cells,
    llm_columns,
    llm_title,
    shows_seeds,
    summary_lines,
    table_cells,
    table_columns,
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


def write_html(view: RunView, out_dir: Path, top: int, plots: dict[str, Path]) -> Path:
    """report.html in out_dir: tables, diffs, and the plots as data URIs."""
    seeds = shows_seeds(view.population)
    diffs = best_diffs(view) or []
    page = (
        _environment()
        .get_template("report.html.j2")
        .render(
            name=view.name,
            sandbox_warning=sandbox_warning(view.record),
            warnings=view.warnings,
            summary=summary_lines(view),
            shown=min(top, len(view.population)),
            population=len(view.population),
            program_columns=table_columns(view.population),
            program_rows=[table_cells(p, seeds) for p in view.population[:top]],
            best=view.best.short_id,
            lineage_columns=LINEAGE_COLUMNS,
            lineage_rows=lineage_cells(view.chain),
            diffs=[diff_lines(d.text) for d in diffs],
            no_diff=(
                "No block changed: the best is the initial program."
                if view.initial
                else "No initial program in the checkpoint or the trace: no diff."
            ),
            llm_title=llm_title(view),
            llm_columns=llm_columns(view),
            llm_rows=llm_cells(view),
            plots=[
                dict(title=title, data=base64.b64encode(path.read_bytes()).decode()) for title, path in plots.items()
            ],
        )
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_dir / "report.html", page)
