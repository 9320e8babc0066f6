"""Does the quick profile (200 steps) rank programs as the full one (1000 steps) does?

    python scripts/bench_rank.py [--seeds 42,43] [--out openevolve_output/bench-rank] [--profiles quick,full]

Eight diverse programs (the initial one, two named schedules, five structural variants the offline
mutator can write), each replayed through the real judge on the given seeds under each profile;
then Spearman's rho between the programs' mean val_loss under the two profiles. The evaluations
go to OUT/ledger.sqlite, so an interrupted benchmark resumes where it stopped. Writes
OUT/bench_rank.md and .json and ends with `rho: X.XX`. A benchmark, not a test: the full profile
costs about 4 minutes an evaluation on 2 CPU cores.
"""

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from scipy.stats import rankdata, spearmanr

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT
from plasa_lab.program.blocks import with_schedule
from plasa_lab.replay import Candidate, Plan, run_plan
from plasa_lab.search.mutator import Design, with_design
from plasa_lab.util import atomic_write

SCREEN_THRESHOLD = 0.7  # the rho a screening rung needs before it is worth shipping

VARIANTS = {  # name: the design's knobs, away from the initial program's
    "recent 1/4 + sink": dict(recent_share=(0.25,) * 4, sink_keys=1),
    "recent 1/2": dict(recent_share=(0.5,) * 4),
    "recency slope 0.01": dict(recency_slope=0.01),
    "KL over every past key": dict(kl_keys="causal"),
    "small indexer (1 head x 16)": dict(heads=1, head_dim=16),
}


def programs() -> list[Candidate]:
    initial = INITIAL_PROGRAM.read_text()
    out = [Candidate("initial", "initial", initial, str(INITIAL_PROGRAM))]
    for schedule in ("AGGRESSIVE_MIDDLE", "DENSE_TO_SPARSE"):
        out.append(Candidate(schedule, "program", with_schedule(initial, schedule), f"named schedule {schedule}"))
    for name, knobs in VARIANTS.items():
        code = with_design(initial, dataclasses.replace(Design(), **knobs))
        out.append(Candidate(name, "program", code, f"offline-mutator design {knobs}"))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,43", help="training seeds, comma-separated (default 42,43)")
    parser.add_argument(
        "--profiles", default="quick,full", help="the two profiles whose rankings are compared (default quick,full)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=PROJECT_ROOT / "openevolve_output" / "bench-rank",
        help="the ledger and the report (default: openevolve_output/bench-rank)",
    )
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        sys.exit(f"bench_rank.py: error: --seeds must be integers separated by commas, got {args.seeds!r}")
    profiles = args.profiles.split(",")
    if len(profiles) != 2:
        sys.exit("bench_rank.py: error: --profiles takes two profiles, the screen's and the full one")
    args.out.mkdir(parents=True, exist_ok=True)
    candidates, losses = programs(), {}
    for profile in profiles:
        plan = Plan(candidates, seeds, profile, None, args.out / "ledger.sqlite", args.out / profile, f"rank {profile}")
        results = run_plan(plan)
        losses[profile] = {c.name: statistics.mean(r.val_loss for r in results[c.name]) for c in candidates}
    names = [c.name for c in candidates]
    screen, full = ([losses[p][n] for n in names] for p in profiles)
    rho = float(spearmanr(screen, full).statistic)
    lines = [
        f"# Does {profiles[0]} rank as {profiles[1]} does? ({len(names)} programs, seeds {args.seeds})",
        "",
        f"| program | {profiles[0]} val_loss | rank | {profiles[1]} val_loss | rank |",
        "|---|---|---|---|---|",
    ]
    for name, a, ra, b, rb in zip(names, screen, rankdata(screen), full, rankdata(full)):
        lines.append(f"| {name} | {a:.4f} | {ra:g} | {b:.4f} | {rb:g} |")
    verdict = "ship the screening rung" if rho >= SCREEN_THRESHOLD else "do not ship the screening rung"
    lines += ["", f"Spearman's rho = {rho:.2f} (threshold {SCREEN_THRESHOLD}): {verdict}."]
    atomic_write(args.out / "bench_rank.md", "\n".join(lines) + "\n")
    atomic_write(args.out / "bench_rank.json", json.dumps(dict(seeds=seeds, losses=losses, rho=rho), indent=2))
    print("\n".join(lines))
    print(f"rho: {rho:.2f}")


if __name__ == "__main__":
    main()
