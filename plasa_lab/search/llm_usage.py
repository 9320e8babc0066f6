"""What the LLM calls of a run cost: tokens per call, the run's totals, a budget and a price.

Each call's tokens are the server's own count (the `usage` of its answer), else an estimate of one
token per four characters, marked `tokens_estimated` (llama.cpp's server and most APIs give usage;
an estimate is only a guide). The LLM client records them per call in llm_calls.jsonl; the run
reads them back (`TokenMeter`, while it runs) for the budget (`--max-llm-tokens`: a clean stop
once the run's total reaches it) and for the totals and the estimated cost (`--price-per-million
IN,OUT`, dollars per million prompt and completion tokens) in run.json and in the run's last lines.

The totals are the whole run's, resumes included: every call in llm_calls.jsonl was paid for, the
calls of iterations a resume ran again too. The start-up check's one-token completion is not counted.
"""

import json
from pathlib import Path

from ..rundir import LLM_CALLS

CHARS_PER_TOKEN = 4


def call_tokens(usage, prompt_chars: int, response_chars: int) -> dict:
    """One completion's tokens: from the server's usage (an object or a dict), else estimated."""
    if usage is not None and not isinstance(usage, dict):
        usage = usage.model_dump() if hasattr(usage, "model_dump") else dict(vars(usage))
    prompt, completion = (usage or {}).get("prompt_tokens"), (usage or {}).get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return dict(prompt_tokens=prompt, completion_tokens=completion, tokens_estimated=False)
    return dict(
        prompt_tokens=-(-prompt_chars // CHARS_PER_TOKEN),
        completion_tokens=-(-response_chars // CHARS_PER_TOKEN),
        tokens_estimated=True,
    )


def added(a: dict | None, b: dict) -> dict:
    """The tokens of two completions of one call (a retry), estimated if either was."""
    if a is None:
        return dict(b)
    return dict(
        prompt_tokens=a["prompt_tokens"] + b["prompt_tokens"],
        completion_tokens=a["completion_tokens"] + b["completion_tokens"],
        tokens_estimated=a["tokens_estimated"] or b["tokens_estimated"],
    )


class TokenMeter:
    """The run's token totals, read from llm_calls.jsonl as it grows (only the new lines each time)."""

    def __init__(self, run_dir: Path):
        self.path, self.offset = Path(run_dir) / LLM_CALLS, 0
        self.calls = self.prompt_tokens = self.completion_tokens = self.estimated_calls = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def update(self) -> "TokenMeter":
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next update
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                call = json.loads(line)
            except ValueError:
                continue
            if call.get("prompt_tokens") is None or call.get("completion_tokens") is None:
                continue  # a failed call: the server answered nothing
            self.calls += 1
            self.prompt_tokens += int(call["prompt_tokens"])
            self.completion_tokens += int(call["completion_tokens"])
            self.estimated_calls += bool(call.get("tokens_estimated"))
        return self

    def record(self, price: tuple[float, float] | None = None, budget: int | None = None) -> dict:
        """The totals as run.json keeps them."""
        return dict(
            calls=self.calls,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total,
            estimated_calls=self.estimated_calls,
            max_llm_tokens=budget,
            price_per_million=list(price) if price else None,
            estimated_cost=round(self.cost(price), 4) if price else None,
        )

    def cost(self, price: tuple[float, float]) -> float:
        return (self.prompt_tokens * price[0] + self.completion_tokens * price[1]) / 1e6

    def line(self, price: tuple[float, float] | None = None, budget: int | None = None) -> str:
        """The run's LLM tokens in one line (for its summary)."""
        estimated = (
            f", {self.estimated_calls} of them estimated at {CHARS_PER_TOKEN} characters a token (no usage from "
            "the server)"
            if self.estimated_calls
            else ""
        )
        text = (
            f"LLM tokens: {self.total:,} over {self.calls} call(s) ({self.prompt_tokens:,} prompt, "
            f"{self.completion_tokens:,} completion{estimated})"
        )
        if budget:
            text += f"; budget {budget:,} (--max-llm-tokens)"
        if price:
            text += f"; estimated cost ${self.cost(price):.4f} at ${price[0]:g}/${price[1]:g} per million in/out"
        return text
