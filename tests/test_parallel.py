"""Evaluations side by side (plasa_lab.evaluation.parallel.in_slots), and the two places that use it:
the noise floor's seeds and replays. Real threads and real functions that take time, standing in
for evaluations (a real one takes minutes; the smoke replay test in test_replay.py runs real ones).
And the evaluation slots that processes share (plasa_lab.evaluation.slots), with real processes: a run's
trainings never exceed them however many iterations are in flight (the run itself: test_evolution.py)."""

import signal
import subprocess
import sys
import threading
import time

import pytest

from plasa_lab.evaluation.parallel import in_slots
from plasa_lab.evaluation.slots import evaluation_slot
from plasa_lab.evaluation.stage import Evaluation
from plasa_lab.search.launch import evaluate_initial_program
from plasa_lab.search.run import busy_shares, covered_seconds, most_at_once
from plasa_lab.search.run_config import RunError
from plasa_lab.settings import Settings


class Calls:
    """A call that sleeps `seconds[item]` and records when it ran, on which thread, and whether it unwound."""

    def __init__(self, seconds: dict, fail=()):
        self.seconds, self.fail = seconds, set(fail)
        self.spans, self.threads, self.unwound, self.lock = {}, {}, set(), threading.Lock()

    def __call__(self, item):
        start = time.monotonic()
        try:
            deadline = start + self.seconds[item]
            while time.monotonic() < deadline:  # small steps, as the judge's loop looks at its processes
                time.sleep(0.01)
            if item in self.fail:
                raise ValueError(f"item {item} failed")
            return f"result {item}"
        finally:  # where a sandbox's process groups are killed
            with self.lock:
                self.spans[item] = (start, time.monotonic())
                self.threads[item] = threading.get_ident()
                self.unwound.add(item)

    def overlap(self, a, b) -> bool:
        (a0, a1), (b0, b1) = self.spans[a], self.spans[b]
        return a0 < b1 and b0 < a1


def test_two_slots_run_two_calls_at_once_and_give_their_results_in_the_items_order():
    calls, seen = Calls({0: 0.6, 1: 0.1, 2: 0.1}), []
    results = in_slots(calls, [0, 1, 2], 2, lambda item, result: seen.append((item, result, threading.get_ident())))
    assert results == ["result 0", "result 1", "result 2"]
    assert calls.overlap(0, 1) and calls.overlap(0, 2)  # 1 and 2 ran one after the other while 0 ran
    assert [item for item, _, _ in seen] == [0, 1, 2]  # though 1 and 2 finished first
    assert {thread for _, _, thread in seen} == {threading.get_ident()}  # each() on the calling thread


def test_one_slot_runs_the_calls_one_by_one_on_the_calling_thread():
    calls = Calls({0: 0.1, 1: 0.1})
    assert in_slots(calls, [0, 1], 1) == ["result 0", "result 1"]
    assert not calls.overlap(0, 1) and set(calls.threads.values()) == {threading.get_ident()}


def test_a_failed_call_is_raised_in_its_turn_and_the_calls_in_flight_unwind_before_it_leaves():
    calls, seen = Calls({0: 0.3, 1: 30, 2: 30, 3: 30}, fail={0}), []
    start = time.monotonic()
    with pytest.raises(ValueError, match="item 0 failed"):
        in_slots(calls, [0, 1, 2, 3], 2, lambda item, result: seen.append(item))
    left = time.monotonic()
    assert left - start < 5 and seen == []
    assert {0, 1} <= calls.unwound and 3 not in calls.unwound  # 2 may have started on 0's slot, 3 never did
    assert all(end <= left for _, end in calls.spans.values())  # every call that started had unwound


def test_an_error_in_each_stops_the_rest_too():
    calls = Calls({0: 0.1, 1: 30})

    def each(item, result):
        raise RuntimeError(f"{item} is not good enough")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="0 is not good enough"):
        in_slots(calls, [0, 1], 2, each)
    assert time.monotonic() - start < 5 and calls.unwound == {0, 1}


