"""The LLM side of a run: a client for API and local servers whose prompts fit and whose calls finish.

OpenEvolve builds the prompts; this client (plugged in through OpenEvolve's `init_client`) sends
them with the real OpenAI client and adds what a small model on a CPU needs:

- **compact prompts** (`compact_prompt`): every program in the prompt appears once. The current
  program shows its EVOLVE-BLOCKs in full (a SEARCH must copy their lines) and of the fixed code only
  the interface the blocks meet: the lines that call into a block, under their def/class headers.
  Other programs show only the blocks in which they differ from the current one.
- **calls that finish**: one attempt with the configured timeout (a local server cannot cancel a
  request, so a retry would queue behind the one it abandons), and every failure raised with a
  real reason ("timed out after 900 s", "HTTP 400: the prompt has 9562 tokens, the context 8192").
  A local server computes one answer at a time: its calls take turns (a lock in the run folder,
  RUN_DIR/llm-slot), so that a call's timeout counts its own answer, not the queue before it.
- **calls recorded**: every call's model, prompt size, seconds, response or error goes to
  RUN_DIR/llm_calls.jsonl; the run joins them with OpenEvolve's trace into llm_responses.jsonl.
"""

import asyncio
import functools
import json
import re
import time
from pathlib import Path

from ..evaluation.slots import evaluation_slot
from ..program.blocks import BlockError, names_defined_in, split_blocks
from ..reporting import notebook
from ..rundir import LLM_CALLS, LLM_SLOT
from . import block_answers
from .llm_usage import TokenMeter, added, call_tokens

