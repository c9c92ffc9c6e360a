"""The synthetic teacher, served on 127.0.0.1 over the OpenAI HTTP protocol.

Speaks ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models`` (stdlib
only), so ``negkd sample --base-url http://127.0.0.1:PORT/v1`` exercises its real client path.
The problem is recovered from the prompt text (the last problem in the last user message, or in
the whole prompt, so few-shot prompts work) by :func:`arithgen.parse_question`; choice ``i`` of a
request with seed ``s`` is :func:`arithgen.teacher_rationale` ``(problem, seed=s, index=i)``, so
the same request always gets the same answer. A prompt with no recognisable problem gets a 400.

    python teacher_server.py --port 0 --url-file url.txt   # serves until killed; writes its base URL
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arithgen import parse_question, teacher_rationale  # noqa: E402

MODEL = "arith-teacher"
TEACHERS = ("v1", "study")  # v1: arithgen.teacher_rationale; study: worlds.teacher (length-dependent errors)


def complete(prompt: str, seed, n: int, kind: str = "v1") -> list[str] | None:
    parsed = parse_question(prompt)
    if parsed is None:
        return None
    ops, name, thing = parsed
    if kind == "study":
        import worlds

        return [worlds.teacher(ops, name, thing, seed=seed, index=i)[0] for i in range(n)]
    return [teacher_rationale(ops, name, thing, seed=seed, index=i)[0] for i in range(n)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def _send(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, msg: str) -> None:
        self._send(status, {"error": {"message": msg, "type": "invalid_request_error", "code": None}})

    def do_GET(self):
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "negkd"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            return self._error(400, "body is not JSON")
        chat = self.path.rstrip("/").endswith("/chat/completions")
        if not chat and not self.path.rstrip("/").endswith("/completions"):
            return self._error(404, f"no route {self.path}")
        if chat:
            msgs = body.get("messages") or []
            users = [str(m.get("content", "")) for m in msgs if m.get("role") == "user"]
            prompt = users[-1] if users else ""
            if parse_question(prompt) is None:
                prompt = "\n".join(str(m.get("content", "")) for m in msgs)
        else:
            prompt = body.get("prompt", "")
            prompt = prompt[0] if isinstance(prompt, list) else str(prompt)
        n = int(body.get("n") or 1)
        texts = complete(prompt, body.get("seed"), n, self.server.teacher)  # type: ignore[attr-defined]
        if texts is None:
            return self._error(400, "no arithmetic problem found in the prompt")
        self.server.served += n  # type: ignore[attr-defined]
        created = int(time.time())
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop",
                        "logprobs": None} for i, t in enumerate(texts)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": t, "finish_reason": "stop", "logprobs": None} for i, t in enumerate(texts)]
            obj = "text_completion"
        ptok = len(prompt.split())
        ctok = sum(len(t.split()) for t in texts)
        self._send(200, {"id": f"arith-{created}-{self.server.served}", "object": obj, "created": created,  # type: ignore[attr-defined]
                         "model": body.get("model", MODEL), "choices": choices,
                         "usage": {"prompt_tokens": ptok, "completion_tokens": ctok, "total_tokens": ptok + ctok}})


def serve(port: int = 0, teacher: str = "v1") -> ThreadingHTTPServer:
    """Start the server in a daemon thread; ``srv.server_address[1]`` is the port; ``srv.shutdown()`` stops it."""
    if teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {teacher!r}; expected one of {TEACHERS}")
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.teacher = teacher  # type: ignore[attr-defined]
    srv.daemon_threads = True
    srv.served = 0  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Serve the synthetic arithmetic teacher on 127.0.0.1.")
    ap.add_argument("--port", type=int, default=0, help="port (0: a free one)")
    ap.add_argument("--url-file", type=Path, help="write the base URL (http://127.0.0.1:PORT/v1) here once listening")
    ap.add_argument("--teacher", choices=TEACHERS, default="v1",
                    help="v1: the original per-level slips (arithgen); study: worlds.teacher, whose per-step error "
                         "rate grows with the problem's length and never depends on the skill")
    args = ap.parse_args(argv)
    srv = serve(args.port, args.teacher)
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    if args.url_file:
        tmp = args.url_file.with_suffix(".tmp")
        tmp.write_text(url)
        tmp.replace(args.url_file)
    print(url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.shutdown()


if __name__ == "__main__":
    main()
