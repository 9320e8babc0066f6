"""Analyse: what a RunView means. The ranking (OpenEvolve's), each program against the initial
program paired by seed, lineages (of one program and of the whole population), block diffs, how a
program was made (its prompt and response), the per-iteration history, the Pareto front, the
MAP-Elites grid as OpenEvolve saved it, failures by rule, confirmation, replays, the sandbox, and
what became of the LLM's responses. No printing here."""

import difflib
import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field

from .. import rundir
from ..program.blocks import BlockError, split_blocks
from ..stats import paired_change, seed_losses
from ..util import one_line
from .load import UNKNOWN, Program, ReportError, RunView

FEATURE_DIMENSIONS = ("density", "indexer_params")  # config.yaml's; used when a run has no run.json
RANKING_RULE = (
    "ranked by combined_score = 1/min(val_ppl, 10000), highest first; ties (every ppl above 10000 "
    "scores 1e-4) in the order found: OpenEvolve keeps its best until another scores strictly higher, "
    "so #1 is its best_program_id"
)


# ---------------------------------------------------------------------------------------------
# Ranking: OpenEvolve's notion of best


def fitness(metrics: dict, feature_dimensions=FEATURE_DIMENSIONS) -> float:
    """OpenEvolve's get_fitness_score: combined_score when present, else the mean of the numeric
    metrics that are not feature dimensions (all numeric metrics if none is left)."""
    if "combined_score" in metrics:
        try:
            return float(metrics["combined_score"] or 0.0)
        except (TypeError, ValueError):
            pass
    numeric = {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    }
    values = [v for k, v in numeric.items() if k not in feature_dimensions] or list(numeric.values())
    return statistics.mean(values) if values else 0.0


def rank(programs: list[Program], best_id: str | None = None, feature_dimensions=FEATURE_DIMENSIONS) -> list[Program]:
    """Best first, as OpenEvolve decides: the higher fitness; among equals, OpenEvolve's own
    best_program_id, then the program found first. (OpenEvolve replaces its best only with a
    strictly fitter program, so among equals it keeps the earliest; `best_id` settles the order
    where creation times do not match the order programs entered its database.)"""

    def key(p: Program):
        return (
            -fitness(p.metrics, feature_dimensions),
            p.id != best_id,
            p.timestamp is None,
            p.timestamp or 0.0,
            p.iteration,
            p.id,
        )

    return sorted(programs, key=key)


def feature_dimensions(view: RunView) -> tuple[str, ...]:
    return tuple(view.config("database", "feature_dimensions", default=FEATURE_DIMENSIONS))


def prepare(view: RunView) -> RunView:
    """Rank the population and trace the lineage of the best (in place; returns the view)."""
    best_id = view.openevolve_best_id
    view.population = rank(view.population, best_id, feature_dimensions(view))
    if best_id and best_id != view.best.id:
        why = (
            "is not among its programs"
            if best_id not in {p.id for p in view.population}
            else "does not have the highest combined_score"
        )
        view.warnings.append(
            f"warning: {view.checkpoint.name}'s best_program_id {best_id[:8]} {why}; #1 here is {view.best.short_id}"
        )
    view.chain = lineage(view)
    return view


# ---------------------------------------------------------------------------------------------
# Like with like: each program against the initial program, on the seeds both were trained on


@dataclass(frozen=True)
class Paired:
    change_pct: float  # 100 * expm1(mean per-seed val_loss difference): the change of val_ppl; negative is better
    seeds: int  # the seeds both were trained on
    p: float | None  # two-sided paired t-test; None on one seed


def paired(view: RunView, metrics: dict) -> Paired | None:
    """A program's change against the initial program paired by seed (its val_loss_seed<N> metrics
    against the initial program's); None for a failed program or one that shares no seed with it."""
    if view.initial is None or (metrics.get("combined_score") or 0) <= 0:
        return None
    seed = search_seed(view)
    change, p, n = paired_change(seed_losses(metrics, seed), seed_losses(view.initial.metrics, seed))
    return Paired(100 * math.expm1(change), n, p) if n else None


def search_seed(view: RunView) -> int | None:
    """The run's first seed, on which every child is trained (run.json's settings)."""
    settings = view.record.get("settings") or {}
    return (settings.get("seeds") or [settings.get("seed")])[0]


def vs_initial(view: RunView, program: Program) -> Paired | None:
    """paired() of a program; None for the initial program itself, the reference."""
    return None if is_initial(view, program) else paired(view, program.metrics)


