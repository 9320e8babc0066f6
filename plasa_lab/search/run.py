"""An evolution run: OpenEvolve configured for PLASA, launched or resumed, watched, summarised.

OpenEvolve does the search; this module runs it and adds what an overnight run needs around it,
in the order a run goes:

    plan       plasa_lab.search.launch.plan_run: the config, the LLM and its endpoint, the OS isolation,
               the resume checks, the corpus: every check, one line on any problem, nothing written
    start      plasa_lab.search.launch.start_run: run.json, then the initial program on every seed of the
               run (the noise floor, and the time limits calibrated on this machine, now)
    search     OpenEvolve from the checkpoint to the run's total, watched (`Watch`): one line per
               iteration with an ETA (plasa_lab.search.progress), each LLM response filed (plasa_lab.rundir),
               a stop when the LLM keeps failing the same way
    end        on any stop a checkpoint and the resume command (plasa_lab.search.stops); else a summary of
               the best confirmed program and of where the time went, and a non-zero exit when no
               child could be evaluated (OpenEvolve exits 0 then)
"""

import asyncio
import contextlib
import io
import logging
import multiprocessing
import sys
import threading
import time
from pathlib import Path

from .. import INITIAL_PROGRAM, PROJECT_ROOT, rundir
from ..evaluation.fitness import confirmation_count, confirmed_gains
from ..evaluation.ledger import Ledger
from ..evaluation.stage import corpus_of
from ..reporting import notebook
from ..rundir import TRACE, LLMResponseLog, finished_iterations, read_jsonl
from ..settings import Settings
from .launch import NothingToDo, RunOptions, RunPlan, RunStart, plan_run, start_run
from .llm_client import BLOCK_REFUSED, BUDGET_SPENT, outcome_of
from .llm_usage import TokenMeter
from .progress import Best, Progress, child_ppl, hours, say
from .run_config import RunError
from .stops import STOPPED_EXIT, RunStops, Stopped, resume_line, stopped_line

EVALUATOR = PROJECT_ROOT / "evaluator.py"
IDENTICAL_FAILURES_TO_STOP = 3  # LLM failures in a row with the same reason end the run


def run(options: RunOptions) -> int:
    """Launch or resume a run; returns the process exit code. A stop (Ctrl-C, SIGTERM) at any moment
    ends with one line saying how to go on: the resume command once run.json exists, else the same
    command again."""
    stops, plan = RunStops(), None
    try:
        with stops.raising():
            plan = plan_run(options)
            return search(plan, start_run(plan), stops)
    except NothingToDo as e:
        print(e)
        return 0
    except Stopped as stop:
        say(stopped_line(stop, plan.run_dir if plan else None, plan.done + 1 if plan else 1))
        return STOPPED_EXIT


# ---------------------------------------------------------------------------------------------
# The search


def search(plan: RunPlan, start: RunStart, stops: RunStops) -> int:
    """OpenEvolve from the plan's checkpoint to its total, watched; then the stop's line or the summary."""
    from openevolve.controller import EvolutionFailedError

    controller = _construct_quietly(str(INITIAL_PROGRAM), str(EVALUATOR), plan.config, output_dir=str(plan.run_dir))
    best = Best(
        _best_at(plan.checkpoint) or start.initial_metrics,
        dict(zip(start.noise_floor.seeds, start.noise_floor.val_losses)),
    )
    progress = Progress(plan.done + 1, plan.total, best, start.seconds_per_child)
    watch = Watch(plan.run_dir, plan.done + 1, plan.total, best, progress, stops, plan.config.llm.models[0].name)
    watch.budget = plan.llm.max_llm_tokens
    target = 1.0 / plan.target_ppl if plan.target_ppl else None
    failed, stopped, started = None, False, time.time()
    watch.start()
    try:
        with stops.openevolve_running(controller):
            asyncio.run(
                controller.run(
                    iterations=plan.total - plan.done,
                    target_score=target,
                    checkpoint_path=str(plan.checkpoint) if plan.checkpoint else None,
                )
            )
    except EvolutionFailedError as e:
        failed = str(e)
    except (Stopped, KeyboardInterrupt, SystemExit):  # its second Ctrl-C calls sys.exit(0)
        stopped = True
    finally:
        watch.finish()

    reached = controller.database.last_iteration
    finished = {f.iteration for f in finished_iterations(plan.run_dir)}
    missing = set(range(plan.done + 1, plan.total + 1)) - finished  # every finished iteration leaves a trace line
    best_program = controller.database.get_best_program()
    best_metrics = best_program.metrics if best_program else {}
    target_hit = bool(target and best_metrics.get("combined_score", 0) >= target)
    time_line = _time_accounting(plan, started, reached)
    tokens_line = _token_accounting(plan)
    if (missing or stopped) and not target_hit and failed is None:  # stopped by Ctrl-C, SIGTERM or the run
        return _stop_with_a_checkpoint(controller, plan, stops, reached)
    if stops.reason and stops.failure:  # OpenEvolve ran out of iterations before the stop reached it
        failed = f"{stops.reason}; fix the LLM, then: {resume_line(plan.run_dir).removeprefix('Resume with: ')}"
    last_run = max(finished | {reached})  # the last iteration run, whether or not it left a program
    _say_the_outcome(plan, last_run, Best(best_metrics, best.initial_losses), failed)
    say(time_line)
    if tokens_line:
        say(tokens_line)
    if plan.settings.noise_aware:
        say(_confirmation_accounting(plan.run_dir, plan.settings))
    return 0


