"""Shared machinery of the PLASA evolution lab: data, program loading, checks, harness, sandbox,
ledger, evaluation pipeline, mutator and reporting. Scripts stay thin and call into here."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
INITIAL_PROGRAM = PROJECT_ROOT / "initial_program.py"
