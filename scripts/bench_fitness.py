"""Does a run's best hold up? Plain single-seed fitness against noise-aware fitness.

    python scripts/bench_fitness.py [--profile quick] [--iterations 12] [--replay-seeds 101,102,103,104,105]
                                    [--out openevolve_output/bench-fitness]

Two runs from the same start (the initial program, the offline mutator, the same config): first the
noise-aware one (seeds 42,43,44: noise floor, confirmation of contenders), then a plain one (seed 42
only) given as many stage-2 trainings as the noise-aware run spent. Then the best of each, and the
initial program, are replayed on seeds neither run used, and each best's claim (what its run said
its val_ppl was) is set against its replay. Writes OUT/bench_fitness.md and .json; a benchmark,
not a test (a quick-profile pair takes about 1.5 h on 2 CPU cores).
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT
from plasa_lab.cli import evolve
from plasa_lab.evaluation.ledger import Ledger, code_key
from plasa_lab.replay import Candidate, Plan, run_plan
from plasa_lab.stats import ALPHA, claim_p, mean_sd, ppl_change_pct, verdict
from plasa_lab.util import atomic_write


def stage2_trainings(run_dir: Path) -> list[dict]:
    return [r for r in Ledger(run_dir / "ledger.sqlite").rows() if r["stage"] == 2]


def best_of(run_dir: Path) -> tuple[str, dict]:
    info = json.loads((run_dir / "best" / "best_program_info.json").read_text())
    return (run_dir / "best" / "best_program.py").read_text(), info["metrics"]


def claimed_loss(metrics: dict) -> float:
    """What the run says the best's val_loss is: its seed mean (noise-aware) or its one seed (plain)."""
    return metrics["val_loss"]


def compare(
    candidate: Candidate, runs: list, reference: dict[int, float], claim: dict | None, initial_key: str
) -> dict:
    """One row of the table: a program's replay against the initial program's and against its run's claim."""
    passed = [r for r in runs if r.passed]
    if len(passed) < 2:  # nothing to compare: say why instead of computing on failure values
        failure = next((r.failure for r in runs if not r.passed), "too few seeds")
        return dict(program=candidate.name, failed=f"{len(passed)} of {len(runs)} replays passed: {failure}")
    losses = [r.val_loss for r in passed]
    by_seed = {r.seed: r.val_loss for r in passed}
    word, p, _ = verdict(by_seed, reference) if candidate.kind != "initial" else ("reference", None, None)
    row = dict(
        program=candidate.name,
        same_as_initial=code_key(candidate.code) == initial_key,
        replay_val_ppl=math.exp(statistics.fmean(losses)),
        replay_val_loss_sd=mean_sd(losses)[1],
        change_vs_initial_pct=ppl_change_pct(losses, list(reference.values())),
        p_vs_initial=p,
        verdict_vs_initial=word,
    )
    if claim:
        p_claim = claim_p(losses, claimed_loss(claim))  # worse than claimed beyond noise?
        worse = p_claim is not None and p_claim < ALPHA and statistics.fmean(losses) > claimed_loss(claim)
        row.update(
            claimed_val_ppl=math.exp(claimed_loss(claim)),
            claimed_seeds=int(claim.get("seeds", 1)),
            replay_minus_claim_pct=ppl_change_pct(losses, [claimed_loss(claim)]),
            p_vs_claim=p_claim,
            held_up="worse than claimed beyond noise" if worse else "held up",
        )
    return row


