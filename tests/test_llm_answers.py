"""Block answers (the model rewrites one named EVOLVE-BLOCK, the client builds the edit) and the
tokens every LLM call costs, against a real HTTP server on 127.0.0.1 standing in for the LLM."""

import asyncio
import json

import pytest
from fake_llm_server import FakeLLMServer, asked_block, block_reply
from openevolve.config import LLMModelConfig
from openevolve.utils.code_utils import apply_diff_blocks, extract_diffs

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT
from plasa_lab.program.blocks import split_blocks
from plasa_lab.program.checks import integrity_violation, static_violation
from plasa_lab.rundir import LLM_CALLS
from plasa_lab.search.block_answers import BlockRefused, block_prompt, focus_block, read_block, unresolved_names
from plasa_lab.search.llm_client import LLMClient, LLMError, outcome_of
from plasa_lab.search.llm_setup import LOCAL_MAX_TOKENS, choose_llm, configure_llm
from plasa_lab.search.llm_usage import TokenMeter
from plasa_lab.search.run_config import load_config

PARENT = INITIAL_PROGRAM.read_text()
FOCUS = {
    "the selection rule in select_topk: which past keys each query keeps": "topk_selector",
    "the index score in LightningIndexer: heads, head size, activation": "lightning_indexer",
    "the sparsity schedule in layer_k_schedule: how many keys each layer keeps": "k_schedule",
    "the indexer's training signal in indexer_aux_loss and init_indexer: its target": "indexer_training",
}


def prompt(focus: str = next(iter(FOCUS))) -> str:
    """A user message shaped as prompts/diff_user.txt makes it."""
    return (
        f"# Current Program\n```python\n{PARENT}```\n\n# Program Evolution History\n(none)\n\n# Task\n"
        f"Lower the validation perplexity. This time, work on {focus}.\nPropose one concrete idea of your own in "
        "one or two sentences, then make exactly that change.\nThe archive also keeps programs with a different "
        "density, indexer_params.\n\n# Answer format\nOne or more SEARCH/REPLACE blocks.\n<<<<<<< SEARCH\n"
    )


def ask(server: FakeLLMServer, tmp_path, answer="block", user=None) -> str:
    """One call of the run's client (block answers, compact prompts) to `server`."""
    config = LLMModelConfig(name="fake-llm", api_base=server.url, api_key="none", timeout=10)
    client = LLMClient(config, str(tmp_path), compact=True, notebook=False, answer=answer)
    try:
        return asyncio.run(client.generate_with_context("system", [{"role": "user", "content": user or prompt()}]))
    finally:
        server.close()


def calls(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / LLM_CALLS).read_text().splitlines()]


def child_of(answer: str) -> str:
    return apply_diff_blocks(PARENT, extract_diffs(answer))[0]


def bodies(code: str) -> dict[str, str]:
    return {b.name: b.body for b in split_blocks(code)[1]}


def test_the_block_a_prompt_asks_for_is_the_one_its_focus_names():
    for focus, name in FOCUS.items():
        assert focus_block(prompt(focus), PARENT).name == name


def test_the_block_prompt_names_the_block_and_asks_for_one_fenced_block_and_nothing_else():
    user = block_prompt(prompt(), "topk_selector")
    answer_format = user[user.index("# Answer format") :]
    assert "named topk_selector" in answer_format and "one fenced python code block" in answer_format
    assert "Nothing else" in answer_format and "<<<<<<< SEARCH" not in user
    assert "one or two sentences" not in user  # the task no longer asks for prose before the code


def test_a_block_answer_becomes_a_child_that_differs_from_the_parent_only_in_that_block(tmp_path):
    server = FakeLLMServer(reply=block_reply)
    answer = ask(server, tmp_path)
    sent = server.requests[-1]["messages"][-1]["content"]
    assert "Rewrite the EVOLVE-BLOCK named topk_selector in full" in sent
    child = child_of(answer)
    assert integrity_violation(child, PARENT) is None
    changed = {name for name, body in bodies(child).items() if body != bodies(PARENT)[name]}
    assert changed == {"topk_selector"} and "# rewritten whole by the fake LLM" in bodies(child)["topk_selector"]
    (call,) = calls(tmp_path)
    assert call["response"] == answer and call["block"] == "topk_selector" and call["raw_responses"]


def test_a_block_that_does_not_parse_is_sent_back_with_one_line_and_a_fixed_one_is_taken(tmp_path):
    def reply(message):
        if "does not parse" in message:
            return block_reply(first[0])
        first.append(message)
        return "```python\ndef select_topk(scores, k:\n    return scores\n```"

    first = []
    server = FakeLLMServer(reply=reply)
    answer = ask(server, tmp_path)
    assert len(server.requests) == 2
    (reason,) = [line for line in server.requests[-1]["messages"][-1]["content"].split("\n") if "refused" in line]
    assert reason.startswith("It was refused: the block does not parse: ")  # one line
    assert "# rewritten whole by the fake LLM" in bodies(child_of(answer))["topk_selector"]


