"""Which search finds a better program? Arms with equal evaluation budgets from the same start,
each arm's best replayed on seeds no run used, through the same judge.

    python scripts/bench_search.py [--profile full] [--iterations 60] [--replay-seeds 101,102,103,104,105]
                                   [--api-base URL [--model NAME]] [--arms offline,offline+screen,...]
                                   [--out openevolve_output/bench-search]

Arms: `offline` (the offline mutator); `offline+screen` (the same with the screening rung: every child
trains on the next cheaper profile first and only the better half go on); with --api-base,
`llm+notebook` and `llm` (the same local or API model with and without the lab notebook in its
prompts); --arms picks some of them. Every arm is one noise-aware run
(scripts/evolve.py, seeds 42,43,44) of the same number of iterations with its own ledger; as each
arm's run ends, its best (OpenEvolve's, which a noise-aware run only lets a confirmed program be) and
the initial program are replayed on the replay seeds and its row is written, so each arm's result
can be committed as it comes. The change against the initial program is paired by seed (every
program trains from the same trunk initialisation and batches on a seed) and tested with a paired t-test.
Resumable: a run resumes from its last checkpoint, a replay from its ledger. To cut a benchmark short,
stop it and run it again with --iterations at the children its arms have done: each arm's best so far
(its newest checkpoint's) is replayed, and the table says how many children it had. Writes
OUT/bench_search.md and .json; ends with `best_beyond_noise: ARM -X.X% p=P` or `best_beyond_noise: none`.
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT
from plasa_lab.cli import evolve, fail
from plasa_lab.evaluation.ledger import Ledger, code_key
from plasa_lab.replay import Candidate, Plan, run_plan
from plasa_lab.rundir import latest_checkpoint, read_run_record
from plasa_lab.stats import ALPHA, paired_change, seed_losses, shrinkage
from plasa_lab.util import atomic_write

CHEAPER_PROFILE = {"full": "quick", "quick": "smoke"}  # the screen of a screened arm


def arms(args) -> dict[str, list[str]]:
    """Every arm this benchmark can run with these arguments: its name and its evolve.py arguments."""
    out = {"offline": ["--llm", "offline"]}
    if args.profile in CHEAPER_PROFILE:
        out["offline+screen"] = ["--llm", "offline", "--screen", CHEAPER_PROFILE[args.profile]]
    if args.api_base:
        llm = ["--llm", "local", "--api-base", args.api_base, *(["--model", args.model] if args.model else [])]
        out["llm+notebook"] = llm
        out["llm"] = [*llm, "--no-notebook"]
    return out


def arm_best(run_dir: Path) -> tuple[Path, dict, int]:
    """(program file, metrics, children evaluated) of a run's best, from its newest checkpoint: what a
    finished run ends with, and what a run stopped early has found so far."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        fail(f"{run_dir}: no checkpoint to take the best program from")
    path, done = checkpoint
    info = json.loads((path / "best_program_info.json").read_text())
    return path / "best_program.py", info["metrics"], done


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile", default="full", choices=["full", "quick", "smoke"], help="the arms' profile (default full)"
    )
    parser.add_argument("--iterations", type=int, default=60, help="children per arm (default 60)")
    parser.add_argument(
        "--replay-seeds",
        default="101,102,103,104,105",
        help="seeds no run used, on which the bests are replayed, comma-separated (default 101,102,103,104,105)",
    )
    parser.add_argument("--api-base", help="an OpenAI-compatible server: adds the LLM arms")
    parser.add_argument("--model", help="the model name to ask the server for")
    parser.add_argument("--arms", help="comma-separated arms to run (default: every arm the arguments allow)")
    parser.add_argument(
        "--out",
        type=Path,
        default=PROJECT_ROOT / "openevolve_output" / "bench-search",
        help="the arms' runs and ledgers, the replay and the report (default: openevolve_output/bench-search)",
    )
    args = parser.parse_args(argv)
    try:
        replay_seeds = [int(s) for s in args.replay_seeds.split(",")]
    except ValueError:
        parser.error(f"--replay-seeds must be integers separated by commas, got {args.replay_seeds!r}")
    if args.iterations < 1 or len(replay_seeds) < 2 or set(replay_seeds) & {42, 43, 44}:
        parser.error("--iterations must be at least 1, --replay-seeds at least 2 seeds none of 42, 43, 44")
    available = arms(args)
    chosen = list(available) if args.arms is None else args.arms.split(",")
    unknown = [a for a in chosen if a not in available]
    if unknown or not chosen:
        parser.error(f"--arms: {', '.join(unknown) or 'none given'}: choose from {', '.join(available)}")
    args.out.mkdir(parents=True, exist_ok=True)

    initial = Candidate("initial", "initial", INITIAL_PROGRAM.read_text(), "initial_program.py")
    rows = rows_written_before(args, replay_seeds, chosen)  # arms run earlier into OUT keep their rows
    for arm in chosen:  # each arm's row is written as soon as its run and replay are done
        run = run_arm(args, arm, available[arm])
        best = Candidate(arm, "program", run["program"].read_text(), str(run["program"]))
        plan = Plan([initial, best], replay_seeds, args.profile, None, args.out / "replay-ledger.sqlite", args.out, arm)
        results = run_plan(plan)  # the initial program's seeds come from the ledger after the first arm
        by_seed = {c.name: {r.seed: r.val_loss for r in results[c.name] if r.passed} for c in (initial, best)}
        rows.append(arm_row(arm, run, by_seed[arm], by_seed["initial"], code_key(best.code) == code_key(initial.code)))
        lines, last = write_table(args, replay_seeds, rows)
        print(f"{arm}: done; the table so far is in {args.out / 'bench_search.md'}", file=sys.stderr, flush=True)
    print("\n".join(lines))
    print(last)


