"""How many evaluations run at once on this machine, and with how many threads each.

    GPU   as many as the GPU's free memory holds at GPU_MIB_PER_EVALUATION each, and no more than
          the CPU cores: each evaluation's host side (a Python loop launching small kernels, the
          judge's own arithmetic) keeps one core busy. This model leaves a GPU nearly idle at batch
          2, so evaluations side by side fill the gaps between each other's kernels.
    CPU   the split of the cores that bench_throughput.py measured to give the most children per
          hour on this machine (`--save`); until it has, CPU_THREADS_PER_EVALUATION (1) thread each,
          the split measured best on 2 cores.

PLASA_PARALLEL and PLASA_THREADS override either: plasa_lab.settings reads them and passes them
here, with the path of the measurement file, so this module reads no settings. The GPU is asked
through nvidia-smi in a subprocess, never through torch: initialising CUDA in this process would
break the worker processes OpenEvolve forks from it afterwards.
"""

import functools
import json
import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from ..util import atomic_write

# GPU memory one evaluation may hold at its peak. NOT measured on a GPU here (none was available):
# an estimate, with margin, of a stage's worst moment, its two serving processes side by side, each
# a CUDA context (about 0.5 GiB with torch's lazy kernel loading) plus the weights (12.6M fp32
# values, 50 MB) and a batch's logits (2 x 128 x 49152 fp32, 50 MB) with the caching allocator's
# slack. The training process alone needs less: weights, gradients and two AdamW moments (200 MB),
# activations, one context. bench_throughput.py prints the measured figure per child.
GPU_MIB_PER_EVALUATION = 2048
GPU_FREE_SHARE = 0.9  # of the free memory: what else runs on the GPU may grow
# RAM one evaluation may hold, its processes together (the judge enforces it: evaluation.judge). Measured
# here (CPU, quick stage 2, 2026-12-06): 1.37 GiB resident at the peak (the trunk 0.85, two blocks
# processes 0.33 and 0.26); address space 1.35 GB for the trunk, 0.69 GB for a blocks process, which
# the limits that sum to this figure must hold with room for more threads.
RAM_MIB_PER_EVALUATION = 4096
# CPU threads per evaluation until bench_throughput.py --save has measured this machine: one, so
# as many evaluations as cores (as the RAM allows). Measured on 2 cores (quick profile, stage 1 and
# 2, docs/benchmarks.md "Children per hour"): 2 evaluations x 1 thread gave 61.4 children/h, 1 x 2 threads
# 49.2 (1.26x, the same val_loss): batch-2 operations gain less from a second thread than a second
# evaluation gains from its own core. Not measured on bigger machines.
CPU_THREADS_PER_EVALUATION = 1
MEASUREMENT_FILE = "throughput.json"  # in the data cache (plasa_lab.settings.measurement_path)
SMI_QUERY = ["nvidia-smi", "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"]


class Gpu(NamedTuple):
    free_mib: int
    total_mib: int


class Slots(NamedTuple):
    parallel: int  # evaluations at once
    threads: int  # threads per evaluation
    reason: str  # one line for the start-up output


# ---------------------------------------------------------------------------------------------
# What the machine has


def parse_gpus(smi_output: str) -> list[Gpu]:
    """The GPUs in the output of SMI_QUERY, one `free, total` line (MiB) each. ValueError on
    anything else (`[N/A]` under MIG, an error message)."""
    gpus = []
    for line in smi_output.strip().splitlines():
        fields = [x.strip() for x in line.split(",")]
        if len(fields) != 2 or not all(x.isdigit() for x in fields):
            raise ValueError(f"unexpected nvidia-smi line {line.strip()[:80]!r}")
        gpus.append(Gpu(int(fields[0]), int(fields[1])))
    return gpus


def children_gpu(gpus: list[Gpu], visible: str | None) -> Gpu | None:
    """The GPU the children train on: every worker asks for "cuda", i.e. the first device that
    CUDA_VISIBLE_DEVICES (`visible`) shows them. None when it hides every GPU."""
    if visible is None:
        return gpus[0] if gpus else None
    first = visible.split(",")[0].strip()
    if not first:
        return None
    if first.isdigit():
        return gpus[int(first)] if int(first) < len(gpus) else None
    return gpus[0] if gpus else None  # a UUID or MIG name: nvidia-smi's first row is the best guess


def query_gpus() -> tuple[list[Gpu] | None, str]:
    """(the GPUs, "") from nvidia-smi, or (None, why not)."""
    if not shutil.which(SMI_QUERY[0]):
        return None, "no nvidia-smi on PATH"
    try:
        run = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"nvidia-smi did not answer ({type(e).__name__})"
    if run.returncode != 0:
        return None, f"nvidia-smi failed: {(run.stderr or run.stdout).strip()[:120]}"
    try:
        return parse_gpus(run.stdout), ""
    except ValueError as e:
        return None, str(e)


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def available_ram_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The decision (pure functions: tested with made-up machines)