def is_initial(view: RunView, program: Program) -> bool:
    return view.initial is not None and program.id == view.initial.id


def pairs_by_seed(view: RunView) -> bool:
    """Whether any program other than the initial one has a paired change (a run that records
    val_loss per seed): then every view shows that change, else the uncapped val_loss."""
    return any(vs_initial(view, p) for p in view.known.values())


def effect(view: RunView, metrics: dict, by_seed: bool) -> float | None:
    """What the plots show of a program: its paired change in % (by_seed), else its val_loss
    (uncapped, where val_ppl stops at 10000); None when it failed or shares no seed."""
    if by_seed:
        found = paired(view, metrics)
        return found.change_pct if found else None
    return metrics.get("val_loss") if (metrics.get("combined_score") or 0) > 0 else None


# ---------------------------------------------------------------------------------------------
# Lineage and diff


def lineage(view: RunView, program: Program | None = None) -> list[Program]:
    """The chain from the initial program (first) to `program` (default: the best), by parent ids."""
    chain, seen = [program or view.best], set()
    while chain[-1].parent_id not in (None, UNKNOWN) and chain[-1].id not in seen:
        seen.add(chain[-1].id)
        parent = view.known.get(chain[-1].parent_id)
        if parent is None:
            warning = (
                f"warning: lineage breaks at {chain[-1].short_id}: parent "
                f"{chain[-1].parent_id[:8]} is in neither the checkpoint nor the trace"
            )
            if warning not in view.warnings:  # every program below the break meets it
                view.warnings.append(warning)
            break
        chain.append(parent)
    return chain[::-1]


def lineage_layout(view: RunView) -> dict[str, tuple[float, int]]:
    """(x, y) of every known program for a picture of the whole population's lineage: x its
    iteration, y its row in a depth-first walk from the roots (children by iteration), so that each
    subtree holds a band of rows. A parent known only from the trace sits half an iteration before
    its first child."""
    children = {}
    for p in sorted(view.known.values(), key=lambda p: (p.iteration, p.id)):
        parent = p.parent_id if p.parent_id in view.known else None
        children.setdefault(parent, []).append(p)
    rows, stack = {}, list(reversed(children.get(None, [])))
    while stack:
        p = stack.pop()
        if p.id not in rows:
            rows[p.id] = len(rows)
            stack += reversed(children.get(p.id, []))
    layout = {}
    for pid, row in rows.items():
        p = view.known[pid]
        firsts = [c.iteration for c in children.get(pid, []) if c.iteration >= 0]
        layout[pid] = (p.iteration if p.iteration >= 0 else min(firsts, default=0.5) - 0.5, row)
    return layout


@dataclass
class BlockDiff:
    name: str
    text: str  # a unified diff of the block's body; line numbers are the file's


def block_diffs(before: str, after: str, before_name="initial", after_name="best") -> list[BlockDiff]:
    """Unified diffs of the EVOLVE-BLOCK bodies that differ, block by block (the text outside the
    blocks is fixed by the evaluator, so this is the whole change)."""
    try:
        old_blocks, new_blocks = split_blocks(before)[1], split_blocks(after)[1]
    except BlockError as e:
        raise ReportError(f"cannot split the programs into EVOLVE-BLOCKs: {e}") from None
    diffs = []
    for old, new in zip(old_blocks, new_blocks):
        if old.body == new.body:
            continue
        old_lines, new_lines = old.body.splitlines(), new.body.splitlines()
        hunks = []
        for group in difflib.SequenceMatcher(None, old_lines, new_lines).get_grouped_opcodes(3):
            i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]
            hunks.append(f"@@ -{old.start + 2 + i1},{i2 - i1} +{new.start + 2 + j1},{j2 - j1} @@")
            for tag, a1, a2, b1, b2 in group:
                if tag == "equal":
                    hunks += [f" {line}" for line in old_lines[a1:a2]]
                    continue
                hunks += [f"-{line}" for line in old_lines[a1:a2]]
                hunks += [f"+{line}" for line in new_lines[b1:b2]]
        header = [f"--- {before_name} [{old.name}]", f"+++ {after_name} [{new.name}]"]
        diffs.append(BlockDiff(new.name, "\n".join(header + hunks)))
    return diffs


def best_diffs(view: RunView) -> list[BlockDiff] | None:
    """The best's block diffs against the initial program; None when the initial program is unknown."""
    return None if view.initial is None else block_diffs(view.initial.code, view.best.code)