BLOCK_REFUSED = "block answer refused"  # an answer that made no edit: no child, and not the server's failure
BUDGET_SPENT = "the LLM token budget is spent"  # no call made: the run is stopping (--max-llm-tokens)
BUDGET_GRACE = 5.0  # seconds a call past the budget waits, so that the run stops before more iterations start
CODE_FENCE = re.compile(r"```(?P<lang>[a-z]*)\n(?P<code>.*?)\n```", re.DOTALL)
CURRENT_PROGRAM = re.compile(r"# Current Program\s*```[a-z]*\n", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# Compact prompts


def _header_of(lines: list[str], i: int) -> int | None:
    """Index of the def/class line that encloses line i (the nearest one less indented above it)."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    for j in range(i - 1, -1, -1):
        stripped = lines[j].lstrip()
        if stripped and len(lines[j]) - len(stripped) < indent and stripped.startswith(("def ", "class ")):
            return j
    return None


def compact_program(code: str) -> str:
    """The blocks in full, markers included, and of the fixed code the imports a block may use,
    MODEL_CONFIG, and every line that uses what a block defines or returns (followed through the
    variables it is assigned to, twice), with its enclosing headers; `...` marks what is left out."""
    try:
        blocks = split_blocks(code)[1]
        names = names_defined_in(code, split_blocks(code)[1])
    except (BlockError, SyntaxError, ValueError):
        return code  # not a program we can read: show it whole
    lines = code.splitlines()
    keep = {i for b in blocks for i in range(b.start, b.end + 1)}
    fixed = [i for i, line in enumerate(lines) if i not in keep and line.strip() and not line.lstrip().startswith("#")]
    keep |= {i for i in fixed if lines[i].startswith(("import torch", "import math", "MODEL_CONFIG"))}
    standalone = next((i for i, line in enumerate(lines) if line.startswith("def main(")), len(lines))
    fixed = [i for i in fixed if i < standalone]  # the standalone training run is not the model's interface
    followed = set()
    for _ in range(2):  # the block names, then the variables their results are assigned to
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names | followed))) + r")\b")
        for i in fixed:
            if pattern.search(lines[i]):
                keep.add(i)
                assigned = re.match(r"\s*(?:self\.)?([A-Za-z_][\w, ]*?)\s*=[^=]", lines[i])
                if assigned and any(re.search(rf"\b{re.escape(n)}\b", lines[i].split("=", 1)[1]) for n in names):
                    followed |= {n.strip() for n in assigned[1].split(",") if len(n.strip()) > 1}
    for i in sorted(keep):
        j = i
        while (j := _header_of(lines, j)) is not None and j not in keep:
            keep.add(j)
    out, last = [], -1
    for i in sorted(keep):
        if i > last + 1 and out:
            indent = len(lines[i]) - len(lines[i].lstrip())
            out.append(" " * indent + "...")
        out.append(lines[i])
        last = i
    return "\n".join(out) + "\n"


def changed_blocks(code: str, reference: str) -> str:
    """The blocks of `code` that differ from `reference`'s, in full; a line when none does."""
    try:
        mine, theirs = split_blocks(code)[1], split_blocks(reference)[1]
    except BlockError:
        return code
    changed = [b for b, r in zip(mine, theirs) if b.body != r.body]
    if not changed or len(mine) != len(theirs):
        return "(the same EVOLVE-BLOCKs as the current program)\n" if not changed else code
    return "".join(f"# EVOLVE-BLOCK-START {b.name}\n{b.body}# EVOLVE-BLOCK-END\n" for b in changed)


def current_program(user: str) -> str | None:
    """The program a prompt asks the LLM to change: the code under its "# Current Program" heading."""
    heading = CURRENT_PROGRAM.search(user)
    fence = next((f for f in CODE_FENCE.finditer(user) if heading and f.start() >= heading.start()), None)
    return fence["code"] + "\n" if fence is not None and "EVOLVE-BLOCK-START" in fence["code"] else None


def compact_prompt(user: str) -> str:
    """The user message with the current program compacted and every other program shown only
    as the blocks in which it differs from the current one."""
    heading = CURRENT_PROGRAM.search(user)
    fences = list(CODE_FENCE.finditer(user))
    current_fence = next((f for f in fences if heading and f.start() >= heading.start()), None)
    if current_fence is None or "EVOLVE-BLOCK-START" not in current_fence["code"]:
        return user
    current_code = current_fence["code"]

    def replace(fence):
        code = fence["code"]
        if "EVOLVE-BLOCK-START" not in code:
            return fence.group(0)
        shown = compact_program(code) if fence is current_fence else changed_blocks(code, current_code)
        return f"```{fence['lang']}\n{shown.rstrip()}\n```"

    parts, last = [], 0
    for fence in fences:
        parts += [user[last : fence.start()], replace(fence)]
        last = fence.end()
    return "".join(parts) + user[last:]


# ---------------------------------------------------------------------------------------------
# What became of a response


def outcome_of(child_metrics: dict | None, error: str | None) -> str:
    """One of rundir.LLM_OUTCOMES for an iteration: from OpenEvolve's failure line when it made no
    child, else from the child's evaluation."""
    if error is not None:
        if BLOCK_REFUSED in error:  # a block answer that did not parse, or held a marker
            return "no diff"
        if error.startswith("LLM generation failed") or error.startswith("LLM returned None"):
            return "llm error"
        if "No valid diffs" in error:
            return "no diff"
        return "diff did not apply"  # SEARCH matched nothing, changed nothing, or left the blocks
    return "passed" if ((child_metrics or {}).get("combined_score") or 0) > 0 else "rejected by a check"


# ---------------------------------------------------------------------------------------------
# The client


class LLMError(RuntimeError):
    """An LLM call that failed; the message is the reason, in one line."""


def describe_failure(e: BaseException, timeout: float) -> str:
    import openai

    if isinstance(e, openai.APITimeoutError) or isinstance(e, TimeoutError):
        return f"timed out after {timeout:.0f} s (a local server keeps computing the abandoned answer)"
    if isinstance(e, openai.APIStatusError):
        detail = ""
        try:
            body = e.response.json()
            detail = (
                (body.get("error") or {}).get("message")
                if isinstance(body.get("error"), dict)
                else body.get("error") or body.get("detail")
            )
        except Exception:
            detail = e.response.text[:200] if e.response is not None else ""
        return f"HTTP {e.status_code}: {' '.join(str(detail or e.message).split())[:240]}"
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        return f"cannot reach the server: {type(cause).__name__}: {' '.join(str(cause).split())[:200]}"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}" if text else type(e).__name__


