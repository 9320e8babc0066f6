"""The trusted evaluator, end to end with real sandboxed subprocesses on the smoke profile.

Every cheat or breakage gets combined_score 0.0, a one-line `failure` an LLM can act on, every
metric key, and leaves no process behind.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT
from plasa_lab.evaluation import METRIC_KEYS, Settings, evaluate_code, evaluate_file
from plasa_lab.runners import run_local

SOURCE = INITIAL_PROGRAM.read_text()
INDEXER_TRAINING = "def init_indexer(indexer):\n"  # an anchor inside the last block


def variant(old, new):
    assert old in SOURCE, old
    return SOURCE.replace(old, new, 1)


def harness_processes():
    """Harness processes this test process started and that are still there (grandchildren are
    covered by the sandbox tests, which kill whole groups)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/status") as f:
                ppid = int(next(line.split()[1] for line in f if line.startswith("PPid:")))
        except (OSError, StopIteration):
            continue
        if b"plasa_lab.harness" in cmdline and ppid == os.getpid():
            found.append(pid)
    return found


@pytest.fixture
def smoke(tmp_path):
    return Settings(profile="smoke", ledger=str(tmp_path / "ledger.sqlite"))


def assert_rejected(evaluation, *phrases):
    assert set(METRIC_KEYS) <= set(evaluation.metrics)
    assert evaluation.metrics["combined_score"] == 0.0
    failure = evaluation.artifacts["failure"]
    assert "\n" not in failure
    for phrase in phrases:
        assert phrase in failure, failure
    assert harness_processes() == []


def test_initial_program_passes_both_stages_with_finite_metrics(smoke):
    evaluation = evaluate_file(INITIAL_PROGRAM, "all", smoke)
    m = evaluation.metrics
    assert set(m) == set(METRIC_KEYS) and all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert m["stage1_passed"] == m["stage2_passed"] == 1.0
    assert m["combined_score"] == 1 / min(m["val_ppl"], 10000) > 0
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    assert m["density"] == pytest.approx((1 + 2 * 3600 / 8256 + 6176 / 8256) / 4, abs=1e-6)  # k = 128, 32, 32, 64
    assert m["nonembed_params"] == 1_526_912 and m["indexer_params"] == 4 * 20_992
    assert "failure" not in evaluation.artifacts and "fingerprint" in evaluation.artifacts["corpus"]

    start = time.monotonic()
    again = evaluate_file(INITIAL_PROGRAM, "all", smoke)
    assert again.from_ledger and again.metrics == m
    assert time.monotonic() - start < 2.0


def test_stage1_alone_screens_without_the_full_training(smoke):
    m = evaluate_code(SOURCE, 1, smoke).metrics
    assert m["stage1_passed"] == 1.0 and m["stage2_passed"] == 0.0 and m["combined_score"] > 0


def test_syntax_error_is_rejected_before_anything_runs(smoke):
    assert_rejected(evaluate_code(variant(INDEXER_TRAINING, "def broken(:\n" + INDEXER_TRAINING), 1, smoke),
                    "stage 1: syntax error at line")


def test_exception_at_import_is_rejected_with_its_line(smoke):
    code = variant(INDEXER_TRAINING, "raise RuntimeError('boom')\n" + INDEXER_TRAINING)
    line = code.splitlines().index("raise RuntimeError('boom')") + 1
    assert_rejected(evaluate_code(code, 1, smoke), "importing the program failed", f"line {line}", "boom")


def test_endless_loop_times_out_and_its_process_group_is_gone(smoke, monkeypatch):
    monkeypatch.setenv("PLASA_TIMEOUT_SCALE", "0.05")  # stage 1 limit: 9 s
    start = time.monotonic()
    evaluation = evaluate_code(variant(INDEXER_TRAINING, "while True:\n    pass\n" + INDEXER_TRAINING), 1, smoke)
    assert_rejected(evaluation, "timed out after 9 s")
    assert time.monotonic() - start < 30


