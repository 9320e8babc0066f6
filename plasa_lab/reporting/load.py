"""Load: a run folder (run.json, its newest complete checkpoint, the trace) as one RunView.

Reads only what a run writes, never OpenEvolve itself. A checkpoint holds only the current
population, so programs displaced from it (and the lineage) come from the trace, which records
every child's parent, code and metrics.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import rundir
from ..rundir import RunDirError
from ..util import first_line

UNKNOWN = "?"  # parent_id of a program known only as some child's parent: its own parent is not recorded


class ReportError(Exception):
    """Why a folder cannot be reported on; one line."""


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
    timestamp: float | None = None  # when OpenEvolve created it (checkpoint programs only): its found order

    @property
    def short_id(self):
        return self.id[:8]

    @property
    def passed(self):
        return (self.metrics.get("combined_score") or 0.0) > 0

    @property
    def val_ppl(self):
        return self.metrics.get("val_ppl", float("inf"))


@dataclass
class RunView:
    run_dir: Path
    record: dict  # run.json ({} when the folder has none)
    checkpoint: Path
    iteration: int
    population: list[Program]  # the checkpoint's programs (ranked once analysed: analyse.prepare)
    known: dict[str, Program]  # every program seen: the population, and every child and parent in the trace
    trace: list[dict]  # children up to the checkpoint's iteration
    failures: list[dict]  # iterations up to it that produced no child
    warnings: list[str] = field(default_factory=list)
    chain: list[Program] = field(default_factory=list)  # lineage of the best, from the initial program
    metadata: dict = field(default_factory=dict)  # the checkpoint's metadata.json (MAP-Elites cells, feature_stats)
    llm_calls: list[dict] = field(default_factory=list)  # llm_responses.jsonl up to the checkpoint's iteration

    @property
    def best(self) -> Program:
        return self.population[0]

    @property
    def openevolve_best_id(self) -> str | None:
        return self.metadata.get("best_program_id")

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


def resolve_target(path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint folder if one was named) for a path, or the newest run for None."""
    if path is None:
        run_dir = rundir.newest_run()
        if run_dir is None:
            raise ReportError(
                f"no run under {rundir.OUTPUT_ROOT}: pass a run folder (python scripts/evolve.py makes one)"
            )
        return Path(run_dir), None
    path = Path(path)
    if not path.exists():
        raise ReportError(f"no such folder: {path}")
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder: pass a run folder or one of its checkpoints/checkpoint_N")
    if path.parent.name == rundir.CHECKPOINTS and path.name.startswith("checkpoint_"):
        return path.parent.parent, path
    if (path / rundir.RUN_RECORD).exists() or (path / rundir.CHECKPOINTS).is_dir():
        return path, None
    raise ReportError(f"{path} is not a run folder (no run.json, no checkpoints/): pass openevolve_output/<run>")


def read_checkpoint(path: Path) -> tuple[int, dict, list[Program]]:
    """(iteration, metadata, programs) of one checkpoint; ReportError when any file is missing or corrupt."""
    try:
        iteration = rundir.checkpoint_iteration(path)
        metadata = json.loads((path / "metadata.json").read_text())
    except RunDirError as e:
        raise ReportError(str(e)) from None
    islands = {pid: i for i, members in enumerate(metadata.get("islands") or []) for pid in members}
    programs = []
    for file in sorted((path / "programs").glob("*.json")):
        where = f"{path.name}/programs/{file.name}"
        try:
            d = json.loads(file.read_text())
        except ValueError as e:
            raise ReportError(f"{where} is not valid JSON ({e}): the checkpoint is corrupt") from None
        except OSError as e:
            raise ReportError(f"{where}: {first_line(e)}") from None
        if not isinstance(d, dict) or not {"id", "code", "metrics"} <= d.keys() or not isinstance(d["metrics"], dict):
            raise ReportError(f"{where} is not an OpenEvolve program (needs id, code and metrics)")
        meta = d.get("metadata") or {}
        programs.append(
            Program(
                id=d["id"],
                code=d["code"],
                parent_id=d.get("parent_id"),
                generation=int(d.get("generation") or 0),
                iteration=int(d.get("iteration_found") or 0),
                island=meta.get("island", islands.get(d["id"])),
                metrics=d["metrics"],
                changes=meta.get("changes") or "",
                timestamp=d.get("timestamp"),
            )
        )
    if not programs:
        raise ReportError(f"{path.name}: no programs (partly written?)")
    return iteration, metadata, programs


