"""The judge's cost: a whole cascade (stage 1, then stage 2) against the training recipe alone, and
what OS isolation adds. Measured in interleaved rounds, so that a change of load during the run
moves both sides of every ratio alike.

Every round times three things, in an order that alternates from round to round:
    reference   the recipe in this process (plasa_lab.evaluation.recipe: the judge's own trunk loop with the
                blocks answered here, no sandbox, no checks): the profile's training steps, then one
                bare pass over the profile's scored validation windows;
    bwrap       the cascade by the real judge (stage 1, then stage 2), its processes under bubblewrap;
    none        the same cascade without OS isolation (Job.sandbox = "none").
The summary gives medians of the per-round figures: the judge's training step against the recipe's,
the cascade's wall time over its own training time (the target is at most 1.10), and what isolation
adds. It ends with `ratio: X.XXX`, the judge's seconds per training step over the recipe's.

    python scripts/bench_eval.py [--profile full|quick|smoke] [--rounds R] [--program FILE]
                                 [--threads T] [--device auto|cpu|cuda]
"""

import argparse
import dataclasses
import math
import shutil
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.cli import fail
from plasa_lab.contract import PROFILES, get_profile
from plasa_lab.evaluation import hardware
from plasa_lab.evaluation.jobs import Job
from plasa_lab.evaluation.judge import run_local
from plasa_lab.evaluation.recipe import train_and_score
from plasa_lab.evaluation.stage import Calibration, corpus_of
from plasa_lab.settings import Settings

CASCADE_TARGET = 1.10  # the whole cascade's wall time over its training time


def cascade(code: str, corpus, settings: Settings) -> dict:
    """Stage 1 then stage 2 by the real judge: wall and training seconds of each."""
    profile = get_profile(settings.profile)
    out = {}
    for stage in (1, 2):
        limit = Calibration(10.0).limits(stage, profile, profile.val_windows)
        start = time.monotonic()
        result = run_local(Job.of(code, stage, settings, corpus, 42, limit, profile.val_windows))
        if not result.ok:
            fail(f"the judge rejected the program (stage {stage}, {settings.sandbox}): {result.failure}")
        out[f"stage{stage}_wall"], out[f"stage{stage}_train"] = (
            time.monotonic() - start,
            result.metrics["train_seconds"],
        )
    out["wall"] = out["stage1_wall"] + out["stage2_wall"]
    out["train"] = out["stage1_train"] + out["stage2_train"]
    return out


def one_round(number: int, code: str, corpus, settings: Settings) -> dict:
    """The three measurements, reversed every other round."""
    profile = get_profile(settings.profile)
    order = ["reference", "bwrap", "none"] if number % 2 == 0 else ["none", "bwrap", "reference"]
    got = {}
    for what in order:
        start = time.monotonic()
        if what == "reference":
            run = train_and_score(code, corpus.train, corpus.val, profile, 42, settings.device)
            got["ref_train"], got["ref_val"] = run.train_seconds, run.val_seconds
        else:
            got[what] = cascade(code, corpus, dataclasses.replace(settings, sandbox=what))
        print(f"  round {number + 1}: {what} done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    steps = profile.steps
    bwrap, none = got["bwrap"], got["none"]
    got.update(
        ratio=(bwrap["stage2_train"] / steps) / (got["ref_train"] / steps),
        cascade=bwrap["wall"] / bwrap["train"],
        cascade_vs_recipe=bwrap["wall"] / (got["ref_train"] + got["ref_val"]),
        isolation=(bwrap["wall"] - none["wall"]) / bwrap["wall"],
        stage2_outside_training=(bwrap["stage2_wall"] - bwrap["stage2_train"]) / bwrap["stage2_wall"],
    )
    return got


def rounds_table(rounds: list[dict], steps: int) -> Table:
    out = Table(title=f"interleaved rounds ({steps} training steps in stage 2)")
    columns = ("round", "recipe s/step", "judge s/step", "ratio", "cascade wall s", "of it training s", "wall/train")
    for column in columns + ("unsandboxed wall s", "bare validation s"):
        out.add_column(column, justify="right")
    for i, r in enumerate(rounds, 1):
        out.add_row(
            str(i),
            f"{r['ref_train'] / steps:.4f}",
            f"{r['bwrap']['stage2_train'] / steps:.4f}",
            f"{r['ratio']:.3f}",
            f"{r['bwrap']['wall']:.1f}",
            f"{r['bwrap']['train']:.1f}",
            f"{r['cascade']:.3f}",
            f"{r['none']['wall']:.1f}",
            f"{r['ref_val']:.2f}",
        )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", choices=list(PROFILES), help="the profile timed (default full)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over them (default 3)")
    parser.add_argument(
        "--program", default=str(INITIAL_PROGRAM), help="the program the cascade judges (default: initial_program.py)"
    )
    parser.add_argument(
        "--threads", type=int, default=hardware.cpu_cores(), help="threads of each side (default: every core)"
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where both sides train (default: auto)"
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        fail("--rounds and --threads must be at least 1")
    try:
        code = open(args.program).read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{args.program}: {getattr(e, 'strerror', None) or e}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but torch sees no CUDA device")
    torch.set_num_threads(args.threads)  # the recipe's arithmetic, as many threads as the judge's trunk
    settings = Settings(profile=args.profile, device=device, parallel=1, threads=args.threads)
    profile, corpus = get_profile(args.profile), corpus_of("auto")
    console = Console(width=shutil.get_terminal_size((120, 24)).columns)  # piped: 120, not 80
    console.print(
        f"{profile.name} profile: {profile.steps} steps, batch {profile.batch_size} x {profile.seq_len}, "
        f"{profile.val_windows} validation windows; {device}, {args.threads} thread(s); {args.rounds} rounds"
    )
    rounds = [one_round(number, code, corpus, settings) for number in range(args.rounds)]
    console.print(rounds_table(rounds, profile.steps))

    median = lambda key: statistics.median(r[key] for r in rounds)
    console.print(
        f"training: judge {statistics.median(r['bwrap']['stage2_train'] for r in rounds) / profile.steps:.4f} s/step, "
        f"recipe {median('ref_train') / profile.steps:.4f} s/step (medians)"
    )
    verdict = "within" if median("cascade") <= CASCADE_TARGET else "OVER"
    console.print(
        f"cascade (stage 1 + stage 2) under bwrap: {median('cascade'):.3f}x its training time ({verdict} the target "
        f"of {CASCADE_TARGET:.2f}x); {median('cascade_vs_recipe'):.3f}x the recipe's training and bare validation"
    )
    console.print(
        f"stage 2 alone: {statistics.median(r['bwrap']['stage2_wall'] for r in rounds):.1f} s wall, "
        f"{median('stage2_outside_training'):.1%} of it outside training (start-ups, weights, probes, validation)"
    )
    console.print(f"isolation (bwrap - none): {median('isolation'):.1%} of the cascade's wall time")
    ratio = median("ratio")
    if not math.isfinite(ratio):
        fail("the ratio is not finite")
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
