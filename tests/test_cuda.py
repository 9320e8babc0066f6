"""The CUDA path of the judge (the sandbox binds the GPU's device nodes): skipped on machines
without a GPU (CI has none; not run in this change's session either, which had no GPU)."""

import math

import pytest
import torch

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.contract import METRIC_KEYS
from plasa_lab.evaluation.fitness import evaluate_file
from plasa_lab.settings import Settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_initial_program_trains_and_passes_every_probe_on_cuda():
    lines = []
    evaluation = evaluate_file(
        INITIAL_PROGRAM, "all", Settings(profile="smoke", device="cuda", ledger=""), on_line=lines.append
    )
    assert "failure" not in evaluation.artifacts, evaluation.artifacts.get("failure")
    assert set(METRIC_KEYS) <= set(evaluation.metrics) and all(math.isfinite(v) for v in evaluation.metrics.values())
    assert evaluation.metrics["stage2_passed"] == 1.0
    assert any("cuda" in line for line in lines)


def test_leaky_selector_is_caught_on_cuda():
    code = INITIAL_PROGRAM.read_text().replace("    return selected & causal\n", "    return selected\n")
    from plasa_lab.evaluation.fitness import evaluate_code

    evaluation = evaluate_code(code, 1, Settings(profile="smoke", device="cuda", ledger=""))
    assert evaluation.metrics["combined_score"] == 0.0 and "must be causal" in evaluation.artifacts["failure"]
