"""Children per hour with N evaluations at once, each in its own sandboxed evaluation.

For each N it evaluates the same programs (the initial program, then offline-mutator children of
it) N at a time, in N worker processes as OpenEvolve runs them, with cores // N threads each, under
a fresh ledger so nothing is answered from a cache. The configurations are interleaved: every
round runs each N once, in an order that reverses from round to round, and the summary takes
medians over rounds, so a change of load during the run does not decide which N wins. It prints
wall time per child, children per hour and, on a GPU, the GPU memory per child (nvidia-smi sampled
in a thread, never CUDA in this process), as a table, then `children_per_hour: X` for the best N.
`--save` records the best split for plasa_lab.evaluation.hardware, which then makes it this machine's default.

    python scripts/bench_throughput.py [--profile full|quick|smoke] [--concurrency 1,2,4,8,16]
                                       [--rounds R] [--waves W] [--stage all|2] [--device auto|cpu|cuda] [--save]
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from openevolve.utils.code_utils import apply_diff
from rich.console import Console
from rich.table import Table

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.cli import fail
from plasa_lab.contract import PROFILES
from plasa_lab.evaluation import hardware
from plasa_lab.evaluation.fitness import evaluate_code
from plasa_lab.evaluation.stage import corpus_of
from plasa_lab.program.checks import static_violation
from plasa_lab.search.mutator import format_diff, propose_edits
from plasa_lab.settings import Settings, measurement_path

GPU_SAMPLE_SECONDS = 0.5
SMI_USED = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]


# ---------------------------------------------------------------------------------------------
# The programs


def programs(count: int) -> list[str]:
    """The initial program, then distinct offline-mutator children of it. Schedule edits are left
    out: a uniform schedule is rejected in seconds, and every N should time the same kind of work."""
    initial = INITIAL_PROGRAM.read_text()
    codes, seed = [initial], 0
    while len(codes) < count:
        seed += 1
        edits = [e for e in propose_edits(initial, random.Random(seed)) if e[0] != "schedule rule"]
        child = apply_diff(initial, format_diff(edits)) if edits else initial
        if child not in codes and static_violation(child, initial) is None:
            codes.append(child)
        if seed > 100 * count:
            fail(f"the offline mutator made only {len(codes)} distinct children")
    return codes


# ---------------------------------------------------------------------------------------------
# One configuration: N worker processes, each evaluating one program at a time


def _worker_start(threads: int, corpus: str):
    import torch

    torch.set_num_threads(threads)  # the judge's own arithmetic keeps to its evaluation's share
    corpus_of(corpus)  # loaded before the clock starts


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)  # long enough that the other workers take the other tasks
    return os.getpid()


def _evaluate(index: int, code: str, stage: str, settings: Settings):
    start = time.monotonic()
    evaluation = evaluate_code(code, stage, settings)
    return index, time.monotonic() - start, evaluation.metrics.get("val_loss"), evaluation.artifacts.get("failure")


class GpuMemory(threading.Thread):
    """The peak GPU memory in use (MiB, all GPUs) while it runs, from nvidia-smi."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.peak = threading.Event(), 0
        self.baseline = self.sample()

    @staticmethod
    def sample() -> int:
        try:
            out = subprocess.run(SMI_USED, capture_output=True, text=True, timeout=10).stdout
            return sum(int(x) for x in out.split() if x.isdigit())
        except (OSError, subprocess.SubprocessError):
            return 0

    def run(self):
        while not self.stop.wait(GPU_SAMPLE_SECONDS):
            self.peak = max(self.peak, self.sample())

    def used_mib(self) -> int:
        self.stop.set()
        self.join()
        return max(0, self.peak - self.baseline)


