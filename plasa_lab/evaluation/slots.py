"""Evaluation slots shared by processes: at most N trainings at once, however many iterations are in flight.

OpenEvolve runs each iteration (the LLM's proposal, then the child's evaluation) in one of its worker
processes. A run with more workers than evaluation slots lets the LLM write the next child while the
last one trains (plasa_lab.search.launch); each training takes one slot here first, so the slots are
never exceeded. A slot is an exclusive flock on one of N files: the kernel lets go of it when its
holder exits, however it exits, so a killed worker never keeps a slot. The files hold nothing; the
sandboxed processes never see them (the descriptor is close-on-exec, and the sandbox binds no run folder).
"""

import contextlib
import fcntl
import os
import time
from pathlib import Path

POLL_SECONDS = 0.2  # how often a training waiting for one of several slots tries them again


@contextlib.contextmanager
def evaluation_slot(directory: str | None, count: int):
    """Hold one of `count` slots in `directory` for the body (waiting for one to be free); with no
    directory, no gate: the caller's own parallelism is the bound."""
    if not directory:
        yield None
        return
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(max(1, count)):
            fd = os.open(folder / f"slot-{slot}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                # one slot: wait in the kernel's queue, woken as its holder lets go; a poller can lose
                # every race to a newcomer (an LLM call once waited 30 min behind three later calls)
                fcntl.flock(fd, fcntl.LOCK_EX if count <= 1 else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield slot
            finally:
                os.close(fd)  # closing the only descriptor of the open file lets go of its lock
            return
        time.sleep(POLL_SECONDS)
