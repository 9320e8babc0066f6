"""A fake LLM behind a real OpenAI-compatible HTTP server on 127.0.0.1, for tests only.

No real LLM can run in CI, so this server stands in for one (llama.cpp's server, vLLM, an API):
it speaks the same HTTP protocol the real OpenAI client uses (/v1/models, /v1/chat/completions)
and answers from a scripted `reply(prompt)` function.
"""

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from plasa_lab.mutator import format_diff, parent_program, propose_edits


def mutator_reply(prompt: str) -> str:
    """Valid diffs inside the blocks (the offline mutator's, seeded by the prompt)."""
    return format_diff(propose_edits(parent_program(prompt), random.Random(len(prompt))))


def outside_edit_reply(prompt: str) -> str:
    """A diff that edits the fixed code outside every EVOLVE-BLOCK."""
    return ("Make the FFN wider.\n<<<<<<< SEARCH\nFFN_HIDDEN = 768  # SwiGLU hidden size: 4 layers then hold "
            "~1.53M non-embedding parameters\n=======\nFFN_HIDDEN = 1024  # wider\n>>>>>>> REPLACE\n")


class FakeLLMServer:
    def __init__(self, reply=mutator_reply):
        self.reply, self.requests = reply, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "fake-llm", "object": "model", "owned_by": "tests"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(request)
                content = server.reply(request["messages"][-1]["content"])
                self._send({"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": request["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": content}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
