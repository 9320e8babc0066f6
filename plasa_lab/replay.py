"""Replay: re-evaluate the top programs of a run (or program files) over several seeds, next to the
initial program, and say which differences are beyond seed noise.

Every evaluation goes through the same sandboxed pipeline as the search (evaluation.fitness.evaluate_code,
stage 1 then stage 2) and through the ledger, so an interrupted replay resumes where it stopped,
and the seeds a run already trained (42) are not trained again.

The verdict rule (VERDICT_RULE) compares each program's val_loss (log perplexity) with the initial
program's on the seeds both were trained on: a paired t-test, two-sided, alpha 0.05 (Welch's t-test
only where the seeds differ; plasa_lab.stats). Beside it, the winner's curse: a run program's
change on the seeds it was selected on (claimed) and on the replay's seeds the run never used.
`--ablate` adds each edit of a program alone (its changed blocks one at a time in the initial
program); `--steps N` trains every candidate longer (profile NAME@N).
"""

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import INITIAL_PROGRAM, rundir
from .contract import PPL_CAP, get_profile
from .evaluation.fitness import evaluate_code
from .evaluation.ledger import code_sha256
from .evaluation.parallel import in_slots
from .evaluation.stage import describe_validation
from .program.blocks import SCHEDULE_RULES, BlockError, changed_blocks, with_blocks_of, with_schedule
from .reporting import ReportError, load_run, sandbox_warning
from .settings import Settings
from .stats import ALPHA, VERDICTS, mean_sd, paired_change, seed_losses, shrinkage, verdict
from .util import atomic_write

DEFAULT_SEEDS = (42, 43, 44)
BASELINES = ("DENSE", "UNIFORM")  # named schedules (program.blocks.SCHEDULE_RULES) with one k in every layer
VERDICT_RULE = (
    f"A paired t-test (two-sided) on val_loss = log(val_ppl), each program against the initial program on the "
    f"seeds both were trained on (every program trains on a seed from the same initialisation, batches and dropout "
    f"masks, so the seed's share of the noise cancels); Welch's t-test where their seeds differ. p < {ALPHA} and a "
    f"lower mean loss -> `better beyond noise`; p < {ALPHA} and a higher mean loss -> `worse beyond noise`; "
    f"otherwise `within noise`, and also with fewer than 2 seeds or no variance (no estimate of the noise). The "
    f"change is exp(mean paired difference of val_loss) - 1. A failed evaluation counts as val_ppl "
    f"{PPL_CAP:.0f} (val_loss log {PPL_CAP:.0f}) and is flagged; a program that failed on any seed is never "
    f"called better."
)
REPLAYS_ROOT = rundir.OUTPUT_ROOT / "replays"  # ledger and report of replays of program files


class ReplayError(Exception):
    """Why a replay cannot start; one line."""


@dataclass
class Candidate:
    name: str  # what the tables call it
    kind: str  # initial | baseline | program
    code: str
    source: str  # where it came from: a run program (id, iteration) or a file
    uniform: bool = False  # a uniform-k baseline: evaluated with allow_uniform_schedule
    claimed: dict[int, float] | None = None  # a run program's val_loss on the seeds the run selected it on


@dataclass
class SeedRun:
    seed: int
    val_ppl: float
    val_loss: float
    val_acc: float
    passed: bool
    failure: str | None
    from_ledger: bool
    seconds: float


@dataclass
class Plan:
    candidates: list[Candidate]  # the initial program first
    seeds: list[int]
    profile: str
    corpus: str | None
    ledger: Path
    out_dir: Path
    title: str
    notes: list[str] = field(default_factory=list)
    whole_validation: bool = False  # validate on the whole split instead of the profile's first windows
    sandbox_warning: str | None = None  # the run's children were not isolated: every report says so first


# ---------------------------------------------------------------------------------------------
# What to replay


def schedule_variant(code: str, schedule: str) -> str:
    """The initial program with the same k in every layer (DENSE: every key; UNIFORM: half): a baseline."""
    try:
        return with_schedule(code, schedule)
    except BlockError as e:
        raise ReplayError(f"cannot make the {schedule} baseline: {e}") from None


