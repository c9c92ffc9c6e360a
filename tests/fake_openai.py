"""A loopback OpenAI-compatible HTTP server for tests and benchmarks, with injectable faults.

It speaks the chat-completions (``POST /v1/chat/completions``) and completions
(``POST /v1/completions``) wire formats plus ``GET /v1/models``, on 127.0.0.1 and a free port,
over plain HTTP/1.1 with keep-alive. It is a small asyncio server (no dependencies), so it is
cheap enough to sit beside a client that sends thousands of requests.

Use it in a test::

    from fake_openai import FakeOpenAI, http_error, hang, drop

    def responder(req, i):            # req: Request (prompt, messages, seed, n, body...), i: choice index
        return f"... The answer is $\\boxed{{{len(req.prompt)}}}$."

    with FakeOpenAI(responder, api_key="sk-test") as srv:
        srv.inject(http_error(429, retry_after=0.1), drop(), hang(5))   # the next 3 requests fail so
        srv.inject(http_error(500), match=lambda r: "x^2" in r.prompt, times=2)
        ... AsyncOpenAI(base_url=srv.url, api_key="sk-test") ...
        assert srv.stats["ok"] == ...

A responder returns the completion text, or ``(text, finish_reason)``. The default responder
returns a deterministic pseudo-rationale that depends on the prompt, seed, temperature and choice
index (so equal seeds give equal text, as with a real seeded server) and ends in ``\\boxed{}``.

Faults (module functions returning :class:`Fault`):
``http_error(status, retry_after=None, message=None, code=None, fastapi=False)`` an error
response (optional ``Retry-After`` header; ``fastapi=True``: a FastAPI-style ``{"detail": message}``
body, as ``transformers serve`` sends); ``hang(seconds)`` read the request and answer nothing for ``seconds``
(the client times out); ``drop()`` close the connection without a response; ``malformed()`` a
200 whose body is truncated JSON; ``empty_choices()`` a 200 with ``"choices": []``;
``delay(seconds)`` answer normally after an extra delay. Queue faults with :meth:`inject`
(FIFO, optionally only for requests a ``match`` predicate accepts) or pass ``fault_fn(req)`` to
decide per request. Every request is recorded in ``srv.requests``; outcomes are counted in
``srv.stats`` (``ok``, ``status:429``, ``hang``, ``drop``, ``malformed``, ``empty_choices``, ...);
``srv.max_in_flight`` is the most completion requests it was answering at once.

Other knobs: ``latency`` (seconds, or a callable ``req -> seconds``) before each answer;
``api_key`` (requests without ``Authorization: Bearer <key>`` get a 401); ``models`` (other
model names get a 404 ``model_not_found``); ``n_mode`` ``"ok"`` (honour ``n``), ``"reject"`` (400
for n > 1, like servers without ``n`` support) or ``"ignore"`` (always one choice, like
``transformers serve``); ``die_after`` (after that many successful completions the server dies
as a crashed process would: its port refuses connections and open ones are cut; ``srv.dead``
is then set).

For a benchmark, run it in its own process so it does not share the client's CPU::

    python tests/fake_openai.py --latency 0.3      # prints the base URL, serves until killed
    srv = spawn_server(latency=0.3)                  # the same from Python: srv.url, srv.close()
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FakeOpenAI", "Fault", "Request", "default_responder", "http_error", "hang", "drop", "malformed",
    "empty_choices", "delay", "spawn_server",
]

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large", 422: "Unprocessable Entity",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    """What the server does instead of (or before) a normal answer. Build with the helpers below."""

    kind: str  # "status" | "hang" | "drop" | "malformed" | "empty_choices" | "delay"
    status: int = 500
    retry_after: float | None = None
    message: str | None = None
    code: str | None = None
    seconds: float = 0.0
    fastapi: bool = False


def http_error(status: int, retry_after: float | None = None, message: str | None = None,
               code: str | None = None, fastapi: bool = False) -> Fault:
    """An error response with an OpenAI-style ``{"error": {...}}`` body (and ``Retry-After``), or
    with ``fastapi=True`` a FastAPI-style ``{"detail": message}`` body."""
    return Fault("status", status=status, retry_after=retry_after, message=message, code=code, fastapi=fastapi)


def hang(seconds: float = 30.0) -> Fault:
    """Read the request, then send nothing for ``seconds`` and close (the client should time out)."""
    return Fault("hang", seconds=seconds)


def drop() -> Fault:
    """Close the connection right after reading the request, without any response."""
    return Fault("drop")


def malformed() -> Fault:
    """A 200 with ``Content-Type: application/json`` whose body is cut-off JSON."""
    return Fault("malformed")


def empty_choices() -> Fault:
    """A 200 with a well-formed completion object whose ``choices`` list is empty."""
    return Fault("empty_choices")


def delay(seconds: float) -> Fault:
    """A normal answer after ``seconds`` more latency."""
    return Fault("delay", seconds=seconds)


# --------------------------------------------------------------------------- requests


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    index: int  # arrival order, from 0
    api: str = ""  # "chat" | "completions" | "" (other endpoints)

    @property
    def model(self) -> str | None:
        return self.body.get("model")

    @property
    def messages(self) -> list[dict]:
        return self.body.get("messages") or []

    @property
    def prompt(self) -> str:
        """The completion prompt, or for chat the content of the last user message."""
        if self.api == "completions":
            p = self.body.get("prompt", "")
            return p if isinstance(p, str) else json.dumps(p)
        for m in reversed(self.messages):
            if m.get("role") == "user":
                c = m.get("content", "")
                return c if isinstance(c, str) else json.dumps(c)
        return ""

    @property
    def n(self) -> int:
        return int(self.body.get("n") or 1)

    @property
    def seed(self) -> int | None:
        return self.body.get("seed")

    @property
    def temperature(self) -> float | None:
        return self.body.get("temperature")


def default_responder(req: Request, i: int) -> str:
    """A deterministic pseudo-rationale: a function of (prompt, seed, temperature, choice index)."""
    h = hashlib.sha256(f"{req.prompt}|{req.seed}|{req.temperature}|{i}".encode()).hexdigest()
    return f"Let's think step by step. Working {h[:12]}. The answer is $\\boxed{{{int(h[12:16], 16) % 50}}}$."


def _ntok(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- server


Responder = Callable[[Request, int], "str | tuple[str, str]"]


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1 running in a background thread (see module doc)."""

    def __init__(self, responder: Responder | None = None, *, latency: float | Callable[[Request], float] = 0.0,
                 api_key: str | None = None, models: list[str] | None = None, n_mode: str = "ok",
                 fault_fn: Callable[[Request], Fault | None] | None = None, host: str = "127.0.0.1",
                 port: int = 0, record: bool = True, die_after: int | None = None):
        if n_mode not in ("ok", "reject", "ignore"):
            raise ValueError(f"n_mode must be ok|reject|ignore, not {n_mode!r}")
        self.responder = responder or default_responder
        self.latency = latency
        self.api_key = api_key
        self.models = models
        self.n_mode = n_mode
        self.fault_fn = fault_fn
        self.host, self.port = host, port
        self.record = record
        self.die_after = die_after
        self.dead = threading.Event()
        self.requests: list[Request] = []
        self.stats: Counter = Counter()
        self._faults: list[list] = []  # [fault, match, times_left]
        self._lock = threading.Lock()
        self._count = 0
        self.in_flight = 0  # completion requests being answered right now
        self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[asyncio.Task] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ---- lifecycle
    @property
    def url(self) -> str:
        """The base URL to give an OpenAI client (ends in ``/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "FakeOpenAI":
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            fut.result(5)
        except Exception:  # pragma: no cover - best effort
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._thread = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, self.port, backlog=1024))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # pragma: no cover - port in use etc.
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)

    async def serve_forever(self) -> None:
        """Serve on the current event loop (for the stand-alone process)."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        async with self._server:
            await self._server.serve_forever()

    # ---- faults
    def inject(self, *faults: Fault, match: Callable[[Request], bool] | None = None, times: int = 1) -> None:
        """Queue faults: each is used by the next ``times`` completion requests that ``match`` accepts."""
        with self._lock:
            for f in faults:
                self._faults.append([f, match, times])

    def pending_faults(self) -> int:
        with self._lock:
            return sum(x[2] for x in self._faults)

    def _take_fault(self, req: Request) -> Fault | None:
        if self.fault_fn is not None:
            f = self.fault_fn(req)
            if f is not None:
                return f
        with self._lock:
            for entry in self._faults:
                f, match, left = entry
                if left > 0 and (match is None or match(req)):
                    entry[2] -= 1
                    if entry[2] == 0:
                        self._faults.remove(entry)
                    return f
        return None

    # ---- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    method, target, _ = line.decode("latin-1").split(" ", 2)
                except ValueError:
                    break
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length") or 0)
                raw = await reader.readexactly(length) if length else b""
                keep = await self._dispatch(method, target.split("?", 1)[0], headers, raw, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            try:
                writer.close()
            except Exception:  # pragma: no cover
                pass

    def _send(self, writer: asyncio.StreamWriter, status: int, obj: Any = None, raw: bytes | None = None,
              headers: dict[str, str] | None = None) -> None:
        body = raw if raw is not None else json.dumps(obj).encode()
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "content-type: application/json",
                f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    @staticmethod
    def _error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
                    param: str | None = None) -> dict:
        return {"error": {"message": message, "type": type_, "param": param, "code": code}}

    async def _dispatch(self, method: str, path: str, headers: dict, raw: bytes,
                        writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return False to close the connection."""
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            body = {}
        api = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
               "/chat/completions": "chat", "/completions": "completions"}.get(path, "")
        with self._lock:
            idx = self._count
            self._count += 1
        req = Request(method, path, headers, body if isinstance(body, dict) else {}, idx, api)
        if self.record:
            self.requests.append(req)

        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            self.stats["status:401"] += 1
            self._send(writer, 401, self._error_body(
                "Incorrect API key provided.", code="invalid_api_key"))
            await writer.drain()
            return True
        if method == "GET" and path.rstrip("/").endswith("/models"):
            names = self.models or ["fake-model"]
            self._send(writer, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in names]})
            await writer.drain()
            return True
        if method != "POST" or not api:
            self.stats["status:404"] += 1
            self._send(writer, 404, self._error_body(f"no route {method} {path}"))
            await writer.drain()
            return True
        if self.models is not None and req.model not in self.models:
            self.stats["status:404"] += 1
            self._send(writer, 404, self._error_body(
                f"The model `{req.model}` does not exist or you do not have access to it.", code="model_not_found"))
            await writer.drain()
            return True
        if self.n_mode == "reject" and req.n > 1:
            self.stats["status:400"] += 1
            self._send(writer, 400, self._error_body(
                "n > 1 is not supported by this server", code="unsupported_value", param="n"))
            await writer.drain()
            return True

        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._complete(req, writer)
        finally:
            self.in_flight -= 1

    async def _complete(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        fault = self._take_fault(req)
        lat = self.latency(req) if callable(self.latency) else self.latency
        if fault is not None and fault.kind == "delay":
            lat += fault.seconds
            fault = None
        if fault is not None:
            self.stats[fault.kind if fault.kind != "status" else f"status:{fault.status}"] += 1
            if fault.kind == "drop":
                writer.transport.abort()
                return False
            if fault.kind == "hang":
                await asyncio.sleep(fault.seconds)
                return False
            if lat:
                await asyncio.sleep(lat)
            if fault.kind == "status":
                hdrs = {}
                if fault.retry_after is not None:
                    hdrs["retry-after"] = f"{fault.retry_after:g}"
                if fault.fastapi:
                    self._send(writer, fault.status, {"detail": fault.message or f"injected {fault.status}"},
                               headers=hdrs)
                    await writer.drain()
                    return True
                self._send(writer, fault.status, self._error_body(
                    fault.message or f"injected {fault.status}",
                    type_="rate_limit_error" if fault.status == 429 else "server_error"
                    if fault.status >= 500 else "invalid_request_error", code=fault.code), headers=hdrs)
            elif fault.kind == "malformed":
                self._send(writer, 200, raw=b'{"id": "cmpl-broken", "object": "chat.completion", "choices": [{"ind')
            elif fault.kind == "empty_choices":
                self._send(writer, 200, self._completion(req, []))
            await writer.drain()
            return True

        if lat:
            await asyncio.sleep(lat)
        n = 1 if self.n_mode == "ignore" else max(1, req.n)
        outs = []
        for i in range(n):
            r = self.responder(req, i)
            text, finish = (r, "stop") if isinstance(r, str) else r
            outs.append((text, finish))
        if self.dead.is_set():  # answered after the death was decided: cut, as a crash would
            writer.transport.abort()
            return False
        self.stats["ok"] += 1
        self.stats["choices"] += n
        self._send(writer, 200, self._completion(req, outs))
        await writer.drain()
        if self.die_after is not None and self.stats["ok"] >= self.die_after and not self.dead.is_set():
            self.dead.set()
            asyncio.get_running_loop().create_task(self._shutdown())
            return False
        return True

    def _completion(self, req: Request, outs: list[tuple[str, str]]) -> dict:
        if req.api == "chat":
            prompt_tokens = sum(_ntok(str(m.get("content", ""))) + 3 for m in req.messages)
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f,
                        "logprobs": None} for i, (t, f) in enumerate(outs)]
            obj = "chat.completion"
        else:
            prompt_tokens = _ntok(req.prompt)
            choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
                       for i, (t, f) in enumerate(outs)]
            obj = "text_completion"
        completion_tokens = sum(_ntok(t) for t, _ in outs)
        return {"id": f"cmpl-{req.index}", "object": obj, "created": int(time.time()),
                "model": req.model or "fake-model", "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


# --------------------------------------------------------------------------- own process


@dataclass
class SpawnedServer:
    """A fake server in a child process (see :func:`spawn_server`)."""

    proc: subprocess.Popen
    url: str
    _closed: bool = field(default=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()

    def __enter__(self) -> "SpawnedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spawn_server(latency: float = 0.0, api_key: str | None = None, n_mode: str = "ok") -> SpawnedServer:
    """Start the default-responder server in its own Python process; returns its URL."""
    cmd = [sys.executable, __file__, "--latency", str(latency), "--n-mode", n_mode]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError("fake OpenAI server did not start")
    return SpawnedServer(proc, url)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="A loopback OpenAI-compatible server (default responder).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    ap.add_argument("--api-key", default=None, help="require this bearer token")
    ap.add_argument("--n-mode", default="ok", choices=["ok", "reject", "ignore"])
    a = ap.parse_args(argv)
    srv = FakeOpenAI(latency=a.latency, api_key=a.api_key, n_mode=a.n_mode, host=a.host, port=a.port,
                     record=False)

    async def run() -> None:
        task = asyncio.create_task(srv.serve_forever())
        while srv._server is None:
            await asyncio.sleep(0.01)
        print(srv.url, flush=True)
        await task

    try:
        asyncio.run(run())
    except KeyboardInterrupt:  # pragma: no cover
        pass


if __name__ == "__main__":
    main()
