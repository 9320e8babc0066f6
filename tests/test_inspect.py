"""inspect_run.py on a real smoke run (tests/fixtures/smoke_run: 4 offline-mutator iterations, logs
dropped, the last checkpoint kept): the ranking, the lineage, the block diff, plots, the HTML page,
exports, partly written checkpoints and bad input. Real subprocesses for the command line."""

import base64
import csv
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from plasa_lab import PROJECT_ROOT, reporting
from plasa_lab.program import block_line_ranges
from plasa_lab.reporting import Program, ReportError, block_diffs, load_run, pareto_front, rank_key, resolve_target

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_run"
CHECKPOINT = "checkpoint_4"
PNG = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def inspect(*args, timeout=120):
    return subprocess.run([sys.executable, "scripts/inspect_run.py", *map(str, args)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_copy(tmp_path):
    """The fixture run in tmp_path: tests never write into tests/fixtures."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "run"))


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """One inspect_run.py call with every output on a copy of the fixture: (run folder, the process)."""
    run_dir = Path(shutil.copytree(FIXTURE, tmp_path_factory.mktemp("inspect") / "run"))
    done = inspect(run_dir, "--top", "3", "--plots", "--html", "--json", run_dir / "table.json",
                   "--csv", run_dir / "table.csv")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done


# ---------------------------------------------------------------------------------------------
# the table, the lineage, the diff

def test_table_ranks_by_score_then_by_lower_ppl():
    view = load_run(FIXTURE)
    assert len(view.population) >= 3
    assert view.population == sorted(view.population, key=rank_key)
    scores = [p.metrics["combined_score"] for p in view.population]
    assert scores == sorted(scores, reverse=True)
    tied = [p.val_ppl for p in view.population if p.metrics["combined_score"] == scores[0]]
    assert tied == sorted(tied)  # smoke: every ppl is above 10000, every score 1e-4, so ppl decides


def test_a_failed_program_ranks_below_passing_ones_whatever_its_ppl_number():
    passing = Program("a", "", None, 0, 0, 0, dict(combined_score=1e-4, val_ppl=24000.0))
    failed = Program("b", "", "a", 1, 1, 0, dict(combined_score=0.0, val_ppl=10000.0))
    better = Program("c", "", "a", 1, 2, 0, dict(combined_score=1 / 500, val_ppl=500.0))
    assert sorted([failed, passing, better], key=rank_key) == [better, passing, failed]


def test_command_line_table_lists_the_top_programs_in_rank_order(reported):
    run_dir, done = reported
    ranked = [p.short_id for p in load_run(run_dir).population]
    table = done.stdout.split("Top 3")[1].split("Lineage")[0]
    rows = [re.search(r"[0-9a-f]{8}", line).group() for line in table.splitlines() if line.startswith("│")]
    assert rows == ranked[:3]
    assert "ranked by combined_score" in done.stdout and "broken by val_ppl" in done.stdout


def test_lineage_of_the_best_ends_at_the_initial_program():
    view = load_run(FIXTURE)
    chain = view.chain
    assert chain[-1] is view.best and len(chain) >= 2
    assert chain[0].parent_id is None and chain[0].iteration == 0 and chain[0].generation == 0
    for parent, child in zip(chain, chain[1:]):
        assert child.parent_id == parent.id and child.generation == parent.generation + 1


def test_lineage_reaches_the_initial_program_through_the_trace_when_the_checkpoint_dropped_it(run_copy):
    view = load_run(run_copy)
    initial = view.chain[0]
    (run_copy / "checkpoints" / CHECKPOINT / "programs" / f"{initial.id}.json").unlink()  # displaced
    again = load_run(run_copy)
    assert initial.id not in {p.id for p in again.population}
    assert again.chain[0].id == initial.id and again.chain[0].parent_id is None
    assert again.chain[0].code == initial.code and again.warnings == []


def changed_lines(diff_text):
    """(removed, added): 1-based file line numbers of the -/+ lines of a unified diff, by its hunk headers."""
    removed, added, old, new = {}, {}, 0, 0
    for line in diff_text.splitlines():
        if line.startswith(("---", "+++")):
            continue
        if m := re.match(r"@@ -(\d+),\d+ \+(\d+),\d+ @@", line):
            old, new = int(m.group(1)), int(m.group(2))
        elif line.startswith("-"):
            removed[old] = line[1:]
            old += 1
        elif line.startswith("+"):
            added[new] = line[1:]
            new += 1
        else:
            old, new = old + 1, new + 1
    return removed, added


def test_diff_of_the_best_touches_only_evolve_block_lines_and_misses_none():
    view = load_run(FIXTURE)
    before, after = view.initial.code, view.best.code
    diffs = block_diffs(before, after)
    assert diffs, "the fixture's best should differ from the initial program"
    removed, added = {}, {}
    for d in diffs:
        r, a = changed_lines(d.text)
        removed.update(r)
        added.update(a)
    inside_before = {i + 1 for r in block_line_ranges(before) for i in r}
    inside_after = {i + 1 for r in block_line_ranges(after) for i in r}
    assert set(removed) <= inside_before and set(added) <= inside_after
    old_lines, new_lines = before.splitlines(), after.splitlines()
    assert all(old_lines[n - 1] == text for n, text in removed.items())
    assert all(new_lines[n - 1] == text for n, text in added.items())
    whole = difflib.SequenceMatcher(None, old_lines, new_lines).get_opcodes()  # the whole file, blocks or not
    assert {i + 1 for tag, i1, i2, _, _ in whole if tag != "equal" for i in range(i1, i2)} == set(removed)
    assert {j + 1 for tag, _, _, j1, j2 in whole if tag != "equal" for j in range(j1, j2)} == set(added)


def test_command_line_shows_the_lineage_and_the_block_diff(reported):
    _, done = reported
    assert "initial program" in done.stdout.split("Lineage")[1]
    assert re.search(r"--- initial \[\w+\]", done.stdout) and re.search(r"\+\+\+ best \[\w+\]", done.stdout)


def test_pareto_front_keeps_points_no_other_beats_in_both_ppl_and_density():
    points = [(0.2, 300.0), (0.5, 200.0), (0.6, 250.0), (0.9, 100.0), (0.3, 400.0)]
    assert pareto_front(points) == [(0.2, 300.0), (0.5, 200.0), (0.9, 100.0)]


# ---------------------------------------------------------------------------------------------
# plots, the HTML page, exports

def test_plots_are_written_as_non_empty_pngs(reported):
    run_dir, done = reported
    pngs = sorted((run_dir / "report").glob("*.png"))
    assert [p.name for p in pngs] == ["map_elites_grid.png", "ppl_per_iteration.png", "ppl_vs_density.png"]
    for png in pngs:
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 5000
        assert f"wrote {png}" in done.stdout


def test_plots_are_written_even_when_every_child_failed(run_copy):
    for path in [*(run_copy / "checkpoints").glob("*/programs/*.json")]:
        program = json.loads(path.read_text())
        program["metrics"].update(combined_score=0.0, val_ppl=10000.0)
        path.write_text(json.dumps(program))
    view = load_run(run_copy)
    assert not any(p.passed for p in view.population)
    plots = reporting.write_plots(view, run_copy / "report")
    assert len(plots) == 3 and all(p.read_bytes().startswith(PNG) for p in plots.values())


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.rows, self.images, self.external, self.body = 0, 0, [], [], {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tables += tag == "table"
        self.rows += tag == "tr"
        if tag == "img":
            self.images.append(attrs)
        if tag == "body":
            self.body = attrs
        if tag == "img" and not attrs.get("src", "").startswith("data:") or tag != "img" and "src" in attrs \
                or tag == "link":
            self.external.append((tag, attrs))


def parse(text):
    page = Page()
    page.feed(text)
    return page


def test_html_report_is_one_self_contained_page_with_tables_diffs_and_decodable_images(reported):
    run_dir, _ = reported
    text = (run_dir / "report" / "report.html").read_text()
    page = parse(text)
    assert page.tables >= 2 and page.rows >= 5 and page.external == []
    assert len(page.images) == 3
    for image in page.images:
        kind, data = image["src"].split(",", 1)
        assert kind == "data:image/png;base64" and base64.b64decode(data).startswith(PNG)
    assert '<pre class="diff">' in text and "initial program" in text


def browser_dom(html_file: Path, profile_dir: Path) -> str:
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={profile_dir}", "--dump-dom", html_file.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (.ci/run installs Debian's); the page is parsed instead")
def test_html_report_tables_and_images_load_in_headless_chromium(reported, tmp_path):
    run_dir, _ = reported
    page = parse(browser_dom(run_dir / "report" / "report.html", tmp_path / "profile"))
    assert page.body.get("data-images-loaded") == "3/3" and int(page.body.get("data-tables")) >= 2
    assert all(i.get("data-loaded") == "yes" and int(i["data-natural-width"]) > 100 for i in page.images)

    broken = tmp_path / "broken.html"  # the page's own check tells a broken image from a good one
    broken.write_text(re.sub(r'src="data:image/png;base64,[^"]{40}', 'src="data:image/png;base64,AAAA', (
        run_dir / "report" / "report.html").read_text(), count=1))
    page = parse(browser_dom(broken, tmp_path / "profile"))
    assert page.body.get("data-images-loaded") == "2/3"


def test_json_and_csv_export_every_program_in_rank_order(reported):
    run_dir, _ = reported
    ranked = [p.id for p in load_run(run_dir).population]
    exported = json.loads((run_dir / "table.json").read_text())
    assert [p["id"] for p in exported["programs"]] == ranked and "combined_score" in exported["ranking"]
    with (run_dir / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ranked and set(reporting.TABLE_COLUMNS) <= set(rows[0])


# ---------------------------------------------------------------------------------------------
# where to look, and what cannot be read

def test_a_checkpoint_folder_can_be_inspected_directly():
    done = inspect(FIXTURE / "checkpoints" / CHECKPOINT)
    assert done.returncode == 0, done.stderr
    assert f"checkpoint {CHECKPOINT}" in done.stdout


def test_without_an_argument_the_newest_run_is_inspected(tmp_path, monkeypatch):
    older, newer = tmp_path / "run-a", tmp_path / "run-b"
    shutil.copytree(FIXTURE, older)
    shutil.copytree(FIXTURE, newer)
    os.utime(older, (1_000_000_000, 1_000_000_000))
    os.utime(newer, (1_000_000_100, 1_000_000_100))
    monkeypatch.setattr(reporting, "OUTPUT_ROOT", tmp_path)
    assert resolve_target(None) == (newer, None)
    monkeypatch.setattr(reporting, "OUTPUT_ROOT", tmp_path / "empty")
    with pytest.raises(ReportError, match="no run under"):
        resolve_target(None)


def test_partly_written_checkpoint_is_reported_and_the_previous_one_used(run_copy):
    partial = run_copy / "checkpoints" / "checkpoint_5"  # killed while saving: programs half written, no metadata
    shutil.copytree(run_copy / "checkpoints" / CHECKPOINT, partial)
    (partial / "metadata.json").unlink()
    program = next((partial / "programs").glob("*.json"))
    program.write_text(program.read_text()[:100])
    done = inspect(run_copy)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"warning: skipped checkpoint_5: metadata.json missing (partly written?); using {CHECKPOINT}"
    assert f"checkpoint {CHECKPOINT}" in done.stdout


def corrupt_a_program(run_dir):
    program = next((run_dir / "checkpoints" / CHECKPOINT / "programs").glob("*.json"))
    program.write_text(program.read_text()[:500])


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("not a run", "is not a run folder"),
    ("corrupt program", "is not valid JSON"),
    ("corrupt program, checkpoint named", "is not valid JSON"),
    ("a file", "is not a folder"),
])
def test_bad_input_exits_nonzero_with_one_line(case, message, run_copy, tmp_path):
    target = {"missing": tmp_path / "nowhere", "not a run": tmp_path / "empty",
              "corrupt program": run_copy, "corrupt program, checkpoint named": run_copy / "checkpoints" / CHECKPOINT,
              "a file": run_copy / "run.json"}[case]
    (tmp_path / "empty").mkdir()
    if case.startswith("corrupt"):
        corrupt_a_program(run_copy)
    done = inspect(target)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert done.stderr.startswith("inspect_run.py: error: ")
