"""The command lines a user types: every option of every script says what it does, a bad value is
argparse's one error line naming the option it came from, and --help touches nothing."""

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plasa_lab import PROJECT_ROOT

SCRIPTS = sorted((PROJECT_ROOT / "scripts").glob("*.py")) + [PROJECT_ROOT / "evaluator.py"]


class Parsed(Exception):
    """Raised by parse_args instead of parsing: carries the parser a script built."""

    def __init__(self, parser):
        self.parser = parser


def load(script):
    """A script as a module (its `if __name__ == "__main__"` part not run)."""
    spec = importlib.util.spec_from_file_location(f"script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parser_of(script) -> argparse.ArgumentParser:
    """The parser `script`'s main() builds, taken at its parse_args call (nothing after it runs)."""
    module = load(script)

    def parse_args(self, *args, **kwargs):
        raise Parsed(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        with pytest.raises(Parsed) as parsed:
            module.main()
    return parsed.value.parser


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_option_of_every_script_says_what_it_does(script):
    parser = parser_of(script)
    silent = [
        action.option_strings[0] if action.option_strings else action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert silent == [], f"{script.name}: options without help: {silent}"


@pytest.mark.parametrize("script", ["evolve.py", "replay.py"])
def test_seeds_that_are_not_integers_are_one_error_line_naming_the_option(script, capsys):
    with pytest.raises(SystemExit) as exit:
        load(PROJECT_ROOT / "scripts" / script).main(["--seeds", "abc"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert exit.value.code == 2
    reason = "seeds must be integers separated by commas, got 'abc'"
    assert errors == [f"{Path(sys.argv[0]).name}: error: argument --seeds: {reason}"]


def test_gpu_checks_help_prints_its_header_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(PROJECT_ROOT / "scripts" / "gpu_checks.sh"), "--help"],
        env=dict(os.environ, OUT=str(out), PY="false", PATH="/usr/bin:/bin"),  # no python, no nvidia-smi reached
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and done.stderr == ""
    assert "Every GPU check in one go" in done.stdout and "bash scripts/gpu_checks.sh" in done.stdout
    assert not out.exists()
