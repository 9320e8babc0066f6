"""How often does a real LLM write a useful child? A benchmark against a running OpenAI-compatible server.

    python scripts/bench_llm.py --api-base http://127.0.0.1:8012/v1 --model qwen2.5-coder
                                [--iterations 10] [--profile smoke] [--prompt compact|full] [--out DIR]

Drives a real evolution run (scripts/evolve.py --llm local: OpenEvolve's own loop, our prompts and
client, the sandboxed evaluator) for N iterations, then counts what became of each response
(llm_responses.jsonl) and how many children were novel and valid: the diff applied, the child
passed stage 1, and its code (by AST) differs from its parent's and from every program the run had
seen before it. Prints a table, the seconds per response and the machine's load, and last
`novel_valid_rate: X`. Needs a server (see docs/llm.md, "A local model on a CPU"); not a test.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from plasa_lab import PROJECT_ROOT
from plasa_lab.cli import fail
from plasa_lab.evaluation.ledger import code_key
from plasa_lab.rundir import LLM_OUTCOMES, LLM_RESPONSES, TRACE, read_jsonl
from plasa_lab.util import atomic_write


def novel_valid(children: list[dict], initial_code: str) -> list[dict]:
    """Children that passed stage 1 and whose code no program of the run had before them."""
    seen, novel = {code_key(initial_code)}, []
    for r in sorted(children, key=lambda r: r["iteration"]):
        key = code_key(r.get("child_code") or "")
        if (
            (r.get("child_metrics") or {}).get("stage1_passed", 0) > 0
            and key not in seen
            and key != code_key(r.get("parent_code") or "")
        ):
            novel.append(r)
        seen.add(key)
    return novel


def evolve(args, run_dir: Path) -> int:
    """A real run against the server (scripts/evolve.py --llm local, one seed); its exit code."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PLASA_") or k in ("PLASA_TIME_LIMIT", "PLASA_CACHE")
    }
    env["PLASA_LEDGER"] = str(args.out / "ledger.sqlite")  # the initial program's evaluation is paid once
    command = [
        sys.executable,
        "scripts/evolve.py",
        "--profile",
        args.profile,
        "--llm",
        "local",
        "--api-base",
        args.api_base,
        "--model",
        args.model,
        "--prompt",
        args.prompt,
        "--iterations",
        str(args.iterations),
        "--seeds",
        "42",
        "--output",
        str(run_dir),
    ]
    print(f"$ {' '.join(command[1:])}", file=sys.stderr, flush=True)
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env).returncode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-base", required=True, help="the OpenAI-compatible server, e.g. http://127.0.0.1:8012/v1")
    parser.add_argument("--model", required=True, help="the model name to ask the server for")
    parser.add_argument("--iterations", type=int, default=10, help="iterations of the run (default 10)")
    parser.add_argument(
        "--profile", default="smoke", choices=["full", "quick", "smoke"], help="the run's profile (default smoke)"
    )
    parser.add_argument(
        "--prompt", choices=["compact", "full"], default="compact", help="the prompt evolve.py sends (default compact)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=PROJECT_ROOT / "openevolve_output" / "bench-llm",
        help="the runs and their ledger (default: openevolve_output/bench-llm)",
    )
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    run_dir = args.out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    load_before = os.getloadavg()
    start = time.monotonic()
    code = evolve(args, run_dir)
    minutes = (time.monotonic() - start) / 60
    responses = read_jsonl(run_dir / LLM_RESPONSES)
    if not responses:
        fail(f"the run (exit {code}) filed no LLM response in {run_dir}")
    counts = Counter(r.get("outcome") for r in responses)
    seconds = [r["seconds"] for r in responses if isinstance(r.get("seconds"), (int, float))]
    tokens = [r["prompt_tokens"] for r in responses if isinstance(r.get("prompt_tokens"), int)]
    novel = novel_valid(read_jsonl(run_dir / TRACE), (PROJECT_ROOT / "initial_program.py").read_text())
    rate = len(novel) / len(responses)
    summary = dict(
        model=args.model,
        api_base=args.api_base,
        prompt=args.prompt,
        profile=args.profile,
        iterations=args.iterations,
        responses=len(responses),
        outcomes={o: counts.get(o, 0) for o in LLM_OUTCOMES},
        novel_valid=len(novel),
        novel_valid_rate=rate,
        seconds_per_response=dict(mean=statistics.fmean(seconds), median=statistics.median(seconds), max=max(seconds))
        if seconds
        else None,
        prompt_tokens=dict(mean=statistics.fmean(tokens), max=max(tokens)) if tokens else None,
        load_before=load_before,
        load_after=os.getloadavg(),
        minutes=round(minutes, 1),
        run=str(run_dir),
        exit_code=code,
    )
    atomic_write(run_dir / "bench_llm.json", json.dumps(summary, indent=2))
    print(
        f"{len(responses)} responses from {args.model} ({args.prompt} prompts, {args.profile} profile), "
        f"{minutes:.0f} min; "
        f"load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    for outcome in LLM_OUTCOMES:
        print(f"  {outcome:22s} {counts.get(outcome, 0)}")
    if seconds:
        print(
            f"  seconds per response: mean {statistics.fmean(seconds):.0f}, median {statistics.median(seconds):.0f}, "
            f"max {max(seconds):.0f}" + (f"; prompt tokens mean {statistics.fmean(tokens):.0f}" if tokens else "")
        )
    for r in novel:
        print(f"  novel: iteration {r['iteration']}: {(r.get('artifacts') or {}).get('failure') or 'passed'}")
    print(f"novel_valid_rate: {rate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
