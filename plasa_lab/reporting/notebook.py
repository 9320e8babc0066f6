"""The lab notebook: what the run has tried, as a compact table the LLM reads in every prompt.

One row per evaluated child: the lever (the blocks it changed), a one-line summary of the change
(the mutator's move names, or the first sentence of the LLM's answer), and its effect on val_loss
paired against the initial program on the seeds both were trained on, with n and the run's noise
sd, or why it failed. Best effects first; bounded in rows and characters so that a compact prompt
still fits a small local model's context.

Built only from the run folder's own records (evolution_trace.jsonl, run.json): the run writes it to
RUN_DIR/notebook.md as children come in, the LLM client reads that file for each prompt (the trace,
with every prompt and program in it, is read once per child, not once per prompt), and
inspect_run.py shows it. Nothing in it is run; every cell is one printable line.
"""

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..contract import SCREENED_OUT
from ..program.blocks import BlockError, split_blocks
from ..rundir import TRACE, read_jsonl, read_run_record
from ..stats import paired_change, seed_losses

NOTEBOOK = "notebook.md"
LEVERS = {
    "lightning_indexer": "index score",
    "topk_selector": "selection",
    "k_schedule": "schedule",
    "indexer_training": "indexer training",
}
MAX_ROWS = 12  # the best 9 and the 3 latest failures at most
MAX_FAILURES = 3
SUMMARY_CHARS = 90


@dataclass
class Row:
    iteration: int
    lever: str
    summary: str
    effect: float | None  # mean paired val_loss change against the initial program (negative: better)
    n: int  # seeds in the pairing
    failure: str | None


def _one_line(text: str, limit: int) -> str:
    """Printable, one line, no table separators or code fences, at most `limit` characters."""
    text = re.sub(r"[^\x20-\x7e]+", " ", str(text)).replace("|", "/").replace("`", "'")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def levers(child_code: str, parent_code: str) -> str:
    """The blocks a child changed, named as the levers they are."""
    try:
        child = {b.name: b.body for b in split_blocks(child_code)[1]}
        parent = {b.name: b.body for b in split_blocks(parent_code)[1]}
    except BlockError:
        return "?"
    changed = [LEVERS.get(name, name) for name, body in child.items() if parent.get(name) != body]
    return ", ".join(changed) or "none"


CONSTANT = re.compile(r"^([A-Z][A-Z0-9_]*) = (.+?)(?:  #.*)?$", re.MULTILINE)


def constant_changes(child_code: str, parent_code: str) -> str:
    """The block constants whose value changed, as `NAME old->new` (new ones as `NAME=new`)."""
    try:
        inside = lambda code: "".join(b.body for b in split_blocks(code)[1])
        child, parent = dict(CONSTANT.findall(inside(child_code))), dict(CONSTANT.findall(inside(parent_code)))
    except BlockError:
        return ""
    return "; ".join(
        f"{name} {parent[name]}->{value}" if name in parent else f"{name}={value}"
        for name, value in child.items()
        if parent.get(name) != value
    )


def summary(response: str, child_code: str = "", parent_code: str = "") -> str:
    """The change in one line: the offline mutator's move names, or the LLM's first sentence, and
    the block constants it changed."""
    head = (response or "").split("<<<<<<<", 1)[0].strip()
    head = head.removeprefix("Offline mutator:").strip()
    first = re.split(r"(?<=[.!?])\s", head, maxsplit=1)[0].rstrip(".") if head else "(no explanation)"
    constants = constant_changes(child_code, parent_code)
    return _one_line(f"{first}: {constants}" if constants else first, SUMMARY_CHARS)


def rows(trace: list[dict], initial: dict[int, float], search_seed: int | None = None) -> list[Row]:
    out = []
    for record in trace:
        metrics = record.get("child_metrics") or {}
        passed = metrics.get("stage2_passed") == 1.0
        failure = None if passed else _one_line((record.get("artifacts") or {}).get("failure", "failed"), SUMMARY_CHARS)
        effect, _, n = paired_change(seed_losses(metrics, search_seed), initial) if passed else (None, None, 0)
        effect = effect if n else None  # no seed shared with the initial program: nothing paired
        out.append(
            Row(
                iteration=int(record.get("iteration") or 0),
                lever=levers(record.get("child_code", ""), record.get("parent_code", "")),
                summary=summary(
                    record.get("llm_response", ""), record.get("child_code", ""), record.get("parent_code", "")
                ),
                effect=effect,
                n=n,
                failure=failure,
            )
        )
    return out


def chosen(all_rows: list[Row]) -> list[Row]:
    """The best measured effects first, then children with no paired seed, then the latest failures,
    within MAX_ROWS."""
    measured = sorted((r for r in all_rows if r.effect is not None), key=lambda r: (r.effect, -r.n))
    unpaired = [r for r in all_rows if r.effect is None and not r.failure]
    failed = [r for r in all_rows if r.failure][-MAX_FAILURES:]
    return (measured + unpaired)[: MAX_ROWS - len(failed)] + failed


def render(all_rows: list[Row], noise_sd: float | None, initial_seeds: int) -> str:
    if not all_rows:
        return ""
    sd = f"{noise_sd:.3f}" if noise_sd else "unknown"
    lines = [
        "# Lab notebook (what this run has tried)",
        f"Effect: mean change of val_loss against the initial program on the n seeds both were trained on "
        f"(negative is better; the run's noise sd between seeds is {sd}, over {initial_seeds} seeds of the initial "
        f"program). Best first; {len(all_rows)} children so far.",
        "",
        "| iter | lever | change | effect on val_loss |",
        "|---|---|---|---|",
    ]
    for r in chosen(all_rows):
        if r.failure:  # a child the screen stopped did not fail: its cheaper training ranked low
            outcome = r.failure if r.failure.startswith(SCREENED_OUT) else f"failed: {r.failure}"
        elif r.effect is None:
            outcome = "passed; no seed shared with the initial program"
        else:
            outcome = f"{r.effect:+.4f} ({math.exp(r.effect) - 1:+.1%} ppl, n={r.n})"
        lines.append(f"| {r.iteration} | {r.lever} | {r.summary} | {outcome} |")
    return "\n".join(lines) + "\n"


def build(run_dir: Path) -> str:
    """The notebook of a run folder, from its trace and run.json ('' before any child)."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir) or {}
    floor = record.get("noise_floor") or {}
    initial = dict(zip(floor.get("seeds") or [], floor.get("val_losses") or []))
    initial = {int(s): float(v) for s, v in initial.items() if isinstance(v, (int, float))}
    seed = (record.get("settings") or {}).get("seed")
    trace = read_jsonl(run_dir / TRACE)
    return render(rows(trace, initial, seed if isinstance(seed, int) else None), floor.get("val_loss_sd"), len(initial))


def write(run_dir: Path) -> str:
    """Write RUN_DIR/notebook.md (atomically: prompt builders in other processes read it)."""
    text = build(run_dir)
    path = Path(run_dir) / NOTEBOOK
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


def read(run_dir) -> str:
    """RUN_DIR/notebook.md as the run last wrote it ('' before the first child)."""
    try:
        return (Path(run_dir) / NOTEBOOK).read_text()
    except OSError:
        return ""


def with_notebook(user_prompt: str, notebook: str) -> str:
    """The prompt with the notebook just before its '# Task' section (at the end if it has none)."""
    if not notebook:
        return user_prompt
    at = user_prompt.find("\n# Task")
    if at < 0:
        return f"{user_prompt.rstrip()}\n\n{notebook}"
    return f"{user_prompt[:at].rstrip()}\n\n{notebook}{user_prompt[at:]}"
