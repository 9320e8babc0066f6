"""Children per hour without a change of metric (docs/benchmarks.md, "Children per hour").

How many evaluations share the machine is decided from what nvidia-smi and the OS report (pure
functions, tested here on made-up machines); the same program must score the same val_loss
whether it runs alone or beside seven others, and whether the training loop looks at its
losses every step or every 50 (real sandboxed evaluations, smoke profile, CPU).
"""

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.contract import VOCAB_SIZE
from plasa_lab.evaluation import hardware
from plasa_lab.evaluation.hardware import Gpu, children_gpu, cpu_split, gpu_split, parse_gpus
from plasa_lab.evaluation.jobs import Job
from plasa_lab.evaluation.judge import run_local
from plasa_lab.evaluation.stage import corpus_of
from plasa_lab.settings import Settings, measurement_path

H200 = "143156, 143771\n"  # `nvidia-smi --query-gpu=memory.free,memory.total --format=csv,noheader,nounits`
SAME = dict(rel=1e-4)  # the same child's val_loss within 1e-4 relative, alone or beside others


# ---------------------------------------------------------------------------------------------
# How many at once


def test_an_idle_h200_with_16_cores_runs_16_evaluations_with_one_thread_each():
    parallel, threads, reason = gpu_split(parse_gpus(H200)[0], cores=16)
    assert (parallel, threads) == (16, 1)
    assert reason.startswith("GPU: 16 evaluation(s) at once") and "\n" not in reason


def test_the_gpus_free_memory_bounds_the_evaluations_at_2_gib_each():
    assert hardware.GPU_MIB_PER_EVALUATION == 2048
    parallel, threads, _ = gpu_split(parse_gpus("9000, 24576\n")[0], cores=16)
    assert (parallel, threads) == (3, 5)  # 90% of 9000 MiB holds 3 evaluations of 2 GiB
    assert gpu_split(Gpu(free_mib=500, total_mib=16384), cores=16).parallel == 1  # never fewer than one


def test_children_use_the_first_gpu_that_cuda_visible_devices_shows():
    gpus = parse_gpus("1000, 81920\n70000, 81920\n")
    assert children_gpu(gpus, None) == Gpu(1000, 81920)
    assert children_gpu(gpus, "1,0") == Gpu(70000, 81920)
    assert children_gpu(gpus, "") is None
    assert children_gpu(gpus, "7") is None


@pytest.mark.parametrize(
    "output", ["[N/A], [N/A]", "NVIDIA-SMI has failed because it couldn't communicate with the driver", "1000"]
)
def test_nvidia_smi_output_that_is_not_free_and_total_mib_is_refused(output):
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        parse_gpus(output)


def test_a_cpu_machine_without_a_measurement_runs_one_evaluation_per_core_as_the_ram_allows():
    assert cpu_split(cores=2, ram_mib=16000)[:2] == (2, 1)  # the split measured best on 2 cores
    assert cpu_split(cores=16, ram_mib=80000)[:2] == (16, 1)
    parallel, threads, reason = cpu_split(cores=16, ram_mib=9000)
    assert (parallel, threads) == (2, 8) and "holds 2" in reason  # fewer evaluations, more threads each
    assert cpu_split(cores=2, ram_mib=3000)[:2] == (1, 2)


def test_asked_parallel_and_threads_win_over_memory_and_measurement():
    assert gpu_split(Gpu(500, 16384), cores=16, parallel=4)[:2] == (4, 4)
    assert gpu_split(Gpu(143000, 143771), cores=16, threads=4)[:2] == (4, 4)
    assert cpu_split(cores=2, ram_mib=1000, parallel=2, measured=(1, 2))[:2] == (2, 1)
    assert cpu_split(cores=2, ram_mib=None, threads=1, measured=(1, 2))[:2] == (2, 1)


