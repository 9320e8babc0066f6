"""Evaluations side by side: up to the machine's evaluation slots at once, on threads (each evaluation
is its own sandboxed process tree, so its thread only waits on it), their results taken in order.

A stop (Ctrl-C, SIGTERM) reaches only the main thread: Python runs signal handlers there. One
evaluation at a time, that was enough: it ran on the main thread, so the exception the handler
raised unwound it, its `finally` clauses killed its process groups, and nothing half-done reached
the ledger. Side by side, the evaluations in flight get the same treatment: `Cancelled` (a
BaseException, like KeyboardInterrupt, so the judge's `except Exception` lets it through) is raised
in each of them, and the stop goes on once they have unwound.
"""

import ctypes
import threading

UNWIND_SECONDS = 30.0  # for the evaluations in flight to unwind after a stop (the judge looks 4 times a second)


class Cancelled(BaseException):
    """Raised inside a call that in_slots' caller stopped waiting for."""


def in_slots(call, items, slots: int, each=None) -> list:
    """[call(item) for item in items], up to `slots` calls at once on threads.

    `each(item, result)` runs on the calling thread in the items' order, as soon as a result and all
    those before it are in: what it prints comes out in order, whatever finishes first. An exception
    of a call is raised here in its turn, like one raised by `each` or a stop while waiting; then the
    calls not started are dropped, those running get Cancelled raised in them, and this returns once
    they have unwound. With one slot (or one item) the calls run on the calling thread, one by one."""
    items = list(items)
    if slots <= 1 or len(items) <= 1:
        results = []
        for item in items:
            results.append(call(item))
            if each:
                each(item, results[-1])
        return results

    changed = threading.Condition()  # guards everything below; notified when an outcome comes in
    outcomes = {}  # index -> (True, result) or (False, exception)
    running = set()  # the threads inside call(), by ident: the ones a stop must reach
    todo = iter(range(len(items)))
    stopping = False

    def slot():
        try:
            while True:
                with changed:
                    index = None if stopping else next(todo, None)
                    if index is None:
                        return
                    running.add(threading.get_ident())
                try:
                    outcome = (True, call(items[index]))
                except Cancelled:
                    raise
                except BaseException as e:  # the caller raises it in its turn
                    outcome = (False, e)
                with changed:
                    running.discard(threading.get_ident())
                    outcomes[index] = outcome
                    changed.notify_all()
        except Cancelled:
            pass  # wherever it landed: it was sent while this thread was inside call()

    threads = [threading.Thread(target=slot, daemon=True) for _ in range(min(slots, len(items)))]
    for thread in threads:
        thread.start()
    results = []
    try:
        for index, item in enumerate(items):
            with changed:
                while index not in outcomes:
                    changed.wait()  # a stop's exception comes out of here
                ok, value = outcomes.pop(index)
            if not ok:
                raise value
            results.append(value)
            if each:
                each(item, value)
    finally:
        with changed:  # under the lock: a thread in `running` is still inside call() (or about to leave it)
            stopping = True
            for ident in running:
                _raise_in(ident, Cancelled)
        for thread in threads:
            thread.join(UNWIND_SECONDS)
    return results


def _raise_in(thread_ident: int, exception: type[BaseException]):
    """Raise `exception` in another thread of this process, at its next Python instruction (CPython's
    PyThreadState_SetAsyncExc: how a signal's exception reaches the main thread, for any thread)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_ident), ctypes.py_object(exception))
