"""inspect_run.py on a real smoke run (tests/fixtures/smoke_run: 4 offline-mutator iterations, logs
dropped, the last checkpoint kept): the ranking (OpenEvolve's), each program against the initial
program paired by seed, the lineage, the block diff, the MAP-Elites grid as OpenEvolve saved it,
plots, the HTML page of the whole run (notebook, failures by rule, replay verdicts, settings, every
program's story), exports, the marks newer runs add (confirmation, sandbox, LLM responses), --program,
--watch, a child's words kept as text, partly written checkpoints and bad input. Real subprocesses
for the command line."""

import base64
import csv
import difflib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from plasa_lab import PROJECT_ROOT, reporting, rundir
from plasa_lab.program.blocks import block_line_ranges
from plasa_lab.reporting import (
    Program,
    ReportError,
    block_diffs,
    load_run,
    map_elites_grid,
    pareto_front,
    rank,
    resolve_target,
    vs_initial,
)

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_run"
CHECKPOINT = "checkpoint_4"
PNG = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def inspect(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "scripts/inspect_run.py", *map(str, args)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_copy(tmp_path):
    """The fixture run in tmp_path: tests never write into tests/fixtures."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "run"))


def edit_programs(run_dir, edit):
    """Apply edit(program dict) to every program file of the fixture's checkpoint."""
    for path in (run_dir / "checkpoints" / CHECKPOINT / "programs").glob("*.json"):
        program = json.loads(path.read_text())
        edit(program)
        path.write_text(json.dumps(program))


def edit_metadata(run_dir, edit):
    path = run_dir / "checkpoints" / CHECKPOINT / "metadata.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


def make_a_child_the_best(run_dir) -> str:
    """On the smoke fixture every score ties and OpenEvolve's best is the initial program; here the
    child with the lowest ppl scores higher and is the checkpoint's best_program_id, as OpenEvolve
    would have made it. Returns its id."""
    child = min(
        (
            json.loads(p.read_text())
            for p in (run_dir / "checkpoints" / CHECKPOINT / "programs").glob("*.json")
            if json.loads(p.read_text())["parent_id"]
        ),
        key=lambda d: d["metrics"]["val_ppl"],
    )["id"]
    edit_programs(run_dir, lambda d: d["metrics"].update(combined_score=2e-4) if d["id"] == child else None)
    edit_metadata(run_dir, lambda m: m.update(best_program_id=child))
    return child


def trace_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / rundir.TRACE).read_text().splitlines()]


def fail_children(run_dir, failures: dict[str, str]):
    """{child id prefix: its failure line}: those children scored 0, in the trace and in the checkpoint."""
    failed = lambda child_id: next((line for prefix, line in failures.items() if child_id.startswith(prefix)), None)
    records = trace_records(run_dir)
    for r in records:
        if line := failed(r["child_id"]):
            r["child_metrics"].update(combined_score=0.0, stage2_passed=0.0)
            r["artifacts"]["failure"] = line
    (run_dir / rundir.TRACE).write_text("".join(json.dumps(r) + "\n" for r in records))
    edit_programs(run_dir, lambda d: d["metrics"].update(combined_score=0.0) if failed(d["id"]) else None)


def add_iterations_without_a_child(run_dir, errors: dict[int, str]):
    """OpenEvolve's record of iterations that produced no child (an LLM error, a diff that did not apply)."""
    with (run_dir / rundir.TRACE_FAILURES).open("a") as f:
        f.writelines(json.dumps(dict(iteration=i, error=error)) + "\n" for i, error in errors.items())


def log_llm_responses(run_dir, outcome="passed"):
    """llm_responses.jsonl as a run writes it: one line per iteration, the trace's response in it."""
    lines = [
        dict(
            iteration=r["iteration"], model="offline-mutator", seconds=0.5, outcome=outcome, response=r["llm_response"]
        )
        for r in trace_records(run_dir)
    ]
    (run_dir / rundir.LLM_RESPONSES).write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_replay(run_dir, program, **entry):
    """report/replay.json as scripts/replay.py writes it, with the initial program and `program` replayed."""
    import hashlib

    sha = lambda p: hashlib.sha256(p.code.encode()).hexdigest()
    initial = load_run(run_dir).initial
    programs = [
        dict(name="initial", kind="initial", code_sha256=sha(initial), verdict="within noise", p_value=None),
        dict(name=program.short_id, kind="program", code_sha256=sha(program), **entry),
    ]
    report = dict(profile="smoke", seeds=[101, 102, 103], created="2026-12-04T07:00:00+00:00", programs=programs)
    (run_dir / rundir.REPORT).mkdir(exist_ok=True)
    (run_dir / rundir.REPORT / "replay.json").write_text(json.dumps(dict(report, rule="a paired t-test")))