def diffs_or_why(before: Program | None, after: Program, before_name: str) -> list[BlockDiff] | str | None:
    """Block diffs of `after` against `before`; None without `before`; the reason as a line when
    one of them has no readable EVOLVE-BLOCKs (a child the checks refused may have broken them)."""
    if before is None:
        return None
    try:
        return block_diffs(before.code, after.code, f"{before_name} {before.short_id}", after.short_id)
    except ReportError as e:
        return str(e)


@dataclass
class Story:
    """One program: where it comes from, what it changed, and the LLM call that made it."""

    program: Program
    chain: list[Program]  # from the initial program to it
    parent: Program | None
    vs_parent: list[BlockDiff] | str | None  # diffs_or_why's
    vs_initial: list[BlockDiff] | str | None
    prompt: dict = field(default_factory=dict)  # the trace's {"system": ..., "user": ...} ({} when not kept)
    response: str | None = None
    call: dict | None = None  # its llm_responses.jsonl line (model, seconds, outcome)
    failure: str | None = None  # its one-line failure artifact, when it failed
    model: str | None = None  # the model that wrote the response (the call's, else the trace's)


def story(view: RunView, program: Program) -> Story:
    record = next((r for r in view.trace if r.get("child_id") == program.id), {})
    response = record.get("llm_response")
    calls = [c for c in view.llm_calls if program.iteration > 0 and record_iteration(c) == program.iteration]
    call = next((c for c in calls if response is not None and c.get("response") == response), None)
    call = call or next(iter(calls), None)
    parent = view.known.get(program.parent_id) if program.parent_id else None
    initial = None if is_initial(view, program) else view.initial
    prompt = record.get("prompt")
    return Story(
        program,
        lineage(view, program),
        parent,
        diffs_or_why(parent, program, "parent"),
        diffs_or_why(initial, program, "initial"),
        prompt if isinstance(prompt, dict) else {},
        response if response is not None else (call or {}).get("response"),
        call,
        (record.get("artifacts") or {}).get("failure"),
        (call or {}).get("model") or (record.get("metadata") or {}).get("llm_model"),
    )


def record_iteration(record: dict) -> int | None:
    try:
        return int(record.get("iteration"))
    except (TypeError, ValueError):
        return None


def find_program(view: RunView, prefix: str) -> Program:
    """The known program whose id is or starts with `prefix`; ReportError when none or several do."""
    if prefix in view.known:
        return view.known[prefix]
    found = sorted(pid for pid in view.known if pid.startswith(prefix))
    if len(found) == 1:
        return view.known[found[0]]
    if not found:
        example = view.best.short_id
        raise ReportError(f"no program {prefix!r} in {view.run_dir} (an id as the tables show it: {example})")
    raise ReportError(
        f"{prefix!r} names {len(found)} programs ({', '.join(f[:8] for f in found[:5])}): give more of it"
    )


# ---------------------------------------------------------------------------------------------
# Per-iteration history and the Pareto front


@dataclass(frozen=True)
class Point:
    iteration: int
    passed: bool
    value: float | None  # effect(): None when it failed or shares no seed with the initial program
    seeds: int  # the seeds the value rests on: shared with the initial program (by seed), else its own


def history(view: RunView, by_seed: bool) -> list[Point]:
    """The initial program (iteration 0) and every child, in iteration order."""
    records = [dict(iteration=0, child_metrics=view.initial.metrics)] if view.initial else []
    points = []
    for r in records + sorted(view.trace, key=lambda r: r["iteration"]):
        m = r.get("child_metrics") or {}
        found = paired(view, m) if by_seed else None
        seeds = found.seeds if found else int(m.get("seeds") or 1)
        points.append(Point(int(r["iteration"]), (m.get("combined_score") or 0) > 0, effect(view, m, by_seed), seeds))
    return points


def best_and_median(points: list[Point]) -> list[tuple[int, float, float]]:
    """(iteration, lowest value so far, median so far) over the programs with a value."""
    rows, seen = [], []
    for iteration in sorted({p.iteration for p in points}):
        seen += [p.value for p in points if p.iteration == iteration and p.value is not None]
        if seen:
            rows.append((iteration, min(seen), statistics.median(seen)))
    return rows


