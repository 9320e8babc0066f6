"""How a run stops before its last iteration, in one place: Ctrl-C and SIGTERM from the user, the
run's own stop (an LLM that keeps failing: an error line; a token budget spent: the line a Ctrl-C
gives, naming the budget), and the one line each ends with.

A stop means something different as the run goes, and says so:

    libraries loading       scripts/evolve.py, before anything is planned: nothing was written
    planning, starting      Stopped: the same command again, or the resume command once run.json exists
    OpenEvolve running      its own handlers: a first stop asks it to shut down (it saves a checkpoint),
                            a second exits it; both end with a checkpoint and the resume command
    saving the checkpoint   further stops are ignored: they would only cut the checkpoint short

Standard library only (and the run folder's names): scripts/evolve.py installs its first handler
before the heavy libraries load.
"""

import contextlib
import shlex
import signal
import sys
from pathlib import Path

from ..rundir import RUN_RECORD

STOPPED_EXIT = 130  # any stop (Ctrl-C or SIGTERM): what a shell reports for Ctrl-C
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """Ctrl-C or SIGTERM while the run itself (not OpenEvolve) was working. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way (the judge's) takes it for an error."""

    def __init__(self, signum: int, during: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.during = signum, during  # during: what the run was doing, for the stop's line


def resume_line(run_dir: Path) -> str:
    """The resume command, with this interpreter: a bare `python` is the system's, which lacks the
    project's packages."""
    return f"Resume with: {shlex.join([sys.executable, 'scripts/evolve.py', '--resume', '--output', str(run_dir)])}"


def stop_while_libraries_load():
    """scripts/evolve.py's handlers until run() installs its own: a stop while torch and OpenEvolve
    load is one line too, not a traceback."""

    def handler(signum, frame):
        print(
            f"{Path(sys.argv[0]).name}: stopped ({signal.Signals(signum).name}) before the run started; "
            "nothing was written",
            file=sys.stderr,
        )
        sys.exit(STOPPED_EXIT)

    for s in SIGNALS:
        signal.signal(s, handler)


@contextlib.contextmanager
def _handlers(handler):
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stopped_line(stop: Stopped, run_dir: Path | None, next_iteration: int) -> str:
    """The line a stop before the search ends with: the resume command once run.json exists, else
    the same command again."""
    if run_dir is None or not (Path(run_dir) / RUN_RECORD).exists():
        return (
            f"stopped ({stop}) before the run started; nothing was written. Start it again with: "
            f"{shlex.join([sys.executable, *sys.argv])}"
        )
    if stop.during:
        return (
            f"stopped ({stop}) {stop.during}, before iteration {next_iteration}; its finished evaluations "
            f"are in the ledger. {resume_line(run_dir)}"
        )
    return (
        f"stopped ({stop}) before iteration {next_iteration}; nothing finished is lost (finished evaluations "
        f"are in the ledger). {resume_line(run_dir)}"
    )


class RunStops:
    """The stops of one run: which handlers answer SIGINT and SIGTERM, and the run's own stop."""

    def __init__(self):
        self.reason: str | None = None  # why the run stopped itself (None: it did not)
        self.failure = True  # whether that reason is a failure (the LLM's) or a limit reached (a budget)
        self._controller = None  # OpenEvolve's controller while it runs

    def raising(self):
        """A context in which SIGINT and SIGTERM raise Stopped, so any stop ends with a checkpoint
        (where there is one) and the resume command, never a traceback or a silent exit."""

        def handler(signum, frame):
            raise Stopped(signum)

        return _handlers(handler)

    def ignored(self):
        """A context in which another Ctrl-C or SIGTERM changes nothing: a stop is being carried out
        (its checkpoint written, its line printed), and a second one would only cut it short."""
        return _handlers(signal.SIG_IGN)

    @contextlib.contextmanager
    def openevolve_running(self, controller):
        """Around controller.run(): until OpenEvolve installs its own graceful handlers a stop is
        ours (Stopped); then its first stop asks for a shutdown and its second calls sys.exit(0).
        On the way out ours are back (OpenEvolve leaves its handlers installed)."""
        self._controller = controller
        try:
            with self.raising():
                yield
        finally:
            self._controller = None

    def request(self, reason: str, failure: bool = True):
        """The run stops itself, as a first Ctrl-C would stop OpenEvolve: it finishes the iterations in
        flight and returns, and the run saves a checkpoint and says `reason` (a failure: an error
        line; not one, as a token budget spent: the stop line of a Ctrl-C, exit STOPPED_EXIT). No
        signal is sent: a signal sent from a thread lands on the main thread wherever it is, even
        after OpenEvolve ended."""
        if self.reason is None:
            self.reason, self.failure = reason, failure
        parallel = getattr(self._controller, "parallel_controller", None)  # None unless evolving
        if parallel is not None:
            parallel.request_shutdown()
