"""The evaluation ledger: every evaluation once, in one SQLite file beside the run.

Keyed by what runs, not by how it is written: the program's normalised code (its AST, so comments
and formatting do not count), the stage, profile, seed, corpus fingerprint, judge version, and
whether the uniform-schedule exception or the whole validation split applied. The same program
under the same conditions is answered from here at once, so a resumed run, a replay or a child
that only reformats its parent never trains twice. WAL mode and a busy timeout let OpenEvolve's
worker processes write at the same time without losing rows.
"""

import ast
import hashlib
import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path

KEY_COLUMNS = (
    "code_key",
    "stage",
    "profile",
    "seed",
    "fingerprint",
    "harness_version",
    "uniform_schedule",
    "validation",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    code_key TEXT NOT NULL,          -- sha256 of the normalised text the workers run (no comments)
    stage INTEGER NOT NULL,
    profile TEXT NOT NULL,
    seed INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,       -- of the token cache
    harness_version TEXT NOT NULL,   -- constants.HARNESS_VERSION
    uniform_schedule INTEGER NOT NULL,  -- 1: evaluated as a baseline that may use one k everywhere
    validation TEXT NOT NULL,        -- "profile" (the profile's windows) or "whole" (every window of the split)
    code_sha256 TEXT NOT NULL,       -- of the exact text first evaluated under this key
    metrics TEXT NOT NULL,
    artifacts TEXT NOT NULL,
    seconds REAL NOT NULL,
    created_at REAL NOT NULL,
    runs INTEGER NOT NULL DEFAULT 1,  -- how many times it was actually run: more than 1 means paid twice
    usage TEXT NOT NULL DEFAULT '{}',  -- CPU seconds per process role, peak memory: what the judge measured
    PRIMARY KEY (code_key, stage, profile, seed, fingerprint, harness_version, uniform_schedule, validation)
)
"""


class LedgerError(Exception):
    """The file is not a ledger this version can use (one line)."""


def code_sha256(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def normalised_code(code: str) -> str:
    """The program as it runs: its AST written out again (comments, blank lines, spacing and quote
    style gone), so two texts with one key are one program, even to code that reads its own text; the
    raw text when it does not parse (the static checks reject it anyway)."""
    try:
        return ast.unparse(ast.parse(code))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code


def original_line(code: str, normalised_line: int) -> int | None:
    """The line of `code` that a line of its normalised text came from: the two parse to the same tree,
    so the nodes of one walk pair with the other's (None where they do not)."""
    try:
        nodes = [
            [n for n in ast.walk(ast.parse(text)) if hasattr(n, "lineno")] for text in (code, normalised_code(code))
        ]
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if len(nodes[0]) != len(nodes[1]):
        return None
    return next((a.lineno for a, b in zip(*nodes) if b.lineno == normalised_line), None)


def code_key(code: str) -> str:
    """What runs (`normalised_code`), hashed: a text that does not parse never equals a normalised one."""
    return hashlib.sha256(normalised_code(code).encode()).hexdigest()


@dataclass(frozen=True)
class Key:
    code_key: str
    stage: int
    profile: str
    seed: int
    fingerprint: str
    harness_version: str
    uniform_schedule: bool = False
    validation: str = "profile"


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._use_wal()
        with self._connect() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(evaluations)")}
            if columns and "code_key" not in columns:
                raise LedgerError(
                    f"{self.path} was written by an older plasa-lab (no code_key column): "
                    f"start a new run or give another --ledger"
                )
            db.execute(SCHEMA)
            if columns and "usage" not in columns:  # a ledger from before usage was kept: nothing measured
                db.execute("ALTER TABLE evaluations ADD COLUMN usage TEXT NOT NULL DEFAULT '{}'")

    def _use_wal(self, patience: float = 60.0):
        """Switch a new ledger to WAL (readers never block the writer). The switch takes an exclusive
        lock and SQLite answers "database is locked" at once, without its busy timeout, when another
        process opens the new file at the same moment (parallel evaluations starting together): wait
        and retry, as every other statement waits."""
        deadline = time.monotonic() + patience
        while True:
            try:
                db = sqlite3.connect(self.path, timeout=patience)
                try:
                    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                    return
                finally:
                    db.close()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise LedgerError(f"the ledger {self.path} is unusable: {e}") from None
                time.sleep(0.05)
            except sqlite3.Error as e:
                raise LedgerError(f"the ledger {self.path} is unusable: {e}") from None

    @contextmanager
    def _connect(self):
        """A connection for one transaction: committed on success, always closed."""
        try:
            db = sqlite3.connect(self.path, timeout=60)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open the ledger {self.path}: {e}") from None
        try:
            with db:
                yield db
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"the ledger {self.path} is unusable: {e}") from None
        finally:
            db.close()

    def get(self, key: Key):
        """(metrics, artifacts, seconds) recorded under key, or None."""
        where = " AND ".join(f"{c}=?" for c in KEY_COLUMNS)
        with self._connect() as db:
            row = db.execute(
                f"SELECT metrics, artifacts, seconds FROM evaluations WHERE {where}", self._values(key)
            ).fetchone()
        return (json.loads(row[0]), json.loads(row[1]), row[2]) if row else None

    def put(self, key: Key, code_sha: str, metrics: dict, artifacts: dict, seconds: float, usage: dict | None = None):
        with self._connect() as db:
            db.execute(
                f"INSERT INTO evaluations ({', '.join(KEY_COLUMNS)}, code_sha256, metrics, artifacts, seconds, "
                f"created_at, usage, runs) VALUES ({', '.join('?' * len(KEY_COLUMNS))},?,?,?,?,?,?,1) ON CONFLICT "
                f"DO UPDATE SET metrics=excluded.metrics, artifacts=excluded.artifacts, seconds=excluded.seconds, "
                f"created_at=excluded.created_at, usage=excluded.usage, runs=runs + 1",
                (
                    *self._values(key),
                    code_sha,
                    json.dumps(metrics),
                    json.dumps(artifacts),
                    seconds,
                    time.time(),
                    json.dumps(usage or {}),
                ),
            )

    def seed_rows(self, key: Key) -> dict[int, dict]:
        """seed -> metrics of every seed recorded under key (its seed ignored)."""
        return {seed: metrics for seed, (metrics, _) in self.seed_rows_with_seconds(key).items()}

    def seed_rows_with_seconds(self, key: Key) -> dict[int, tuple[dict, float]]:
        """seed -> (metrics, seconds) of every seed recorded under key (its seed ignored)."""
        return {seed: (metrics, seconds) for seed, (metrics, seconds, _) in self.seed_rows_with_usage(key).items()}

    def seed_rows_with_usage(self, key: Key) -> dict[int, tuple[dict, float, dict]]:
        """seed -> (metrics, seconds, usage) of every seed recorded under key (its seed ignored)."""
        where = " AND ".join(f"{c}=?" for c in KEY_COLUMNS if c != "seed")
        values = [v for c, v in zip(KEY_COLUMNS, self._values(key)) if c != "seed"]
        with self._connect() as db:
            rows = db.execute(f"SELECT seed, metrics, seconds, usage FROM evaluations WHERE {where}", values).fetchall()
        return {int(seed): (json.loads(metrics), seconds, json.loads(usage)) for seed, metrics, seconds, usage in rows}

    def programs_with_seeds(self, key: Key, seeds) -> dict[str, dict[int, dict]]:
        """code_key -> {seed: metrics} for every program recorded under key's conditions (its code and
        seed ignored) on every one of `seeds` (those seeds' rows only)."""
        return {
            code: {s: by_seed[s] for s in seeds}
            for code, by_seed in self.programs(key).items()
            if set(by_seed) >= set(seeds)
        }

    def programs(self, key: Key) -> dict[str, dict[int, dict]]:
        """code_key -> {seed: metrics} for every program recorded under key's conditions (its code and
        seed ignored), on whatever seeds it was trained."""
        conditions = [c for c in KEY_COLUMNS if c not in ("code_key", "seed")]
        values = [v for c, v in zip(KEY_COLUMNS, self._values(key)) if c in conditions]
        with self._connect() as db:
            rows = db.execute(
                f"SELECT code_key, seed, metrics FROM evaluations WHERE {' AND '.join(f'{c}=?' for c in conditions)}",
                values,
            ).fetchall()
        found: dict[str, dict[int, dict]] = {}
        for code, seed, metrics in rows:
            found.setdefault(code, {})[int(seed)] = json.loads(metrics)
        return found

    def trainings(self, key: Key) -> list[tuple[str, int]]:
        """(code_key, seed) of every evaluation recorded under key's conditions (its code and seed ignored)."""
        conditions = [c for c in KEY_COLUMNS if c not in ("code_key", "seed")]
        values = [v for c, v in zip(KEY_COLUMNS, self._values(key)) if c in conditions]
        with self._connect() as db:
            rows = db.execute(
                f"SELECT code_key, seed FROM evaluations WHERE {' AND '.join(f'{c}=?' for c in conditions)}", values
            ).fetchall()
        return [(code, int(seed)) for code, seed in rows]

    def rows(self):
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM evaluations ORDER BY created_at")]

    @staticmethod
    def _values(key: Key):
        code, stage, profile, seed, fingerprint, version, uniform, validation = astuple(key)
        return (code, int(stage), profile, int(seed), fingerprint, version, int(bool(uniform)), validation)
