"""The words and cells every rendering shows (the terminal, the HTML page, the exports), so that
they cannot drift apart."""

import math

from .analyse import (
    RANKING_RULE,
    best_confirmed,
    claim,
    is_confirmed,
    llm_outcomes,
    outcome_names,
    seed_metric_keys,
    uses_confirmation,
)
from .load import Program, RunView

TABLE_COLUMNS = (
    "id",
    "iteration",
    "generation",
    "island",
    "val_ppl",
    "val_acc",
    "density",
    "indexer_params",
    "train_seconds",
    "parent",
)
SEEDS_COLUMN = "seeds"  # shown after val_ppl when the run confirms programs on several seeds
LINEAGE_COLUMNS = ("id", "iteration", "generation", "val_ppl", "vs parent", "changes")


def fmt(value, kind="float"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "int":
        return f"{value:,.0f}"
    if kind in ("ppl", "seconds"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


# ---------------------------------------------------------------------------------------------
# The program table


def seeds_cell(program: Program) -> str:
    """ "1 seed" (unconfirmed), "3 seeds ✓" (confirmed), "-" when the metrics do not say."""
    m = program.metrics
    seeds = m.get("seeds")
    text = plural(int(seeds), "seed") if isinstance(seeds, (int, float)) and not isinstance(seeds, bool) else ""
    if is_confirmed(program):
        return f"{text} ✓".strip()
    return text or ("unconfirmed" if "confirmed" in m else "-")


def shows_seeds(programs: list[Program]) -> bool:
    return uses_confirmation(programs) or any("seeds" in p.metrics for p in programs)


def table_columns(programs: list[Program]) -> tuple[str, ...]:
    if not shows_seeds(programs):
        return TABLE_COLUMNS
    at = TABLE_COLUMNS.index("val_ppl") + 1
    return TABLE_COLUMNS[:at] + (SEEDS_COLUMN,) + TABLE_COLUMNS[at:]


def table_cells(program: Program, seeds: bool = False) -> list[str]:
    m = program.metrics
    cells = [
        program.short_id,
        str(program.iteration),
        str(program.generation),
        "-" if program.island is None else str(program.island),
        fmt(m.get("val_ppl"), "ppl") if program.passed else "FAILED",
    ]
    if seeds:
        cells.append(seeds_cell(program))
    return cells + [
        fmt(m.get("val_acc")),
        fmt(m.get("density")),
        fmt(m.get("indexer_params"), "int"),
        fmt(m.get("train_seconds"), "seconds"),
        (program.parent_id or "-")[:8],
    ]


def export_row(program: Program, extra: list[str] = ()) -> dict:
    """One program in the JSON/CSV export: TABLE_COLUMNS (full ids), its score, and the extra metrics asked for."""
    m = program.metrics
    row = dict(
        id=program.id,
        iteration=program.iteration,
        generation=program.generation,
        island=program.island,
        val_ppl=m.get("val_ppl"),
        val_acc=m.get("val_acc"),
        density=m.get("density"),
        indexer_params=m.get("indexer_params"),
        train_seconds=m.get("train_seconds"),
        parent=program.parent_id,
        combined_score=m.get("combined_score"),
        passed=program.passed,
    )
    row.update({key: m.get(key) for key in extra})
    return row


def export_extra(programs: list[Program]) -> list[str]:
    """Metrics the export adds when any program carries them: confirmation and per-seed losses."""
    extra = [k for k in ("seeds", "confirmed") if any(k in p.metrics for p in programs)]
    return extra + seed_metric_keys(programs)


# ---------------------------------------------------------------------------------------------
# The lineage


def lineage_cells(chain: list[Program]) -> list[list[str]]:
    rows, previous = [], None
    for p in chain:
        ppl = p.val_ppl if p.passed else None
        change = "-" if previous is None or ppl is None else f"{(ppl - previous) / previous * 100:+.2f}%"
        what = "initial program" if p.parent_id is None else (p.changes.replace("\n", "; ")[:160] or "-")
        rows.append(
            [
                p.short_id,
                "?" if p.iteration < 0 else str(p.iteration),
                str(p.generation),
                fmt(ppl, "ppl") if ppl is not None else "FAILED",
                change,
                what,
            ]
        )
        previous = ppl if ppl is not None else previous
    return rows


# ---------------------------------------------------------------------------------------------
# The summary


def confirmation_line(view: RunView) -> str | None:
    """None unless the run confirms programs on several seeds; then which program is the best confirmed."""
    if not uses_confirmation(view.population):
        return None
    confirmed = best_confirmed(view)
    if confirmed is None:
        return f"no program is confirmed yet; the best, {view.best.short_id}, rests on {seeds_cell(view.best)}"
    line = (
        f"best confirmed program: {confirmed.short_id} (val_ppl {fmt(confirmed.val_ppl, 'ppl')}, "
        f"{seeds_cell(confirmed)}, #{view.population.index(confirmed) + 1} in the ranking)"
    )
    if confirmed is not view.best:
        line += f"; the #1, {view.best.short_id}, is not confirmed ({seeds_cell(view.best)})"
    return line


def summary_lines(view: RunView) -> list[str]:
    r = view.record
    passed = sum(1 for t in view.trace if ((t.get("child_metrics") or {}).get("combined_score") or 0) > 0)
    lines = [
        f"run {view.run_dir}",
        f"checkpoint {view.checkpoint.name} (iteration {view.iteration} of {r.get('iterations_total', '?')}); "
        f"{len(view.population)} programs in the population",
        f"children: {len(view.trace)} evaluated, {passed} passed, {len(view.trace) - passed} rejected; "
        f"{len(view.failures)} iterations produced no child",
    ]
    if r:
        profile, llm, corpus = r.get("profile") or {}, r.get("llm") or {}, r.get("corpus") or {}
        lines.append(
            f"profile {profile.get('name', '?')} ({profile.get('steps', '?')} steps) | llm {llm.get('mode', '?')} "
            f"({', '.join(llm.get('models') or [])}) | corpus {corpus.get('corpus', '?')} "
            f"({str(corpus.get('fingerprint', '?'))[:12]})"
        )
    lines.append(RANKING_RULE)
    confirmation = confirmation_line(view)
    if confirmation:
        lines.append(confirmation)
    curse = winners_curse_line(view)
    if curse:
        lines.append(curse)
    return lines


def winners_curse_line(view: RunView) -> str | None:
    """The best's change against the initial program where the search selected it, beside its change
    on seeds the run never used (when the run was replayed on them): how much of the claim held."""
    best = best_confirmed(view) or view.best
    c = claim(view, best)
    if c is None:
        return None
    line = (
        f"{best.short_id} claims {c.claimed_pct:+.2f}% val_ppl against the initial program on the "
        f"{plural(c.claimed_seeds, 'seed')} the search selected it on (paired)"
    )
    if c.unseen_pct is None:
        return line + (
            f"; a search's best is flattered by its selection (the winner's curse): replay it on other seeds "
            f"(scripts/replay.py {view.run_dir} --seeds 101,102,103,104,105) to see how much holds"
        )
    p = "" if c.unseen_p is None else f", p={c.unseen_p:.2g}"
    taken = "" if c.shrinkage is None else f"; the winner's curse took {c.shrinkage:.0%} of the claim"
    return line + f"; on {plural(c.unseen_seeds, 'unseen seed')} {c.unseen_pct:+.2f}%{p}{taken}"


# ---------------------------------------------------------------------------------------------
# LLM responses


def llm_title(view: RunView) -> str:
    return (
        f"LLM responses per model ({plural(len(view.llm_calls), 'call')} in llm_responses.jsonl, "
        f"up to iteration {view.iteration})"
    )


def llm_columns(view: RunView) -> list[str]:
    return ["model", "responses", *outcome_names(view.llm_calls), "mean s/response"]


def llm_cells(view: RunView) -> list[list[str]]:
    return [
        [row.model, str(row.responses), *map(str, row.outcomes.values()), fmt(row.mean_seconds, "seconds")]
        for row in llm_outcomes(view.llm_calls)
    ]
