"""The benchmarks' own arithmetic (their runs are hours, not tests): the search benchmark's paired
test, the rank benchmark's Spearman's rho and its eight programs, which the judge's static checks
accept; and the search and LLM benchmarks end to end on the smoke profile (the LLM one against a fake
server that needs no training)."""

import importlib.util
import json
import random
import sys

import pytest
from scipy.stats import ttest_rel

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT
from plasa_lab.program.checks import static_violation


def script(name):
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_search_benchmark_pairs_by_seed_as_a_paired_t_test_does():
    from plasa_lab.stats import paired_change

    script("bench_search")  # it imports and parses as a script
    rng = random.Random(0)
    reference = {s: 5.0 + rng.gauss(0, 0.02) for s in range(101, 106)}
    losses = {s: v - 0.01 + rng.gauss(0, 0.005) for s, v in reference.items()}
    losses[107] = 1.0  # a seed the reference lacks is not paired
    change, p, n = paired_change(losses, reference)
    seeds = sorted(reference)
    want = ttest_rel([losses[s] for s in seeds], [reference[s] for s in seeds])
    assert n == 5 and p == pytest.approx(want.pvalue, rel=1e-9)
    assert change == pytest.approx(sum(losses[s] - reference[s] for s in seeds) / 5)


def test_the_search_benchmarks_busy_shares_weigh_sessions_and_count_an_llm_run_from_each_first_proposal():
    shares = script("bench_search").run_busy_shares
    stopped = {"wall_seconds": 108, "busy": {"llm": 0.0, "evaluation_slots": 0.0}}  # stopped in its LLM check
    resumed = {
        **{"wall_seconds": 1575, "busy": {"llm": 0.9, "evaluation_slots": 0.08}},
        **{"seconds_after_first_proposal": 1000, "busy_after_first_proposal": {"llm": 1.0, "evaluation_slots": 0.1}},
    }
    assert shares({"time_accounting": [stopped, resumed]}) == {"llm": 1.0, "evaluation_slots": 0.1}
    offline = [{"wall_seconds": 100, "busy": {"evaluation_slots": 1.0}}, stopped]  # no proposal: whole sessions
    assert shares({"time_accounting": offline}) == {"evaluation_slots": pytest.approx(100 / 208), "llm": 0.0}
    assert shares({}) == {"evaluation_slots": None, "llm": None}


def test_the_search_benchmark_takes_an_arms_best_from_its_newest_checkpoint(tmp_path):
    """A run stopped early and rerun with --iterations at what it had done is replayed as it stands:
    the best and the children count of the newest complete checkpoint, not of an older one."""
    bench = script("bench_search")
    for n, best in ((3, "three"), (5, "five"), (7, None)):  # checkpoint_7: partly written (no metadata)
        folder = tmp_path / "checkpoints" / f"checkpoint_{n}"
        folder.mkdir(parents=True)
        (folder / "best_program.py").write_text(f"# {best}\n")
        if best:
            (folder / "metadata.json").write_text(json.dumps({"last_iteration": n}))
            (folder / "best_program_info.json").write_text(json.dumps({"metrics": {"val_loss": float(n)}}))
    program, metrics, children = bench.arm_best(tmp_path)
    assert program.read_text() == "# five\n" and metrics == {"val_loss": 5.0} and children == 5


def test_the_search_benchmarks_screened_arm_screens_on_the_next_cheaper_profile_and_smoke_has_none():
    import argparse

    bench = script("bench_search")
    args = argparse.Namespace(profile="full", api_base=None, model=None)
    assert bench.arms(args)["offline+screen"] == ["--llm", "offline", "--screen", "quick"]
    assert list(bench.arms(argparse.Namespace(profile="smoke", api_base=None, model=None))) == ["offline"]
    with pytest.raises(SystemExit) as stopped:  # an arm the arguments do not allow is refused before any run
        bench.main(["--profile", "smoke", "--arms", "offline+screen", "--out", "/nonexistent/never-made"])
    assert stopped.value.code == 2


def test_the_rank_benchmark_judges_eight_distinct_valid_programs():
    bench = script("bench_rank")
    programs = bench.programs()
    source = INITIAL_PROGRAM.read_text()
    assert len(programs) >= 8 and len({p.code for p in programs}) == len(programs)
    assert all(static_violation(p.code, source) is None for p in programs)


@pytest.mark.slow  # about 4 minutes on 2 cores: a run of one child, then 4 replays, on the smoke profile
def test_the_search_benchmark_runs_an_arm_then_replays_its_best_on_seeds_no_run_used(tmp_path):
    import subprocess

    out = tmp_path / "bench"
    command = [sys.executable, "scripts/bench_search.py", "--profile", "smoke", "--iterations", "1"]
    done = subprocess.run(
        [*command, "--replay-seeds", "101,102", "--out", str(out)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("best_beyond_noise: ")
    (arm,) = json.loads((out / "bench_search.json").read_text())["arms"]
    assert arm["arm"] == "offline" and arm["children"] == 1 and arm["seeds"] == 2
    assert arm["stage2_trainings"] >= 3  # the initial program on 42, 43, 44 (and the child, if it passed stage 1)
    assert 0 < arm["slots_busy"] <= 1 and arm["llm_busy"] == 0  # the offline mutator makes no LLM call

    # an arm run before into the same folder (here the same row under another name) keeps its row
    summary = json.loads((out / "bench_search.json").read_text())
    (out / "bench_search.json").write_text(json.dumps(summary | {"arms": [arm | {"arm": "llm"}]}))
    again = subprocess.run(
        [*command, "--replay-seeds", "101,102", "--out", str(out), "--arms", "offline"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["arm"] for r in json.loads((out / "bench_search.json").read_text())["arms"]] == ["llm", "offline"]
    assert sum(line.startswith(("| llm", "| offline")) for line in again.stdout.splitlines()) == 2


def test_the_llm_benchmark_compares_answer_formats_and_says_why_each_response_failed(tmp_path):
    import shutil
    import subprocess

    from fake_llm_server import FakeLLMServer, block_reply, outside_edit_reply

    def reply(prompt):  # a fake LLM (no real one runs in the tests): a block when asked for one, else a bad diff
        return block_reply(prompt) if "Rewrite the EVOLVE-BLOCK named" in prompt else outside_edit_reply(prompt)

    out, server = tmp_path / "bench", FakeLLMServer(reply=reply)
    out.mkdir()
    shutil.copy(PROJECT_ROOT / "tests" / "fixtures" / "smoke_run" / "ledger.sqlite", out / "ledger.sqlite")
    try:
        done = subprocess.run(
            [
                *(sys.executable, "scripts/bench_llm.py", "--api-base", server.url, "--model", "fake-llm"),
                *("--iterations", "1", "--answers", "diff,block", "--out", str(out)),
            ],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        server.close()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "novel_valid_rate: diff 0.000, block 0.000"
    diff, block = json.loads((out / "bench_llm.json").read_text())["results"]
    assert diff["answer"] == "diff" and diff["outcomes"]["diff did not apply"] == 1
    assert "outside the EVOLVE-BLOCK" in diff["failures"][0]["why"]  # why it failed, in its own words
    assert block["answer"] == "block" and block["outcomes"]["passed"] == 1  # a comment added: not a new program
    assert block["failures"][0]["why"].startswith("passed, but its code (by AST) was the parent's")
    table = (out / "bench_llm.md").read_text()
    assert "| diff | 1 | 0 | 0.000 |" in table and "| block | 1 | 0 | 0.000 |" in table