def reference_candidates(initial_code: str, source: str, baselines: bool) -> list[Candidate]:
    refs = [Candidate("initial", "initial", initial_code, source)]
    if baselines:
        refs += [
            Candidate(
                s,
                "baseline",
                schedule_variant(initial_code, s),
                f"initial program with k = {SCHEDULE_RULES[s]} in every layer",
                uniform=True,
            )
            for s in BASELINES
        ]
    return refs


def plan_replay(
    targets: list,
    top: int = 3,
    seeds=DEFAULT_SEEDS,
    baselines: bool = False,
    profile: str | None = None,
    ledger=None,
    out_dir=None,
    whole_validation: bool = False,
    steps: int | None = None,
    ablate: bool = False,
) -> Plan:
    """A run folder (default: the newest run), or program files: what to evaluate, where to record it.
    `steps`: every candidate trains that many steps (the profile NAME@STEPS); `ablate`: each program's
    changed blocks also alone in the initial program."""
    targets = [Path(t) for t in targets or []]
    for t in targets:
        if not t.exists():
            raise ReplayError(f"no such file or folder: {t}")
    folders = [t for t in targets if t.is_dir()]
    if folders and (len(targets) > 1):
        raise ReplayError("give one run folder, or program files, not both or several folders")
    if top < 1:
        raise ReplayError(f"--top must be at least 1, got {top}")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ReplayError("give at least one seed")
    if steps is not None and steps < 1:
        raise ReplayError(f"--steps must be at least 1, got {steps}")
    if profile is not None:
        get_profile(profile)  # an unknown name fails here, before any training
    if not targets or folders:
        run_dir = folders[0] if folders else None
        plan = _plan_run_replay(run_dir, top, seeds, baselines, profile, ledger, out_dir, whole_validation)
    else:
        plan = _plan_file_replay(targets, seeds, baselines, profile, ledger, out_dir, whole_validation)
    if steps is not None:
        base = plan.profile.partition("@")[0]
        plan.notes.append(
            f"every candidate trained {steps} steps (the {base} profile trains {get_profile(base).steps}): "
            "claimed changes are the run's, at its own budget"
        )
        plan.profile = f"{base}@{steps}"
    if ablate:
        plan.candidates += ablations(plan.candidates)
    return plan


def ablations(candidates: list[Candidate]) -> list[Candidate]:
    """For each program that changed two or more blocks of the initial program: the initial program
    with one of its changed blocks at a time, so the replay says which edit carries a gain."""
    initial = candidates[0].code
    out = []
    for c in [c for c in candidates if c.kind == "program"]:
        try:
            changed = changed_blocks(initial, c.code)
        except BlockError:  # blocks renamed or added: no block-by-block ablation
            continue
        if len(changed) > 1:
            alone = lambda b, c=c: with_blocks_of(initial, c.code, [b])
            out += [Candidate(f"{c.name}:{b}", "ablation", alone(b), f"{c.name}'s {b} block alone") for b in changed]
    return out


def _default_profile(name: str | None) -> str:
    return Settings(profile=name).profile  # None: $PLASA_PROFILE, else full