def _construct_quietly(*args, **kwargs):
    """OpenEvolve(...) with its console handler turned down to warnings: INFO goes to the run's
    log file, and the console shows our progress instead."""
    from openevolve.controller import OpenEvolve

    with contextlib.redirect_stderr(io.StringIO()):  # the handler it adds would print the set-up chatter
        controller = OpenEvolve(*args, **kwargs)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)
            handler.setStream(sys.stderr)
    return controller


def _best_at(checkpoint: Path | None) -> dict | None:
    """OpenEvolve's best at the checkpoint we resume from."""
    import json

    if checkpoint is None:
        return None
    try:
        return json.loads((checkpoint / "best_program_info.json").read_text()).get("metrics")
    except (OSError, ValueError):
        return None


def _stop_with_a_checkpoint(controller, plan: RunPlan, stops: RunStops, reached: int) -> int:
    """A stop during the search: a checkpoint and the best program saved, the evaluations in flight
    let go, and one line; RunError when the run stopped itself (the LLM keeps failing)."""
    with stops.ignored():
        with contextlib.suppress(Exception):
            controller._save_checkpoint(reached)  # OpenEvolve writes none after a shutdown request
            controller._save_best_program()  # nor best/ after a second Ctrl-C (its sys.exit)
        # Evaluations still in flight (a second stop cut OpenEvolve's wait for them) are lost, as a
        # stop promises; without this, leaving would wait for them (its worker pool joins at exit).
        for worker in multiprocessing.active_children():
            worker.kill()
        if stops.reason and stops.failure:  # not the user's stop
            raise RunError(
                f"stopped at iteration {reached} of {plan.total} after {stops.reason}; fix the LLM, "
                f"then: {resume_line(plan.run_dir).removeprefix('Resume with: ')}"
            )
        budget = plan.llm.max_llm_tokens
        more = f" --max-llm-tokens {2 * budget}" if stops.reason and budget else ""  # the budget: a larger one
        say(
            f"stopped at iteration {reached} of {plan.total}{f' ({stops.reason})' if stops.reason else ''}; "
            f"checkpoint saved in {plan.run_dir / rundir.CHECKPOINTS}. {resume_line(plan.run_dir)}{more}"
        )
        return STOPPED_EXIT


def _say_the_outcome(plan: RunPlan, last_run: int, best: Best, failed: str | None):
    """The run's last word: how many children passed and the best, or RunError when none passed."""
    children = read_jsonl(plan.run_dir / TRACE)
    passed = [r for r in children if child_ppl(r.get("child_metrics")) is not None]
    if failed or not passed:
        failures = [(r.get("artifacts") or {}).get("failure") for r in children]
        last = next((f for f in reversed(failures) if f), None)
        raise RunError(
            failed
            or f"no child could be evaluated: {len(children)} children, none passed"
            + (f"; last failure: {last}" if last else "")
        )
    say(
        f"done: iteration {last_run} of {plan.total}; {len(passed)} of {len(children)} children passed; "
        f"{best.describe()} ({plan.run_dir / rundir.BEST_PROGRAM})"
    )


# ---------------------------------------------------------------------------------------------
# Watching OpenEvolve


class FailureStreak:
    """LLM failures in a row for the same reason: past IDENTICAL_FAILURES_TO_STOP every further
    iteration would only burn its time."""

    def __init__(self):
        self.error, self.count = None, 0

    def see(self, error: str | None) -> str | None:
        """Count one iteration's error (None: it had an answer); the reason to stop, once it is one."""
        if not (error and error.startswith("LLM generation failed")) or BLOCK_REFUSED in error or BUDGET_SPENT in error:
            self.error, self.count = None, 0
            return None
        self.count = self.count + 1 if error == self.error else 1
        self.error = error
        return (
            f"{self.count} LLM failures in a row: {error[:200]}" if self.count >= IDENTICAL_FAILURES_TO_STOP else None
        )


