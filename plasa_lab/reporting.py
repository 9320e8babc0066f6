"""Reading a run back: the ranked population, the lineage of the best, its diff against the initial
program (EVOLVE-BLOCKs only), plots, and one self-contained HTML page.

Reads only what a run writes (run.json, OpenEvolve's checkpoints, the evolution trace), never
OpenEvolve itself. A checkpoint holds only the current population, so lineage comes from the
trace, which records every child's parent, code and metrics.

Ranking is OpenEvolve's: combined_score (1 / min(val_ppl, 10000)), highest first; ties (on the
smoke profile every ppl is above 10000, so every score is 1e-4) are broken by val_ppl, lowest first.
"""

import base64
import csv
import difflib
import html
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .evolution import OUTPUT_ROOT, TRACE, TRACE_FAILURES, newest_run, read_jsonl
from .program import BlockError, split_blocks

RANKING_RULE = ("ranked by combined_score = 1/min(val_ppl, 10000), highest first; ties (every ppl above 10000 "
                "scores 1e-4) broken by val_ppl, lowest first")
TABLE_COLUMNS = ("id", "iteration", "generation", "island", "val_ppl", "val_acc", "density", "indexer_params",
                 "train_seconds", "parent")
UNKNOWN = "?"  # parent_id of a program known only as some child's parent: its own parent is not recorded


class ReportError(Exception):
    """Why a folder cannot be reported on; one line."""


class CheckpointError(Exception):
    """Why one checkpoint cannot be read (missing or corrupt file); one line."""


@dataclass
class Program:
    id: str
    code: str
    parent_id: str | None
    generation: int
    iteration: int
    island: int | None
    metrics: dict
    changes: str = ""

    @property
    def short_id(self):
        return self.id[:8]

    @property
    def passed(self):
        return (self.metrics.get("combined_score") or 0.0) > 0

    @property
    def val_ppl(self):
        return self.metrics.get("val_ppl", math.inf)

    def row(self) -> dict:
        """The table row: TABLE_COLUMNS, full ids."""
        m = self.metrics
        return dict(id=self.id, iteration=self.iteration, generation=self.generation, island=self.island,
                    val_ppl=m.get("val_ppl"), val_acc=m.get("val_acc"), density=m.get("density"),
                    indexer_params=m.get("indexer_params"), train_seconds=m.get("train_seconds"),
                    parent=self.parent_id, combined_score=m.get("combined_score"), passed=self.passed)


def rank_key(program: Program):
    return -(program.metrics.get("combined_score") or 0.0), program.val_ppl


@dataclass
class RunView:
    run_dir: Path
    record: dict  # run.json ({} when the folder has none)
    checkpoint: Path
    iteration: int
    population: list[Program]  # the checkpoint's programs, ranked
    known: dict[str, Program]  # every program seen: the population, and every child and parent in the trace
    trace: list[dict]  # children up to the checkpoint's iteration
    failures: list[dict]  # iterations that produced no child
    warnings: list[str] = field(default_factory=list)
    chain: list[Program] = field(default_factory=list)  # lineage of the best, from the initial program
    openevolve_best_id: str | None = None  # OpenEvolve's own pick (among tied scores, not always ours)

    @property
    def best(self) -> Program:
        return self.population[0]

    @property
    def initial(self) -> Program | None:
        roots = [p for p in self.known.values() if p.parent_id is None]
        return min(roots, key=lambda p: p.iteration) if roots else None

    @property
    def name(self):
        return self.run_dir.name

    def config(self, *keys, default=None):
        d = self.record.get("config") or {}
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return default if d is None else d


# ---------------------------------------------------------------------------------------------
# Loading