def _plan_run_replay(run_dir: Path | None, top, seeds, baselines, profile, ledger, out_dir, whole_validation) -> Plan:
    """A run's top passing programs (other than the references), next to its own initial program."""
    try:
        view = load_run(run_dir)
    except ReportError as e:
        raise ReplayError(str(e)) from None
    record = view.record
    initial = view.initial
    initial_code = initial.code if initial else INITIAL_PROGRAM.read_text()
    refs = reference_candidates(
        initial_code, "the run's initial program" if initial else str(INITIAL_PROGRAM), baselines
    )
    refs[0].claimed = seed_losses(initial.metrics) or None if initial else None
    programs, seen = [], {code_sha256(c.code) for c in refs}
    for p in view.population:
        if len(programs) == top:
            break
        if p.passed and code_sha256(p.code) not in seen:
            seen.add(code_sha256(p.code))
            programs.append(
                Candidate(
                    p.short_id,
                    "program",
                    p.code,
                    f"run program {p.id} (iteration {p.iteration}, val_ppl {p.val_ppl:.1f} on its run seeds)",
                    claimed=seed_losses(p.metrics) or None,
                )
            )
    notes = list(view.warnings)
    if not programs:
        notes.append("the run has no passing program other than the initial one: only the references are replayed")
    run_profile = (record.get("profile") or {}).get("name")
    if profile and run_profile and profile != run_profile:
        notes.append(f"profile {profile} differs from the run's ({run_profile}): the run's own numbers do not compare")
    return Plan(
        refs + programs,
        seeds,
        _default_profile(profile or run_profile),
        (record.get("corpus") or {}).get("corpus"),
        Path(ledger) if ledger else _run_ledger(view.run_dir, record),
        Path(out_dir) if out_dir else view.run_dir / rundir.REPORT,
        f"run {view.run_dir}",
        notes,
        whole_validation,
        sandbox_warning(record),
    )


def _plan_file_replay(targets: list[Path], seeds, baselines, profile, ledger, out_dir, whole_validation) -> Plan:
    """Program files, next to this checkout's initial program; a file that is a reference is replayed once."""
    programs = []
    for t in targets:
        try:
            code = t.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ReplayError(f"cannot read the program {t}: {getattr(e, 'strerror', None) or e}") from None
        programs.append(Candidate(t.name, "program", code, str(t)))
    refs = reference_candidates(INITIAL_PROGRAM.read_text(), str(INITIAL_PROGRAM), baselines)
    seen = {code_sha256(c.code) for c in refs}
    notes = [
        f"{p.source} is the initial program (or a baseline) itself: replayed once, as the reference"
        for p in programs
        if code_sha256(p.code) in seen
    ]
    programs = [p for p in programs if code_sha256(p.code) not in seen]
    names = [c.name for c in refs]
    for p in programs:  # two files of the same name in different folders: tell them apart
        if p.name in names:
            p.name = f"{p.name}#{sum(n.split('#')[0] == p.name for n in names) + 1}"
        names.append(p.name)
    return Plan(
        refs + programs,
        seeds,
        _default_profile(profile),
        None,
        Path(ledger) if ledger else REPLAYS_ROOT / rundir.LEDGER,
        Path(out_dir) if out_dir else REPLAYS_ROOT / rundir.REPORT,
        "program files",
        notes,
        whole_validation,
    )


def _run_ledger(run_dir: Path, record: dict) -> Path:
    """The run's own ledger if it has one, else the (shared) ledger run.json names if it exists."""
    own = run_dir / rundir.LEDGER
    named = Path(record["ledger"]) if record.get("ledger") else None
    if not own.exists() and named is not None and named.exists():
        return named
    return own


# ---------------------------------------------------------------------------------------------
# Evaluating


