"""The LLM of a run: which one (an API, a local server, or the offline mutator), proved to answer
before any training, and plugged into OpenEvolve's config."""

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import INITIAL_PROGRAM
from .mutator import NAME as OFFLINE_MODEL_NAME
from .mutator import offline_client
from .progress import say
from .run_config import RunError

LOCAL_TIMEOUT = 900.0  # seconds: a CPU server reads a 3,000-token prompt in ~3 min and writes ~5 tokens/s
# An answer's tokens from a local server: the largest EVOLVE-BLOCK is ~470 tokens, so a diff that rewrites
# it (SEARCH and REPLACE) or a whole-block answer fits. Measured: with OpenEvolve's 4096, a small model
# that rambled wrote for ~800 s at 5 tokens/s, and the calls queued behind it timed out.
LOCAL_MAX_TOKENS = 1200


@dataclass(frozen=True)
class LLMChoice:
    """The run's LLM, resolved: run.json records it and a resume keeps it."""

    mode: str  # api | local | offline
    api_base: str | None
    models: list[str]
    note: str
    compact: bool = False  # compact prompts (plasa_lab.search.llm_client): default for local servers
    timeout: float | None = None
    notebook: bool = True  # the lab notebook (plasa_lab.reporting.notebook) in every prompt
    answer: str = "diff"  # diff: SEARCH/REPLACE edits; block: one named block in full (search.block_answers)
    max_llm_tokens: int | None = None  # the run's token budget (search.llm_usage): a clean stop once reached
    price_per_million: tuple[float, float] | None = None  # dollars per million prompt, completion tokens


def choose_llm(
    mode: str | None,
    api_base: str | None,
    model: str | None,
    config,
    prompt: str | None = None,
    notebook=True,
    answer: str | None = None,
) -> LLMChoice:
    """The LLM a run asks for (None: the environment's key decides, else the offline mutator), with
    its endpoint, models, prompt style and per-call limit; RunError when a mode lacks what it needs."""
    env_key, env_base = os.environ.get("OPENAI_API_KEY"), os.environ.get("OPENAI_API_BASE")
    if mode is None:
        mode = "api" if env_key else "offline"
        if mode == "offline":
            say(
                "No OPENAI_API_KEY set: using the offline mutator (a seeded LLM-free search operator; "
                "pass --llm api or --llm local to use a model)."
            )
    if mode == "offline":
        return LLMChoice(
            "offline",
            None,
            [OFFLINE_MODEL_NAME],
            "offline mutator: seeded LLM-free edits inside the EVOLVE-BLOCKs (the no-LLM baseline)",
        )
    base = api_base or env_base or (config.llm.api_base if mode == "api" else None)
    if not base:
        raise RunError("--llm local needs --api-base URL (or OPENAI_API_BASE), e.g. http://127.0.0.1:8000/v1")
    if mode == "api" and not env_key:
        raise RunError("--llm api needs OPENAI_API_KEY in the environment (or use --llm offline)")
    models = [model] if model else [m.name for m in config.llm.models]
    compact = (prompt or ("compact" if mode == "local" else "full")) == "compact"
    timeout = LOCAL_TIMEOUT if mode == "local" else float(config.llm.timeout or 180)
    # a small local model rewrote a named block whole far more often than it wrote a diff that applied
    # (docs/llm.md, "Whole-block answers"); an API model keeps SEARCH/REPLACE, which costs fewer tokens
    answer = answer or ("block" if mode == "local" else "diff")
    local_limits = f", at most {LOCAL_MAX_TOKENS:,} tokens an answer, one call at a time" if mode == "local" else ""
    return LLMChoice(
        mode,
        base,
        models,
        f"{mode} LLM at {base} ({'compact' if compact else 'full'} prompts{', no notebook' * (not notebook)}, "
        f"{'whole-block' if answer == 'block' else 'SEARCH/REPLACE'} answers, {timeout:.0f} s per call{local_limits})",
        compact,
        timeout,
        notebook,
        answer,
    )