class Watch(threading.Thread):
    """While OpenEvolve runs, once a second: the iterations it finished since, in the order it filed
    them (with parallel evaluations, not the iterations' order: on a tie the earlier filed stays
    best, as in OpenEvolve). Each one's child is offered as the best and shown (Progress), its LLM
    response filed (llm_responses.jsonl), the lab notebook written (notebook.md), and its error
    counted: an LLM that keeps failing the same way stops the run (RunStops.request)."""

    def __init__(self, run_dir: Path, first: int, last: int, best: Best, progress: Progress, stops=None, model=""):
        super().__init__(daemon=True)
        self.run_dir, self.first, self.last, self.best = run_dir, first, last, best
        self.progress, self.stops = progress, stops
        self.responses = LLMResponseLog(run_dir, model, since=time.time())
        self.failures, self.seen, self.done = FailureStreak(), set(), threading.Event()
        self.display_failed = False
        self.tokens, self.budget = TokenMeter(run_dir), None  # budget: the run's --max-llm-tokens

    def run(self):
        with contextlib.ExitStack() as stack:
            self.display(lambda: stack.enter_context(self.progress))
            while not self.done.wait(1.0):
                self.poll()
            self.poll()

    def display(self, action):
        """Show something; a display that fails (a renderer, a terminal) is said once and never stops
        the bookkeeping around it."""
        try:
            action()
        except Exception as e:
            if not self.display_failed:
                self.display_failed = True
                with contextlib.suppress(Exception):
                    print(f"the progress display failed ({type(e).__name__}); the run goes on", file=sys.stderr)

    def finish(self):
        """The last iterations shown and filed, and the thread gone (OpenEvolve has returned)."""
        self.done.set()
        self.join(10)

    def poll(self):
        new = [
            f
            for f in finished_iterations(self.run_dir)
            if f.iteration not in self.seen and self.first <= f.iteration <= self.last
        ]
        for f in new:
            self.seen.add(f.iteration)
            if not f.failed and child_ppl(f.child_metrics) is not None:
                self.best.offer(f.child_metrics)
        self.responses.file([(f, outcome_of(f.child_metrics, f.error)) for f in new])
        if new:
            notebook.write(self.run_dir)
        for f in new:
            if (reason := self.failures.see(f.error)) and self.stops is not None:
                self.stops.request(reason)
        if self.budget and self.stops is not None and self.tokens.update().total >= self.budget:
            spent = f"the LLM token budget is spent: {self.tokens.total:,} tokens of --max-llm-tokens {self.budget:,}"
            self.stops.request(spent, failure=False)
        for f in new:  # shown last: the records above never wait on the display
            self.display(lambda f=f: self.progress.iteration(f.iteration, f.record, f.failed))
        self.display(self.progress.refresh)


# ---------------------------------------------------------------------------------------------
# Where the run's time and trainings went (recorded in run.json)


def _confirmation_accounting(run_dir: Path, settings: Settings) -> str:
    """The share of the run's stage-2 trainings spent confirming contenders, and what they bought:
    confirmed gains (better than the initial program beyond noise, paired on the run's seeds)."""
    ledger, fingerprint = Ledger(settings.ledger), corpus_of(settings.corpus).fingerprint
    spent, trainings = confirmation_count(settings, ledger, fingerprint)
    gains = len(confirmed_gains(settings, ledger, fingerprint))
    share = spent / max(1, trainings)
    counts = dict(
        confirmation_trainings=spent,
        stage2_trainings=trainings,
        share=round(share, 3),
        cap=settings.confirm_share,
        confirmed_gains=gains,
        trainings_per_confirmed_gain=round(trainings / gains, 1) if gains else None,
    )
    _update_run_record(run_dir, lambda record: record.update(confirmation=counts))
    per_gain = f"{trainings / gains:.1f} stage-2 trainings per confirmed gain" if gains else "no confirmed gain"
    return (
        f"confirmations: {spent} of {trainings} stage-2 trainings ({share:.0%}; PLASA_CONFIRM_SHARE caps them "
        f"at {settings.confirm_share:.0%}); {gains} program(s) trained on every seed and better than the initial "
        f"one beyond noise, {per_gain}. A best's change is claimed on the seeds it was selected on: replay it on "
        f"others (scripts/replay.py {run_dir} --seeds 101,102,103,104,105) to see how much of it holds"
    )