class Stop(BaseException):
    pass


def test_a_stop_while_waiting_reaches_every_call_in_flight():
    """A signal's exception comes out in the main thread, which waits; the calls on the other threads
    unwind (their `finally` runs: a sandbox is killed there) before it leaves."""

    def stop(signum, frame):
        raise Stop()

    calls = Calls({0: 30, 1: 30, 2: 30})
    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        start = time.monotonic()
        with pytest.raises(Stop):
            in_slots(calls, [0, 1, 2], 2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    left = time.monotonic()
    assert left - start < 5 and calls.unwound == {0, 1}
    assert all(end <= left for _, end in calls.spans.values())


# ---------------------------------------------------------------------------------------------
# the noise floor


def fake_stage(seconds: dict, failing_seed=None, calls=None):
    """evaluate_stage's signature: stage 1 passes at once; stage 2 on a seed takes seconds[seed]."""

    def evaluate(code, stage, settings, on_line=None, seed=None):
        if stage == 1:
            return Evaluation(dict(combined_score=1e-3, val_ppl=1000.0, val_loss=6.9, val_acc=0.1))
        calls.append(("start", seed, time.monotonic()))
        time.sleep(seconds[seed])
        calls.append(("end", seed, time.monotonic()))
        if seed == failing_seed:
            return Evaluation(dict(combined_score=0.0, val_ppl=1e4, val_loss=9.2, val_acc=0.0), dict(failure="boom"))
        return Evaluation(dict(combined_score=1e-3, val_ppl=500.0 + seed, val_loss=6.2, val_acc=0.2), seconds=1.0)

    return evaluate


def test_the_noise_floor_trains_its_seeds_side_by_side_and_says_them_in_seed_order(capsys):
    calls = []
    settings = Settings(profile="smoke", parallel=2, seeds=(42, 43, 44), ledger="")
    with pytest.raises(RunError, match=r"fails its own evaluation \(seed 43\): boom"):
        evaluate_initial_program(settings, fake_stage({42: 0.5, 43: 0.1, 44: 0.1}, failing_seed=43, calls=calls))
    started = {seed: t for what, seed, t in calls if what == "start"}
    ended = {seed: t for what, seed, t in calls if what == "end"}
    assert started[43] < ended[42]  # two at once
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("initial program, seed")]
    assert lines == ["initial program, seed 42: val_ppl 542.0, val_acc 0.200 (1 s)"]  # 42 first, though 43 ended first


# ---------------------------------------------------------------------------------------------
# replays


def test_a_replay_evaluates_side_by_side_and_keeps_candidate_then_seed_order(monkeypatch):
    from pathlib import Path

    from rich.console import Console

    from plasa_lab.replay import plan_replay, run_plan

    monkeypatch.setenv("PLASA_PARALLEL", "2")
    plan = plan_replay([Path(__file__).parent / "fixtures" / "smoke_run"], top=1, seeds=[42, 43])
    spans = {}

    def evaluate(code, stage, settings, on_line=None):
        start = time.monotonic()
        time.sleep(0.4 if settings.seed == 42 else 0.1)  # seed 43 finishes first
        spans[(code, settings.seed)] = (start, time.monotonic())
        return Evaluation(dict(combined_score=1e-3, val_ppl=float(settings.seed), val_loss=6.0, val_acc=0.1))

    results = run_plan(plan, console=Console(file=open("/dev/null", "w")), evaluate=evaluate)
    assert list(results) == [c.name for c in plan.candidates]
    assert all([r.seed for r in runs] == [42, 43] for runs in results.values())
    assert all([r.val_ppl for r in runs] == [42.0, 43.0] for runs in results.values())
    first = plan.candidates[0].code
    (a0, a1), (b0, b1) = spans[(first, 42)], spans[(first, 43)]
    assert b0 < a1 and a0 < b1  # the initial program's two seeds ran at once