def first_prompt(config, compact: bool, answer: str = "diff") -> dict:
    """The run's first prompt, as OpenEvolve builds it for the initial program (metrics as a placeholder),
    and as the LLM client sends it (compacted, and for block answers asking for the focus's block)."""
    from openevolve.prompt.sampler import PromptSampler

    from .block_answers import block_prompt, focus_block
    from .llm_client import compact_prompt

    code = INITIAL_PROGRAM.read_text()
    metrics = {
        "combined_score": 0.0018,
        "val_ppl": 556.4,
        "val_loss": 6.32,
        "density": 0.655,
        "indexer_params": 83968.0,
    }
    program = dict(id="initial", code=code, metrics=metrics)
    prompt = PromptSampler(config.prompt).build_prompt(
        current_program=code,
        parent_program=code,
        program_metrics=metrics,
        previous_programs=[program],
        top_programs=[program] * (config.prompt.num_top_programs + config.prompt.num_diverse_programs),
        inspirations=[],
        language="python",
        evolution_round=1,
        diff_based_evolution=True,
        feature_dimensions=config.database.feature_dimensions,
    )
    user = compact_prompt(prompt["user"]) if compact else prompt["user"]
    if answer == "block":
        user = block_prompt(user, focus_block(prompt["user"], code).name)
    return dict(prompt, user=user)


def check_endpoint(choice: LLMChoice, config, timeout: float = 10.0):
    """Fail fast, before any training: the server must answer, accept the key, and complete a prompt
    as long as the run's first one (a local server's context may be too small; a broken build may
    crash on its first completion). One line on any failure."""
    import openai

    from .llm_client import describe_failure

    api_base = choice.api_base
    client = openai.OpenAI(
        base_url=api_base, api_key=os.environ.get("OPENAI_API_KEY") or "none", timeout=timeout, max_retries=0
    )
    try:
        client.models.list()
    except openai.AuthenticationError:
        raise RunError(f"the LLM endpoint {api_base} rejected the API key (401): check OPENAI_API_KEY")
    except openai.APIConnectionError as e:
        cause = e.__cause__ or e
        raise RunError(f"cannot reach the LLM endpoint {api_base}: {type(cause).__name__}: {cause}")
    except openai.APIStatusError:
        pass  # it answered; some OpenAI-compatible servers have no /models
    prompt = first_prompt(config, choice.compact, choice.answer)
    if choice.mode == "api":  # a paid API: a short request proves the model name and the key
        prompt = dict(system="Answer with one word.", user="Ready?")
    size = len(prompt["system"]) + len(prompt["user"])
    say(
        f"checking the LLM: one completion of a {size:,}-character prompt like the run's first "
        f"(a CPU server takes minutes to read it; limit {choice.timeout:.0f} s)"
    )
    start = time.monotonic()
    try:
        client.with_options(timeout=choice.timeout).chat.completions.create(
            model=choice.models[0],
            max_tokens=1,
            messages=[{"role": "system", "content": prompt["system"]}, {"role": "user", "content": prompt["user"]}],
        )
    except Exception as e:
        raise RunError(
            f"the LLM at {api_base} cannot complete a prompt like the run's ({size:,} characters): "
            f"{describe_failure(e, choice.timeout)}"
        ) from None
    say(f"the LLM answered in {time.monotonic() - start:.0f} s")


def configure_llm(config, choice: LLMChoice, run_dir: Path):
    """OpenEvolve's config told which LLM to call, and how: the offline mutator through init_client, or
    our client (plasa_lab.search.llm_client) for every model of an API or a local server."""
    from .llm_client import client_factory

    if choice.mode == "offline":
        config.llm.models = config.llm.models[:1]
        config.llm.models[0].name = OFFLINE_MODEL_NAME
        config.llm.models[0].init_client = offline_client
    else:
        template = config.llm.models[0]
        if choice.mode == "local":
            cap = min(template.max_tokens or LOCAL_MAX_TOKENS, LOCAL_MAX_TOKENS)
            template = dataclasses.replace(template, max_tokens=cap)
        config.llm.models = [
            dataclasses.replace(
                template, name=name, api_base=choice.api_base, weight=1.0, timeout=choice.timeout, retries=0
            )
            for name in choice.models
        ]
        for m in config.llm.models:
            if choice.mode == "local":
                m.api_key = os.environ.get("OPENAI_API_KEY") or "local"  # llama.cpp and friends ignore it
            # one attempt per call, every call recorded, the notebook in every prompt
            m.init_client = client_factory(
                run_dir, choice.compact, choice.notebook, choice.answer, choice.max_llm_tokens, choice.mode == "local"
            )
    config.llm.evaluator_models = list(config.llm.models)