def gpu_split(
    gpu: Gpu,
    cores: int,
    parallel: int | None = None,
    threads: int | None = None,
    measured: tuple[int, int] | None = None,
) -> Slots:
    """Evaluations sharing one GPU: as many as its free memory holds and the cores can drive."""
    room = max(1, int(gpu.free_mib * GPU_FREE_SHARE) // GPU_MIB_PER_EVALUATION)
    memory = (
        f"{gpu.free_mib / 1024:.0f} of {gpu.total_mib / 1024:.0f} GiB free: room for {room} at "
        f"{GPU_MIB_PER_EVALUATION / 1024:g} GiB each"
    )
    if parallel:
        why = "asked for"
    elif measured:
        parallel, threads = min(measured[0], room), threads or measured[1]
        why = f"the split bench_throughput.py measured best here; {memory}"
    elif threads:
        parallel, why = min(room, max(1, cores // threads)), f"{memory}; {cores} cores"
    else:
        parallel, why = min(room, cores), f"{memory}; {cores} cores, one per evaluation's host side"
    threads = threads or max(1, cores // parallel)
    return Slots(parallel, threads, f"GPU: {parallel} evaluation(s) at once, {threads} thread(s) each ({why})")


def cpu_split(
    cores: int,
    ram_mib: int | None,
    parallel: int | None = None,
    threads: int | None = None,
    measured: tuple[int, int] | None = None,
) -> Slots:
    """Evaluations sharing the CPU cores: the measured best split, else CPU_THREADS_PER_EVALUATION
    threads each; never more than the RAM holds unless asked for."""
    asked_threads = threads
    if parallel:
        why = "asked for"
    elif threads:
        parallel, why = max(1, cores // threads), f"{cores} cores"
    elif measured:
        (parallel, threads), why = measured, "the split bench_throughput.py measured best here"
    else:
        parallel = max(1, cores // min(cores, CPU_THREADS_PER_EVALUATION))
        why = (
            f"{cores} cores, {CPU_THREADS_PER_EVALUATION} thread(s) each: best measured on 2 cores; "
            "scripts/bench_throughput.py --save measures this machine"
        )
    if why != "asked for" and ram_mib is not None and parallel > ram_mib // RAM_MIB_PER_EVALUATION:
        parallel, threads = max(1, ram_mib // RAM_MIB_PER_EVALUATION), asked_threads  # fewer: more threads each
        why += f"; {ram_mib / 1024:.0f} GiB of free RAM holds {parallel}"
    threads = threads or max(1, cores // parallel)
    return Slots(parallel, threads, f"CPU: {parallel} evaluation(s) at once, {threads} thread(s) each ({why})")


# ---------------------------------------------------------------------------------------------
# This machine


@functools.lru_cache(maxsize=None)  # every argument is hashable: one nvidia-smi call per question
def evaluation_slots(
    device: str = "auto", parallel: int | None = None, threads: int | None = None, *, measurement_path: Path
) -> Slots:
    """(parallel, threads, reason) for evaluations on `device` (auto | cpu | cuda) here; `parallel`
    and `threads` are what the user asked for (None: decide); `measurement_path` the file that
    bench_throughput.py --save writes."""
    cores = cpu_cores()
    if device != "cpu":
        gpus, problem = query_gpus()
        gpu = children_gpu(gpus, os.environ.get("CUDA_VISIBLE_DEVICES")) if gpus else None
        if gpu:
            return gpu_split(gpu, cores, parallel, threads, measured_split(machine_key("cuda", gpu), measurement_path))
        if device == "cuda":  # CUDA asked for, its memory unknown: one at a time is the safe guess
            problem = problem or "CUDA_VISIBLE_DEVICES shows no GPU that nvidia-smi lists"
            parallel = parallel or 1
            threads = threads or max(1, cores // parallel)
            return Slots(
                parallel,
                threads,
                f"GPU: {parallel} evaluation(s) at once, {threads} thread(s) each "
                f"(its free memory is unknown: {problem})",
            )
    return cpu_split(
        cores, available_ram_mib(), parallel, threads, measured_split(machine_key("cpu"), measurement_path)
    )


def machine_key(device: str, gpu: Gpu | None = None) -> str:
    """What a measurement is valid for: the device kind, the GPU's size, the cores."""
    gpu_part = f"gpu {gpu.total_mib} MiB, " if device != "cpu" and gpu else ""
    return f"{device}: {gpu_part}{cpu_cores()} cores"


def current_machine_key(device: str) -> str:
    """machine_key for evaluations on `device` here (the GPU nvidia-smi reports for "cuda")."""
    if device == "cpu":
        return machine_key("cpu")
    gpus, _ = query_gpus()
    return machine_key("cuda", children_gpu(gpus, os.environ.get("CUDA_VISIBLE_DEVICES")) if gpus else None)


def measured_split(key: str, measurement_path: Path) -> tuple[int, int] | None:
    """(parallel, threads) that bench_throughput.py --save found best on a machine like this one."""
    try:
        best = json.loads(measurement_path.read_text())[key]
        return max(1, int(best["parallel"])), max(1, int(best["threads"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_measurement(
    path: Path, key: str, parallel: int, threads: int, children_per_hour: float, table: list[dict]
) -> Path:
    """Record the best split for machines like this one in `path` (kept beside other machines' records)."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known[key] = dict(
        parallel=parallel,
        threads=threads,
        children_per_hour=round(children_per_hour, 1),
        measured=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        table=table,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(known, indent=1))
    evaluation_slots.cache_clear()
    return path