def run_arm(args, arm: str, evolve_args: list[str]) -> dict:
    """One arm's run (resumed if it exists) and what its ledger and run.json say of it."""
    run_dir = evolve(args.out / arm, args.profile, args.iterations, "42,43,44", evolve_args)
    program, claim, children = arm_best(run_dir)
    evaluations = Ledger(run_dir / "ledger.sqlite").rows()
    record = read_run_record(run_dir) or {}
    floor, confirmation = record.get("noise_floor") or {}, record.get("confirmation") or {}
    return dict(
        program=program,
        initial_on_run_seeds=dict(zip(floor.get("seeds", []), floor.get("val_losses", []))),
        trainings_per_gain=confirmation.get("trainings_per_confirmed_gain"),
        claim=claim,
        trainings=sum(1 for r in evaluations if r["stage"] == 2 and r["profile"] == args.profile),
        screens=sum(1 for r in evaluations if r["stage"] == 2 and r["profile"] != args.profile),
        hours=sum(r["seconds"] for r in evaluations) / 3600,  # what the arm's evaluations cost, every stage
        children=children,
        busy=run_busy_shares(record),
    )


def run_busy_shares(record: dict) -> dict:
    """Each resource's busy share over the run's sessions (weighted by their wall time), from run.json's
    time_accounting: the evaluation slots and the LLM (None: no session recorded it). In a run with LLM
    calls, from each session's first proposal on (a session stopped before its first has none): before
    it the LLM check and the initial program's seeds keep the LLM idle by design."""
    shares, weights = {"evaluation_slots": 0.0, "llm": 0.0}, 0.0
    sessions = [t for t in record.get("time_accounting") or [] if isinstance(t, dict)]
    llm_run = any(t.get("busy_after_first_proposal") for t in sessions)
    for t in sessions:
        after = t.get("busy_after_first_proposal")
        busy, wall = (
            (after, t.get("seconds_after_first_proposal")) if llm_run else (t.get("busy"), t.get("wall_seconds"))
        )
        if isinstance(busy, dict) and wall:
            weights += wall
            for resource in shares:
                shares[resource] += busy.get(resource, 0) * wall
    return {resource: share / weights if weights else None for resource, share in shares.items()}