def test_a_retry_sends_the_block_the_refused_body_and_the_reason_not_the_whole_first_prompt_again(tmp_path):
    server = FakeLLMServer(reply=lambda message: "```python\ndef select_topk(scores, k:\n    return scores\n```")
    with pytest.raises(LLMError):
        ask(server, tmp_path)
    first, retry = (r["messages"] for r in server.requests)
    assert retry[0] == first[0] and [m["role"] for m in retry] == ["system", "user"]
    sent = retry[-1]["content"]
    assert bodies(PARENT)["topk_selector"].rstrip() in sent and "def select_topk(scores, k:" in sent
    assert "Return exactly one fenced python code block" in sent
    assert len(sent) < len(first[-1]["content"]) / 2  # it fits wherever the first request fitted


def test_a_block_still_bad_after_its_retry_is_an_iteration_with_no_child_and_a_one_line_error(tmp_path):
    server = FakeLLMServer(reply=lambda message: "```python\nwhile True\n```")
    with pytest.raises(LLMError) as raised:
        ask(server, tmp_path)
    error = str(raised.value)
    assert len(server.requests) == 2 and error.startswith("block answer refused: the block does not parse")
    assert "\n" not in error and outcome_of(None, f"LLM generation failed: {error}") == "no diff"
    (call,) = calls(tmp_path)
    assert call["error"] == error and len(call["raw_responses"]) == 2 and call["response"] is None
    assert call["prompt_tokens"] == 2 and call["completion_tokens"] == 2  # both completions were paid for


def test_a_diff_answer_that_gives_whole_blocks_instead_is_read_as_their_block_answers(tmp_path):
    body = bodies(PARENT)["topk_selector"]
    whole = f"Here it is:\n```python\n# EVOLVE-BLOCK-START topk_selector\n# keep fewer\n{body}# EVOLVE-BLOCK-END\n```\n"
    answer = ask(FakeLLMServer(reply=lambda message: whole), tmp_path, answer="diff")
    child = child_of(answer)
    assert integrity_violation(child, PARENT) is None and bodies(child)["topk_selector"] == f"# keep fewer\n{body}"
    assert {n for n, b in bodies(child).items() if b != bodies(PARENT)[n]} == {"topk_selector"}
    (call,) = calls(tmp_path)
    assert call["response"] == answer and call["raw_responses"] == [whole] and "block" not in call
    # a fence without a block's marker, or an answer with SEARCH/REPLACE, is left as the model gave it
    for untouched in (f"```python\n# keep fewer\n{body}```", f"<<<<<<< SEARCH\n{whole}"):
        assert ask(FakeLLMServer(reply=lambda message, u=untouched: u), tmp_path, answer="diff") == untouched


def test_a_block_answer_is_read_with_its_marker_lines_or_without_its_closing_fence():
    body = bodies(PARENT)["k_schedule"].replace("DENSE_UNTIL = 1 / 3", "DENSE_UNTIL = 0.5")
    answers = (
        f"```python\n# EVOLVE-BLOCK-START k_schedule\n{body}# EVOLVE-BLOCK-END k_schedule\n```",  # as answered
        f"```python\n{body}",  # cut before its closing fence
    )
    for answer in answers:
        assert bodies(child_of(read_block(answer, PARENT, "k_schedule")))["k_schedule"].strip() == body.strip()
    with pytest.raises(BlockRefused, match="may hold no EVOLVE-BLOCK marker"):  # another block's START stays
        read_block(f"```python\n# EVOLVE-BLOCK-START topk_selector\n{body}```", PARENT, "k_schedule")


def test_a_block_answer_smuggling_a_marker_or_code_outside_the_block_is_refused():
    name, body = asked_block(block_prompt(prompt(), "topk_selector"))
    smuggled = f"{body}# EVOLVE-BLOCK-END\nFFN_HIDDEN = 4096\n# EVOLVE-BLOCK-START topk_selector\n"
    with pytest.raises(BlockRefused, match="may hold no EVOLVE-BLOCK marker"):
        read_block(f"```python\n{smuggled}```", PARENT, name)
    # and were it let through, the checks every child meets refuse the child it would make
    assert integrity_violation(PARENT.replace(body, "# changed\n" + smuggled, 1), PARENT) is not None
    # a fixed name redefined inside the block stays inside it, and the static checks refuse the child
    edit = read_block(f"```python\n{body}FFN_HIDDEN = 4096\n```", PARENT, name)
    assert "fixed-names" in static_violation(child_of(edit), PARENT)