REPLAYED = dict(
    verdict="within noise",
    change_vs_initial_pct=-0.05,
    paired_seeds=3,
    p_value=0.41,
    test="paired t-test",
    claimed_change_pct=-0.19,
    claimed_seeds=1,
    unseen_change_pct=-0.05,
    unseen_seeds=3,
    shrinkage=0.74,
)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """One inspect_run.py call with every output on a copy of the fixture whose best is a child, one
    iteration of which produced no child, replayed: (run folder, the process)."""
    run_dir = Path(shutil.copytree(FIXTURE, tmp_path_factory.mktemp("inspect") / "run"))
    best = make_a_child_the_best(run_dir)
    add_iterations_without_a_child(run_dir, {3: "No valid diffs found in response"})
    write_replay(run_dir, load_run(run_dir).known[best], **REPLAYED)
    done = inspect(
        run_dir, "--top", "3", "--plots", "--html", "--json", run_dir / "table.json", "--csv", run_dir / "table.csv"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done


# ---------------------------------------------------------------------------------------------
# the table, the lineage, the diff


def test_ranked_first_is_openevolves_best_program_the_one_in_best_folder():
    view = load_run(FIXTURE)
    metadata = json.loads((FIXTURE / "checkpoints" / CHECKPOINT / "metadata.json").read_text())
    assert view.best.id == metadata["best_program_id"]
    assert view.best.id == json.loads((FIXTURE / "best" / "best_program_info.json").read_text())["id"]
    assert view.best.code == (FIXTURE / "best" / "best_program.py").read_text()
    assert view.warnings == []


def test_tied_scores_rank_in_the_order_openevolve_found_them():
    view = load_run(FIXTURE)
    scores = [p.metrics["combined_score"] for p in view.population]
    assert len(set(scores)) == 1 and len(view.population) == 5  # smoke: every ppl above 10000 scores 1e-4
    found = [p.timestamp for p in view.population]  # two at once: iteration 2 may be found before 1
    assert found == sorted(found) and sorted(p.iteration for p in view.population) == [0, 1, 2, 3, 4]


def test_a_strictly_higher_score_ranks_first_and_openevolves_pick_leads_its_tie():
    first = Program("a", "", None, 0, 0, 0, dict(combined_score=1e-4, val_ppl=24000.0), timestamp=1.0)
    failed = Program("b", "", "a", 1, 1, 0, dict(combined_score=0.0, val_ppl=10000.0), timestamp=2.0)
    better = Program("c", "", "a", 1, 2, 0, dict(combined_score=1 / 500, val_ppl=500.0), timestamp=3.0)
    tied = Program("d", "", "a", 1, 3, 0, dict(combined_score=1 / 500, val_ppl=500.0), timestamp=4.0)
    assert rank([failed, tied, first, better]) == [better, tied, first, failed]
    # parallel evaluations enter the database in completion order: OpenEvolve's own pick leads its tie
    assert rank([failed, tied, first, better], best_id="d") == [tied, better, first, failed]


def test_the_best_stands_with_its_claim_and_once_replayed_with_what_unseen_seeds_left_of_it(run_copy):
    """The summary names the best's paired change where the search selected it and, from the run's
    replay report, its change on seeds the run never used and the share the winner's curse took."""
    import hashlib

    from plasa_lab.reporting.text import winners_curse_line

    view = load_run(run_copy)
    initial = view.initial
    best = next(p for p in view.population if p is not initial)
    best.metrics.update(confirmed=1.0, val_loss_seed42=initial.metrics["val_loss_seed42"] + math.log1p(-0.02))
    view.population.remove(best)
    view.population.insert(0, best)
    line = winners_curse_line(view)
    assert line.startswith(f"{best.short_id} claims -2.00% val_ppl against the initial program on the 1 seed")
    assert "replay it on other seeds" in line
    report = run_copy / rundir.REPORT
    report.mkdir(exist_ok=True)
    entry = dict(
        code_sha256=hashlib.sha256(best.code.encode()).hexdigest(),
        unseen_change_pct=-1.5,
        unseen_seeds=5,
        unseen_p=0.001,
        shrinkage=0.25,
    )
    (report / "replay.json").write_text(json.dumps({"programs": [entry]}))
    assert winners_curse_line(view).endswith(
        "; on 5 unseen seeds -1.50%, p=0.001; the winner's curse took 25% of the claim"
    )


def test_a_best_program_id_that_is_not_the_highest_score_is_warned_about(run_copy):
    edit_metadata(run_copy, lambda m: m.update(best_program_id="not-a-program"))
    view = load_run(run_copy)
    assert view.best.iteration == 0
    assert view.warnings == [
        f"warning: {CHECKPOINT}'s best_program_id not-a-pr is not among its programs; #1 here is {view.best.short_id}"
    ]


def test_command_line_table_lists_the_top_programs_in_rank_order(reported):
    run_dir, done = reported
    ranked = [p.short_id for p in load_run(run_dir).population]
    table = done.stdout.split("Top 3")[1].split("Lineage")[0]
    rows = [re.search(r"[0-9a-f]{8}", line).group() for line in table.splitlines() if line.startswith("│")]
    assert rows == ranked[:3]
    assert "ranked by combined_score" in done.stdout and "#1 is its best_program_id" in done.stdout


def test_lineage_of_the_best_ends_at_the_initial_program(run_copy):
    make_a_child_the_best(run_copy)
    view = load_run(run_copy)
    chain = view.chain
    assert chain[-1] is view.best and len(chain) >= 2
    assert chain[0].parent_id is None and chain[0].iteration == 0 and chain[0].generation == 0
    for parent, child in zip(chain, chain[1:]):
        assert child.parent_id == parent.id and child.generation == parent.generation + 1


def test_lineage_reaches_the_initial_program_through_the_trace_when_the_checkpoint_dropped_it(run_copy):
    make_a_child_the_best(run_copy)
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


def test_diff_of_the_best_touches_only_evolve_block_lines_and_misses_none(run_copy):
    make_a_child_the_best(run_copy)
    view = load_run(run_copy)
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


def test_when_the_best_is_the_initial_program_no_block_changed():
    done = inspect(FIXTURE)
    assert done.returncode == 0, done.stderr
    assert "no block(s) changed" in done.stdout and "--- initial [" not in done.stdout


def test_pareto_front_keeps_points_no_other_beats_in_both_ppl_and_density():
    points = [(0.2, 300.0), (0.5, 200.0), (0.6, 250.0), (0.9, 100.0), (0.3, 400.0)]
    assert pareto_front(points) == [(0.2, 300.0), (0.5, 200.0), (0.9, 100.0)]


# ---------------------------------------------------------------------------------------------
# the MAP-Elites grid: OpenEvolve's own cells


def test_grid_cells_are_the_ones_openevolve_saved_in_the_checkpoint():
    view = load_run(FIXTURE)
    metadata = json.loads((FIXTURE / "checkpoints" / CHECKPOINT / "metadata.json").read_text())
    saved = {}
    for island_map in metadata["island_feature_maps"]:
        for key, pid in island_map.items():
            saved.setdefault(tuple(map(int, key.split("-"))), set()).add(pid)
    grid = map_elites_grid(view)
    assert grid.dims == ("density", "indexer_params") and grid.bins == (10, 8)  # run.json's feature_bins
    assert {cell: {p.id for p in members} for cell, members in grid.cells.items()} == saved
    # the initial program entered alone: OpenEvolve scaled it to the middle (0.5), cell 5-4, and it stays there
    initial = view.initial.id
    assert [cell for cell, members in grid.cells.items() if initial in {p.id for p in members}] == [(5, 4)]
    assert grid.ranges["density"] == (
        metadata["feature_stats"]["density"]["min"],
        metadata["feature_stats"]["density"]["max"],
    )


def test_a_cell_shows_its_best_program_by_the_report_ranking():
    view = load_run(FIXTURE)
    grid = map_elites_grid(view)
    ranked = [p.id for p in view.population]
    shared = [members for members in grid.cells.values() if len(members) > 1]
    assert shared, "two islands share cell 9-0 in the fixture"
    for members in grid.cells.values():
        assert [p.id for p in members] == sorted((p.id for p in members), key=ranked.index)


def test_grid_labels_only_programs_of_the_population(run_copy):
    edit_metadata(run_copy, lambda m: m["island_feature_maps"][1].update({"2-2": "gone-from-the-population"}))
    grid = map_elites_grid(load_run(run_copy))
    population = {p.id for p in load_run(run_copy).population}
    assert (2, 2) not in grid.cells and grid.dropped == 1
    assert all(p.id in population for members in grid.cells.values() for p in members)


# ---------------------------------------------------------------------------------------------
# a child whose checkpoint was never written


def test_trace_records_after_the_checkpoint_are_left_out_and_counted(run_copy):
    """kill -9 during checkpoint_5's save: the trace holds iteration 5, no checkpoint does."""
    trace = run_copy / "evolution_trace.jsonl"
    record = json.loads(trace.read_text().splitlines()[-1])
    record.update(
        iteration=5,
        child_id="unsaved-child",
        child_metrics=dict(record["child_metrics"], val_ppl=50.0, combined_score=0.02),
    )
    with trace.open("a") as f:
        f.write(json.dumps(record) + "\n")
    partial = run_copy / "checkpoints" / "checkpoint_5"
    (partial / "programs").mkdir(parents=True)

    view = load_run(run_copy)
    assert view.checkpoint.name == CHECKPOINT and "unsaved-child" not in view.known
    assert [p.iteration for p in reporting.history(view, True)] == [0, 1, 2, 3, 4] and len(view.trace) == 4
    assert view.warnings[-1] == (
        "warning: left out 1 trace record(s) of iterations after 4 (checkpoint_4's last): "
        "no checkpoint holds them (killed during a save?)"
    )
    done = inspect(run_copy)
    assert done.returncode == 0 and "children: 4 evaluated" in done.stdout and "unsaved-" not in done.stdout
    assert "left out 1 trace record(s)" in done.stderr


# ---------------------------------------------------------------------------------------------
# plots, the HTML page, exports


def test_plots_are_written_as_non_empty_pngs(reported):
    run_dir, done = reported
    pngs = sorted((run_dir / "report").glob("*.png"))
    assert [p.name for p in pngs] == [
        "effect_per_iteration.png",
        "effect_vs_density.png",
        "lineage.png",
        "map_elites_grid.png",
    ]
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
    assert len(plots) == 4 and all(p.read_bytes().startswith(PNG) for p in plots.values())


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
        if (
            tag == "img"
            and not attrs.get("src", "").startswith("data:")
            or tag != "img"
            and "src" in attrs
            or tag == "link"
        ):
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
    assert len(page.images) == 4
    for image in page.images:
        kind, data = image["src"].split(",", 1)
        assert kind == "data:image/png;base64" and base64.b64decode(data).startswith(PNG)
    assert '<pre class="diff">' in text and "initial program" in text


def test_html_page_escapes_what_the_run_wrote(run_copy):
    child = make_a_child_the_best(run_copy)
    edit_programs(
        run_copy,
        lambda d: d["metadata"].update(changes="<script>alert('x')</script> & more") if d["id"] == child else None,
    )
    page = reporting.write_html(load_run(run_copy), run_copy / "report", 3, {}).read_text()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more" in page
    assert "<script>alert" not in page and page.count("<script>") == 1  # the page's own image check only


def browser_dom(html_file: Path, profile_dir: Path) -> str:
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile_dir}",
            "--dump-dom",
            html_file.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (.ci/run installs Debian's); the page is parsed instead")
def test_html_report_tables_and_images_load_in_headless_chromium(reported, tmp_path):
    run_dir, _ = reported
    page = parse(browser_dom(run_dir / "report" / "report.html", tmp_path / "profile"))
    assert page.body.get("data-images-loaded") == "4/4" and int(page.body.get("data-tables")) >= 2
    assert all(i.get("data-loaded") == "yes" and int(i["data-natural-width"]) > 100 for i in page.images)

    broken = tmp_path / "broken.html"  # the page's own check tells a broken image from a good one
    broken.write_text(
        re.sub(
            r'src="data:image/png;base64,[^"]{40}',
            'src="data:image/png;base64,AAAA',
            (run_dir / "report" / "report.html").read_text(),
            count=1,
        )
    )
    page = parse(browser_dom(broken, tmp_path / "profile"))
    assert page.body.get("data-images-loaded") == "3/4"


def section(dom: str, start: str, end: str) -> str:
    """The DOM from the first `start` to the next `end` after it."""
    at = dom.index(start)
    return dom[at : dom.index(end, at + len(start))]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (.ci/run installs Debian's); the page is parsed instead")
def test_headless_chromium_shows_the_whole_run_notebook_failures_replay_paired_column_and_each_programs_story(
    reported, tmp_path
):
    run_dir, _ = reported
    view = load_run(run_dir)
    dom = browser_dom(run_dir / "report" / "report.html", tmp_path / "profile")
    programs = section(dom, 'id="programs"', "</table>")
    assert "<th>vs initial (paired)</th>" in programs and "<th>val_loss</th>" in programs
    assert "<td>reference</td>" in programs and re.search(r"<td>[+-]\d\.\d\d% \(1 seed\)</td>", programs)
    failures = section(dom, 'id="failures"', "</table>")
    assert '<td class="text">no child (1)</td>' in failures and "No valid diffs found in response" in failures
    notebook = section(dom, 'id="notebook"', "</pre>")
    assert "# Lab notebook (what this run has tried)" in notebook and "| iter | lever | change |" in notebook
    replay = section(dom, 'id="replay"', "</table>")
    assert "within noise" in replay and "74%" in replay and "-0.19% (1 seed)" in replay
    settings = section(dom, 'id="settings"', "</body>")
    assert "session 1: 290.3 s wall" in settings and "confirmations: 0 of 7 stage-2 trainings" in settings
    assert '<td class="text">time_limit</td>' in settings

    assert dom.count('<details class="program"') == len(view.population)
    best = section(dom, f'id="program-{view.best.short_id}"', '<details class="program"')
    assert f"made at iteration {view.best.iteration} from {view.chain[-2].short_id} by offline-mutator" in best
    assert f"--- parent {view.chain[-2].short_id} [" in best and f"--- initial {view.initial.short_id} [" in best
    assert '<span class="add">+' in best
    assert "<summary>prompt: user</summary>" in best and "# Current Program" in best
    record = next(r for r in trace_records(run_dir) if r["child_id"] == view.best.id)
    assert "<summary>response</summary>" in best and record["llm_response"].splitlines()[0] in best


def test_json_and_csv_export_every_program_in_rank_order(reported):
    run_dir, _ = reported
    ranked = [p.id for p in load_run(run_dir).population]
    exported = json.loads((run_dir / "table.json").read_text())
    assert [p["id"] for p in exported["programs"]] == ranked and "combined_score" in exported["ranking"]
    with (run_dir / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ranked and set(reporting.TABLE_COLUMNS) <= set(rows[0])


# ---------------------------------------------------------------------------------------------
# marks newer runs add: confirmation on several seeds, the sandbox, LLM responses


def unconfirm_metrics(metrics):
    for key in [k for k in metrics if k in ("seeds", "confirmed", "noise_sd") or k.startswith("val_loss_seed")]:
        del metrics[key]


def confirm(run_dir, confirmed: dict):
    """Give every program `seeds`, `confirmed` and per-seed losses: {id prefix: number of seeds confirmed}."""

    def edit(d):
        seeds = next((n for prefix, n in confirmed.items() if d["id"].startswith(prefix)), 1)
        unconfirm_metrics(d["metrics"])
        d["metrics"].update(
            seeds=float(seeds),
            confirmed=1.0 if seeds > 1 else 0.0,
            **{f"val_loss_seed{42 + i}": 10.0 + i / 10 for i in range(seeds)},
        )

    edit_programs(run_dir, edit)


def test_table_marks_unconfirmed_programs_and_summary_names_the_best_confirmed(run_copy):
    confirm(run_copy, {"7aae45ed": 3})  # the #3 is confirmed on 3 seeds; the #1 rests on one
    done = inspect(run_copy, "--json", run_copy / "t.json", "--csv", run_copy / "t.csv")
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if line.startswith("┃") and "val_ppl" in line)
    assert header.index("val_ppl") < header.index("seeds") < header.index("val_acc")
    table = done.stdout.split("Top 5 of 5")[1].split("Lineage")[0]
    rows = {line.split()[1]: line for line in table.splitlines() if re.match(r"│ [0-9a-f]{8} ", line)}
    assert "3 seeds ✓" in rows["7aae45ed"] and "1 seed " in rows["2cac6f25"] and "✓" not in rows["2cac6f25"]
    assert (
        "best confirmed program: 7aae45ed (val_ppl 10000.0, 3 seeds ✓, #3 in the ranking); "
        "the #1, 2cac6f25, is not confirmed (1 seed)"
    ) in done.stdout
    exported = {p["id"][:8]: p for p in json.loads((run_copy / "t.json").read_text())["programs"]}
    assert exported["7aae45ed"]["confirmed"] == 1.0 and exported["7aae45ed"]["val_loss_seed44"] == 10.2
    assert exported["2cac6f25"]["val_loss_seed44"] is None
    with (run_copy / "t.csv").open() as f:
        assert {"seeds", "confirmed", "val_loss_seed42", "val_loss_seed44"} <= set(next(csv.DictReader(f)))


def test_without_confirmation_marks_the_table_and_exports_keep_their_columns(run_copy):
    edit_programs(run_copy, lambda d: unconfirm_metrics(d["metrics"]))  # a run with one seed
    done = inspect(run_copy, "--csv", run_copy / "table.csv")
    assert done.returncode == 0, done.stderr
    shown = done.stdout.split("Lab notebook")[0]  # the notebook speaks of seeds in its own words
    assert "seeds" not in shown and "confirmed" not in shown
    with (run_copy / "table.csv").open() as f:  # every program paired with the initial one on the run's seed
        paired = ["vs_initial_pct", "vs_initial_seeds", "vs_initial_p"]
        assert next(csv.reader(f)) == [*reporting.TABLE_COLUMNS, "combined_score", "passed", *paired]


def test_unsandboxed_run_puts_its_warning_first_in_every_report(run_copy):
    record = json.loads((run_copy / "run.json").read_text())
    record["sandbox"] = dict(isolation="none", warning="bwrap is not installed: children ran as this user")
    (run_copy / "run.json").write_text(json.dumps(record))
    done = inspect(run_copy, "--html")
    assert done.returncode == 0, done.stderr
    expected = (
        "WARNING: this run's children were not isolated (sandbox isolation: none, not bwrap): "
        "bwrap is not installed: children ran as this user"
    )
    assert done.stdout.splitlines()[0] == expected
    page = (run_copy / "report" / "report.html").read_text()
    assert page.index('<p class="sandbox">') < page.index("<h1>") and expected.replace("'", "&#39;") in page


def test_bwrap_runs_and_runs_that_do_not_say_show_no_sandbox_warning(run_copy):
    record = json.loads((run_copy / "run.json").read_text())
    assert reporting.sandbox_warning(record) is None  # the fixture predates the sandbox record
    assert reporting.sandbox_warning(dict(record, sandbox=dict(isolation="bwrap"))) is None
    assert "not isolated" in reporting.sandbox_warning(dict(record, sandbox=dict(isolation="none")))


def test_llm_responses_are_counted_per_model_and_outcome(run_copy):
    calls = [
        dict(
            iteration=i,
            model=model,
            prompt_chars=9000,
            prompt_tokens=None,
            seconds=seconds,
            outcome=outcome,
            error=None,
            response="...",
        )
        for i, model, seconds, outcome in [
            (1, "qwen", 2.0, "passed"),
            (2, "qwen", 4.0, "no diff"),
            (3, "qwen", 6.0, "passed"),
            (3, "gpt", 1.0, "llm error"),
            (9, "qwen", 100.0, "passed"),
        ]
    ]  # iteration 9: after the checkpoint
    (run_copy / "llm_responses.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls) + '{"torn')
    done = inspect(run_copy, "--html")
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("LLM responses per model")[1]
    assert "4 calls in llm_responses.jsonl, up to iteration 4" in table
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
        for line in table.splitlines()
        if line.startswith("│")
    }
    header = [c.strip() for c in next(line for line in table.splitlines() if line.startswith("┃")).split("┃")[1:-1]]
    assert header == [
        "model",
        "responses",
        "no diff",
        "diff did not apply",
        "llm error",
        "rejected by a check",
        "passed",
        "mean s/response",
    ]
    assert rows["qwen"] == ["3", "1", "0", "0", "0", "2", "4.0"]
    assert rows["gpt"] == ["1", "0", "0", "1", "0", "0", "1.0"]
    assert "LLM responses per model" in (run_copy / "report" / "report.html").read_text()


def test_runs_without_llm_responses_show_no_llm_table(reported):
    run_dir, done = reported
    assert not (run_dir / rundir.LLM_RESPONSES).exists()
    assert "LLM responses" not in done.stdout
    assert "LLM responses" not in (run_dir / "report" / "report.html").read_text()


# ---------------------------------------------------------------------------------------------
# where to look, and what cannot be read


def test_a_checkpoint_folder_can_be_inspected_directly():
    done = inspect(FIXTURE / "checkpoints" / CHECKPOINT)
    assert done.returncode == 0, done.stderr
    assert f"checkpoint {CHECKPOINT}" in done.stdout


def test_an_older_checkpoint_named_shows_the_run_as_it_was_then(run_copy):
    older = run_copy / "checkpoints" / "checkpoint_2"
    shutil.copytree(run_copy / "checkpoints" / CHECKPOINT, older)
    metadata = json.loads((older / "metadata.json").read_text())
    (older / "metadata.json").write_text(json.dumps(dict(metadata, last_iteration=2)))
    view = load_run(older)
    assert sorted(r["iteration"] for r in view.trace) == [1, 2] and view.warnings == []  # checkpoint_4: the rest


def test_without_an_argument_the_newest_run_is_inspected(tmp_path, monkeypatch):
    older, newer = tmp_path / "run-a", tmp_path / "run-b"
    shutil.copytree(FIXTURE, older)
    shutil.copytree(FIXTURE, newer)
    os.utime(older / "run.json", (1_000_000_100, 1_000_000_100))  # rundir.newest_run: run.json written last
    os.utime(newer / "run.json", (1_000_000_200, 1_000_000_200))
    os.utime(older, (1_000_000_300, 1_000_000_300))  # a report written into the older run changes only its folder
    monkeypatch.setattr(rundir, "OUTPUT_ROOT", tmp_path)
    assert resolve_target(None) == (newer, None)
    monkeypatch.setattr(rundir, "OUTPUT_ROOT", tmp_path / "empty")
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
    assert (
        done.stderr.strip()
        == f"warning: skipped checkpoint_5: metadata.json missing (partly written?); using {CHECKPOINT}"
    )
    assert f"checkpoint {CHECKPOINT}" in done.stdout


def corrupt_a_program(run_dir):
    program = next((run_dir / "checkpoints" / CHECKPOINT / "programs").glob("*.json"))
    program.write_text(program.read_text()[:500])


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such folder"),
        ("not a run", "is not a run folder"),
        ("corrupt program", "is not valid JSON"),
        ("corrupt program, checkpoint named", "is not valid JSON"),
        ("a file", "is not a folder"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(case, message, run_copy, tmp_path):
    target = {
        "missing": tmp_path / "nowhere",
        "not a run": tmp_path / "empty",
        "corrupt program": run_copy,
        "corrupt program, checkpoint named": run_copy / "checkpoints" / CHECKPOINT,
        "a file": run_copy / "run.json",
    }[case]
    (tmp_path / "empty").mkdir()
    if case.startswith("corrupt"):
        corrupt_a_program(run_copy)
    done = inspect(target)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert done.stderr.startswith("inspect_run.py: error: ")


# ---------------------------------------------------------------------------------------------
# like with like: each program against the initial program on the seeds both were trained on


def test_each_program_is_set_against_the_initial_program_on_the_seeds_both_were_trained_on(run_copy):
    from plasa_lab.stats import verdict

    confirm(run_copy, {"2cac6f25": 3, "7aae45ed": 3})  # the initial and one child on seeds 42-44; the rest on 42
    view = load_run(run_copy)
    initial, confirmed = view.initial, view.known[next(pid for pid in view.known if pid.startswith("7aae45ed"))]
    one_seed = next(p for p in view.population if p.metrics["seeds"] == 1.0)
    loss = lambda p, seed: p.metrics[f"val_loss_seed{seed}"]

    paired = vs_initial(view, one_seed)
    assert paired.seeds == 1 and paired.p is None  # one seed: no estimate of the noise, no p
    assert math.isclose(paired.change_pct, 100 * math.expm1(loss(one_seed, 42) - loss(initial, 42)))

    paired = vs_initial(view, confirmed)
    mean = sum(loss(confirmed, s) - loss(initial, s) for s in (42, 43, 44)) / 3
    assert paired.seeds == 3 and math.isclose(paired.change_pct, 100 * math.expm1(mean))
    losses = lambda p: {s: loss(p, s) for s in (42, 43, 44)}
    assert paired.p == verdict(losses(confirmed), losses(initial))[1]  # the verdict's paired p


def test_in_a_one_seed_run_every_program_is_set_against_the_initial_program_on_that_seed(run_copy):
    """A run on one seed (make demo's) records no val_loss_seed<N>: each child still pairs with the
    initial program on the run's seed, from its val_loss."""
    edit_programs(run_copy, lambda d: [d["metrics"].pop(k) for k in list(d["metrics"]) if k.startswith("val_loss_s")])
    record = json.loads((run_copy / "run.json").read_text())
    record["settings"]["seeds"] = [42]
    (run_copy / "run.json").write_text(json.dumps(record))
    view = load_run(run_copy)
    child = next(p for p in view.population if p is not view.initial)
    paired = vs_initial(view, child)
    assert paired.seeds == 1 and paired.p is None
    assert math.isclose(
        paired.change_pct, 100 * math.expm1(child.metrics["val_loss"] - view.initial.metrics["val_loss"])
    )


def test_the_table_says_beside_each_paired_change_how_many_seeds_it_rests_on(run_copy):
    records = trace_records(run_copy)  # a child confirmed on 3 seeds, a little better than the initial program
    child = records[0]["child_id"]
    initial = load_run(run_copy).initial.metrics
    better = {f"val_loss_seed{s}": initial[f"val_loss_seed{s}"] - 0.01 - s / 1e4 for s in (42, 43, 44)}
    edit_programs(run_copy, lambda d: d["metrics"].update(better, seeds=3.0, confirmed=1.0) if d["id"] == child else 0)
    done = inspect(run_copy, "--csv", run_copy / "table.csv")
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("Top 5 of 5")[1].split("Lineage")[0]
    header = next(line for line in table.splitlines() if line.startswith("┃") and "val_ppl" in line)
    assert header.index("val_ppl") < header.index("val_loss") < header.index("vs initial (paired)")
    rows = {line.split()[1]: line for line in table.splitlines() if re.match(r"│ [0-9a-f]{8} ", line)}
    assert "reference" in rows["2cac6f25"] and "10.0899" in rows["2cac6f25"]  # val_loss: val_ppl reads 10000.0
    assert re.search(r"-1\.\d\d% \(3 seeds, p=[0-9.e-]+\)", rows[child[:8]])
    assert all(re.search(r"[+-]0\.\d\d% \(1 seed\)", rows[r["child_id"][:8]]) for r in records[1:])
    with (run_copy / "table.csv").open() as f:
        exported = {r["id"][:8]: r for r in csv.DictReader(f)}
    assert exported[child[:8]]["vs_initial_seeds"] == "3" and float(exported[child[:8]]["vs_initial_pct"]) < -1
    assert exported["2cac6f25"]["vs_initial_pct"] == "" and exported["2cac6f25"]["val_loss"].startswith("10.089")


def test_the_plots_show_the_paired_change_or_else_the_uncapped_val_loss_never_the_capped_ppl(run_copy):
    view = load_run(run_copy)
    points = reporting.history(view, True)
    assert {p.iteration: p.seeds for p in points} == {0: 3, 1: 1, 2: 1, 3: 1, 4: 1}
    assert points[0].value == 0.0  # the initial program against itself
    assert points[1].value == vs_initial(view, next(p for p in view.population if p.iteration == 1)).change_pct
    titles = reporting.write_plots(view, run_copy / "report")
    assert "change of val_ppl vs the initial program, % (paired by seed) per iteration" in titles

    # a run without val_loss_seed<N> whose run.json does not name its seeds (an older run): nothing to
    # pair on, so its plots show val_loss, which val_ppl's cap hides
    edit_programs(run_copy, lambda d: unconfirm_metrics(d["metrics"]))
    records = trace_records(run_copy)
    for r in records:
        unconfirm_metrics(r["child_metrics"])
    (run_copy / rundir.TRACE).write_text("".join(json.dumps(r) + "\n" for r in records))
    record = json.loads((run_copy / "run.json").read_text())
    del record["settings"]
    (run_copy / "run.json").write_text(json.dumps(record))
    view = load_run(run_copy)
    assert not reporting.analyse.pairs_by_seed(view)
    points = reporting.history(view, False)
    by_iteration = {r["iteration"]: r["child_metrics"]["val_loss"] for r in records}
    assert [p.value for p in points] == [view.initial.metrics["val_loss"]] + [by_iteration[i] for i in (1, 2, 3, 4)]
    assert all(p.value > math.log(10000) for p in points)  # every val_ppl here reads 10000.0
    titles = reporting.write_plots(view, run_copy / "report")
    assert "val_loss (uncapped) per iteration" in titles


def test_lineage_picture_places_each_program_after_its_parent_and_each_subtree_in_one_band_of_rows(run_copy):
    view = load_run(run_copy)
    layout = reporting.analyse.lineage_layout(view)
    rows = {pid: y for pid, (_, y) in layout.items()}
    assert set(layout) == set(view.known) and sorted(rows.values()) == list(range(len(layout)))
    assert layout[view.initial.id] == (0, 0)

    def subtree(pid):
        return [pid] + [c for child in view.known.values() if child.parent_id == pid for c in subtree(child.id)]

    for pid, (x, y) in layout.items():
        parent = view.known[pid].parent_id
        if parent in layout:
            assert layout[parent][0] < x and layout[parent][1] < y
        band = sorted(rows[c] for c in subtree(pid))
        assert band == list(range(y, y + len(band)))
    written = reporting.write_plots(view, run_copy / "report")
    assert run_copy / "report" / "lineage.png" in written.values()


# ---------------------------------------------------------------------------------------------
# the whole run: failures by rule, each program's story, a child's words kept as text


def test_failures_are_grouped_by_the_rule_that_refused_them_each_reason_counted(run_copy):
    imports = "stage 1: line 40: imports: os may not be imported: use only math, torch, torch.nn"
    fail_children(
        run_copy,
        {"7aae45ed": imports, "b8cb83b2": imports, "8d66d074": "screened out: quick val_loss 10.2 ranks 3 of 3"},
    )
    add_iterations_without_a_child(run_copy, {2: "No valid diffs found in response", 4: "LLM generation failed: 500"})
    groups = reporting.failure_groups(load_run(run_copy))
    assert [(g.rule, g.count) for g in groups] == [("stage 1", 2), ("no child", 2), ("screened out", 1)]
    assert groups[0].reasons == {"line 40: imports: os may not be imported: use only math, torch, torch.nn": [1, 2]}
    assert groups[1].reasons == {"No valid diffs found in response": [2], "LLM generation failed: 500": [4]}
    done = inspect(run_copy)
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("Failures by the rule that refused them (5 in all")[1]
    assert re.search(r"│ stage 1 \(2\) +│ +2 │ line 40: imports: os may not be imported", table)
    assert re.search(r"│ screened out \(1\) +│ +1 │ quick val_loss 10.2 ranks 3 of 3 +│ +3 │", table)


def test_program_option_prints_its_lineage_its_diffs_and_the_prompt_and_response_that_made_it(run_copy):
    log_llm_responses(run_copy)
    view = load_run(run_copy)
    child = next(p for p in view.population if p.generation == 2)  # df2e15c8, a grandchild of the initial program
    parent = view.known[child.parent_id]
    record = next(r for r in trace_records(run_copy) if r["child_id"] == child.id)
    done = inspect(run_copy, "--program", child.id[:5])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{child.short_id} (#") and "vs initial (paired)" in lines[0] and "(1 seed)" in lines[0]
    assert lines[1] == f"made at iteration {child.iteration} from {parent.short_id} by offline-mutator in 0.5 s: passed"
    lineage_rows = [
        line for line in done.stdout.split("Lineage of")[1].splitlines() if re.match(r"│ [0-9a-f]{8}", line)
    ]
    assert [row.split()[1] for row in lineage_rows] == [view.initial.short_id, parent.short_id, child.short_id]
    assert "Diff against its parent, EVOLVE-BLOCKs only: 1 block(s) changed" in done.stdout
    assert f"--- parent {parent.short_id} [k_schedule]" in done.stdout
    assert f"--- initial {view.initial.short_id} [" in done.stdout
    prompt, response = done.stdout.split("--- prompt: user ---")[1].split("--- response ---")
    assert record["prompt"]["user"].strip() in prompt and record["llm_response"].strip() in response
    assert "--- prompt: system ---" in done.stdout


def test_an_unknown_or_ambiguous_program_id_is_one_line_and_exit_1():
    for prefix, message in (("zzzz", "no program 'zzzz' in"), ("", "'' names 5 programs (")):
        done = inspect(FIXTURE, "--program", prefix)
        assert done.returncode == 1 and done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("inspect_run.py: error: ")
        assert message in done.stderr


def test_a_childs_words_are_escaped_on_the_page_and_printed_as_they_are_in_the_terminal(run_copy):
    """A failure line, an LLM response and the notebook carry a child's or an LLM's words: on the page
    they are text (never markup a browser runs), in the terminal plain characters (never rich markup)."""
    words = "<script>alert('x')</script> [/] [bold red]# Task"
    fail_children(run_copy, {"8d66d074": f"stage 1: line 40: imports: {words}"})
    records = trace_records(run_copy)
    for r in records:
        if r["child_id"].startswith("8d66d074"):
            r["llm_response"] = f"Offline mutator: {words}\n<<<<<<< SEARCH"
    (run_copy / rundir.TRACE).write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_copy / "notebook.md").write_text(f"# Lab notebook (what this run has tried)\n\n| 3 | selection | {words} |\n")

    done = inspect(run_copy, "--html")
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"│ stage 1 \(1\) +│ +1 │ line 40: imports: <script>alert\('x'\)</script> \[/\] \[bold red\]# Task", done.stdout
    )
    shown = inspect(run_copy, "--program", "8d66d074")
    assert shown.returncode == 0, shown.stderr
    assert f"failed: stage 1: line 40: imports: {words}" in shown.stdout
    assert f"Offline mutator: {words}" in shown.stdout

    page = (run_copy / "report" / "report.html").read_text()
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; [/] [bold red]# Task"
    assert "<script>alert" not in page and page.count("<script>") == 1  # the page's own image check only
    failures, notebook = section(page, 'id="failures"', "</table>"), section(page, 'id="notebook"', "</pre>")
    program = section(page, 'id="program-8d66d074"', 'id="settings"')  # the last program: the ranking's #5
    assert escaped in failures and escaped in notebook
    assert f"failed: stage 1: line 40: imports: {escaped}" in program and f"Offline mutator: {escaped}" in program


# ---------------------------------------------------------------------------------------------
# following a running run


def test_only_a_page_written_by_watch_reloads_itself(reported, run_copy):
    run_dir, _ = reported
    assert "http-equiv" not in (run_dir / "report" / "report.html").read_text()
    page = reporting.write_html(load_run(run_copy), run_copy / "report", 3, {}, refresh=30).read_text()
    assert '<meta http-equiv="refresh" content="30">' in page and "this page reloads every 30 s" in page


def test_watch_rewrites_the_page_at_each_new_checkpoint_until_ctrl_c_which_exits_0(run_copy):
    import signal
    import time

    page = run_copy / "report" / "report.html"

    def wait_for(text):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if page.exists() and text in page.read_text():
                return
            assert watcher.poll() is None, watcher.communicate()
            time.sleep(0.2)
        pytest.fail(f"the page never showed {text!r}")

    watcher = subprocess.Popen(
        [sys.executable, "scripts/inspect_run.py", str(run_copy), "--watch", "0.5"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(f"checkpoint {CHECKPOINT} (iteration 4 of 4)")
        assert '<meta http-equiv="refresh" content="1">' in page.read_text()
        newer = run_copy / "checkpoints" / "checkpoint_5"  # the run goes on: a checkpoint appears
        shutil.copytree(run_copy / "checkpoints" / CHECKPOINT, newer)
        metadata = json.loads((newer / "metadata.json").read_text())
        (newer / "metadata.json").write_text(json.dumps(dict(metadata, last_iteration=5)))
        wait_for("checkpoint checkpoint_5 (iteration 5 of 4)")
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0 and "Traceback" not in err, err
    assert f"wrote {page} ({CHECKPOINT}, iteration 4)" in out and f"wrote {page} (checkpoint_5, iteration 5)" in out
    assert out.splitlines()[-1] == "stopped watching"