def arm_row(arm: str, run: dict, replayed: dict, initial: dict, best_is_initial: bool) -> dict:
    """An arm's row: its best's claimed change (the run's seeds) and replayed change (unseen seeds), paired."""
    change, p, n = paired_change(replayed, initial)
    claimed, _, _ = paired_change(seed_losses(run["claim"]), run["initial_on_run_seeds"])
    claimed_pct, replayed_pct = 100 * math.expm1(claimed), 100 * math.expm1(change)
    return dict(
        arm=arm,
        children=run["children"],
        stage2_trainings=run["trainings"],
        screens=run["screens"],
        evaluation_hours=run["hours"],
        best_is_initial=best_is_initial,
        claimed_val_ppl=math.exp(run["claim"]["val_loss"]),
        replayed_val_ppl=math.exp(statistics.fmean(replayed.values())) if replayed else math.nan,
        claimed_change_pct=claimed_pct,
        change_vs_initial_pct=replayed_pct,
        shrinkage=shrinkage(claimed_pct, replayed_pct),
        p_vs_initial=p,
        seeds=n,
        trainings_per_confirmed_gain=run["trainings_per_gain"],
        slots_busy=run["busy"]["evaluation_slots"],
        llm_busy=run["busy"]["llm"],
    )


def rows_written_before(args, replay_seeds: list[int], chosen: list[str]) -> list[dict]:
    """The rows OUT/bench_search.json holds for arms not run now, when it was written for the same
    profile, children and replay seeds: a benchmark run one arm at a time builds one table."""
    try:
        before = json.loads((args.out / "bench_search.json").read_text())
    except (OSError, ValueError):
        return []
    written_for = (before.get("profile"), before.get("iterations"), before.get("replay_seeds"))
    if written_for != (args.profile, args.iterations, replay_seeds):
        return []
    return [r for r in before.get("arms", []) if r.get("arm") not in chosen]


def write_table(args, replay_seeds: list[int], rows: list[dict]) -> tuple[list[str], str]:
    """OUT/bench_search.md and .json for the arms done so far: (the table's lines, the last line)."""
    lines = [
        f"# Search benchmark ({args.profile} profile, {args.iterations} children an arm)",
        "",
        f"Each arm's best replayed on seeds {', '.join(map(str, replay_seeds))} (no run used them); change of "
        "val_ppl against the initial program paired by seed, paired t-test. Claimed: the same change on the run's "
        "seeds, where the search selected it; the winner's curse is the share of the claim the unseen seeds take "
        f"back. Stage-2 trainings on the {args.profile} profile (per confirmed gain: per program the run confirmed "
        "better than the initial one beyond noise); screens on the cheaper one; evaluation hours summed over the "
        "arm's ledger; busy: the share of the run's wall time (from the first proposal on, in an LLM run) the "
        "evaluation slots trained and the LLM had a call in flight.",
        "",
        "| arm | children | stage-2 trainings | per confirmed gain | screens | evaluation h | slots busy "
        "| LLM busy | claimed val_ppl | replayed val_ppl | claimed vs initial | replayed vs initial "
        "| winner's curse | p | seeds |",
        "|---" * 15 + "|",
    ]
    share = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    for r in rows:
        p = "-" if r["p_vs_initial"] is None else f"{r['p_vs_initial']:.3g}"
        curse = "-" if r["shrinkage"] is None else f"{r['shrinkage']:.0%}"
        per_gain = r["trainings_per_confirmed_gain"] or "-"
        lines.append(
            f"| {r['arm']}{' (= initial)' * r['best_is_initial']} | {r['children']} | {r['stage2_trainings']} | "
            f"{per_gain} | {r['screens']} | {r['evaluation_hours']:.2f} | {share(r['slots_busy'])} | "
            f"{share(r['llm_busy'])} | {r['claimed_val_ppl']:.2f} | {r['replayed_val_ppl']:.2f} | "
            f"{r['claimed_change_pct']:+.2f}% | {r['change_vs_initial_pct']:+.2f}% | {curse} | {p} | {r['seeds']} |"
        )
    winners = [
        r
        for r in rows
        if r["p_vs_initial"] is not None and r["p_vs_initial"] < ALPHA and r["change_vs_initial_pct"] < 0
    ]
    best = min(winners, key=lambda r: r["change_vs_initial_pct"]) if winners else None
    last = "best_beyond_noise: none"
    if best:
        last = f"best_beyond_noise: {best['arm']} {best['change_vs_initial_pct']:+.1f}% p={best['p_vs_initial']:.3g}"
    summary = dict(profile=args.profile, iterations=args.iterations, replay_seeds=replay_seeds, arms=rows)
    atomic_write(args.out / "bench_search.json", json.dumps(summary, indent=2, default=str))
    atomic_write(args.out / "bench_search.md", "\n".join(lines + ["", last]) + "\n")
    return lines, last


if __name__ == "__main__":
    main()
