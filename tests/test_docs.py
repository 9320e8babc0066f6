"""The README stays a front door: short, with the quick start on its first screen, and every page it
and the docs/ pages link to is there, down to the heading a `page.md#anchor` link names (GitHub's
anchor rule: the heading's text, lowercase, punctuation other than '-' and '_' dropped, spaces to '-')."""

import re
from pathlib import Path

from plasa_lab import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
README_LINES = 240
FIRST_SCREEN = 40
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^ *```.*?^ *```", re.DOTALL | re.MULTILINE)  # a fenced code block, indented or not


def pages() -> list[Path]:
    return [README, *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks (a `# comment` in a bash block is no heading) and code spans."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a page's headings give (a repeated heading gets -1, -2, ... as on GitHub)."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", text), re.M):
        name = anchor(heading.replace("`", ""))
        found.add(name if name not in seen else f"{name}-{seen[name]}")
        seen[name] = seen.get(name, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not ours to check
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked.read_text()):
            broken.append(f"{target}: no such heading")
    return broken


def test_the_anchor_rule_is_githubs():
    assert anchor('What "best" means') == "what-best-means"
    assert anchor("inspect_run.py") == "inspect_runpy"
    assert anchor("Scaling out: a Ray cluster, a GPU") == "scaling-out-a-ray-cluster-a-gpu"
    assert anchors("# A\n```bash\n# not a heading\n```\n## A\n## `b.py` c\n") == {"a", "a-1", "bpy-c"}


def test_the_link_checker_finds_a_missing_page_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Here it is\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n[ok](other.md#here-it-is) [web](https://example.org/x) [self](#page) `[code](nowhere.md)`\n"
        "[gone](missing.md) [no heading](other.md#not-here) [no self](#nothing)\n```\n[fenced](nowhere.md)\n```\n"
        "- a list item\n  ```bash\n  [indented fence](nowhere.md)\n  ```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#not-here: no such heading",
        "#nothing: no such heading",
    ]


def test_every_relative_link_in_the_readme_and_docs_points_to_a_file_and_heading_that_exist():
    broken = {str(p.relative_to(PROJECT_ROOT)): broken_links(p) for p in pages()}
    assert {page: links for page, links in broken.items() if links} == {}


def test_the_readme_is_a_front_door_with_the_quick_start_on_its_first_screen():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_LINES, "move detail into a docs/ page the README links"
    first_screen = "\n".join(lines[:FIRST_SCREEN])
    assert "make demo" in first_screen
    assert "docs/reference-numbers.md" in first_screen, "the honest-numbers note belongs on the first screen"
    assert "make test" in README.read_text() and "make evolve" in README.read_text(), "the two commands"