def evaluated_programs(view: RunView) -> list[Program]:
    """Every passing program with both feature values, each once."""
    return [p for p in view.known.values() if p.passed and "density" in p.metrics and "indexer_params" in p.metrics]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (density, val_ppl) points no other point beats in both (lower is better in both), by density."""
    front, best_ppl = [], math.inf
    for density, ppl in sorted(set(points)):
        if ppl < best_ppl:
            front.append((density, ppl))
            best_ppl = ppl
    return front


# ---------------------------------------------------------------------------------------------
# The MAP-Elites grid, as OpenEvolve saved it


@dataclass
class Grid:
    dims: tuple[str, str]  # (x, y): the run's feature_dimensions, in OpenEvolve's key order
    bins: tuple[int, int]  # bins along x and y
    ranges: dict  # dim -> (min, max) of OpenEvolve's feature_stats at the checkpoint, or None
    cells: dict  # (x, y) -> the population's programs OpenEvolve placed there (any island), best first
    dropped: int = 0  # cell entries naming a program that is not in the checkpoint's programs

    def best(self, cell) -> Program:
        return self.cells[cell][0]


def _bins(view: RunView, dims) -> list[int]:
    bins = view.config("database", "feature_bins", default=10)
    return [int(bins.get(d, 10)) if isinstance(bins, dict) else int(bins) for d in dims]


def map_elites_grid(view: RunView) -> Grid:
    """The cells of every island's feature map in the checkpoint (island_feature_maps: "x-y" ->
    program id). These are OpenEvolve's own coordinates: each program keeps the bin it got when it
    entered, scaled by feature_stats as they were then, so re-binning here could disagree."""
    dims = feature_dimensions(view)[:2]
    if len(dims) < 2:
        dims = FEATURE_DIMENSIONS
    order = {p.id: i for i, p in enumerate(view.population)}  # ranked: a cell's first program is its best
    cells, dropped = {}, 0
    for island_map in view.metadata.get("island_feature_maps") or []:
        for key, program_id in (island_map or {}).items():
            try:
                coords = tuple(int(c) for c in str(key).split("-"))
            except ValueError:
                coords = ()
            if len(coords) != 2 or program_id not in order:
                dropped += 1
                continue
            members = cells.setdefault(coords, [])
            if program_id not in members:
                members.append(program_id)
    population = {p.id: p for p in view.population}
    cells = {c: [population[pid] for pid in sorted(ids, key=order.get)] for c, ids in cells.items()}
    bins = _bins(view, dims)
    for axis in (0, 1):  # a config changed mid-run: never drop a cell for want of a column
        bins[axis] = max([bins[axis]] + [c[axis] + 1 for c in cells])
    stats = view.metadata.get("feature_stats") or {}
    ranges = {
        d: (float(stats[d]["min"]), float(stats[d]["max"]))
        if isinstance(stats.get(d), dict) and {"min", "max"} <= stats[d].keys()
        else None
        for d in dims
    }
    return Grid(tuple(dims), tuple(bins), ranges, cells, dropped)


# ---------------------------------------------------------------------------------------------
# Confirmation (metrics `confirmed`, `seeds`, `val_loss_seed<N>`), the sandbox, LLM responses


def uses_confirmation(programs: list[Program]) -> bool:
    return any("confirmed" in p.metrics for p in programs)


def is_confirmed(program: Program) -> bool:
    return program.metrics.get("confirmed") == 1.0


def best_confirmed(view: RunView) -> Program | None:
    return next((p for p in view.population if p.passed and is_confirmed(p)), None)


@dataclass(frozen=True)
class Claim:
    """A program's change against the initial program, paired by seed: on the run's seeds, where the
    search selected it (claimed), and where a replay trained it on seeds the run never used."""

    claimed_pct: float
    claimed_seeds: int
    unseen_pct: float | None = None  # None: not replayed on unseen seeds
    unseen_seeds: int = 0
    unseen_p: float | None = None
    shrinkage: float | None = None  # the share of the claim the unseen seeds take back


def claim(view: RunView, program: Program) -> Claim | None:
    """None without the initial program's per-seed losses (a run that did not confirm on seeds)."""
    found = vs_initial(view, program)
    if found is None:
        return None
    entry = _replayed(view, program)
    if not entry or entry.get("unseen_change_pct") is None:
        return Claim(found.change_pct, found.seeds)
    return Claim(
        found.change_pct,
        found.seeds,
        entry["unseen_change_pct"],
        entry["unseen_seeds"],
        entry.get("unseen_p"),
        entry.get("shrinkage"),
    )


