"""How often does a real LLM write a useful child? A benchmark against a running OpenAI-compatible server.

    python scripts/bench_llm.py --api-base http://127.0.0.1:8012/v1 --model qwen2.5-coder
                                [--iterations 10] [--answers diff,block] [--profile smoke]
                                [--prompt compact|full] [--out DIR]

Drives a real evolution run (scripts/evolve.py --llm local: OpenEvolve's own loop, our prompts and
client, the sandboxed evaluator) of N iterations per answer format, each from the same start and
run seed, then counts what became of each response (llm_responses.jsonl) and how many children
were novel and valid: the edit applied, the child passed stage 1, and its code (by AST) differs
from its parent's and from every program the run had seen before it. Prints one row per format
(outcomes, seconds per response), why each response that gave no novel valid child failed, and last
`novel_valid_rate: FORMAT X, ...`; writes OUT/bench_llm.md and .json. Needs a server (see
docs/llm.md, "A local model on a CPU"); not a test.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from plasa_lab import PROJECT_ROOT
from plasa_lab.cli import fail, run_evolve
from plasa_lab.evaluation.ledger import code_key
from plasa_lab.rundir import LLM_OUTCOMES, LLM_RESPONSES, TRACE, read_jsonl
from plasa_lab.util import atomic_write, one_line

ANSWERS = ("diff", "block")  # the LLM's answer formats (evolve.py --answer)


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


def run_in_format(args, run_dir: Path, answer: str) -> int:
    """A real run against the server (scripts/evolve.py --llm local, one seed); its exit code. The
    formats share one ledger: the initial program's evaluation is paid once."""
    llm = ["--llm", "local", "--api-base", args.api_base, "--model", args.model]
    llm += ["--prompt", args.prompt, "--answer", answer]
    return run_evolve(run_dir, args.profile, args.iterations, "42", llm, ledger=args.out / "ledger.sqlite")


def why_not(response: dict, novel_iterations: set) -> str | None:
    """Why a response gave no novel valid child (None: it gave one): its outcome and the failure's words."""
    if response.get("iteration") in novel_iterations:
        return None
    outcome, error = response.get("outcome"), one_line(response.get("error") or "", 160)
    if outcome == "passed":
        return "passed, but its code (by AST) was the parent's or an earlier program's"
    return f"{outcome}: {error}" if error else str(outcome)


def measure(args, answer: str) -> dict:
    """One run in one answer format, and what became of each of its responses."""
    run_dir = args.out / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{answer}"
    load_before, start = os.getloadavg(), time.monotonic()
    code = run_in_format(args, run_dir, answer)
    minutes = (time.monotonic() - start) / 60
    responses = read_jsonl(run_dir / LLM_RESPONSES)
    if not responses:
        fail(f"the {answer} run (exit {code}) filed no LLM response in {run_dir}")
    counts = Counter(r.get("outcome") for r in responses)
    seconds = [r["seconds"] for r in responses if isinstance(r.get("seconds"), (int, float))]
    tokens = [r["prompt_tokens"] for r in responses if isinstance(r.get("prompt_tokens"), int)]
    novel = novel_valid(read_jsonl(run_dir / TRACE), (PROJECT_ROOT / "initial_program.py").read_text())
    iterations = {r["iteration"] for r in novel}
    summary = dict(
        answer=answer,
        responses=len(responses),
        outcomes={o: counts.get(o, 0) for o in LLM_OUTCOMES},
        novel_valid=len(novel),
        novel_valid_rate=len(novel) / len(responses),
        failures=[dict(iteration=r.get("iteration"), why=w) for r in responses if (w := why_not(r, iterations))],
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
    return summary


def table(args, results: list[dict]) -> list[str]:
    """One row per answer format, then why each response that gave no novel valid child failed."""
    lines = [
        f"{args.model}, {args.prompt} prompts, {args.profile} profile, {args.iterations} iterations per format "
        "(the same run seed and start: the first prompt is the same, later ones follow each run's population)",
        "",
        f"| answer | responses | novel valid | rate | {' | '.join(LLM_OUTCOMES)} | s per response (median) | min |",
        "|---" * (6 + len(LLM_OUTCOMES)) + "|",
    ]
    for r in results:
        median = f"{r['seconds_per_response']['median']:.0f}" if r["seconds_per_response"] else "-"
        outcomes = " | ".join(str(r["outcomes"][o]) for o in LLM_OUTCOMES)
        lines.append(
            f"| {r['answer']} | {r['responses']} | {r['novel_valid']} | {r['novel_valid_rate']:.3f} | {outcomes} "
            f"| {median} | {r['minutes']:.0f} |"
        )
    lines.append("")
    for r in results:
        lines += [f"- {r['answer']}, iteration {f['iteration']}: {f['why']}" for f in r["failures"]]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-base", required=True, help="the OpenAI-compatible server, e.g. http://127.0.0.1:8012/v1")
    parser.add_argument("--model", required=True, help="the model name to ask the server for")
    parser.add_argument("--iterations", type=int, default=10, help="iterations per answer format (default 10)")
    parser.add_argument(
        "--answers",
        default="diff",
        help="answer formats to compare, comma-separated, one run each: diff, block (default diff)",
    )
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
    answers = list(dict.fromkeys(a.strip() for a in args.answers.split(",")))
    if not answers or any(a not in ANSWERS for a in answers):
        parser.error(f"--answers: choose from {', '.join(ANSWERS)}, comma-separated, got {args.answers!r}")
    results = [measure(args, answer) for answer in answers]
    lines = table(args, results)
    last = "novel_valid_rate: " + ", ".join(f"{r['answer']} {r['novel_valid_rate']:.3f}" for r in results)
    atomic_write(args.out / "bench_llm.md", "\n".join([*lines, "", last]) + "\n")
    atomic_write(
        args.out / "bench_llm.json", json.dumps(dict(vars(args), out=str(args.out), results=results), indent=2)
    )
    print("\n".join(lines))
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