def table(rows: list[dict], budget: int, spent: int, plain_trainings: int, profile: str, seeds: list[int]) -> list[str]:
    """bench_fitness.md: the two runs' budgets, then one row per replayed program."""
    lines = [
        f"# Plain vs noise-aware fitness ({profile} profile)",
        "",
        f"noise-aware run: {budget} stage-2 trainings, {spent} of them confirmations "
        f"({100 * spent / budget:.0f}%); plain run: {plain_trainings} stage-2 trainings. "
        f"Replayed on seeds {', '.join(map(str, seeds))} (never used by either run).",
        "",
        "| program | claimed val_ppl (seeds) | replayed val_ppl | replay vs claim | p | held up? | vs initial | p "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    number = lambda p: "-" if p is None else f"{p:.3g}"
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['program']} | FAILED on replay: {r['failed'][:200]} |||||||")
            continue
        claim = ("-", "-", "-", "-")
        if "claimed_val_ppl" in r:
            claim = (
                f"{r['claimed_val_ppl']:.1f} ({r['claimed_seeds']})",
                f"{r['replay_minus_claim_pct']:+.2f}%",
                number(r["p_vs_claim"]),
                r["held_up"],
            )
        lines.append(
            f"| {r['program']}{' (= initial)' * r['same_as_initial']} | {claim[0]} | {r['replay_val_ppl']:.1f} | "
            f"{claim[1]} | {claim[2]} | {claim[3]} | {r['change_vs_initial_pct']:+.2f}% | "
            f"{number(r['p_vs_initial'])} | {r['verdict_vs_initial']} |"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile", default="quick", choices=["full", "quick", "smoke"], help="the runs' profile (default quick)"
    )
    parser.add_argument("--iterations", type=int, default=12, help="iterations of the noise-aware run (default 12)")
    parser.add_argument(
        "--replay-seeds",
        default="101,102,103,104,105",
        help="seeds neither run used, on which the bests are replayed, comma-separated (default 101,102,103,104,105)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=PROJECT_ROOT / "openevolve_output" / "bench-fitness",
        help="the runs, their ledgers and the report (default: openevolve_output/bench-fitness)",
    )
    args = parser.parse_args(argv)
    try:
        replay_seeds = [int(s) for s in args.replay_seeds.split(",")]
    except ValueError:
        parser.error(f"--replay-seeds must be integers separated by commas, got {args.replay_seeds!r}")
    if args.iterations < 1 or len(replay_seeds) < 2:
        parser.error("--iterations must be at least 1 and --replay-seeds name at least 2 seeds")
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)

    aware = evolve(args.out / "noise-aware", args.profile, args.iterations, "42,43,44")
    budget = len(stage2_trainings(aware))
    # what the run itself counted (evaluation.confirmation_count), not a second definition of a confirmation
    spent = json.loads((aware / "run.json").read_text())["confirmation"]["confirmation_trainings"]
    # the initial program's own training counts as one
    plain = evolve(args.out / "plain", args.profile, budget - 1, "42")
    plain_trainings = len(stage2_trainings(plain))

    initial = INITIAL_PROGRAM.read_text()
    candidates = [Candidate("initial", "initial", initial, "initial_program.py")]
    claims = {}
    for name, run_dir in (("plain best", plain), ("noise-aware best", aware)):
        code, claims[name] = best_of(run_dir)
        candidates.append(Candidate(name, "program", code, str(run_dir / "best" / "best_program.py")))
    plan = Plan(
        candidates, replay_seeds, args.profile, None, args.out / "replay-ledger.sqlite", args.out, "bench_fitness", []
    )
    results = run_plan(plan)
    reference = {r.seed: r.val_loss for r in results["initial"]}
    rows = [compare(c, results[c.name], reference, claims.get(c.name), code_key(initial)) for c in candidates]
    summary = dict(
        profile=args.profile,
        replay_seeds=replay_seeds,
        minutes=round((time.monotonic() - start) / 60, 1),
        runs={
            "noise-aware": dict(
                stage2_trainings=budget,
                confirmation_trainings=spent,
                confirmation_share=spent / budget,
                iterations=args.iterations,
            ),
            "plain": dict(stage2_trainings=plain_trainings, iterations=budget - 1),
        },
        programs=rows,
    )
    lines = table(rows, budget, spent, plain_trainings, args.profile, replay_seeds)
    atomic_write(args.out / "bench_fitness.json", json.dumps(summary, indent=2))
    atomic_write(args.out / "bench_fitness.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"confirmation_share: {spent / budget:.3f}")


if __name__ == "__main__":
    main()