def _time_accounting(plan: RunPlan, started: float, reached: int) -> str:
    """Where this session's wall time went, per resource: the share of it the LLM was busy (at least one
    call in flight) and the share of the evaluation slots' time spent training, over the whole session
    and from the first proposal on (before it, the LLM check and the initial program's seeds leave the
    LLM idle by design); and the most trainings that ran at once, which the slots bound (evaluation.slots)."""
    settings, now = plan.settings, time.time()
    trainings = [
        (r["created_at"] - r["seconds"], r["created_at"])
        for r in Ledger(settings.ledger).rows()
        if r["created_at"] >= started
    ]
    calls = [
        (c["time"] - c["seconds"], c["time"])
        for c in read_jsonl(plan.run_dir / rundir.LLM_CALLS)
        if isinstance(c.get("seconds"), (int, float)) and c.get("time", 0) >= started
    ]
    slots = max(1, settings.parallel)
    busy = busy_shares(started, now, trainings, calls, slots)
    first_proposal = min((end for _, end in calls), default=None)
    after_first = busy_shares(first_proposal, now, trainings, calls, slots) if first_proposal else None
    session = dict(
        wall_seconds=round(now - started, 1),
        parallel=settings.parallel,
        proposals_ahead=plan.proposals_ahead,
        llm_seconds=round(covered_seconds(calls), 1),
        evaluation_seconds=round(sum(end - begin for begin, end in trainings), 1),
        most_trainings_at_once=most_at_once(trainings),
        busy=busy,
        busy_after_first_proposal=after_first,
        seconds_after_first_proposal=round(now - first_proposal, 1) if first_proposal else None,
    )
    _update_run_record(plan.run_dir, lambda record: record.setdefault("time_accounting", []).append(session))
    llm_line = f"the LLM busy {busy['llm']:.0%}" if calls else "no LLM calls"
    if after_first:
        llm_line += (
            f" (from the first proposal on: slots {after_first['evaluation_slots']:.0%}, "
            f"the LLM {after_first['llm']:.0%})"
        )
    return (
        f"time: {hours(now - started)} wall; {slots} evaluation slot(s) busy {busy['evaluation_slots']:.0%} "
        f"(at most {session['most_trainings_at_once']} training(s) at once), {llm_line}; "
        f"{plan.proposals_ahead} proposal(s) ahead of the slots (--proposals-ahead)"
    )


def busy_shares(begin: float, end: float, trainings: list, calls: list, slots: int) -> dict:
    """Each resource's busy share of the wall time from begin to end: the LLM's (at least one call in
    flight) and the evaluation slots' (training seconds over wall seconds times slots); the (begin, end)
    spans of trainings and calls are cut to that window."""
    wall = max(1e-9, end - begin)
    cut = lambda spans: [(max(b, begin), min(e, end)) for b, e in spans if e > begin and b < end]  # noqa: E731
    evaluating = sum(e - b for b, e in cut(trainings))
    return dict(
        llm=round(min(1.0, covered_seconds(cut(calls)) / wall), 3),
        evaluation_slots=round(min(1.0, evaluating / (wall * slots)), 3),
    )


def covered_seconds(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of the (begin, end) intervals was running."""
    total, reach = 0.0, float("-inf")
    for begin, end in sorted(intervals):
        if end > reach:
            total += end - max(begin, reach)
            reach = end
    return total


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most (begin, end) intervals running at one moment (one that ends as another begins: not both)."""
    events = sorted([(begin, 1) for begin, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in events:  # at a tie the end (-1) sorts first
        running += step
        most = max(most, running)
    return most


def _token_accounting(plan: RunPlan) -> str | None:
    """The run's LLM tokens, resumes included, and their estimated cost, recorded in run.json's
    llm_usage; its line (None for a run with no LLM calls: the offline mutator)."""
    meter, llm = TokenMeter(plan.run_dir).update(), plan.llm
    if not meter.calls:
        return None
    usage = meter.record(llm.price_per_million, llm.max_llm_tokens)
    _update_run_record(plan.run_dir, lambda record: record.update(llm_usage=usage))
    return meter.line(llm.price_per_million, llm.max_llm_tokens)


def _update_run_record(run_dir: Path, update):
    """run.json changed by update(record); a summary that cannot be recorded is printed all the same."""
    with contextlib.suppress(Exception):
        record = rundir.read_run_record(run_dir) or {}
        update(record)
        rundir.write_run_record(run_dir, record)
