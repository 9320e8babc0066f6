"""Analyse: what a RunView means. The ranking (OpenEvolve's), the lineage of the best, block
diffs, the per-iteration history, the Pareto front, the MAP-Elites grid as OpenEvolve saved it,
confirmation, the sandbox, and what became of the LLM's responses. No printing here."""

import difflib
import hashlib
import json
import math
import statistics
from dataclasses import dataclass

from .. import rundir
from ..program.blocks import BlockError, split_blocks
from ..stats import paired_change, seed_losses
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
# Lineage and diff


def lineage(view: RunView, program: Program | None = None) -> list[Program]:
    """The chain from the initial program (first) to `program` (default: the best), by parent ids."""
    chain, seen = [program or view.best], set()
    while chain[-1].parent_id not in (None, UNKNOWN) and chain[-1].id not in seen:
        seen.add(chain[-1].id)
        parent = view.known.get(chain[-1].parent_id)
        if parent is None:
            view.warnings.append(
                f"warning: lineage breaks at {chain[-1].short_id}: parent "
                f"{chain[-1].parent_id[:8]} is in neither the checkpoint nor the trace"
            )
            break
        chain.append(parent)
    return chain[::-1]


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


# ---------------------------------------------------------------------------------------------
# Per-iteration history and the Pareto front


def history(view: RunView) -> list[tuple[int, float | None]]:
    """(iteration, val_ppl or None if it failed) of the initial program (iteration 0) and every child."""
    points = []
    if view.initial is not None:
        points.append((0, view.initial.val_ppl if view.initial.passed else None))
    for r in sorted(view.trace, key=lambda r: r["iteration"]):
        m = r.get("child_metrics") or {}
        points.append((int(r["iteration"]), m.get("val_ppl") if (m.get("combined_score") or 0) > 0 else None))
    return points


def best_and_median(points) -> list[tuple[int, float, float]]:
    """(iteration, best val_ppl so far, median val_ppl so far) over the passing programs."""
    rows, seen = [], []
    for iteration in sorted({i for i, _ in points}):
        seen += [ppl for i, ppl in points if i == iteration and ppl is not None]
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
    initial = seed_losses(view.initial.metrics) if view.initial else {}
    claimed, _, n = paired_change(seed_losses(program.metrics), initial)
    if not n or program is view.initial:
        return None
    entry = _replayed(view, program)
    if not entry or entry.get("unseen_change_pct") is None:
        return Claim(100 * math.expm1(claimed), n)
    return Claim(
        100 * math.expm1(claimed),
        n,
        entry["unseen_change_pct"],
        entry["unseen_seeds"],
        entry.get("unseen_p"),
        entry.get("shrinkage"),
    )


def _replayed(view: RunView, program: Program) -> dict | None:
    """The program's entry in the run's replay report (RUN_DIR/report/replay.json), if it was replayed."""
    path = view.run_dir / rundir.REPORT / "replay.json"
    try:
        entries = json.loads(path.read_text()).get("programs", [])
    except (OSError, ValueError, AttributeError):
        return None
    sha = hashlib.sha256(program.code.encode()).hexdigest()
    return next((e for e in entries if isinstance(e, dict) and e.get("code_sha256") == sha), None)


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
