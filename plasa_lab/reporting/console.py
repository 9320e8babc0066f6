"""Render for the terminal: the summary, the program table, the lineage, the diff, the lab notebook,
failures by rule, the LLM responses and replay verdicts; or one program's story. With rich, every
cell and line as plain text (markup off): a child's words are shown, never read as markup."""

from .analyse import best_diffs, failure_groups, replay_report, sandbox_warning, story
from .load import Program, RunView
from .text import (
    FAILURE_COLUMNS,
    LINEAGE_COLUMNS,
    PAIRED_COLUMN,
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
    summary_lines,
    table_cells,
    table_columns,
)

LEFT = {"id", "parent", "model", "changes", "rule", "reason", "program", "kind", "verdict"}
WHOLE = {"id", "parent", PAIRED_COLUMN}  # never folded: a change and its seeds read as one


def _console(console):
    from rich.console import Console

    return console or Console(width=None if Console().is_terminal else 200)


def _table(console, title: str, columns, rows):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), title_justify="left")
    for column in columns:
        justify = "left" if column in LEFT else "right"
        table.add_column(column, justify=justify, overflow="fold", no_wrap=column in WHOLE)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)


def _diffs(console, diffs):
    from rich.syntax import Syntax

    for d in diffs:
        console.print(Syntax(d.text, "diff", theme="ansi_dark", word_wrap=True))


def print_report(view: RunView, top: int, console=None):
    console = _console(console)
    say = lambda line, **style: console.print(line, markup=False, highlight=False, soft_wrap=True, **style)
    warning = sandbox_warning(view.record)
    if warning:  # first, and loud: nothing below was measured in isolation
        say(warning, style="bold red")
    for line in summary_lines(view):
        say(line)

    columns = table_columns(view)
    title = f"Top {min(top, len(view.population))} of {len(view.population)} programs"
    _table(console, title, columns, [table_cells(view, p, columns) for p in view.population[:top]])
    title = f"Lineage of the best ({view.best.short_id}), from the initial program"
    _table(console, title, LINEAGE_COLUMNS, lineage_cells(view, view.chain))

    diffs = best_diffs(view)
    if diffs is None:
        say("no initial program in the checkpoint or the trace: no diff", style="yellow")
    else:
        say(f"Diff of the best against the initial program, EVOLVE-BLOCKs only: {len(diffs) or 'no'} block(s) changed")
        _diffs(console, diffs)

    if text := lab_notebook(view):  # what the LLM is shown of the run's history
        from rich.markdown import Markdown

        console.print(Markdown(text))
    if groups := failure_groups(view):
        _table(console, failures_title(groups), FAILURE_COLUMNS, failure_cells(groups))
    if view.llm_calls:
        _table(console, llm_title(view), llm_columns(view), llm_cells(view))
    if report := replay_report(view):
        _table(console, replay_title(report), REPLAY_COLUMNS, replay_cells(report))


def print_program(view: RunView, program: Program, console=None):
    """One program: its line, lineage, diffs against its parent and the initial program, and the
    prompt and response that made it."""
    console = _console(console)
    say = lambda line, **style: console.print(line, markup=False, highlight=False, soft_wrap=True, **style)
    s = story(view, program)
    say(program_title(view, program), style="bold")
    for line in filter(None, (making_line(s), failure_line(s))):
        say(line)
    _table(
        console,
        f"Lineage of {program.short_id}, from the initial program",
        LINEAGE_COLUMNS,
        lineage_cells(view, s.chain),
    )
    for heading, diffs, missing in diff_sections(s):
        say(f"{heading}, EVOLVE-BLOCKs only: " + (f"{len(diffs)} block(s) changed" if diffs else missing), style="bold")
        _diffs(console, diffs)
    for title, text in conversation(s):
        say(f"--- {title} ---", style="bold")
        say(text)