def resolve_target(path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint folder if one was named) for a path, or the newest run for None."""
    if path is None:
        run_dir = newest_run(OUTPUT_ROOT)
        if run_dir is None:
            raise ReportError(f"no run under {OUTPUT_ROOT}: pass a run folder (python scripts/evolve.py makes one)")
        return Path(run_dir), None
    path = Path(path)
    if not path.exists():
        raise ReportError(f"no such folder: {path}")
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder: pass a run folder or one of its checkpoints/checkpoint_N")
    if path.parent.name == "checkpoints" and path.name.startswith("checkpoint_"):
        return path.parent.parent, path
    if (path / "run.json").exists() or (path / "checkpoints").is_dir():
        return path, None
    raise ReportError(f"{path} is not a run folder (no run.json, no checkpoints/): pass openevolve_output/<run>")


def _checkpoint_number(path: Path):
    m = re.fullmatch(r"checkpoint_(\d+)", path.name)
    return int(m.group(1)) if m else None


def read_checkpoint(path: Path) -> tuple[int, dict, list[Program]]:
    """(iteration, metadata, programs) of one checkpoint; CheckpointError when any file is missing or corrupt."""
    try:
        metadata = json.loads((path / "metadata.json").read_text())
        iteration = int(metadata["last_iteration"])
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: metadata.json missing (partly written?)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path.name}: metadata.json unreadable ({type(e).__name__}: {e})") from None
    islands = {pid: i for i, members in enumerate(metadata.get("islands") or []) for pid in members}
    programs = []
    for file in sorted((path / "programs").glob("*.json")):
        where = f"{path.name}/programs/{file.name}"
        try:
            d = json.loads(file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{where} is not valid JSON ({e}): the checkpoint is corrupt") from None
        except OSError as e:
            raise CheckpointError(f"{where}: {e.strerror}") from None
        if not isinstance(d, dict) or not {"id", "code", "metrics"} <= d.keys() or not isinstance(d["metrics"], dict):
            raise CheckpointError(f"{where} is not an OpenEvolve program (needs id, code and metrics)")
        meta = d.get("metadata") or {}
        programs.append(Program(
            id=d["id"], code=d["code"], parent_id=d.get("parent_id"), generation=int(d.get("generation") or 0),
            iteration=int(d.get("iteration_found") or 0), island=meta.get("island", islands.get(d["id"])),
            metrics=d["metrics"], changes=meta.get("changes") or ""))
    if not programs:
        raise CheckpointError(f"{path.name}: no programs (partly written?)")
    return iteration, metadata, programs


def _choose_checkpoint(run_dir: Path, named: Path | None, warnings: list):
    if named is not None:
        try:
            return (named, *read_checkpoint(named))
        except CheckpointError as e:
            raise ReportError(f"{run_dir}: {e}") from None
    candidates = sorted((p for p in (run_dir / "checkpoints").glob("checkpoint_*") if _checkpoint_number(p) is not None),
                        key=_checkpoint_number, reverse=True)
    problems = []
    for path in candidates:
        try:
            loaded = (path, *read_checkpoint(path))
        except CheckpointError as e:
            problems.append(str(e))
            continue
        warnings.extend(f"warning: skipped {p}; using {path.name}" for p in problems)
        return loaded
    if problems:
        raise ReportError(f"no readable checkpoint in {run_dir / 'checkpoints'}: {problems[0]}")
    raise ReportError(f"{run_dir} holds no checkpoint yet (the first is written after iteration 1)")


def load_run(path=None) -> RunView:
    """Everything a report needs from a run folder (or one of its checkpoints, or the newest run)."""
    run_dir, named = resolve_target(path)
    warnings = []
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except FileNotFoundError:
        record = {}
        warnings.append(f"warning: {run_dir} has no run.json (not made by scripts/evolve.py): config unknown")
    except (OSError, ValueError) as e:
        raise ReportError(f"{run_dir / 'run.json'} is unreadable: {e}") from None
    checkpoint, iteration, metadata, population = _choose_checkpoint(run_dir, named, warnings)
    population.sort(key=rank_key)

    trace = [r for r in read_jsonl(run_dir / TRACE) if r.get("iteration", 0) <= iteration]
    failures = [r for r in read_jsonl(run_dir / TRACE_FAILURES) if r.get("iteration", 0) <= iteration]
    known = {p.id: p for p in population}
    for r in trace:
        cid = r.get("child_id")
        if cid and cid not in known and r.get("child_code") is not None:
            known[cid] = Program(cid, r["child_code"], r.get("parent_id"), int(r.get("generation") or 0),
                                 int(r["iteration"]), r.get("island_id"), r.get("child_metrics") or {},
                                 (r.get("metadata") or {}).get("changes") or "")
    for r in trace:  # a parent displaced from the population: known by its code and metrics only
        pid = r.get("parent_id")
        if pid and pid not in known and r.get("parent_code") is not None:
            generation = max(0, int(r.get("generation") or 1) - 1)  # generation 0: the initial program, no parent
            known[pid] = Program(pid, r["parent_code"], None if generation == 0 else UNKNOWN, generation,
                                 0 if generation == 0 else -1, None, r.get("parent_metrics") or {})
    view = RunView(run_dir, record, checkpoint, iteration, population, known, trace, failures, warnings,
                   openevolve_best_id=metadata.get("best_program_id"))
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
            view.warnings.append(f"warning: lineage breaks at {chain[-1].short_id}: parent "
                                 f"{chain[-1].parent_id[:8]} is in neither the checkpoint nor the trace")
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


# ---------------------------------------------------------------------------------------------
# Per-iteration history, the MAP-Elites grid, the Pareto front

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


def feature_bins(view: RunView) -> dict:
    bins = view.config("database", "feature_bins", default=10)
    dims = ("density", "indexer_params")
    return {d: int(bins.get(d, 10)) for d in dims} if isinstance(bins, dict) else dict.fromkeys(dims, int(bins))


def bin_index(value, low, high, bins):
    """OpenEvolve's binning: min-max scaled over the values seen (0.5 when all are equal)."""
    scaled = 0.5 if high == low else (value - low) / (high - low)
    return max(0, min(bins - 1, int(scaled * bins)))


