"""The evaluation ledger: one SQLite file, every evaluation once, keyed by what runs, safe with concurrent writers."""

import sqlite3
import subprocess
import sys

import pytest

from plasa_lab.evaluation.ledger import Key, Ledger, LedgerError, code_key

KEY = Key(code_key="abc", stage=1, profile="smoke", seed=42, fingerprint="f00", harness_version="1")


def test_recorded_evaluation_is_found_under_the_same_key(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.put(KEY, "sha", {"combined_score": 0.5}, {"failure": "x"}, seconds=1.0)
    assert Ledger(tmp_path / "ledger.sqlite").get(KEY) == ({"combined_score": 0.5}, {"failure": "x"}, 1.0)


def test_any_key_part_changing_misses(tmp_path):
    from dataclasses import replace

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.put(KEY, "sha", {"combined_score": 0.5}, {}, seconds=1.0)
    for part, other in [
        ("code_key", "abd"),
        ("stage", 2),
        ("profile", "full"),
        ("seed", 43),
        ("fingerprint", "f01"),
        ("harness_version", "2"),
        ("uniform_schedule", True),
        ("validation", "whole"),
    ]:
        assert ledger.get(replace(KEY, **{part: other})) is None


def test_code_that_differs_only_in_comments_and_formatting_has_one_key():
    code = "def f(x):\n    return x + 1  # one more\n"
    assert code_key(code) == code_key("def f( x ):\n\n    return (x + 1)\n")
    assert code_key(code) != code_key("def f(x):\n    return x + 2\n")


def test_seed_rows_gather_every_seed_of_one_program(tmp_path):
    from dataclasses import replace

    ledger = Ledger(tmp_path / "ledger.sqlite")
    for seed in (42, 43):
        ledger.put(replace(KEY, seed=seed), "sha", {"val_loss": seed / 10}, {}, seconds=1.0)
    ledger.put(replace(KEY, code_key="other", seed=44), "sha", {"val_loss": 1.0}, {}, seconds=1.0)
    assert ledger.seed_rows(KEY) == {42: {"val_loss": 4.2}, 43: {"val_loss": 4.3}}
    assert set(ledger.programs_with_seeds(KEY, (42, 43))) == {"abc"}


def test_a_ledger_of_an_older_version_is_refused_in_one_line(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE evaluations (code_sha256 TEXT, stage TEXT)")
    with pytest.raises(LedgerError) as refused:
        Ledger(path)
    assert "older plasa-lab" in str(refused.value) and "\n" not in str(refused.value)


WRITER = """
import sys
from plasa_lab.evaluation.ledger import Key, Ledger
ledger = Ledger(sys.argv[1])
for i in range(150):
    ledger.put(Key(f"{sys.argv[2]}-{i}", 1, "smoke", 42, "f", "1"), "sha", {"combined_score": i}, {}, seconds=0.0)
"""


def test_two_processes_writing_at_once_lose_no_row(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name]) for name in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    rows = Ledger(path).rows()
    assert len(rows) == 300
    assert {r["code_key"].split("-")[0] for r in rows} == {"a", "b"}


def test_each_actual_run_is_counted(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.put(KEY, "sha", {"combined_score": 0.5}, {}, seconds=1.0)
    assert ledger.rows()[0]["runs"] == 1
    ledger.put(KEY, "sha", {"combined_score": 0.6}, {}, seconds=1.0)
    assert [(r["runs"], r["metrics"]) for r in ledger.rows()] == [(2, '{"combined_score": 0.6}')]


def _open_and_write(path, barrier, i, errors):
    barrier.wait()  # every process opens the new file at the same moment
    try:
        Ledger(path).put(Key(f"code{i}", 2, "smoke", 42, "f", "v"), "sha", {"val_loss": 1.0}, {}, 1.0)
    except Exception as e:
        errors.put(str(e))


def test_processes_opening_a_new_ledger_at_once_all_get_it(tmp_path):
    """Parallel evaluations start together on a fresh ledger; before the WAL switch waited, 5 of 80
    such opens failed with "database is locked"."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    for round_ in range(20):
        path = tmp_path / f"ledger{round_}.sqlite"
        barrier = context.Barrier(4)
        processes = [context.Process(target=_open_and_write, args=(path, barrier, i, errors)) for i in range(4)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(60)
        assert errors.empty(), errors.get()
        assert len(Ledger(path).rows()) == 4