def test_a_block_answer_that_leaves_a_name_the_program_reads_undefined_is_refused_naming_it():
    body = bodies(PARENT)["k_schedule"]
    dropped = body.replace("DENSE_UNTIL = 1 / 3", "")  # as the local model answered three times
    with pytest.raises(BlockRefused, match=r"would read DENSE_UNTIL, which nothing defines \(a NameError\)"):
        read_block(f"```python\n{dropped}```", PARENT, "k_schedule")
    invented = body.replace("k = seq_len // LATE_DIVISOR", "k = seq_len // LATE_DIVISOR // EXTRA")
    with pytest.raises(BlockRefused, match="would read EXTRA"):
        read_block(f"```python\n{invented}```", PARENT, "k_schedule")
    renamed = dropped.replace("DENSE_UNTIL", "DENSE_BELOW") + "DENSE_BELOW = 0.3\n"  # defined in the block
    assert "DENSE_BELOW = 0.3" in child_of(read_block(f"```python\n{renamed}```", PARENT, "k_schedule"))


def test_unresolved_names_are_the_globals_read_anywhere_and_defined_nowhere():
    code = (
        "import math\nX = 1\nclass A:\n    y = Z\n"
        "    def f(self):\n        return W + X + math.pi + len([q for q in R])\n"
        "def g():\n    global NEW\n    NEW = 3\n    return lambda t: t + V + NEW + __name__\n"
    )
    assert unresolved_names(code) == {"Z", "W", "R", "V"}
    assert unresolved_names(PARENT) == set()


def test_a_block_answer_that_changes_nothing_holds_no_code_or_does_not_compile_is_refused():
    name, body = "topk_selector", bodies(PARENT)["topk_selector"]
    refusals = (f"```python\n{body}```", "unchanged"), ("I would keep it.", "does not parse")
    refusals += ((f"```python\n{body}nonlocal k\n```", "does not parse: nonlocal declaration"),)  # compile() refuses
    for answer, reason in refusals:
        with pytest.raises(BlockRefused, match=reason):
            read_block(answer, PARENT, name)


def test_token_counts_are_recorded_per_call_from_the_servers_usage(tmp_path):
    usage = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}
    ask(FakeLLMServer(usage=usage), tmp_path, answer="diff")
    (call,) = calls(tmp_path)
    assert (call["prompt_tokens"], call["completion_tokens"], call["tokens_estimated"]) == (120, 30, False)


def test_tokens_are_estimated_from_characters_and_marked_when_the_server_gives_no_usage(tmp_path):
    server = FakeLLMServer(usage=None)
    response = ask(server, tmp_path, answer="diff")
    (call,) = calls(tmp_path)
    assert call["tokens_estimated"] is True
    assert call["prompt_tokens"] == -(-call["prompt_chars"] // 4) and call["completion_tokens"] == -(
        -len(response) // 4
    )
    meter = TokenMeter(tmp_path).update()
    assert meter.calls == 1 and meter.estimated_calls == 1
    line = meter.line(price=(3.0, 15.0), budget=100000)
    assert "1 of them estimated" in line and "--max-llm-tokens" in line and "estimated cost $" in line
    record = meter.record((3.0, 15.0), 100000)
    assert record["estimated_cost"] == round((meter.prompt_tokens * 3 + meter.completion_tokens * 15) / 1e6, 4)


def test_the_token_meter_reads_only_new_whole_lines(tmp_path):
    path = tmp_path / LLM_CALLS
    path.write_text(json.dumps(dict(prompt_tokens=10, completion_tokens=5)) + "\n" + '{"prompt_tok')
    meter = TokenMeter(tmp_path).update()
    assert meter.total == 15
    with open(path, "a") as f:
        f.write('ens": 1, "completion_tokens": 2}\n' + json.dumps(dict(prompt_tokens=None, error="HTTP 500")) + "\n")
    assert meter.update().total == 18 and meter.calls == 2


def test_a_local_server_answers_in_whole_blocks_and_an_api_in_diffs_unless_told_otherwise(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    config, _ = load_config(PROJECT_ROOT / "config.yaml")
    local = choose_llm("local", "http://127.0.0.1:1/v1", "m", config)
    assert local.answer == "block" and "whole-block answers" in local.note and "one call at a time" in local.note
    assert choose_llm("api", None, "m", config).answer == "diff"
    assert choose_llm("local", "http://127.0.0.1:1/v1", "m", config, answer="diff").answer == "diff"


def test_a_local_servers_answers_are_capped_so_a_rambling_one_ends_within_its_call(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    config, _ = load_config(PROJECT_ROOT / "config.yaml")
    assert config.llm.models[0].max_tokens > LOCAL_MAX_TOKENS  # the config's, for API models
    configure_llm(config, choose_llm("local", "http://127.0.0.1:1/v1", "m", config), tmp_path)
    assert [m.max_tokens for m in config.llm.models] == [LOCAL_MAX_TOKENS]
    api, _ = load_config(PROJECT_ROOT / "config.yaml")
    configured = api.llm.models[0].max_tokens
    configure_llm(api, choose_llm("api", None, None, api), tmp_path)
    assert {m.max_tokens for m in api.llm.models} == {configured}