def map_elites_grid(view: RunView):
    """(grid[indexer_params bin][density bin] = best val_ppl or None, bins, (low, high) per dimension)."""
    programs, bins = evaluated_programs(view), feature_bins(view)
    ranges = {d: (min(p.metrics[d] for p in programs), max(p.metrics[d] for p in programs)) if programs else (0.0, 1.0)
              for d in bins}
    grid = [[None] * bins["density"] for _ in range(bins["indexer_params"])]
    for p in programs:
        x = bin_index(p.metrics["density"], *ranges["density"], bins["density"])
        y = bin_index(p.metrics["indexer_params"], *ranges["indexer_params"], bins["indexer_params"])
        grid[y][x] = p.val_ppl if grid[y][x] is None else min(grid[y][x], p.val_ppl)
    return grid, bins, ranges


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (density, val_ppl) points no other point beats in both (lower is better in both), by density."""
    front, best_ppl = [], math.inf
    for density, ppl in sorted(set(points)):
        if ppl < best_ppl:
            front.append((density, ppl))
            best_ppl = ppl
    return front


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display needed)

def write_plots(view: RunView, out_dir: Path) -> dict[str, Path]:
    """The three PNGs in out_dir: {title: path}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}

    def save(fig, name, title):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[title] = path

    points = history(view)
    fig, ax = plt.subplots(figsize=(7, 4))
    passed = [(i, p) for i, p in points if p is not None]
    if passed:
        ax.scatter(*zip(*passed), s=14, color="0.6", label="each program")
    failed = [i for i, p in points if p is None]
    if failed:
        top = max((p for _, p in passed), default=1.0)
        ax.scatter(failed, [top] * len(failed), marker="x", color="tab:red", label="failed (no ppl)")
    curve = best_and_median(points)
    if curve:
        its, best, median = zip(*curve)
        ax.step(its, best, where="post", color="tab:blue", label="best so far")
        ax.plot(its, median, color="tab:orange", label="median so far")
    ax.set(xlabel="iteration", ylabel="val_ppl", title=f"{view.name}: val_ppl per iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if passed:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, "ppl_per_iteration.png", "best and median val_ppl per iteration")

    grid, bins, ranges = map_elites_grid(view)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = [v for row in grid for v in row if v is not None]
    masked = [[math.nan if v is None else v for v in row] for row in grid]
    norm = LogNorm(min(values), max(values) * 1.0001) if values else None
    image = ax.imshow(masked, origin="lower", aspect="auto", cmap="viridis_r", norm=norm,
                      extent=(0, bins["density"], 0, bins["indexer_params"]))
    if values:
        fig.colorbar(image, ax=ax, label="best val_ppl in cell")
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if v is not None:
                ax.text(x + 0.5, y + 0.5, f"{v:.0f}", ha="center", va="center", fontsize=6, color="white",
                        bbox=dict(facecolor="black", alpha=0.4, linewidth=0, pad=1))
    (d_lo, d_hi), (i_lo, i_hi) = ranges["density"], ranges["indexer_params"]
    ax.set(xlabel=f"density bin ({d_lo:.3f} .. {d_hi:.3f})",
           ylabel=f"indexer_params bin ({i_lo:,.0f} .. {i_hi:,.0f})",
           title=f"MAP-Elites grid ({len(values)} of {bins['density'] * bins['indexer_params']} cells filled)")
    ax.set_xticks(range(bins["density"] + 1))
    ax.set_yticks(range(bins["indexer_params"] + 1))
    ax.grid(color="0.85", linewidth=0.5)
    save(fig, "map_elites_grid.png", "MAP-Elites grid: density x indexer_params, coloured by best val_ppl")

    fig, ax = plt.subplots(figsize=(7, 4))
    programs = evaluated_programs(view)
    xy = [(p.metrics["density"], p.val_ppl) for p in programs]
    if xy:
        ax.scatter(*zip(*xy), s=16, color="0.5", label="programs")
        front = pareto_front(xy)
        ax.plot(*zip(*front), "o-", drawstyle="steps-post", color="tab:red",
                label="Pareto front (lower ppl and lower density are better)")
        ax.set_yscale("log")
    ax.set(xlabel="density (fraction of causal keys attended)", ylabel="val_ppl", title="val_ppl against density")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, "ppl_vs_density.png", "val_ppl against density, Pareto front marked")
    return written