def run_configuration(parallel: int, threads: int, codes: list[str], args, corpus: str, gpu: bool, label: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as folder:
        settings = Settings(
            profile=args.profile,
            device=args.device,
            corpus=corpus,
            parallel=parallel,
            threads=threads,
            ledger=str(Path(folder) / "ledger.sqlite"),
            time_limit=10.0,
        )
        with ProcessPoolExecutor(
            parallel, mp_context=get_context("spawn"), initializer=_worker_start, initargs=(threads, corpus)
        ) as pool:
            started = set()
            while len(started) < parallel:  # every worker started and warm (torch, corpus) before the clock
                started |= set(pool.map(_pid_after, [0.5] * parallel))
            memory = GpuMemory() if gpu else None
            if memory:
                memory.start()
            start = time.monotonic()
            futures = [pool.submit(_evaluate, i, code, args.stage, settings) for i, code in enumerate(codes)]
            latencies, failures = [], []
            for done, future in enumerate(as_completed(futures), 1):
                index, seconds, val_loss, failure = future.result()
                latencies.append(seconds)
                if failure:
                    failures.append(failure)
                outcome = f"FAILED {failure}" if failure else f"val_loss {val_loss:.4f}"
                print(
                    f"  {label}: program {index} done in {seconds:.0f} s ({outcome}) "
                    f"[{done}/{len(codes)}, {time.monotonic() - start:.0f} s]",
                    file=sys.stderr,
                    flush=True,
                )
            wall = time.monotonic() - start
    return dict(
        parallel=parallel,
        threads=threads,
        children=len(codes),
        ok=len(codes) - len(failures),
        wall_seconds=round(wall, 1),
        seconds_per_child=round(sum(latencies) / len(latencies), 1),
        children_per_hour=round(len(codes) / wall * 3600, 1),
        gpu_mib_per_child=round(memory.used_mib() / parallel) if memory else None,
        first_failure=failures[0] if failures else None,
    )


# ---------------------------------------------------------------------------------------------


def parse_concurrency(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--concurrency takes counts separated by commas, like 1,2,4; got {text!r}")
    if not values or min(values) < 1:
        fail(f"--concurrency takes counts of at least 1; got {text!r}")
    return sorted(set(values))


def summarise(n: int, runs: list[dict], sequential: list[dict] | None) -> dict:
    """One N over the rounds: medians, and its speed-up over one at a time as the median of the
    per-round ratios (each pair measured side by side in time)."""
    median = lambda key: statistics.median(r[key] for r in runs)
    speedup = (
        statistics.median(r["children_per_hour"] / s["children_per_hour"] for r, s in zip(runs, sequential))
        if sequential
        else None
    )
    memory = [r["gpu_mib_per_child"] for r in runs if r["gpu_mib_per_child"] is not None]
    return dict(
        parallel=n,
        threads=runs[0]["threads"],
        rounds=len(runs),
        children=runs[0]["children"],
        ok=min(r["ok"] for r in runs),
        wall_seconds=round(median("wall_seconds"), 1),
        seconds_per_child=round(median("seconds_per_child"), 1),
        children_per_hour=round(median("children_per_hour"), 1),
        speedup=round(speedup, 2) if speedup else None,
        gpu_mib_per_child=max(memory) if memory else None,
        first_failure=next((r["first_failure"] for r in runs if r["first_failure"]), None),
    )


def table(rows: list[dict], gpu: bool) -> Table:
    out = Table(title=f"children per hour (medians of {rows[0]['rounds']} interleaved round(s))")
    for column in (
        "at once",
        "threads each",
        "children (ok)",
        "wall s",
        "s per child",
        "children/h",
        "x one at a time",
    ):
        out.add_column(column, justify="right")
    if gpu:
        out.add_column("GPU MiB per child (peak / N)", justify="right")
    for r in rows:
        cells = [
            str(r["parallel"]),
            str(r["threads"]),
            f"{r['children']} ({r['ok']})",
            f"{r['wall_seconds']:.0f}",
            f"{r['seconds_per_child']:.0f}",
            f"{r['children_per_hour']:.1f}",
            f"{r['speedup']:.2f}" if r["speedup"] else "-",
        ]
        out.add_row(*cells, *([str(r["gpu_mib_per_child"])] if gpu else []))
    return out


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", choices=list(PROFILES), help="the profile timed (default full)")
    parser.add_argument(
        "--concurrency",
        help="evaluations at once, e.g. 1,2,4 (default: 1,2,4,8,16 on a GPU, powers of two up to the cores on a CPU)",
    )
    parser.add_argument("--threads", type=int, help="threads per evaluation (default: the cores shared by N)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the configurations (default 2)")
    parser.add_argument("--waves", type=int, default=1, help="each N evaluates max(2, waves x N) programs (default 1)")
    parser.add_argument(
        "--stage",
        default="all",
        choices=["all", "2"],
        help="all: stage 1 then 2, as a run evaluates a child (default); 2: stage 2 only",
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the children train (default: auto)"
    )
    parser.add_argument("--save", action="store_true", help="make the best split this machine's default")
    args = parser.parse_args()
    if min(args.rounds, args.waves, args.threads or 1) < 1:
        fail("--rounds, --waves and --threads must be at least 1")
    if args.save and args.profile != "full":
        fail("--save needs --profile full: a smaller profile's children per hour is mostly process start-up")
    return args


def main():
    args = parse_args()
    cores = hardware.cpu_cores()
    gpus, _ = hardware.query_gpus() if args.device != "cpu" else (None, "")
    gpu = bool(gpus)
    if args.device == "cuda" and not gpu:
        fail("--device cuda, but nvidia-smi reports no GPU")
    concurrency = (
        parse_concurrency(args.concurrency)
        if args.concurrency
        else [1, 2, 4, 8, 16]
        if gpu
        else [n for n in (1, 2, 4, 8, 16) if n <= cores]
    )
    corpus = corpus_of("auto").name
    counts = {n: max(2, args.waves * n) for n in concurrency}
    codes = programs(max(counts.values()))
    console = Console(width=shutil.get_terminal_size((120, 24)).columns)  # piped: 120, not 80
    default = hardware.evaluation_slots(args.device, measurement_path=measurement_path())
    console.print(
        f"{args.profile} profile, stage {args.stage}, {cores} cores, "
        f"{'GPU' if gpu else 'CPU'}; default here: {default.reason}"
    )
    runs = {n: [] for n in concurrency}
    for number in range(args.rounds):
        for n in concurrency if number % 2 == 0 else concurrency[::-1]:
            threads = args.threads or max(1, cores // n)
            label = f"round {number + 1}/{args.rounds}, N={n}"
            console.print(f"{label}: {counts[n]} programs, {threads} thread(s) each", style="bold")
            runs[n].append(run_configuration(n, threads, codes[: counts[n]], args, corpus, gpu, label))
    rows = [summarise(n, runs[n], runs.get(1)) for n in concurrency]
    console.print(table(rows, gpu))
    for r in rows:
        if r["first_failure"]:
            console.print(f"N={r['parallel']}: {r['children'] - r['ok']} failed, first: {r['first_failure']}")
    # By the paired speed-up when one at a time was measured: it compares runs made side by side in time.
    best = max(rows, key=lambda r: r["children_per_hour"] if r["speedup"] is None else r["speedup"])
    if not any(r["ok"] for r in rows):
        fail("every evaluation failed; no throughput to report")
    if args.save:
        path = hardware.save_measurement(
            measurement_path(),
            hardware.current_machine_key(args.device),
            best["parallel"],
            best["threads"],
            best["children_per_hour"],
            rows,
        )
        console.print(
            f"saved: {best['parallel']} evaluation(s) x {best['threads']} thread(s) is the default here ({path})"
        )
    sequential = next((r for r in rows if r["parallel"] == 1), None)
    against = (
        f" against {sequential['children_per_hour']:.1f} one at a time ({best['speedup']:.2f}x, paired)"
        if sequential
        else ""
    )
    print(
        f"best: {best['parallel']} at once, {best['threads']} thread(s) each: "
        f"{best['children_per_hour']:.1f} children/h{against}"
    )
    print(f"children_per_hour: {best['children_per_hour']:.1f}")


if __name__ == "__main__":
    main()