def _choose_checkpoint(run_dir: Path, named: Path | None, warnings: list) -> Path:
    """The named checkpoint, else the newest complete one (rundir's rule), warning about newer partial ones."""
    if named is not None:
        return named
    skipped = []
    latest = rundir.latest_checkpoint(run_dir, skipped)
    if latest is None:
        if skipped:
            raise ReportError(f"no readable checkpoint in {run_dir / rundir.CHECKPOINTS}: {skipped[0]}")
        raise ReportError(f"{run_dir} holds no checkpoint yet (the first is written after iteration 1)")
    warnings.extend(f"warning: skipped {problem}; using {latest[0].name}" for problem in skipped)
    return latest[0]


def _known_programs(population: list[Program], trace: list[dict]) -> dict[str, Program]:
    """The population, then every child of the trace, then every parent the trace names."""
    known = {p.id: p for p in population}
    for r in trace:
        cid = r.get("child_id")
        if cid and cid not in known and r.get("child_code") is not None:
            known[cid] = Program(
                cid,
                r["child_code"],
                r.get("parent_id"),
                int(r.get("generation") or 0),
                int(r["iteration"]),
                r.get("island_id"),
                r.get("child_metrics") or {},
                (r.get("metadata") or {}).get("changes") or "",
            )
    for r in trace:  # a parent displaced from the population: known by its code and metrics only
        pid = r.get("parent_id")
        if pid and pid not in known and r.get("parent_code") is not None:
            generation = max(0, int(r.get("generation") or 1) - 1)  # generation 0: the initial program, no parent
            known[pid] = Program(
                pid,
                r["parent_code"],
                None if generation == 0 else UNKNOWN,
                generation,
                0 if generation == 0 else -1,
                None,
                r.get("parent_metrics") or {},
            )
    return known


def read_run(path=None) -> RunView:
    """Everything a report needs from a run folder (or one of its checkpoints, or the newest run),
    population in file order (analyse.prepare ranks it)."""
    run_dir, named = resolve_target(path)
    warnings = []
    try:
        record = rundir.read_run_record(run_dir)
    except RunDirError as e:
        raise ReportError(str(e)) from None
    if record is None:
        record = {}
        warnings.append(f"warning: {run_dir} has no run.json (not made by scripts/evolve.py): config unknown")
    checkpoint = _choose_checkpoint(run_dir, named, warnings)
    try:
        iteration, metadata, population = read_checkpoint(checkpoint)
    except ReportError as e:
        raise ReportError(f"{run_dir}: {e}") from None

    trace = rundir.read_trace(run_dir, up_to_iteration=iteration)
    latest = rundir.latest_checkpoint(run_dir)
    # Named on purpose, an older checkpoint leaves later records out silently: a later checkpoint holds them.
    if trace.left_out and (latest is None or latest[1] <= iteration):
        warnings.append(
            f"warning: left out {trace.left_out} trace record(s) of iterations after {iteration} "
            f"({checkpoint.name}'s last): no checkpoint holds them (killed during a save?)"
        )
    return RunView(
        run_dir,
        record,
        checkpoint,
        iteration,
        population,
        _known_programs(population, trace.children),
        trace.children,
        trace.failures,
        warnings,
        metadata=metadata,
        llm_calls=rundir.read_llm_responses(run_dir, up_to_iteration=iteration),
    )
