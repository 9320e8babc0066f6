"""A run's configuration, checked before anything runs: OpenEvolve's Config from YAML, refusing
every key OpenEvolve would silently ignore (a misspelled key would change nothing and say nothing).
Also RunError, the one-line reason a run cannot start or did not produce anything, which every
part of a run raises and scripts/evolve.py prints."""

import dataclasses
from pathlib import Path

import yaml

from ..util import first_line, message_line


class RunError(Exception):
    """Why a run cannot start or did not produce anything; one line."""


def unknown_config_keys(raw: dict) -> list[str]:
    """Dotted paths of keys in a config dict that OpenEvolve's dataclasses do not define."""
    from openevolve.config import (
        Config,
        DatabaseConfig,
        EvaluatorConfig,
        EvolutionTraceConfig,
        LLMConfig,
        LLMModelConfig,
        PromptConfig,
    )

    sections = dict(
        llm=LLMConfig,
        prompt=PromptConfig,
        database=DatabaseConfig,
        evaluator=EvaluatorConfig,
        evolution_trace=EvolutionTraceConfig,
    )

    def check(d, cls, prefix):
        names = {f.name for f in dataclasses.fields(cls)}
        bad = [f"{prefix}{k}" for k in d if k not in names]
        for k, v in d.items():
            if k in sections and cls is Config and isinstance(v, dict):
                bad += check(v, sections[k], f"{k}.")
            elif k in ("models", "evaluator_models") and cls is LLMConfig and isinstance(v, list):
                for i, m in enumerate(v):
                    bad += check(m or {}, LLMModelConfig, f"{prefix}{k}[{i}].")
        return bad

    return check(raw, Config, "")


def load_config(path: Path):
    """OpenEvolve's Config from YAML, refusing keys it would silently ignore."""
    from openevolve.config import Config

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise RunError(f"cannot read the config {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise RunError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or message_line(e)
        raise RunError(f"{path} is not valid YAML{where}: {problem}")
    if not isinstance(raw, dict):
        raise RunError(f"{path} must hold a YAML mapping")
    bad = unknown_config_keys(raw)
    if bad:
        raise RunError(f"{path}: unknown OpenEvolve keys (it would ignore them silently): {', '.join(bad)}")
    try:
        return Config.from_yaml(path), raw
    except Exception as e:  # dacite type errors and OpenEvolve's own validation
        raise RunError(f"{path}: {first_line(e)}")