# ---------------------------------------------------------------------------------------------
# Evaluation slots shared by processes (plasa_lab.evaluation.slots): a run with proposals ahead


HOLD_A_SLOT = """
import sys, time
from plasa_lab.evaluation.slots import evaluation_slot
with evaluation_slot(sys.argv[1], 1):
    print("held", flush=True)
    time.sleep(120)
"""


def test_n_slots_let_n_trainings_run_at_once_and_never_more(tmp_path):
    spans, lock = [], threading.Lock()

    def training():
        with evaluation_slot(str(tmp_path / "slots"), 2):
            start = time.monotonic()
            time.sleep(0.4)
            with lock:
                spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=training) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(spans) == 5 and most_at_once(spans) == 2


def test_a_slot_is_held_across_processes_and_let_go_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_SLOT, str(tmp_path / "slots")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        got = threading.Event()

        def training():
            with evaluation_slot(str(tmp_path / "slots"), 1):
                got.set()

        threading.Thread(target=training, daemon=True).start()
        assert not got.wait(1.5)  # the other process holds the only slot
        holder.kill()  # no clean-up runs: the kernel lets go of the lock
        assert got.wait(10)
    finally:
        holder.kill()
        holder.wait()


HOLD_THEN_COME_BACK = """
import sys, time
from plasa_lab.evaluation.slots import evaluation_slot
with evaluation_slot(sys.argv[1], 1):
    print("held", flush=True)
    sys.stdin.readline()
time.sleep(0.05)  # a newcomer a moment after the slot was let go (the next iteration, say)
with evaluation_slot(sys.argv[1], 1):
    print(time.time(), flush=True)
"""


def test_the_one_slot_goes_to_whoever_waited_not_to_a_newcomer(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THEN_COME_BACK, str(tmp_path / "slots")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        got = []

        def waiter():
            with evaluation_slot(str(tmp_path / "slots"), 1):
                got.append(time.time())
                time.sleep(0.5)

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        time.sleep(0.5)  # the waiter is waiting
        holder.stdin.write("\n")
        holder.stdin.flush()
        came_back = float(holder.stdout.readline())
        thread.join(10)
        assert got and got[0] < came_back  # a poller every 0.2 s lost this race 3 times in 4
    finally:
        holder.kill()
        holder.wait()


def test_without_a_slot_folder_there_is_no_gate():
    done = threading.Event()

    def nested():  # a gate of one slot would wait here forever
        with evaluation_slot(None, 1), evaluation_slot(None, 1):
            done.set()

    threading.Thread(target=nested, daemon=True).start()
    assert done.wait(5)


def test_busy_time_counts_overlapping_spans_once_and_the_most_at_once_counts_them():
    spans = [(0, 4), (1, 2), (3, 6), (8, 9), (9, 10)]
    assert covered_seconds(spans) == 8  # 0..6, 8..10
    assert most_at_once(spans) == 2  # (8, 9) ends as (9, 10) begins: never both
    assert covered_seconds([]) == 0 and most_at_once([]) == 0


def test_busy_shares_cut_every_span_to_the_window_they_are_taken_over():
    trainings, calls = [(0, 10), (10, 20)], [(5, 12), (11, 15), (18, 30)]
    whole = busy_shares(0, 20, trainings, calls, slots=2)
    assert whole == {"llm": 0.6, "evaluation_slots": 0.5}  # calls cover 5..15 and 18..20: 12 s; 20 of 40 slot-s
    late = busy_shares(12, 20, trainings, calls, slots=1)  # e.g. from the first proposal on
    assert late == {"llm": 0.625, "evaluation_slots": 1.0}  # 12..15 and 18..20 of 8 s; training all 8 s
    assert busy_shares(40, 50, trainings, calls, slots=1) == {"llm": 0.0, "evaluation_slots": 0.0}