# ---------------------------------------------------------------------------------------------
# Text formatting, tables, exports

def fmt(value, kind="float"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "ppl":
        return f"{value:.1f}"
    if kind == "seconds":
        return f"{value:.1f}"
    return f"{value:.3f}"


def table_cells(program: Program) -> list[str]:
    m = program.metrics
    return [program.short_id, str(program.iteration), str(program.generation),
            "-" if program.island is None else str(program.island),
            fmt(m.get("val_ppl"), "ppl") if program.passed else "FAILED", fmt(m.get("val_acc")),
            fmt(m.get("density")), fmt(m.get("indexer_params"), "int"), fmt(m.get("train_seconds"), "seconds"),
            (program.parent_id or "-")[:8]]


def lineage_cells(chain: list[Program]) -> list[list[str]]:
    rows, previous = [], None
    for p in chain:
        ppl = p.val_ppl if p.passed else None
        change = "-" if previous is None or ppl is None else f"{(ppl - previous) / previous * 100:+.2f}%"
        what = "initial program" if p.parent_id is None else (p.changes.replace("\n", "; ")[:160] or "-")
        rows.append([p.short_id, "?" if p.iteration < 0 else str(p.iteration), str(p.generation),
                     fmt(ppl, "ppl") if ppl is not None else "FAILED", change, what])
        previous = ppl if ppl is not None else previous
    return rows


LINEAGE_COLUMNS = ("id", "iteration", "generation", "val_ppl", "vs parent", "changes")


def summary_lines(view: RunView) -> list[str]:
    r = view.record
    passed = sum(1 for t in view.trace if ((t.get("child_metrics") or {}).get("combined_score") or 0) > 0)
    lines = [f"run {view.run_dir}",
             f"checkpoint {view.checkpoint.name} (iteration {view.iteration} of {r.get('iterations_total', '?')}); "
             f"{len(view.population)} programs in the population",
             f"children: {len(view.trace)} evaluated, {passed} passed, {len(view.trace) - passed} rejected; "
             f"{len(view.failures)} iterations produced no child"]
    if r:
        profile, llm, corpus = r.get("profile") or {}, r.get("llm") or {}, r.get("corpus") or {}
        lines.append(f"profile {profile.get('name', '?')} ({profile.get('steps', '?')} steps) | llm {llm.get('mode', '?')} "
                     f"({', '.join(llm.get('models') or [])}) | corpus {corpus.get('corpus', '?')} "
                     f"({str(corpus.get('fingerprint', '?'))[:12]})")
    lines.append(RANKING_RULE)
    if view.openevolve_best_id and view.openevolve_best_id != view.best.id:
        lines.append(f"OpenEvolve's own best_program_id is {view.openevolve_best_id[:8]} (tied on combined_score); "
                     f"this report's best is {view.best.short_id}")
    return lines


def export_json(view: RunView, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(run=str(view.run_dir), checkpoint=view.checkpoint.name, iteration=view.iteration,
                                    ranking=RANKING_RULE, programs=[p.row() for p in view.population]), indent=2))


def export_csv(view: RunView, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(view.population[0].row()))
        writer.writeheader()
        writer.writerows(p.row() for p in view.population)


