"""Render for the terminal: the summary, the program table, the lineage, the diff, the lab notebook
and the LLM responses, with rich."""

from . import notebook
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


def print_report(view: RunView, top: int, console=None):
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 160)
    warning = sandbox_warning(view.record)
    if warning:  # first, and loud: nothing below was measured in isolation
        console.print(warning, style="bold red", highlight=False)
    for line in summary_lines(view):
        console.print(line, highlight=False)

    seeds = shows_seeds(view.population)
    table = Table(
        title=f"Top {min(top, len(view.population))} of {len(view.population)} programs", title_justify="left"
    )
    for column in table_columns(view.population):
        table.add_column(column, justify="left" if column in ("id", "parent") else "right")
    for p in view.population[:top]:
        table.add_row(*table_cells(p, seeds))
    console.print(table)

    table = Table(title=f"Lineage of the best ({view.best.short_id}), from the initial program", title_justify="left")
    for column in LINEAGE_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in lineage_cells(view.chain):
        table.add_row(*row)
    console.print(table)

    diffs = best_diffs(view)
    if diffs is None:
        console.print("[yellow]no initial program in the checkpoint or the trace: no diff[/yellow]")
    else:
        console.print(
            f"Diff of the best against the initial program, EVOLVE-BLOCKs only: {len(diffs) or 'no'} block(s) changed",
            highlight=False,
        )
        for d in diffs:
            console.print(Syntax(d.text, "diff", theme="ansi_dark", word_wrap=True))

    if lab_notebook := notebook.build(view.run_dir):  # what the LLM is shown of the run's history
        from rich.markdown import Markdown

        console.print(Markdown(lab_notebook))

    if view.llm_calls:
        table = Table(title=llm_title(view), title_justify="left")
        for column in llm_columns(view):
            table.add_column(column, justify="left" if column == "model" else "right")
        for row in llm_cells(view):
            table.add_row(*row)
        console.print(table)