class LLMClient:
    """OpenEvolve's LLM interface (`.model`, async `generate_with_context`) over an OpenAI-compatible
    endpoint, one attempt per call (a refused block answer is told why once, within the call), every
    call recorded with its tokens."""

    def __init__(
        self,
        model_cfg,
        run_dir: str | None = None,
        compact: bool = False,
        notebook: bool = True,
        answer="diff",
        max_llm_tokens: int | None = None,
        one_call_at_a_time: bool = False,
    ):
        self.model = model_cfg.name
        self.api_base, self.api_key = model_cfg.api_base, model_cfg.api_key or "none"
        self.temperature, self.max_tokens = model_cfg.temperature, model_cfg.max_tokens
        self.timeout = float(model_cfg.timeout or 180)
        self.run_dir, self.compact, self.notebook = run_dir, compact, notebook and run_dir is not None
        self.answer = answer  # diff | block (plasa_lab.search.block_answers)
        self.budget = max_llm_tokens  # the run's: no call starts once its calls have used it
        self.meter = TokenMeter(Path(run_dir)) if run_dir and max_llm_tokens else None
        self.last_usage = None
        self._client = None
        # a local server's calls take turns (one slot in the run folder, shared by OpenEvolve's workers)
        self.turns = str(Path(run_dir) / LLM_SLOT) if one_call_at_a_time and run_dir else None

    def _openai(self):
        import openai

        if self._client is None:
            self._client = openai.AsyncOpenAI(
                base_url=self.api_base, api_key=self.api_key, timeout=self.timeout, max_retries=0
            )
        return self._client

    def _prepared(self, messages: list[dict]) -> tuple[list[dict], str | None, str | None]:
        """(the messages as sent, the parent program, the block a block answer rewrites): prompts
        compacted, the notebook added, and for block answers the answer format naming the block."""
        messages = [dict(m) for m in messages]
        user = messages[-1]["content"] if messages and messages[-1].get("role") == "user" else None
        parent = current_program(user) if user else None
        block = block_answers.focus_block(user, parent) if parent and self.answer == "block" else None
        if self.compact:
            for m in messages:
                if m.get("role") == "user":
                    m["content"] = compact_prompt(m["content"])
        if self.notebook and user is not None:
            messages[-1]["content"] = notebook.with_notebook(messages[-1]["content"], notebook.read(self.run_dir))
        if block is not None:
            messages[-1]["content"] = block_answers.block_prompt(messages[-1]["content"], block.name)
        return messages, parent, block.name if block else None

    async def _complete(self, request: list[dict], **kwargs) -> tuple[str, dict]:
        """One completion: (its text, its tokens)."""
        answer = await self._openai().chat.completions.create(
            model=self.model,
            messages=request,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            **({"seed": kwargs["seed"]} if "seed" in kwargs else {}),
        )
        text = answer.choices[0].message.content or ""
        usage = getattr(answer, "usage", None)
        self.last_usage = usage.model_dump() if usage is not None else None
        return text, call_tokens(usage, sum(len(m["content"]) for m in request), len(text))

    async def generate_with_context(self, system_message, messages, **kwargs):
        if self.meter is not None and self.meter.update().total >= self.budget:
            await asyncio.sleep(BUDGET_GRACE)  # the run's stop (its watch sees the budget too) comes meanwhile
            error = f"{BUDGET_SPENT} ({self.meter.total:,} tokens of {self.budget:,}): no call made"
            self._record(dict(time=time.time(), model=self.model, response=None, error=error))
            raise LLMError(error)
        messages, parent, block = self._prepared(messages)
        request = [{"role": "system", "content": system_message}, *messages]
        chars = sum(len(m["content"]) for m in request)
        turn, queued = evaluation_slot(self.turns, 1), time.monotonic()
        await asyncio.to_thread(turn.__enter__)  # waits for the server's previous call, off the event loop
        start, response, error, tokens, raw = time.monotonic(), None, None, None, []
        try:
            for _ in range(block_answers.RETRIES + 1 if block else 1):
                text, used = await self._complete(request, **kwargs)
                tokens, response, error = added(tokens, used), text, None
                if block is None:  # a diff answer; whole blocks given in its place are read as block answers
                    if parent and (edit := block_answers.blocks_in_diff_answer(text, parent)):
                        raw, response = [text], edit
                    break
                raw.append(text)
                try:
                    response = block_answers.read_block(text, parent, block)
                    break
                except block_answers.BlockRefused as refused:  # told why, once, within the call
                    response, error = None, f"{BLOCK_REFUSED}: {refused}"
                    retry = block_answers.retry_prompt(parent, block, text, str(refused))
                    request = [request[0], dict(role="user", content=retry)]
        except Exception as e:
            error = describe_failure(e, self.timeout)
        finally:
            turn.__exit__(None, None, None)
            self._record(
                dict(
                    time=time.time(),
                    model=self.model,
                    prompt_chars=chars,
                    **(tokens or dict(prompt_tokens=None, completion_tokens=None, tokens_estimated=None)),
                    seconds=round(time.monotonic() - start, 2),
                    waited_seconds=round(start - queued, 2),  # for the local server's previous call
                    response=response,
                    error=error,
                    **(dict(answer="block", block=block) if block else {}),
                    **(dict(raw_responses=raw) if raw else {}),
                )
            )
        if error:
            raise LLMError(error)
        return response

    def _record(self, call: dict):
        if self.run_dir:
            with open(Path(self.run_dir) / LLM_CALLS, "a") as f:
                f.write(json.dumps(call) + "\n")


def llm_client(
    model_cfg, run_dir=None, compact=False, notebook=True, answer="diff", max_llm_tokens=None, one_call_at_a_time=False
):
    """OpenEvolve's init_client hook (a module-level function: `functools.partial` of it pickles)."""
    return LLMClient(model_cfg, run_dir, compact, notebook, answer, max_llm_tokens, one_call_at_a_time)


def client_factory(
    run_dir: Path, compact: bool, notebook=True, answer="diff", max_llm_tokens=None, one_call_at_a_time=False
):
    return functools.partial(
        llm_client,
        run_dir=str(run_dir),
        compact=compact,
        notebook=notebook,
        answer=answer,
        max_llm_tokens=max_llm_tokens,
        one_call_at_a_time=one_call_at_a_time,
    )