def print_report(view: RunView, top: int, console=None):
    """The tables, the lineage and the diff, with rich."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.table import Table
    console = console or Console(width=None if Console().is_terminal else 160)
    for line in summary_lines(view):
        console.print(line, highlight=False)

    table = Table(title=f"Top {min(top, len(view.population))} of {len(view.population)} programs", title_justify="left")
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column in ("id", "parent") else "right")
    for p in view.population[:top]:
        table.add_row(*table_cells(p))
    console.print(table)

    chain = view.chain
    table = Table(title=f"Lineage of the best ({view.best.short_id}), from the initial program", title_justify="left")
    for column in LINEAGE_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in lineage_cells(chain):
        table.add_row(*row)
    console.print(table)

    initial = view.initial
    if initial is None:
        console.print("[yellow]no initial program in the checkpoint or the trace: no diff[/yellow]")
        return
    diffs = block_diffs(initial.code, view.best.code)
    console.print(f"Diff of the best against the initial program, EVOLVE-BLOCKs only: "
                  f"{len(diffs) or 'no'} block(s) changed", highlight=False)
    for d in diffs:
        console.print(Syntax(d.text, "diff", theme="ansi_dark", word_wrap=True))


# ---------------------------------------------------------------------------------------------
# The HTML page

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; text-align: center; } td.text { text-align: left; }
pre.diff { background: #fafafa; border: 1px solid #ddd; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.add { color: #116611; background: #eaffea; } .del { color: #991111; background: #ffecec; } .hunk { color: #555; }
.warn { color: #a60; } img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
"""
# Marks each image once the browser has decoded it (or failed to): a headless browser's DOM shows it.
PAGE_SCRIPT = """
window.addEventListener('load', function () {
  var images = document.images, ok = 0;
  for (var i = 0; i < images.length; i++) {
    var loaded = images[i].complete && images[i].naturalWidth > 0;
    images[i].setAttribute('data-loaded', loaded ? 'yes' : 'no');
    images[i].setAttribute('data-natural-width', images[i].naturalWidth);
    if (loaded) ok++;
  }
  document.body.setAttribute('data-images-loaded', ok + '/' + images.length);
  document.body.setAttribute('data-tables', document.querySelectorAll('table').length);
});
"""


def _html_table(columns, rows, text_columns=()):
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    cell = lambda c, v: f'<td class="text">{html.escape(v)}</td>' if c in text_columns else f"<td>{html.escape(v)}</td>"
    body = "".join("<tr>" + "".join(cell(c, v) for c, v in zip(columns, row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_diff(text):
    lines = []
    for line in text.splitlines():
        cls = ("hunk" if line.startswith("@@") or line.startswith(("---", "+++"))
               else "add" if line.startswith("+") else "del" if line.startswith("-") else "")
        lines.append(f'<span class="{cls}">{html.escape(line)}</span>' if cls else html.escape(line))
    return '<pre class="diff">' + "\n".join(lines) + "</pre>"


def write_html(view: RunView, out_dir: Path, top: int, plots: dict[str, Path]) -> Path:
    """One page, no server, nothing outside it: tables, diffs, and the plots as data URIs."""
    parts = [f"<h1>Run {html.escape(view.name)}</h1>"]
    parts += [f'<p class="warn">{html.escape(w)}</p>' for w in view.warnings]
    parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(view)) + "</ul>")
    parts.append(f"<h2>Top {min(top, len(view.population))} of {len(view.population)} programs</h2>")
    parts.append(_html_table(TABLE_COLUMNS, [table_cells(p) for p in view.population[:top]], ("id", "parent")))
    parts.append(f"<h2>Lineage of the best ({html.escape(view.best.short_id)}), from the initial program</h2>")
    parts.append(_html_table(LINEAGE_COLUMNS, lineage_cells(view.chain), ("id", "changes")))
    parts.append("<h2>Diff of the best against the initial program (EVOLVE-BLOCKs only)</h2>")
    diffs = block_diffs(view.initial.code, view.best.code) if view.initial else []
    parts += [_html_diff(d.text) for d in diffs] or ["<p>No block changed: the best is the initial program.</p>"]
    parts.append("<h2>Plots</h2>")
    for title, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(title)}</h3><img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{data}\">")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>PLASA run {html.escape(view.name)}"
            f"</title><style>{PAGE_STYLE}</style><script>{PAGE_SCRIPT}</script></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def report_dir(view: RunView) -> Path:
    return view.run_dir / "report"
