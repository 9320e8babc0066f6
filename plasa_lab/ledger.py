"""The evaluation ledger: every evaluation once, in one SQLite file beside the run.

Keyed by (code sha256, stage, profile, seed, corpus fingerprint, harness version): the same
program under the same conditions is answered from here at once, so a resumed run or a replay
never trains it twice. WAL mode and a busy timeout let OpenEvolve's worker processes write at
the same time without losing rows.
"""

import hashlib
import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    code_sha256 TEXT NOT NULL,
    stage TEXT NOT NULL,
    profile TEXT NOT NULL,
    seed INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    harness_version TEXT NOT NULL,
    metrics TEXT NOT NULL,
    artifacts TEXT NOT NULL,
    seconds REAL NOT NULL,
    created_at REAL NOT NULL,
    runs INTEGER NOT NULL DEFAULT 1,  -- how many times it was actually run: more than 1 means paid twice
    PRIMARY KEY (code_sha256, stage, profile, seed, fingerprint, harness_version)
)
"""


def code_sha256(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    @contextmanager
    def _connect(self):
        """A connection for one transaction: committed on success, always closed."""
        db = sqlite3.connect(self.path, timeout=60)
        try:
            with db:
                yield db
        finally:
            db.close()

    def get(self, key: dict):
        """(metrics, artifacts) recorded under key, or None."""
        with self._connect() as db:
            row = db.execute(
                "SELECT metrics, artifacts FROM evaluations WHERE code_sha256=? AND stage=? AND profile=? "
                "AND seed=? AND fingerprint=? AND harness_version=?", self._values(key)).fetchone()
        return (json.loads(row[0]), json.loads(row[1])) if row else None

    def put(self, key: dict, metrics: dict, artifacts: dict, seconds: float):
        with self._connect() as db:
            db.execute(
                "INSERT INTO evaluations VALUES (?,?,?,?,?,?,?,?,?,?,1) ON CONFLICT DO UPDATE SET "
                "metrics=excluded.metrics, artifacts=excluded.artifacts, seconds=excluded.seconds, "
                "created_at=excluded.created_at, runs=runs + 1",
                (*self._values(key), json.dumps(metrics), json.dumps(artifacts), seconds, time.time()))

    def rows(self):
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM evaluations ORDER BY created_at")]

    @staticmethod
    def _values(key):
        return (key["code_sha256"], str(key["stage"]), key["profile"], int(key["seed"]), key["fingerprint"],
                key["harness_version"])