def test_a_saved_measurement_sets_the_cpu_split_for_the_same_machine_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PLASA_CACHE", str(tmp_path))
    for variable in ("PLASA_PARALLEL", "PLASA_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    key, path = hardware.machine_key("cpu"), measurement_path()
    assert path.parent == tmp_path  # in the data cache, as PLASA_CACHE says
    hardware.save_measurement(path, key, parallel=2, threads=1, children_per_hour=11.5, table=[])
    try:
        assert hardware.measured_split(key, path) == (2, 1)
        assert hardware.measured_split("cpu: 3 cores", path) is None
        assert "measured best here" in hardware.evaluation_slots("cpu", measurement_path=path).reason
        assert "measured best here" in Settings(device="cpu").slots_reason  # the line evolve.py can print
        assert (Settings(device="cpu").parallel, Settings(device="cpu").threads) == (2, 1)
        monkeypatch.setenv("PLASA_THREADS", "2")
        assert (Settings(device="cpu").parallel, Settings(device="cpu").threads) == (hardware.cpu_cores() // 2, 2)
    finally:
        hardware.evaluation_slots.cache_clear()  # other tests see the machine as it is


# ---------------------------------------------------------------------------------------------
# The training loop syncs rarely and still reports every step


class CountingModel(torch.nn.Module):
    """A tiny language model whose logits turn NaN at one training step."""

    def __init__(self, nan_at_step=None):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB_SIZE, 4)
        self.head = torch.nn.Linear(4, VOCAB_SIZE)
        self.calls, self.nan_at_step = 0, nan_at_step

    def forward(self, ids):
        self.calls += 1
        logits = self.head(self.embed(ids))
        return {"logits": logits * math.nan if self.calls == self.nan_at_step else logits}


class NoBlocks:
    """The trunk's link to a blocks process, with nothing to train."""

    def step(self):
        pass


def train_tiny(check_every, nan_at_step=None, steps=12):
    from plasa_lab.evaluation.sandboxed.trunk import Selections, train

    torch.manual_seed(0)
    model = CountingModel(nan_at_step)
    batches = iter(torch.randint(0, VOCAB_SIZE, (steps, 2, 9), generator=torch.Generator().manual_seed(1)))
    selections = Selections([1], torch.device("cpu"))
    return train(model, selections, NoBlocks(), batches, steps, torch.device("cpu"), 42, check_every)


def test_the_loss_curve_is_the_same_whether_checked_every_step_or_every_50():
    every_step, _ = train_tiny(check_every=1)
    every_50, _ = train_tiny(check_every=50)
    assert len(every_step) == 12 and every_step == every_50


def test_the_first_nonfinite_step_is_named_exactly_between_two_checks():
    from plasa_lab.evaluation.sandboxed.validation import Rejection

    with pytest.raises(Rejection, match="training LM loss became nan at step 7"):
        train_tiny(check_every=5, nan_at_step=7)


# ---------------------------------------------------------------------------------------------
# Real evaluations: the same val_loss alone, eight at once, and with a sync every step

AT_ONCE = 8  # N=1 and N=8, as docs/benchmarks.md says; stage 1 (12 training steps, one validation batch) keeps 8 cheap


def stage1(threads, check_every=None):
    corpus = corpus_of("auto")
    job = Job(
        code=INITIAL_PROGRAM.read_text(),
        stage=1,
        profile="smoke",
        seed=42,
        corpus=corpus.name,
        fingerprint=corpus.fingerprint,
        device="cpu",
        threads=threads,
        memory_gb=4,
        time_limit=600.0,
        time_limit_reason="the test's limit of 600 s",
        val_windows=8,
        check_every=check_every,
    )
    result = run_local(job)
    assert result.ok, result.failure
    return result.metrics


@pytest.fixture(scope="module")
def alone():
    """The initial program evaluated alone with both cores of a 2-core machine, checked every 50 steps."""
    return stage1(threads=2, check_every=50)


@pytest.fixture(scope="module")
def eight_at_once():
    """Eight evaluations of it at once, one thread each (as 8 slots would split 2 cores): half check
    their losses every 50 steps, half every step. {check interval: [metrics, ...]}"""
    intervals = [50, 1] * (AT_ONCE // 2)
    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = list(pool.map(lambda every: stage1(threads=1, check_every=every), intervals))
    return {every: [m for i, m in zip(intervals, results) if i == every] for every in (50, 1)}


def test_eight_evaluations_at_once_score_the_same_val_loss_as_one_alone(alone, eight_at_once):
    for metrics in eight_at_once[50] + eight_at_once[1]:
        assert metrics["val_loss"] == pytest.approx(alone["val_loss"], **SAME)
        assert metrics["train_loss"] == pytest.approx(alone["train_loss"], **SAME)


def test_a_host_sync_every_step_scores_the_same_val_loss_as_one_every_50_steps(eight_at_once):
    for every_step, every_50 in zip(eight_at_once[1], eight_at_once[50]):
        assert every_step["val_loss"] == pytest.approx(every_50["val_loss"], **SAME)
        assert every_step["train_loss"] == pytest.approx(every_50["train_loss"], **SAME)
