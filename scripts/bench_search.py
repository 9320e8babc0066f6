"""Which search finds a better program? Arms with equal evaluation budgets from the same start,
each arm's best replayed on seeds no run used, through the same judge.

    python scripts/bench_search.py [--profile full] [--iterations 60] [--replay-seeds 101,102,103,104,105]
                                   [--api-base URL [--model NAME]] [--arms offline,offline+screen,...]
                                   [--out openevolve_output/bench-search]

Arms: `offline` (the offline mutator); `offline+screen` (the same with the screening rung: every child
trains on the next cheaper profile first and only the better half go on); with --api-base,
`llm+notebook` and `llm` (the same local or API model with and without the lab notebook in its
prompts); --arms picks some of them. Every arm is one noise-aware run
(scripts/evolve.py, seeds 42,43,44) of the same number of iterations with its own ledger; each arm's
best (OpenEvolve's, which a noise-aware run only lets a confirmed program be) and the initial program
are then replayed on the replay seeds. The change against the initial program is paired by seed (every
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


def main(argv=None):  # long: the arms, the replay and the table, read top to bottom
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

    initial = INITIAL_PROGRAM.read_text()
    candidates, runs = [Candidate("initial", "initial", initial, "initial_program.py")], {}
    for arm in chosen:
        run_dir = evolve(args.out / arm, args.profile, args.iterations, "42,43,44", available[arm])
        program, claim, children = arm_best(run_dir)
        evaluations = Ledger(run_dir / "ledger.sqlite").rows()
        floor = (read_run_record(run_dir) or {}).get("noise_floor") or {}
        confirmation = (read_run_record(run_dir) or {}).get("confirmation") or {}
        runs[arm] = dict(
            initial_on_run_seeds=dict(zip(floor.get("seeds", []), floor.get("val_losses", []))),
            trainings_per_gain=confirmation.get("trainings_per_confirmed_gain"),
            run_dir=run_dir,
            claim=claim,
            trainings=sum(1 for r in evaluations if r["stage"] == 2 and r["profile"] == args.profile),
            screens=sum(1 for r in evaluations if r["stage"] == 2 and r["profile"] != args.profile),
            hours=sum(r["seconds"] for r in evaluations) / 3600,  # what the arm's evaluations cost, every stage
            children=children,
        )
        candidates.append(Candidate(arm, "program", program.read_text(), str(program)))
    plan = Plan(candidates, replay_seeds, args.profile, None, args.out / "replay-ledger.sqlite", args.out, "search")
    results = run_plan(plan)
    by_seed = {c.name: {r.seed: r.val_loss for r in results[c.name] if r.passed} for c in candidates}

    rows = []
    for arm, run in runs.items():
        change, p, n = paired_change(by_seed[arm], by_seed["initial"])
        replayed = statistics.fmean(by_seed[arm].values()) if by_seed[arm] else math.nan
        claimed, _, _ = paired_change(seed_losses(run["claim"]), run["initial_on_run_seeds"])
        claimed_pct, replayed_pct = 100 * math.expm1(claimed), 100 * math.expm1(change)
        rows.append(
            dict(
                arm=arm,
                children=run["children"],
                stage2_trainings=run["trainings"],
                screens=run["screens"],
                evaluation_hours=run["hours"],
                best_is_initial=code_key(next(c.code for c in candidates if c.name == arm)) == code_key(initial),
                claimed_val_ppl=math.exp(run["claim"]["val_loss"]),
                replayed_val_ppl=math.exp(replayed),
                claimed_change_pct=claimed_pct,
                change_vs_initial_pct=replayed_pct,
                shrinkage=shrinkage(claimed_pct, replayed_pct),
                p_vs_initial=p,
                seeds=n,
                trainings_per_confirmed_gain=run["trainings_per_gain"],
            )
        )
    lines = [
        f"# Search benchmark ({args.profile} profile, {args.iterations} children an arm)",
        "",
        f"Each arm's best replayed on seeds {', '.join(map(str, replay_seeds))} (no run used them); change of "
        "val_ppl against the initial program paired by seed, paired t-test. Claimed: the same change on the run's "
        "seeds, where the search selected it; the winner's curse is the share of the claim the unseen seeds take "
        f"back. Stage-2 trainings on the {args.profile} profile (per confirmed gain: per program the run confirmed "
        "better than the initial one beyond noise); screens on the cheaper one; evaluation hours summed over the "
        "arm's ledger.",
        "",
        "| arm | children | stage-2 trainings | per confirmed gain | screens | evaluation h | claimed val_ppl "
        "| replayed val_ppl | claimed vs initial | replayed vs initial | winner's curse | p | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = "-" if r["p_vs_initial"] is None else f"{r['p_vs_initial']:.3g}"
        curse = "-" if r["shrinkage"] is None else f"{r['shrinkage']:.0%}"
        per_gain = r["trainings_per_confirmed_gain"] or "-"
        lines.append(
            f"| {r['arm']}{' (= initial)' * r['best_is_initial']} | {r['children']} | {r['stage2_trainings']} | "
            f"{per_gain} | {r['screens']} | {r['evaluation_hours']:.2f} | {r['claimed_val_ppl']:.2f} | "
            f"{r['replayed_val_ppl']:.2f} | {r['claimed_change_pct']:+.2f}% | {r['change_vs_initial_pct']:+.2f}% | "
            f"{curse} | {p} | {r['seeds']} |"
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
    print("\n".join(lines))
    print(last)


if __name__ == "__main__":
    main()
