"""The run's console: lines on stderr, the best program as the progress line names it, and the live
bar while OpenEvolve runs. Display only: what the run records (the trace, llm_responses.jsonl,
run.json) is written elsewhere, and a stop is asked for elsewhere (plasa_lab.search.stops)."""

import math
import sys
import time

from ..stats import paired_change, seed_losses, verdict
from ..util import one_line


def say(line: str):
    """One line on the console. The run talks on stderr: stdout stays free for what a caller parses."""
    print(line, file=sys.stderr, flush=True)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def child_ppl(metrics: dict | None):
    """A child's val_ppl if it passed evaluation, else None."""
    metrics = metrics or {}
    return metrics.get("val_ppl") if (metrics.get("combined_score") or 0.0) > 0 else None


class Best:
    """The best program as OpenEvolve keeps it: the highest combined_score, the earlier on a tie. With
    noise-aware scores only a program confirmed on every seed can hold it (evaluation.noise_aware_stage2)."""

    def __init__(self, metrics: dict | None, initial_losses: dict[int, float]):
        self.metrics, self.initial_losses = metrics or {}, initial_losses

    def offer(self, metrics: dict):
        if (metrics.get("combined_score") or 0) > (self.metrics.get("combined_score") or 0):
            self.metrics = metrics

    def describe(self) -> str:
        m = self.metrics
        if not child_ppl(m):
            return "no passing program yet"
        losses = seed_losses(m)
        if len(losses) < 2 or len(self.initial_losses) < 2:
            return f"best val_ppl {m['val_ppl']:.1f}"
        word, p, _ = verdict(losses, self.initial_losses)
        change, _, n = paired_change(losses, self.initial_losses)
        p_text = f"p={p:.2g}" if p is not None else "p n/a"
        return (
            f"best confirmed val_ppl {m['val_ppl']:.1f} ({len(losses)} seeds, "
            f"{100 * math.expm1(change):+.2f}% vs initial on the same {n} seeds, {p_text}: {word})"
        )


def iteration_outcome(record: dict, failed: bool) -> str:
    """What became of one iteration, in a few words: a child's val_ppl, its rejection, or why there
    was no child."""
    if failed:
        return f"no child: {one_line(record.get('error'), 110)}"
    metrics = record.get("child_metrics") or {}
    ppl = child_ppl(metrics)
    if ppl is None:
        return f"rejected: {one_line((record.get('artifacts') or {}).get('failure', 'score 0'), 110)}"
    seeds = int(metrics.get("seeds") or 1)
    confirmed = ", confirmed" if metrics.get("confirmed") else ""
    return f"val_ppl {ppl:.1f} ({seeds} seed{'s' * (seeds > 1)}{confirmed})"


class Progress:
    """While OpenEvolve runs: one line per finished iteration, and a live bar with the count, the
    ETA and the best so far. Used as a context (the bar lives inside it); `emit` replaces the bar's
    console (a test collects the lines)."""

    def __init__(self, first: int, last: int, best: Best, seconds_per_child: float | None, emit=None):
        self.first, self.last, self.best, self.estimate = first, last, best, seconds_per_child
        self.finished, self.started = 0, time.monotonic()
        self.emit, self._bar, self._task = emit, None, None

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("[bold]evolve"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            TextColumn("{task.fields[status]}"),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.start()
        total = self.last - self.first + 1
        self._task = self._bar.add_task("", total=total, eta=self.eta(), status=self.best.describe())
        # lines hold a child's words: printed as text, never read as rich markup ("[/]" once ended the run's watcher)
        self.emit = self.emit or (lambda line: self._bar.console.print(line, highlight=False, markup=False))
        return self

    def __exit__(self, *exc):
        self._bar.stop()

    def eta(self) -> str:
        remaining = self.last - self.first + 1 - self.finished
        per_child = (time.monotonic() - self.started) / self.finished if self.finished else self.estimate
        return f"ETA {hours(per_child * remaining)}" if per_child and remaining else ("ETA ?" if remaining else "")

    def iteration(self, iteration: int, record: dict, failed: bool):
        """The line of one finished iteration (its trace record), with the best so far."""
        self.finished += 1
        outcome = iteration_outcome(record, failed)
        self.emit(f"iteration {iteration}/{self.last}: {outcome} | {self.best.describe()} | {self.eta()}")

    def refresh(self):
        if self._bar is not None:
            self._bar.update(self._task, completed=self.finished, eta=self.eta(), status=self.best.describe())