def replay_report(view: RunView) -> dict | None:
    """The run's replay report (RUN_DIR/report/replay.json, written by scripts/replay.py), if any."""
    try:
        report = json.loads((view.run_dir / rundir.REPORT / "replay.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("programs"), list):
        return None
    report["programs"] = [e for e in report["programs"] if isinstance(e, dict)]
    return report


def _replayed(view: RunView, program: Program) -> dict | None:
    """The program's entry in the run's replay report, if it was replayed."""
    sha = hashlib.sha256(program.code.encode()).hexdigest()
    return next((e for e in (replay_report(view) or {}).get("programs", []) if e.get("code_sha256") == sha), None)


# ---------------------------------------------------------------------------------------------
# Failures, by the rule that refused them


@dataclass
class FailureGroup:
    rule: str  # the failure line's first words ("stage 1", "screened out"; "no child": no program came back)
    reasons: dict[str, list[int]]  # each distinct reason -> the iterations it ended, most frequent first

    @property
    def count(self):
        return sum(map(len, self.reasons.values()))


RULE_WORDS = 40  # a head longer than this is not a rule's name but a sentence: "other"


def failure_groups(view: RunView) -> list[FailureGroup]:
    """Every child that failed (its one-line `failure`) and every iteration that produced no child
    (OpenEvolve's error), grouped by the words before the line's first colon; most frequent first."""
    lines = [
        (int(r["iteration"]), (r.get("artifacts") or {}).get("failure") or "scored 0 with no failure line")
        for r in view.trace
        if ((r.get("child_metrics") or {}).get("combined_score") or 0) <= 0
    ]
    lines += [(record_iteration(r) or 0, f"no child: {r.get('error') or 'no error recorded'}") for r in view.failures]
    groups = {}
    for iteration, line in sorted(lines):
        rule, colon, reason = one_line(line, 1000).partition(": ")
        if not colon or len(rule) > RULE_WORDS:
            rule, reason = "other", one_line(line, 1000)
        groups.setdefault(rule, {}).setdefault(reason, []).append(iteration)
    found = [
        FailureGroup(rule, dict(sorted(reasons.items(), key=lambda kv: -len(kv[1]))))
        for rule, reasons in groups.items()
    ]
    return sorted(found, key=lambda g: -g.count)


def seed_metric_keys(programs: list[Program]) -> list[str]:
    """val_loss_seed<N> keys present in any program, by seed."""
    keys = {k for p in programs for k in p.metrics if k.startswith("val_loss_seed") and k[13:].isdigit()}
    return sorted(keys, key=lambda k: int(k[13:]))


def sandbox_warning(record: dict) -> str | None:
    """The line every report shows when the run's children were not isolated by bwrap (None when
    they were, or when run.json does not say: runs older than the sandbox record)."""
    sandbox = record.get("sandbox")
    if sandbox is None:
        return None
    isolation = sandbox.get("isolation") if isinstance(sandbox, dict) else sandbox
    if isolation == "bwrap":
        return None
    why = (
        sandbox.get("warning") if isinstance(sandbox, dict) else None
    ) or "child code ran with this user's access to the machine"
    return (
        f"WARNING: this run's children were not isolated (sandbox isolation: {isolation or 'unknown'}, "
        f"not bwrap): {why}"
    )


@dataclass
class ModelOutcomes:
    model: str
    responses: int
    outcomes: dict  # outcome -> count (rundir.LLM_OUTCOMES, then any other outcome seen)
    mean_seconds: float | None


def llm_outcomes(calls: list[dict]) -> list[ModelOutcomes]:
    """Per model: how many responses, what became of them, and the mean seconds per response."""
    by_model = {}
    for call in calls:
        by_model.setdefault(str(call.get("model") or "?"), []).append(call)
    rows = []
    for model, group in sorted(by_model.items()):
        outcomes = dict.fromkeys(outcome_names(calls), 0)
        for call in group:
            outcomes[str(call.get("outcome") or "?")] += 1
        seconds = [float(c["seconds"]) for c in group if isinstance(c.get("seconds"), (int, float))]
        rows.append(ModelOutcomes(model, len(group), outcomes, statistics.mean(seconds) if seconds else None))
    return rows


def outcome_names(calls: list[dict]) -> list[str]:
    """The known outcomes in pipeline order, then any other outcome the file holds."""
    others = sorted({str(c.get("outcome") or "?") for c in calls} - set(rundir.LLM_OUTCOMES))
    return list(rundir.LLM_OUTCOMES) + others
