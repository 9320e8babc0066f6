"""Launch or resume an evolution run of the PLASA program (see README).

python scripts/evolve.py [--iterations N] [--llm api|offline|local] [--profile full|quick|smoke]
                         [--output DIR] [--resume] [--target-ppl X] [--seeds 42,43,44]
                         [--screen none|quick|smoke] [--answer diff|block]
                         [--max-llm-tokens N] [--price-per-million IN,OUT] [--proposals-ahead N]
"""

import argparse
import sys
from pathlib import Path

from plasa_lab.search.stops import stop_while_libraries_load

if __name__ == "__main__":  # until run() takes over: a stop while the libraries load is one line too
    stop_while_libraries_load()

from plasa_lab.cli import fail, price_pair, profile_help, seed_list  # noqa: E402 (after the stop handlers)
from plasa_lab.data.tokens import CorpusError  # noqa: E402
from plasa_lab.evaluation.ledger import LedgerError  # noqa: E402
from plasa_lab.rundir import RunDirError  # noqa: E402
from plasa_lab.search.launch import RunOptions  # noqa: E402
from plasa_lab.search.run import run  # noqa: E402
from plasa_lab.search.run_config import RunError  # noqa: E402
from plasa_lab.util import first_line  # noqa: E402


def add_llm_options(parser):
    """The LLM: which, where, its prompts and answers, and what it may spend."""
    parser.add_argument(
        "--llm",
        choices=["api", "offline", "local"],
        help="api: OpenAI-compatible API (OPENAI_API_KEY, OPENAI_API_BASE); local: a server at "
        "--api-base; offline: the LLM-free mutator (default when no OPENAI_API_KEY is set)",
    )
    parser.add_argument("--api-base", help="LLM endpoint, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_API_BASE)")
    parser.add_argument("--model", help="model name (default: config.yaml)")
    parser.add_argument(
        "--prompt",
        choices=["compact", "full"],
        help="compact: each program once, the fixed code as the interface the blocks meet (default "
        "for --llm local); full: OpenEvolve's own prompt (default for --llm api)",
    )
    parser.add_argument(
        "--no-notebook",
        action="store_true",
        help="leave the lab notebook (what the run has tried, and its effects) out of the LLM's prompts",
    )
    parser.add_argument(
        "--answer",
        choices=["diff", "block"],
        help="diff: SEARCH/REPLACE edits (the default with --llm api); block: the LLM rewrites the block the "
        "prompt's focus names in full, and the edit is built from it (a block that does not parse is sent back "
        "once; the default with --llm local)",
    )
    parser.add_argument(
        "--max-llm-tokens",
        type=int,
        help="stop the run cleanly (a checkpoint, the resume command) once its LLM calls, resumes included, "
        "have used this many tokens (the server's counts, else characters/4)",
    )
    parser.add_argument(
        "--price-per-million",
        type=price_pair,
        metavar="IN,OUT",
        help="dollars per million prompt and completion tokens: the run's summary and run.json give its cost",
    )
    parser.add_argument(
        "--proposals-ahead",
        type=int,
        metavar="N",
        help="iterations in flight beyond the evaluation slots: the LLM writes the next children while the "
        "slots train, and trainings never exceed the slots (default: 1 with an LLM, 0 offline)",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description="Launch or resume an OpenEvolve run over PLASA programs.")
    parser.add_argument(
        "--iterations", type=int, help="total iterations of the run, resumes included (default: config.yaml)"
    )
    add_llm_options(parser)
    parser.add_argument("--profile", choices=["full", "quick", "smoke"], help=profile_help("$PLASA_PROFILE or full"))
    parser.add_argument(
        "--output", type=Path, help="run folder (default: openevolve_output/run-<time>; with --resume: the newest run)"
    )
    parser.add_argument("--resume", action="store_true", help="continue a run from its latest checkpoint")
    parser.add_argument("--target-ppl", type=float, help="stop once a child reaches this validation perplexity")
    parser.add_argument(
        "--config", type=Path, default=RunOptions.config, help="OpenEvolve's configuration (default: config.yaml)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where children train (default: auto)")
    parser.add_argument("--corpus", help="auto, wikitext2, wiki-summaries or text:PATH (default: auto)")
    parser.add_argument(
        "--seeds",
        type=seed_list,
        help="training seeds of the noise floor and of confirmation, comma-separated "
        "(default 42,43,44; a single seed turns noise-aware fitness off)",
    )
    parser.add_argument(
        "--screen",
        choices=["none", "quick", "smoke"],
        help="train every child on this cheaper profile first; only the best share (PLASA_SCREEN_SHARE, "
        "default 0.5) of those screened go on to the full budget (default: none)",
    )
    parser.add_argument(
        "--runner",
        choices=["local", "ray"],
        help="where evaluations run: local subprocesses or a Ray cluster at $RAY_ADDRESS "
        "(default: $PLASA_RUNNER or local)",
    )
    args = parser.parse_args(argv)
    try:
        return run(RunOptions(**vars(args)))
    except (RunError, RunDirError, ValueError) as e:
        fail(e)
    except (LedgerError, CorpusError, OSError) as e:  # the machine's problem, in one line all the same
        fail(first_line(e))


if __name__ == "__main__":
    sys.exit(main())