def run_plan(plan: Plan, console=None, evaluate=evaluate_code) -> dict[str, list[SeedRun]]:
    """Evaluate every candidate on every seed (ledger first), up to this machine's evaluation slots at
    once, with a progress bar and an ETA; lines and results in candidate, then seed, order.
    `evaluate`: evaluate_code's signature (a test's stand-in)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    jobs = [(c, s) for c in plan.candidates for s in plan.seeds]
    slots = Settings(profile=plan.profile, corpus=plan.corpus).parallel
    results = {c.name: [] for c in plan.candidates}
    trained = []  # seconds of the evaluations that actually ran (not from the ledger): the ETA's basis
    columns = (
        TextColumn("[bold]replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("", total=len(jobs), eta="ETA ?")

        def evaluate_one(job) -> SeedRun:  # on a slot's thread
            candidate, seed = job
            label = f"{candidate.name} seed {seed}"
            bar.update(task, description=label)
            settings = Settings(
                profile=plan.profile,
                seed=seed,
                corpus=plan.corpus,
                ledger=str(plan.ledger),
                allow_uniform_schedule=candidate.uniform,
                whole_validation=plan.whole_validation,
                screen="none",  # a replay trains every candidate on its full budget
            )
            start = time.monotonic()
            evaluation = evaluate(
                candidate.code,
                "all",
                settings,
                on_line=lambda line: bar.update(task, description=f"{label}: {line.strip()[:60]}"),
            )
            m = evaluation.metrics
            return SeedRun(
                seed,
                m["val_ppl"],
                m["val_loss"],
                m["val_acc"],
                evaluation.passed,
                evaluation.artifacts.get("failure"),
                evaluation.from_ledger,
                round(time.monotonic() - start, 1),
            )

        def show(job, run: SeedRun):  # on this thread, in the jobs' order
            candidate, seed = job
            if not run.from_ledger:
                trained.append(run.seconds)
            results[candidate.name].append(run)
            outcome = f"val_ppl {run.val_ppl:.1f}" if run.passed else f"FAILED ({run.failure})"
            bar.console.print(
                f"{candidate.name} seed {seed}: {outcome} "
                f"({'from the ledger' if run.from_ledger else f'trained in {run.seconds:.0f} s'})",
                highlight=False,
            )
            remaining = len(jobs) - sum(map(len, results.values()))
            eta = f"ETA {statistics.mean(trained) * remaining / slots / 60:.1f} min" if trained else "ETA ?"
            bar.update(task, completed=len(jobs) - remaining, eta=eta if remaining else "")

        in_slots(evaluate_one, jobs, slots, show)
    return results


# ---------------------------------------------------------------------------------------------
# Judging


def summarise(plan: Plan, results: dict[str, list[SeedRun]]) -> dict:
    """Everything replay.json holds: the set-up, the rule, and one entry per program."""
    initial = plan.candidates[0]
    reference = {r.seed: r.val_loss for r in results[initial.name]}
    entries = []
    for c in plan.candidates:
        runs = results[c.name]
        ppl_mean, ppl_sd = mean_sd([r.val_ppl for r in runs])
        acc_mean, acc_sd = mean_sd([r.val_acc for r in runs])
        failed = [r for r in runs if not r.passed]
        losses = {r.seed: r.val_loss for r in runs}
        word, p, test = verdict(losses, reference)
        if failed and word == "better beyond noise":
            word = "within noise"
        change, _, n = paired_change(losses, reference)
        entries.append(
            dict(
                name=c.name,
                kind=c.kind,
                source=c.source,
                code_sha256=code_sha256(c.code),
                uniform_schedule=c.uniform,
                val_ppl_mean=ppl_mean,
                val_ppl_sd=ppl_sd,
                val_acc_mean=acc_mean,
                val_acc_sd=acc_sd,
                val_loss_mean=statistics.mean(losses.values()),
                change_vs_initial_pct=100 * math.expm1(change) if n else None,
                paired_seeds=n,
                p_value=p,
                test=test,
                verdict=word,
                failed_seeds=[r.seed for r in failed],
                runs=[asdict(r) for r in runs],
                **winners_curse(c, initial, losses, reference),
            )
        )
    extra = dict(sandbox_warning=plan.sandbox_warning) if plan.sandbox_warning else {}
    return dict(
        title=plan.title,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        profile=plan.profile,
        seeds=plan.seeds,
        corpus=plan.corpus,
        ledger=str(plan.ledger),
        validation=describe_validation(get_profile(plan.profile), plan.whole_validation),
        reference="initial",
        rule=VERDICT_RULE,
        alpha=ALPHA,
        verdicts=list(VERDICTS),
        notes=plan.notes,
        programs=entries,
        **extra,
    )


def winners_curse(c: Candidate, initial: Candidate, losses: dict, reference: dict) -> dict:
    """A run program's change against the initial program on the seeds the run selected it on
    (claimed), beside its change on the replay's seeds the run never trained it on (unseen), and
    the share of the claim those seeds take back. Empty for what the run did not select."""
    if c.kind != "program" or not c.claimed or not initial.claimed:
        return {}
    claimed, _, claimed_n = paired_change(c.claimed, initial.claimed)
    unseen = {s: v for s, v in losses.items() if s not in c.claimed}
    change, p, n = paired_change(unseen, reference)
    claimed_pct = 100 * math.expm1(claimed)
    unseen_pct = 100 * math.expm1(change) if n else None
    return dict(
        claimed_change_pct=claimed_pct,
        claimed_seeds=claimed_n,
        unseen_change_pct=unseen_pct,
        unseen_seeds=n,
        unseen_p=p,
        shrinkage=shrinkage(claimed_pct, unseen_pct) if unseen_pct is not None else None,
    )


def _pm(mean, sd, digits):
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for e in summary["programs"]:
        reference = e["kind"] == "initial"
        curse = e.get("shrinkage")
        rows.append(
            [
                e["name"],
                e["kind"],
                str(len(e["runs"])),
                _pm(e["val_ppl_mean"], e["val_ppl_sd"], 1),
                _pm(e["val_acc_mean"], e["val_acc_sd"], 4),
                "reference" if reference else _pct(e["change_vs_initial_pct"]),
                "-" if e["p_value"] is None or reference else f"{e['p_value']:.3g} ({e['test'].split()[0]})",
                e["verdict"] + (" (reference)" if reference else ""),
                _pct(e.get("claimed_change_pct")),
                _pct(e.get("unseen_change_pct")) + (f" ({e['unseen_seeds']} seeds)" if e.get("unseen_seeds") else ""),
                "-" if curse is None else f"{curse:.0%}",
                ", ".join(map(str, e["failed_seeds"])) or "-",
            ]
        )
    return rows


COLUMNS = (
    "program",
    "kind",
    "seeds",
    "val_ppl mean ± sd",
    "val_acc mean ± sd",
    "change vs initial (paired)",
    "p (test)",
    "verdict",
    "claimed (run seeds)",
    "on unseen seeds",
    "winner's curse",
    "failed seeds",
)


def write_reports(summary: dict, out_dir: Path) -> tuple[Path, Path]:
    """replay.json (everything) and replay.md (the table, the rule, the failures) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "replay.json", out_dir / "replay.md"
    atomic_write(json_path, json.dumps(summary, indent=2))
    lines = [f"# Replay: {summary['title']}", ""]
    if summary.get("sandbox_warning"):
        lines += [f"> **{summary['sandbox_warning']}**", ""]
    lines += [
        f"Profile `{summary['profile']}`, seeds {', '.join(map(str, summary['seeds']))}, corpus "
        f"`{summary['corpus'] or 'default'}`, validated on {summary['validation']}, ledger `{summary['ledger']}`; "
        f"{summary['created']}.",
        "",
        f"**Rule.** {summary['rule']}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table_rows(summary)]
    lines += ["", "## Programs", ""]
    lines += [f"- `{e['name']}`: {e['source']} (code sha256 {e['code_sha256'][:12]})" for e in summary["programs"]]
    failures = [(e["name"], r) for e in summary["programs"] for r in e["runs"] if not r["passed"]]
    if failures:
        lines += ["", "## Failed evaluations (counted as val_ppl 10000)", ""]
        lines += [f"- `{name}` seed {r['seed']}: {r['failure']}" for name, r in failures]
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
    atomic_write(md_path, "\n".join(lines) + "\n")
    return md_path, json_path


def print_table(summary: dict, console=None):
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 160)
    if summary.get("sandbox_warning"):
        console.print(summary["sandbox_warning"], style="bold red", highlight=False)
    table = Table(
        title=f"Replay of {summary['title']}: profile {summary['profile']}, seeds "
        f"{', '.join(map(str, summary['seeds']))}, validated on {summary['validation']}",
        title_justify="left",
    )
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("program", "kind", "verdict") else "right")
    for row in table_rows(summary):
        table.add_row(*row)
    console.print(table)
    console.print(f"Rule: {summary['rule']}", highlight=False)
    for note in summary["notes"]:
        print(note, file=sys.stderr)
