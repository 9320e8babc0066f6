"""The run folder, in one place: what `openevolve_output/<run>/` holds, and the rules for reading it back.

Both sides use this module: the run that writes the folder (launch, evolution: run.json, the LLM
responses, the records a resume sets aside) and the reports that read it (reporting, replay). It
imports nothing but the standard library, so reading a run never imports the orchestrator,
OpenEvolve or torch.

    run.json                          the run's record (config, versions, corpus, profile, llm, sandbox)
    ledger.sqlite                     every evaluation once
    checkpoints/checkpoint_N/         OpenEvolve's database after iteration N (metadata.json, programs/)
    best/best_program.py              OpenEvolve's best program at the end
    evolution_trace.jsonl             one line per evaluated child
    evolution_trace_failures.jsonl    one line per iteration that produced no child
    llm_responses.jsonl               one line per LLM call (LLM_OUTCOMES)
    notebook.md                       the lab notebook the LLM reads (reporting.notebook), as of the last child
    report/                           what inspect_run.py and replay.py write
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import PROJECT_ROOT
from .util import atomic_write, first_line

OUTPUT_ROOT = PROJECT_ROOT / "openevolve_output"
RUN_RECORD = "run.json"
LEDGER = "ledger.sqlite"
CHECKPOINTS = "checkpoints"
BEST = "best"
BEST_PROGRAM = "best/best_program.py"
TRACE = "evolution_trace.jsonl"
TRACE_FAILURES = "evolution_trace_failures.jsonl"
TRACE_LOST = "evolution_trace_lost.jsonl"  # records of iterations whose checkpoint was never written (a resume)
LLM_RESPONSES = "llm_responses.jsonl"
LLM_CALLS = "llm_calls.jsonl"  # written by the LLM client as calls end; joined with the trace into LLM_RESPONSES
REPORT = "report"
LOGS = "logs"
SLOTS = "slots"  # the evaluation slots' lock files (plasa_lab.evaluation.slots) of a run with proposals ahead
LLM_SLOT = "llm-slot"  # the lock a local server's calls take in turn (plasa_lab.search.llm_client)

# What became of one LLM response (the `outcome` of an llm_responses.jsonl line), in pipeline order.
LLM_OUTCOMES = ("no diff", "diff did not apply", "llm error", "rejected by a check", "passed")


class RunDirError(Exception):
    """Why a run folder (or a file of it) cannot be read; one line."""


def newest_run(root: Path | None = None) -> Path | None:
    """The newest run under root (default OUTPUT_ROOT), the one meaning of "newest" every script uses
    (evolve.py --resume without --output, inspect_run.py and replay.py without a folder): the run
    folder whose run.json was written last. A run writes run.json when it starts or resumes, once
    its noise floor is measured, and when it ends; nothing that reads a run writes it. So the run
    last started, resumed or finished is the newest, however it ended, and a report written into an
    older run (which changes that folder's own modification time) never makes it the newest."""
    root = Path(root) if root is not None else OUTPUT_ROOT
    records = [(p / RUN_RECORD) for p in root.glob("*/") if (p / RUN_RECORD).is_file()]
    newest = max(records, key=lambda r: (r.stat().st_mtime_ns, r.parent.name), default=None)
    return newest.parent if newest else None


def read_run_record(run_dir: Path) -> dict | None:
    """run.json as a dict; None when the folder has none; RunDirError when it cannot be read."""
    path = Path(run_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} is unreadable: {first_line(e)}") from None
    if not isinstance(record, dict):
        raise RunDirError(f"{path} is not a JSON object")
    return record


def write_run_record(run_dir: Path, record: dict):
    """run.json, written whole (a reader never sees half of it); RunDirError when it cannot be."""
    try:
        atomic_write(Path(run_dir) / RUN_RECORD, json.dumps(record, indent=2))
    except OSError as e:
        raise RunDirError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_number(path: Path) -> int | None:
    """N of a folder named checkpoint_N, else None."""
    m = re.fullmatch(r"checkpoint_(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_iteration(path: Path) -> int:
    """The last_iteration of a complete checkpoint; RunDirError saying why one is not complete.

    The one rule for "complete": OpenEvolve writes metadata.json after every program file, so a
    readable metadata.json with last_iteration means the save finished; a kill mid-save leaves none.
    """
    path = Path(path)
    try:
        metadata = json.loads((path / "metadata.json").read_text())
        return int(metadata["last_iteration"])
    except FileNotFoundError:
        raise RunDirError(f"{path.name}: metadata.json missing (partly written?)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{path.name}: metadata.json unreadable ({first_line(e)})") from None


def latest_checkpoint(run_dir: Path, skipped: list | None = None) -> tuple[Path, int] | None:
    """(path, iteration) of the newest complete checkpoint, or None when there is none.

    Newest means the highest last_iteration (then the highest N). Incomplete checkpoints newer than
    the one chosen are appended to `skipped` as one line each ("checkpoint_5: metadata.json missing
    (partly written?)"), so a report can say what it passed over."""
    found, problems = [], []
    for path in (Path(run_dir) / CHECKPOINTS).glob("checkpoint_*"):
        number = checkpoint_number(path)
        if number is None or not path.is_dir():
            continue
        try:
            found.append((checkpoint_iteration(path), number, path))
        except RunDirError as e:
            problems.append((number, str(e)))
    if not found:
        if skipped is not None:
            skipped.extend(problem for _, problem in sorted(problems, reverse=True))
        return None
    iteration, number, path = max(found, key=lambda f: (f[0], f[1]))
    if skipped is not None:
        skipped.extend(problem for n, problem in sorted(problems, reverse=True) if n > number)
    return path, iteration


# ---------------------------------------------------------------------------------------------
# JSONL records


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines of a JSONL file that may be being written (a torn last line is skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


@dataclass
class Trace:
    """What evolution_trace.jsonl and evolution_trace_failures.jsonl say, up to an iteration."""

    children: list[dict] = field(default_factory=list)  # one per evaluated child
    failures: list[dict] = field(default_factory=list)  # one per iteration that produced no child
    left_out: int = 0  # records of later iterations (children and failures): not in the checkpoint read


def _iteration(record: dict) -> int:
    try:
        return int(record.get("iteration") or 0)
    except (TypeError, ValueError):
        return 0


def read_trace(run_dir: Path, up_to_iteration: int | None = None) -> Trace:
    """The run's trace; with up_to_iteration (a checkpoint's last_iteration), only what that
    checkpoint's population can hold. A record of a later iteration belongs to a child whose
    checkpoint was not read (or never written: a kill during the save), so it is counted in
    left_out instead, never reported as part of the population."""
    children, failures = read_jsonl(Path(run_dir) / TRACE), read_jsonl(Path(run_dir) / TRACE_FAILURES)
    if up_to_iteration is None:
        return Trace(children, failures)
    keep = lambda records: [r for r in records if _iteration(r) <= up_to_iteration]
    kept_children, kept_failures = keep(children), keep(failures)
    left_out = len(children) - len(kept_children) + len(failures) - len(kept_failures)
    return Trace(kept_children, kept_failures, left_out)


def read_llm_responses(run_dir: Path, up_to_iteration: int | None = None, after: int | None = None) -> list[dict]:
    """llm_responses.jsonl (one line per iteration's LLM call; [] when the run wrote none), up to an
    iteration, and after one (a session that resumed from it)."""
    records = read_jsonl(Path(run_dir) / LLM_RESPONSES)
    if up_to_iteration is not None:
        records = [r for r in records if _iteration(r) <= up_to_iteration]
    if after is not None:
        records = [r for r in records if _iteration(r) > after]
    return records


# ---------------------------------------------------------------------------------------------
# What the run writes as it goes


@dataclass(frozen=True)
class FinishedIteration:
    """One iteration as the trace filed it: a child (a TRACE line) or none (a TRACE_FAILURES line)."""

    iteration: int
    record: dict
    failed: bool  # no child: the LLM failed or its diff did not apply

    @property
    def child_metrics(self) -> dict:
        return self.record.get("child_metrics") or {}

    @property
    def error(self) -> str | None:
        """Why there was no child (OpenEvolve's line); None when there was one."""
        return self.record.get("error") if self.failed else None


def finished_iterations(run_dir: Path) -> list[FinishedIteration]:
    """Every iteration the trace holds, in the order OpenEvolve filed them (with parallel evaluations
    not the iterations' order): children first, then the iterations without one."""
    run_dir = Path(run_dir)
    children = [FinishedIteration(_iteration(r), r, False) for r in read_jsonl(run_dir / TRACE)]
    return children + [FinishedIteration(_iteration(r), r, True) for r in read_jsonl(run_dir / TRACE_FAILURES)]


class LLMResponseLog:
    """llm_responses.jsonl, written as the run goes: one line per finished iteration, its outcome
    (LLM_OUTCOMES) joined with the LLM client's record of the call (llm_calls.jsonl; matched by the
    response's text, or by the error) for the model, the prompt's size and the seconds. Resumes
    and the reports read it."""

    def __init__(self, run_dir: Path, model: str, since: float):
        self.run_dir, self.model, self.since = (
            Path(run_dir),
            model,
            since,
        )  # since: calls before it are another session's
        self.used_calls = set()  # indexes into llm_calls.jsonl (it only grows) already joined to an iteration

    def file(self, outcomes: list[tuple[FinishedIteration, str]]):
        """One line per (iteration, its outcome)."""
        if not outcomes:
            return
        calls = read_jsonl(self.run_dir / LLM_CALLS)
        lines = [self._line(finished, outcome, calls) for finished, outcome in outcomes]
        with open(self.run_dir / LLM_RESPONSES, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)

    def _line(self, finished: FinishedIteration, outcome: str, calls: list[dict]) -> dict:
        record, error = finished.record, finished.error
        response = record.get("llm_response")
        call = next(
            (
                i
                for i, c in enumerate(calls)
                if i not in self.used_calls
                and c.get("time", 0) >= self.since
                and (
                    (response is not None and c.get("response") == response)
                    or (c.get("error") and error and c["error"] in error)
                )
            ),
            None,
        )
        if call is not None:
            self.used_calls.add(call)
        c = calls[call] if call is not None else {}
        return dict(
            iteration=finished.iteration,
            model=c.get("model", self.model),
            prompt_chars=c.get("prompt_chars"),
            prompt_tokens=c.get("prompt_tokens"),
            completion_tokens=c.get("completion_tokens"),
            tokens_estimated=c.get("tokens_estimated"),  # True: characters/4, the server gave no usage
            seconds=c.get("seconds"),
            outcome=outcome,
            error=error or (record.get("artifacts") or {}).get("failure"),
            response=response,
        )


def discard_unsaved_iterations(run_dir: Path, done: int) -> int:
    """Move the records (children, failures, LLM responses) of iterations after the checkpoint a run
    resumes from into TRACE_LOST: a kill before or during a checkpoint's save leaves them without a
    population entry, and the resumed run runs those iterations again (an evaluation it repeats is
    answered by the ledger). Returns how many records moved."""
    run_dir, moved = Path(run_dir), []
    for name in (TRACE, TRACE_FAILURES, LLM_RESPONSES):
        path = run_dir / name
        records = read_jsonl(path)
        keep = [r for r in records if _iteration(r) <= done]
        if len(keep) != len(records):
            moved += [dict(r, lost_from=name) for r in records if _iteration(r) > done]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))
    if moved:
        with open(run_dir / TRACE_LOST, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in moved)
    return len(moved)