def test_memory_bomb_hits_the_memory_limit_quickly(tmp_path):
    settings = Settings(profile="smoke", memory_gb=3)
    bomb = "BOMB = [torch.ones(1 << 27) for _ in range(1000)]\n"  # 512 MiB each
    start = time.monotonic()
    assert_rejected(evaluate_code(variant(INDEXER_TRAINING, bomb + INDEXER_TRAINING), 1, settings), "memory")
    assert time.monotonic() - start < 60


def test_child_reading_an_api_key_is_stopped_statically(smoke):
    code = variant(INDEXER_TRAINING, "import os\nKEY = os.environ.get('OPENAI_API_KEY')\n" + INDEXER_TRAINING)
    assert_rejected(evaluate_code(code, 1, smoke), "import of 'os' is not allowed")


def test_api_key_is_not_in_the_sandbox_even_past_the_static_checks(smoke, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    monkeypatch.setenv("PLASA_SECRET_TOKEN", "tok-secret")
    leak = ("import os\nraise RuntimeError('env: ' + ' '.join(sorted(k for k in os.environ)) + ' ' + "
            "str(os.environ.get('OPENAI_API_KEY')))\n")
    code = variant(INDEXER_TRAINING, leak + INDEXER_TRAINING)
    from plasa_lab.evaluation import _corpus_summary
    name, fingerprint, _, _ = _corpus_summary(smoke.corpus)
    result = run_local(dict(code=code, stage=1, profile="smoke", seed=42, corpus=name, fingerprint=fingerprint,
                            device="cpu", threads=1, memory_gb=4, timeout=120))
    assert not result["ok"] and "env: " in result["failure"] and "None" in result["failure"]
    assert "secret" not in result["failure"] + result["stderr"] and "PLASA_SECRET_TOKEN" not in result["failure"]


def test_selector_without_causal_and_is_rejected(smoke):
    code = variant("    return selected & causal\n", "    return selected\n")
    assert_rejected(evaluate_code(code, 1, smoke), "selects key", "must be causal")


def test_indexer_that_peeks_at_the_future_is_caught_by_the_causality_probe(smoke):
    # Every selection stays causal, but which past keys are kept depends on future tokens.
    peek = "        k = k + k.mean(dim=1, keepdim=True)  # leak: the mean runs over all positions\n"
    code = variant("        k = self.k_proj(x)\n", "        k = self.k_proj(x)\n" + peek)
    assert_rejected(evaluate_code(code, 1, smoke), "sees future tokens")


def test_batch_mixing_is_caught(smoke):
    mix = "        k = k + k.mean(dim=0, keepdim=True)  # leak across the batch\n"
    code = variant("        k = self.k_proj(x)\n", "        k = self.k_proj(x)\n" + mix)
    assert_rejected(evaluate_code(code, 1, smoke), "must not see each other")


def test_edit_outside_the_blocks_is_rejected(smoke):
    assert_rejected(evaluate_code(variant("FFN_HIDDEN = 768", "FFN_HIDDEN = 2048"), 1, smoke),
                    "outside the EVOLVE-BLOCKs changed")


def test_forbidden_import_is_rejected(smoke):
    assert_rejected(evaluate_code(variant(INDEXER_TRAINING, "import subprocess\n" + INDEXER_TRAINING), 1, smoke),
                    "import of 'subprocess' is not allowed")


def test_nan_logits_are_rejected(smoke):
    code = variant("    return selected & causal\n", "    return selected & causal & False\n")
    assert_rejected(evaluate_code(code, 1, smoke), "NaN")


def test_model_config_changed_from_a_block_is_rejected(smoke):
    code = variant(INDEXER_TRAINING, "MODEL_CONFIG.update(n_layers=2)\n" + INDEXER_TRAINING)
    assert_rejected(evaluate_code(code, 1, smoke), "MODEL_CONFIG is", "must stay")


def test_uniform_schedule_is_rejected_for_children(smoke):
    code = variant('SCHEDULE = "PROGRESSIVE_SPARSE"', 'SCHEDULE = "UNIFORM"')
    assert_rejected(evaluate_code(code, 1, smoke), "every layer k=64")


def test_oversized_indexer_is_rejected(smoke):
    code = variant("def __init__(self, d_model, n_heads=4, head_dim=32):", "def __init__(self, d_model, n_heads=64, head_dim=32):")
    assert_rejected(evaluate_code(code, 1, smoke), "over the budget of 2,000,000")


def test_flood_of_stdout_is_cut_without_hanging(smoke):
    flood = "for _ in range(200):\n    print('x' * 50_000)\n"  # 10 MB
    start = time.monotonic()
    evaluation = evaluate_code(variant(INDEXER_TRAINING, flood + INDEXER_TRAINING), 1, smoke)
    assert_rejected(evaluation, "limit 1 MiB")
    assert time.monotonic() - start < 30


def test_missing_program_file_scores_zero_with_a_reason(smoke, tmp_path):
    assert_rejected(evaluate_file(tmp_path / "nope.py", 1, smoke), "cannot read the program")


def test_cli_prints_metrics_as_json_on_the_last_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(variant(INDEXER_TRAINING, "import os\n" + INDEXER_TRAINING))
    run = subprocess.run([sys.executable, "evaluator.py", str(bad), "--stage", "1", "--profile", "smoke"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    metrics = json.loads(run.stdout.strip().splitlines()[-1])
    assert metrics["combined_score"] == 0.0 and set(METRIC_KEYS) <= set(metrics)
    assert "FAILED stage 1: line" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["missing.py"], "No such file"),
    (["initial_program.py", "--profile", "huge"], "invalid choice"),
    (["initial_program.py", "--stage", "3"], "invalid choice"),
])
def test_cli_bad_input_exits_nonzero_with_one_line(args, message):
    run = subprocess.run([sys.executable, "evaluator.py", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and message in run.stderr and run.stdout == ""


def test_openevolve_entry_points_return_every_metric_even_on_a_setup_error(monkeypatch, tmp_path):
    import evaluator
    monkeypatch.setenv("PLASA_PROFILE", "no-such-profile")
    result = evaluator.evaluate_stage1(str(INITIAL_PROGRAM))
    assert set(METRIC_KEYS) <= set(result.metrics) and result.metrics["combined_score"] == 0.0
    assert "evaluator set-up error" in result.artifacts["failure"] and "no-such-profile" in result.artifacts["failure"]


def test_failure_in_stage2_training_keeps_stage1_passed(smoke):
    # The aux loss turns NaN after 16 training steps: stage 1 (12 steps) passes, stage 2 (20) fails.
    code = variant("def indexer_aux_loss(attn_probs, scores, selected):\n",
                   "CALLS = [0]\n\n\ndef indexer_aux_loss(attn_probs, scores, selected):\n"
                   "    CALLS[0] += 1\n    if CALLS[0] > 4 * 16:\n        scores = scores * float('nan')\n")
    evaluation = evaluate_code(code, "all", smoke)
    assert_rejected(evaluation, "stage 2: training aux_loss became nan at step 17")
    assert evaluation.metrics["stage1_passed"] == 1.0 and evaluation.metrics["stage2_passed"] == 0.0


def test_leak_switched_on_only_for_validation_is_caught_by_spot_checks(smoke):
    # Causal during every probe, leaky for the first eval calls after training: the validation.
    code = variant("        self.w_proj = nn.Linear(d_model, n_heads, bias=False)\n",
                   "        self.w_proj = nn.Linear(d_model, n_heads, bias=False)\n"
                   "        self.trained, self.eval_calls = False, 0\n")
    code = code.replace("        q, k, w = self.components(x)\n        dots",
                        "        q, k, w = self.components(x)\n"
                        "        if self.training:\n"
                        "            self.trained, self.eval_calls = True, 0\n"
                        "        elif self.trained:\n"
                        "            self.eval_calls += 1\n"
                        "            if self.eval_calls <= 6:\n"
                        "                k = k + k.mean(dim=1, keepdim=True)\n"
                        "        dots", 1)
    assert "self.eval_calls <= 6" in code
    assert_rejected(evaluate_code(code, "all", smoke), "during validation", "sees future tokens")
