"""The part of the LLM's system message that the code owns: the static rules, written from
plasa_lab.program.checks.RULES so that what the LLM is told is what is checked.

prompts/system_message.txt holds this text verbatim (OpenEvolve reads the file as it is);
tests/test_checks.py fails when the two differ. Rewrite the file's section with

    .venv/bin/python -m plasa_lab.program.prompting
"""

import textwrap

from .. import PROJECT_ROOT
from .checks import RULES

SYSTEM_MESSAGE = PROJECT_ROOT / "prompts" / "system_message.txt"
HEADING = "- Inside the blocks, the static rules (checked before anything runs; a refusal names its rule):"


def static_rules_text() -> str:
    """The heading, then one wrapped line per rule: `name: what it allows`."""
    lines = [HEADING]
    for rule in RULES:
        lines += textwrap.wrap(f"{rule.name}: {rule.allows}", 100, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"


def with_static_rules(message: str) -> str:
    """The system message with its rules section (from HEADING to the end) written anew."""
    return message[: message.index(HEADING)] + static_rules_text()


if __name__ == "__main__":
    SYSTEM_MESSAGE.write_text(with_static_rules(SYSTEM_MESSAGE.read_text()))
    print(f"wrote the static rules into {SYSTEM_MESSAGE}")
