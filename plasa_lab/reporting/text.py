"""The words and cells every rendering shows (the terminal, the HTML page, the exports), so that
they cannot drift apart."""

import json
import math

from ..util import printable
from . import notebook
from .analyse import (
    RANKING_RULE,
    FailureGroup,
    Story,
    best_confirmed,
    claim,
    is_confirmed,
    is_initial,
    llm_outcomes,
    outcome_names,
    pairs_by_seed,
    seed_metric_keys,
    uses_confirmation,
    vs_initial,
)
from .load import Program, RunView

TABLE_COLUMNS = (
    "id",
    "iteration",
    "generation",
    "island",
    "val_ppl",
    "val_loss",
    "val_acc",
    "density",
    "indexer_params",
    "train_seconds",
    "parent",
)
SEEDS_COLUMN = "seeds"  # shown after val_loss when the run confirms programs on several seeds
PAIRED_COLUMN = "vs initial (paired)"  # shown after it when the run records val_loss per seed
LINEAGE_COLUMNS = ("id", "iteration", "generation", "val_loss", PAIRED_COLUMN, "changes")


def fmt(value, kind="float"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "int":
        return f"{value:,.0f}"
    if kind in ("ppl", "seconds"):
        return f"{value:.1f}"
    if kind == "loss":
        return f"{value:.4f}"
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


def paired_cell(view: RunView, program: Program) -> str:
    """ "-1.2% (1 seed)", "-1.5% (3 seeds, p=0.01)": the change of val_ppl against the initial
    program on the seeds both were trained on, never a mean of one program's seeds beside another's."""
    if is_initial(view, program):
        return "reference"
    found = vs_initial(view, program)
    if found is None:
        return "-" if not program.passed else "no shared seed"
    p = "" if found.p is None else f", p={found.p:.2g}"
    return f"{found.change_pct:+.2f}% ({plural(found.seeds, 'seed')}{p})"


def table_columns(view: RunView) -> tuple[str, ...]:
    at = TABLE_COLUMNS.index("val_loss") + 1
    shown = (SEEDS_COLUMN,) * shows_seeds(view.population) + (PAIRED_COLUMN,) * pairs_by_seed(view)
    return TABLE_COLUMNS[:at] + shown + TABLE_COLUMNS[at:]


def table_cells(view: RunView, program: Program, columns: tuple[str, ...]) -> list[str]:
    m = program.metrics
    cells = dict(
        id=program.short_id,
        iteration=str(program.iteration),
        generation=str(program.generation),
        island="-" if program.island is None else str(program.island),
        val_ppl=fmt(m.get("val_ppl"), "ppl") if program.passed else "FAILED",
        val_loss=fmt(m.get("val_loss"), "loss") if program.passed else "-",
        val_acc=fmt(m.get("val_acc")),
        density=fmt(m.get("density")),
        indexer_params=fmt(m.get("indexer_params"), "int"),
        train_seconds=fmt(m.get("train_seconds"), "seconds"),
        parent=(program.parent_id or "-")[:8],
    )
    cells[SEEDS_COLUMN] = seeds_cell(program)
    cells[PAIRED_COLUMN] = paired_cell(view, program)
    return [cells[c] for c in columns]


def paired_fields(view: RunView, program: Program) -> dict:
    """The paired change in the export: vs_initial_pct, vs_initial_seeds, vs_initial_p."""
    found = vs_initial(view, program)
    return dict(
        vs_initial_pct=found.change_pct if found else None,
        vs_initial_seeds=found.seeds if found else None,
        vs_initial_p=found.p if found else None,
    )


def export_row(program: Program, extra: list[str] = ()) -> dict:
    """One program in the JSON/CSV export: TABLE_COLUMNS (full ids), its score, and the extra metrics asked for."""
    m = program.metrics
    row = dict(
        id=program.id,
        iteration=program.iteration,
        generation=program.generation,
        island=program.island,
        val_ppl=m.get("val_ppl"),
        val_loss=m.get("val_loss"),
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


def lineage_cells(view: RunView, chain: list[Program]) -> list[list[str]]:
    rows = []
    for p in chain:
        what = "initial program" if p.parent_id is None else (p.changes.replace("\n", "; ")[:160] or "-")
        rows.append(
            [
                p.short_id,
                "?" if p.iteration < 0 else str(p.iteration),
                str(p.generation),
                fmt(p.metrics.get("val_loss"), "loss") if p.passed else "FAILED",
                paired_cell(view, p),
                what,
            ]
        )
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


# ---------------------------------------------------------------------------------------------
# The plots' measure


def effect_label(by_seed: bool, short: bool = False) -> str:
    """What the plots show: the paired change where the run records val_loss per seed, else val_loss."""
    if by_seed:
        return "vs initial, % (paired)" if short else "change of val_ppl vs the initial program, % (paired by seed)"
    return "val_loss (uncapped)"


# ---------------------------------------------------------------------------------------------
# Failures by rule, replay verdicts, the lab notebook


FAILURE_COLUMNS = ("rule", "count", "reason", "iterations")


def failures_title(groups: list[FailureGroup]) -> str:
    total = sum(g.count for g in groups)
    return f"Failures by the rule that refused them ({total} in all: children rejected, iterations without a child)"


def failure_cells(groups: list[FailureGroup]) -> list[list[str]]:
    """One row per distinct reason; the rule and its total on the first row of its group."""
    rows = []
    for g in groups:
        for i, (reason, iterations) in enumerate(g.reasons.items()):
            shown = ", ".join(map(str, iterations[:12])) + (", ..." if len(iterations) > 12 else "")
            rows.append([f"{g.rule} ({g.count})" if i == 0 else "", str(len(iterations)), reason, shown])
    return rows


REPLAY_COLUMNS = (
    "program",
    "kind",
    "verdict",
    "change vs initial (paired)",
    "p (test)",
    "claimed (run seeds)",
    "on unseen seeds",
    "winner's curse",
)


def replay_title(report: dict) -> str:
    seeds = ", ".join(map(str, report.get("seeds") or [])) or "?"
    return (
        f"Replay verdicts (report/replay.json: profile {report.get('profile', '?')}, seeds {seeds}, "
        f"{report.get('created', '?')})"
    )


def _pct(value, seeds=None) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:+.2f}%" + (f" ({plural(seeds, 'seed')})" if isinstance(seeds, int) and seeds else "")


def replay_cells(report: dict) -> list[list[str]]:
    rows = []
    for e in report["programs"]:
        reference = e.get("kind") == "initial"
        p, curse = e.get("p_value"), e.get("shrinkage")
        rows.append(
            [
                str(e.get("name", "?")),
                str(e.get("kind", "?")),
                str(e.get("verdict", "?")) + (" (reference)" if reference else ""),
                "reference" if reference else _pct(e.get("change_vs_initial_pct"), e.get("paired_seeds")),
                "-"
                if reference or not isinstance(p, (int, float))
                else f"{p:.3g} ({str(e.get('test', '?')).split()[0]})",
                _pct(e.get("claimed_change_pct"), e.get("claimed_seeds")),
                _pct(e.get("unseen_change_pct"), e.get("unseen_seeds")),
                f"{curse:.0%}" if isinstance(curse, (int, float)) else "-",
            ]
        )
    return rows


def lab_notebook(view: RunView) -> str:
    """notebook.md as the run last wrote it (what the LLM read), else built from the trace (a run
    from before the notebook)."""
    return notebook.read(view.run_dir) or notebook.build(view.run_dir)


# ---------------------------------------------------------------------------------------------
# The run's settings and where the time went (run.json)


def _value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return "-" if value is None else str(value)


def settings_sections(view: RunView) -> list[tuple[str, list[list[str]]]]:
    """(title, [key, value] rows) of run.json's settings, profile and llm."""
    sections = []
    for key, title in (("settings", "settings (PLASA_*)"), ("profile", "profile"), ("llm", "LLM")):
        d = view.record.get(key)
        if isinstance(d, dict) and d:
            sections.append((title, [[str(k), _value(v)] for k, v in d.items()]))
    return sections


def _percent(shares: dict, key: str) -> str:
    """A recorded share as a percentage ("?" where the record lacks it)."""
    return f"{shares[key]:.0%}" if isinstance(shares.get(key), (int, float)) else "?"


def time_lines(view: RunView) -> list[str]:
    """Per session: its wall time, the evaluation slots' shares, and the confirmations' share."""
    lines = []
    for i, t in enumerate(view.record.get("time_accounting") or [], 1):
        if not isinstance(t, dict):
            continue
        if isinstance(busy := t.get("busy"), dict):  # each resource's busy share (runs with proposals ahead)
            lines.append(
                f"session {i}: {fmt(t.get('wall_seconds'), 'seconds')} s wall; {t.get('parallel', '?')} evaluation "
                f"slots busy {_percent(busy, 'evaluation_slots')} "
                f"({fmt(t.get('evaluation_seconds'), 'seconds')} s training, "
                f"at most {t.get('most_trainings_at_once', '?')} at once); the LLM busy {_percent(busy, 'llm')} "
                f"({fmt(t.get('llm_seconds'), 'seconds')} s); {t.get('proposals_ahead', '?')} proposal(s) ahead"
            )
            if isinstance(after := t.get("busy_after_first_proposal"), dict):
                lines[-1] += (
                    f"; from the first proposal on ({fmt(t.get('seconds_after_first_proposal'), 'seconds')} s): "
                    f"slots busy {_percent(after, 'evaluation_slots')}, the LLM busy {_percent(after, 'llm')}"
                )
            continue
        shares = t.get("shares") if isinstance(t.get("shares"), dict) else {}  # a run from before: shares of the slots
        lines.append(
            f"session {i}: {fmt(t.get('wall_seconds'), 'seconds')} s wall, {t.get('parallel', '?')} evaluation slots: "
            f"waiting on the LLM {_percent(shares, 'llm')} ({fmt(t.get('llm_seconds'), 'seconds')} s), evaluating "
            f"{_percent(shares, 'evaluations')} ({fmt(t.get('evaluation_seconds'), 'seconds')} s), "
            f"idle or OpenEvolve's own work {_percent(shares, 'idle_or_other')}"
        )
    c = view.record.get("confirmation")
    if isinstance(c, dict) and isinstance(c.get("share"), (int, float)):
        cap = f"{c['cap']:.0%}" if isinstance(c.get("cap"), (int, float)) else "?"
        lines.append(
            f"confirmations: {c.get('confirmation_trainings', '?')} of {c.get('stage2_trainings', '?')} stage-2 "
            f"trainings ({c['share']:.0%}; cap {cap})"
        )
    expected = view.record.get("expected_seconds_per_child")
    if isinstance(expected, (int, float)):
        lines.append(f"expected per child at the start: {fmt(expected, 'seconds')} s")
    return lines


# ---------------------------------------------------------------------------------------------
# One program: where it comes from, what it changed, the prompt and the response that made it


def program_title(view: RunView, program: Program) -> str:
    where = f"#{view.population.index(program) + 1}" if program in view.population else "displaced from the population"
    head = f"{program.short_id} ({where}): iteration {'?' if program.iteration < 0 else program.iteration}, "
    head += f"generation {program.generation}, island {'-' if program.island is None else program.island}; "
    if not program.passed:
        return head + "FAILED"
    return (
        head + f"val_loss {fmt(program.metrics.get('val_loss'), 'loss')} ({seeds_cell(program)}); "
        f"{PAIRED_COLUMN} {paired_cell(view, program)}"
    )


def making_line(story: Story) -> str:
    p, call = story.program, story.call or {}
    if p.parent_id is None:
        return "the initial program: no parent, no prompt"
    if not story.prompt and story.response is None and not call:
        return "made by an LLM call the run did not record (a parent known only from the trace)"
    parent = story.parent.short_id if story.parent else (p.parent_id or "?")[:8]
    seconds = f" in {fmt(call['seconds'], 'seconds')} s" if isinstance(call.get("seconds"), (int, float)) else ""
    outcome = f": {call['outcome']}" if call.get("outcome") else ""
    return f"made at iteration {p.iteration} from {parent} by {story.model or 'the LLM'}{seconds}{outcome}"


def failure_line(story: Story) -> str | None:
    if story.program.passed:
        return None
    return f"failed: {story.failure or 'scored 0 (no failure line)'}"


def diff_sections(story: Story) -> list[tuple[str, list, str]]:
    """(heading, block diffs, what to say when there are none) against the parent and the initial program."""
    if story.program.parent_id is None:
        return [("Diff", [], "none: it is the initial program")]

    def section(heading, diffs, missing):
        if isinstance(diffs, str):  # a program whose blocks do not split
            return (f"Diff {heading}", [], diffs)
        return (f"Diff {heading}", diffs or [], missing if diffs is None else "no EVOLVE-BLOCK changed")

    sections = [section("against its parent", story.vs_parent, "its parent is not recorded")]
    if story.parent is not None and story.parent.parent_id is None:
        return sections + [("Diff against the initial program", [], "the same: its parent is the initial program")]
    return sections + [section("against the initial program", story.vs_initial, "the initial program is unknown")]


def conversation(story: Story) -> list[tuple[str, str]]:
    """(title, text) of the prompt's system and user messages and the response, as printable text."""
    parts = [(f"prompt: {role}", story.prompt[role]) for role in ("system", "user") if story.prompt.get(role)]
    if story.response is not None:
        parts.append(("response", story.response))
    return [(title, printable(str(text))) for title, text in parts]
