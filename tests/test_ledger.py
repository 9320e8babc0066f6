"""The evaluation ledger: one SQLite file, every evaluation once, safe with concurrent writers."""

import subprocess
import sys

from plasa_lab.ledger import Ledger

KEY = dict(code_sha256="abc", stage=1, profile="smoke", seed=42, fingerprint="f00", harness_version="1")


def test_recorded_evaluation_is_found_under_the_same_key(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.put(KEY, {"combined_score": 0.5}, {"failure": "x"}, seconds=1.0)
    assert Ledger(tmp_path / "ledger.sqlite").get(KEY) == ({"combined_score": 0.5}, {"failure": "x"})


def test_any_key_part_changing_misses(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.put(KEY, {"combined_score": 0.5}, {}, seconds=1.0)
    for part, other in [
        ("code_sha256", "abd"),
        ("stage", 2),
        ("profile", "full"),
        ("seed", 43),
        ("fingerprint", "f01"),
        ("harness_version", "2"),
    ]:
        assert ledger.get({**KEY, part: other}) is None


WRITER = """
import sys
from plasa_lab.ledger import Ledger
ledger = Ledger(sys.argv[1])
for i in range(150):
    ledger.put(dict(code_sha256=f"{sys.argv[2]}-{i}", stage=1, profile="smoke", seed=42, fingerprint="f",
                    harness_version="1"), {"combined_score": i}, {}, seconds=0.0)
"""


def test_two_processes_writing_at_once_lose_no_row(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name]) for name in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    rows = Ledger(path).rows()
    assert len(rows) == 300
    assert {r["code_sha256"].split("-")[0] for r in rows} == {"a", "b"}


def test_each_actual_run_is_counted(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.put(KEY, {"combined_score": 0.5}, {}, seconds=1.0)
    assert ledger.rows()[0]["runs"] == 1
    ledger.put(KEY, {"combined_score": 0.6}, {}, seconds=1.0)
    assert [(r["runs"], r["metrics"]) for r in ledger.rows()] == [(2, '{"combined_score": 0.6}')]
