"""A fake LLM behind a real OpenAI-compatible HTTP server on 127.0.0.1, for tests only.

No real LLM can run in CI, so this server stands in for one (llama.cpp's server, vLLM, an API):
it speaks the same HTTP protocol the real OpenAI client uses (/v1/models, /v1/chat/completions)
and answers from a scripted `reply(prompt)` function.
"""

import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from plasa_lab.program.blocks import split_blocks
from plasa_lab.search.mutator import format_diff, parent_program, propose_edits

USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def mutator_reply(prompt: str) -> str:
    """Valid diffs inside the blocks (the offline mutator's, seeded by the prompt)."""
    return format_diff(propose_edits(parent_program(prompt), random.Random(len(prompt))))


def outside_edit_reply(prompt: str) -> str:
    """A diff that edits the fixed code outside every EVOLVE-BLOCK."""
    return (
        "Make the FFN wider.\n<<<<<<< SEARCH\nFFN_HIDDEN = 768  # SwiGLU hidden size: 4 layers then hold "
        "~1.53M non-embedding parameters\n=======\nFFN_HIDDEN = 1024  # wider\n>>>>>>> REPLACE\n"
    )


def asked_block(prompt: str) -> str:
    """The block a block-answer prompt names, and its body in the prompt's current program."""
    name = re.search(r"Rewrite the EVOLVE-BLOCK named (\w+)", prompt)[1]
    return name, next(b.body for b in split_blocks(parent_program(prompt))[1] if b.name == name)


def block_reply(prompt: str) -> str:
    """A block answer (--answer block): the named block in full, one comment line added (a change the
    ledger answers, as it keys on the code's AST: the child needs no training)."""
    name, body = asked_block(prompt)
    return f"```python\n# rewritten whole by the fake LLM\n{body}```\n"


class FakeLLMServer:
    """`reply(prompt)` answers each chat request; `fail_after=n` answers every request after the
    first n with HTTP 500 and a fixed error (a server that keeps failing the same way);
    `context_chars` refuses longer prompts with HTTP 400, as llama.cpp does past its context;
    `usage` is the token count each answer reports (None: the answer has no `usage`); `reply_seconds`
    is how long each answer takes (a slow LLM: a small model on a CPU)."""

    def __init__(
        self, reply=mutator_reply, fail_after=None, context_chars=None, fail_seconds=0.0, usage=USAGE, reply_seconds=0.0
    ):
        self.reply, self.requests, self.fail_after, self.context_chars = reply, [], fail_after, context_chars
        self.usage, self.reply_seconds = usage, reply_seconds
        self.fail_seconds = fail_seconds  # how long a failing request takes
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body, status=200):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "fake-llm", "object": "model", "owned_by": "tests"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(request)
                chars = sum(len(m["content"]) for m in request["messages"])
                if server.context_chars and chars > server.context_chars:
                    return self._send(
                        {
                            "error": {
                                "message": f"the request exceeds the available context size "
                                f"({chars} > {server.context_chars} characters)"
                            }
                        },
                        400,
                    )
                if server.fail_after is not None and len(server.requests) > server.fail_after:
                    time.sleep(server.fail_seconds)
                    return self._send({"error": {"message": "model crashed: out of memory"}}, 500)
                time.sleep(server.reply_seconds)
                content = server.reply(request["messages"][-1]["content"])
                self._send(
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": 0,
                        "model": request["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                        ],
                        **({"usage": server.usage} if server.usage is not None else {}),
                    }
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
