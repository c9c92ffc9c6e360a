"""An async client for any OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, TGI, llama.cpp, ...).

Shared by ``negkd sample`` and ``negkd infer --backend openai``. The API::

    from negkd.client import Teacher, Job, SamplingParams, run_jobs

    params = SamplingParams(temperature=0.5, top_p=1.0, max_tokens=1024)
    async with Teacher("http://localhost:8000/v1", "my-model", api="chat", concurrency=64,
                       timeout=120, max_retries=6, rpm=None, tpm=None) as teacher:
        resp = await teacher.complete(messages_or_text, params, n=4, seed=1234)
        resp.choices[0].text, resp.choices[0].finish_reason, resp.prompt_tokens, resp.completion_tokens

        def on_result(job, result):        # result: Response, or RequestFailed (failed for good)
            ...                            # may return new Jobs to run
        await run_jobs(teacher, jobs, params, on_result)   # FatalError stops everything and is raised

    teacher.stats   # requests sent, retries, failures, tokens, errors by kind

Behaviour:

- *One connection pool*: a single ``openai.AsyncOpenAI`` client (its own retries off,
  ``max_retries=0``, so every retry is ours and counted) over one ``httpx`` pool sized to the
  concurrency. The client's CPU per request is what limits throughput on a small machine (the
  server mostly waits), so by default (``transport="pool"``) requests are POSTed through that
  pool with the headers the openai client builds (auth, user agent), computed once, and the JSON
  is parsed here: ~1.0 ms of client CPU per request against ~1.4 ms for
  ``transport="openai"`` (``AsyncOpenAI.post(..., cast_to=httpx.Response)``) and ~2.2 ms for the
  typed ``chat.completions.create`` (which also raises a bare ``JSONDecodeError`` on a malformed
  body). Both transports classify errors identically.
- *Bounded concurrency*: at most ``concurrency`` requests in flight; a request waiting out a
  back-off does not hold a slot.
- *Retries* with exponential back-off and jitter (``backoff * 2**attempt``, scaled by a uniform
  factor in [0.5, 1], capped at ``max_backoff``) on connection errors, timeouts, 408/409/429/5xx,
  malformed bodies and empty ``choices``. A ``Retry-After`` (or ``retry-after-ms``) header is
  honoured, and on a 429 it pauses every request, not only the one that got it.
- A 400 asking for ``max_completion_tokens`` instead of ``max_tokens`` (OpenAI's reasoning
  models) switches the field and retries.
- *Fatal errors* stop the run instead of burning through the input: 400 (except a prompt over
  the context length, which fails only its own request), 401, 403, 404, 422, and a 429 whose
  code is ``insufficient_quota``. They raise :class:`FatalError` with a message that names the fix.
  Error text is read from OpenAI-style ``{"error": {"message"}}``, flat ``{"message"}`` (older
  vLLM) and FastAPI-style ``{"detail": ...}`` bodies (``transformers serve``).
- *Circuit breaker*: when every attempt for ``breaker_s`` seconds (and at least 3 in a row)
  failed to connect, the server is down: a :class:`FatalError` naming the URL stops the run
  instead of retrying each request for minutes. Any answer from the server (even a 500) resets it.
- *n choices per prompt*: :class:`NChoices` asks for up to ``n_per_request`` choices in one
  request and falls back to one request per choice when a server rejects ``n`` or returns fewer
  choices than asked (``transformers serve`` ignores ``n``); ``sample`` and ``infer`` share it.
- *Rate limits* (client side): ``rpm`` requests and ``tpm`` tokens per minute, token buckets
  holding one second of budget; a request is charged its estimated prompt tokens plus
  ``max_tokens * n`` up front (what OpenAI counts), plus any reported usage beyond that.
- The API key is read from the environment variable ``api_key_env`` and is scrubbed from every
  message this module produces; it is never logged or written.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

RETRY_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({400, 401, 403, 404, 422})


# --------------------------------------------------------------------------- records


@dataclass
class SamplingParams:
    """Sampling settings sent with every request (``None`` = the server's default)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other body fields (e.g. vLLM's top_k)


@dataclass
class Choice:
    text: str
    finish_reason: str | None
    index: int


@dataclass
class Response:
    """One successful request: its choices and the server-reported usage."""

    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    model: str | None
    attempts: int  # HTTP attempts this request took (1 = no retry)
    latency_s: float  # of the successful attempt


@dataclass
class Job:
    """One request to run with :func:`run_jobs`; ``tag`` is the caller's handle."""

    prompt: Any  # str (completions API) or list of chat messages (chat API)
    n: int = 1
    seed: int | None = None
    tag: Any = None


class TeacherError(Exception):
    """Base class of the errors this module raises."""


class FatalError(TeacherError):
    """An error no retry can fix (bad key, unknown model, bad request): the run must stop."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, n_rejected: bool = False):
        super().__init__(message)
        self.status = status
        self.code = code
        self.n_rejected = n_rejected  # a 400 on a request with n > 1 (the server may not support n)


class RequestFailed(TeacherError):
    """A request that failed for good (retries exhausted, or an error that fails only itself)."""

    def __init__(self, reason: str, kind: str, attempts: int, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.attempts = attempts
        self.status = status


class _Retryable(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after


@dataclass
class Stats:
    """Counters over the client's life (read them for progress bars and summaries)."""

    requests: int = 0  # HTTP attempts sent
    ok: int = 0  # requests that succeeded
    retries: int = 0  # attempts that were retried
    failed: int = 0  # requests that failed for good
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: Counter = field(default_factory=Counter)  # by kind: timeout, connection, status:429, malformed, ...
    busy_s: float = 0.0  # sum of successful request latencies

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "ok": self.ok, "retries": self.retries, "failed": self.failed,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "errors": dict(sorted(self.errors.items()))}


# --------------------------------------------------------------------------- rate limiting


class RateLimiter:
    """A token bucket of ``per_minute`` units, refilled continuously, holding one second of budget."""

    def __init__(self, per_minute: float):
        if per_minute <= 0:
            raise ValueError("rate limit must be > 0")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.t = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = now

    async def acquire(self, cost: float = 1.0) -> float:
        """Wait until ``cost`` units are available and take them; returns the cost charged."""
        cost = min(float(cost), self.capacity)  # a request larger than the bucket waits for a full one
        async with self._lock:  # FIFO among waiters
            while True:
                self._refill()
                if self.tokens >= cost:
                    self.tokens -= cost
                    return cost
                await asyncio.sleep((cost - self.tokens) / self.rate)

    def adjust(self, delta: float) -> None:
        """Give back (``delta > 0``) or charge (``delta < 0``) units after the fact."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens + delta)


def estimate_tokens(prompt: Any) -> int:
    """A rough prompt-token count (~4 characters a token, +4 per chat message) without a tokenizer."""
    if isinstance(prompt, str):
        return max(1, len(prompt) // 4)
    return sum(4 + len(str(m.get("content", ""))) // 4 for m in prompt)


# --------------------------------------------------------------------------- client


def endpoint_host(base_url: str) -> str:
    """``host[:port]`` of a URL, without credentials, path or query (what the manifest records)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


def _retry_after(headers) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(ra)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error_message(body: Any, fallback: str) -> tuple[str, str | None, str | None]:
    """(message, code, param) of an error body: OpenAI-style ``{"error": {"message", "code",
    "param"}}``, flat ``{"message"}``, or FastAPI's ``{"detail": str | [{"loc", "msg"}, ...]}``."""
    if isinstance(body, dict) and "error" not in body and "message" not in body and "detail" in body:
        return _detail_message(body["detail"], fallback), None, None
    err = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(err, dict):
        msg = err.get("message") or fallback
        code = err.get("code")
        return str(msg), (str(code) if code is not None else None), err.get("param")
    if isinstance(err, str) and err:
        return err, None, None
    if isinstance(body, str) and body.strip():
        return body.strip()[:300], None, None
    return fallback, None, None


def _detail_message(detail: Any, fallback: str) -> str:
    """FastAPI's ``detail``: a string, or a list of validation errors ``{"loc": [...], "msg": ...}``."""
    if isinstance(detail, str) and detail.strip():
        return detail.strip()[:500]
    if isinstance(detail, list) and detail:
        parts = []
        for d in detail[:5]:
            if isinstance(d, dict) and d.get("msg"):
                loc = ".".join(str(x) for x in d.get("loc") or [] if x != "body")
                parts.append(f"{loc}: {d['msg']}" if loc else str(d["msg"]))
            else:
                parts.append(str(d))
        return "; ".join(parts)[:500]
    if isinstance(detail, dict):
        return str(detail.get("message") or detail.get("msg") or json.dumps(detail))[:500]
    return fallback


def _context_length(msg: str, code: str | None) -> bool:
    m = msg.lower()
    return code == "context_length_exceeded" or "context length" in m or "maximum context" in m or (
        "too long" in m and "token" in m)


class Teacher:
    """An OpenAI-compatible endpoint with bounded concurrency, retries and client-side rate limits."""

    def __init__(self, base_url: str, model: str, *, api: str = "chat", api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 600.0, max_retries: int = 6,
                 concurrency: int = 16, rpm: float | None = None, tpm: float | None = None,
                 backoff: float = 1.0, max_backoff: float = 60.0, max_retry_after: float = 600.0,
                 on_retry: Callable[[str], None] | None = None, transport: str = "pool",
                 breaker_s: float = 10.0, model_flag: str = "--model"):
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be chat or completions, not {api!r}")
        if transport not in ("pool", "openai"):
            raise ValueError(f"transport must be pool or openai, not {transport!r}")
        self.transport = transport
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.base_url = base_url
        self.host = endpoint_host(base_url)
        self.model = model
        self.api = api
        self.path = "/chat/completions" if api == "chat" else "/completions"
        self.api_key_env = api_key_env
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        self._key_set = bool(key)
        self._secret = key or ""
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self.on_retry = on_retry
        self.breaker_s = float(breaker_s)  # <= 0: off
        self.model_flag = model_flag  # the CLI flag that sets `model`, named in error messages
        self._down_since: float | None = None  # first of the connection failures in a row
        self._down_count = 0
        self.stats = Stats()
        self._rpm = RateLimiter(rpm) if rpm else None
        self._tpm = RateLimiter(tpm) if tpm else None
        self._sem = asyncio.Semaphore(self.concurrency)
        self._pause_until = 0.0
        self._rng = random.Random()
        self._max_tokens_key = "max_tokens"  # newer OpenAI models want max_completion_tokens instead

        import httpx2
        import openai

        self._openai = openai
        self._httpx = httpx2
        tmo = httpx2.Timeout(self.timeout, connect=min(self.timeout, 30.0))
        http = httpx2.AsyncClient(
            timeout=tmo,
            limits=httpx2.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        # Local servers (vLLM, llama.cpp) often need no key; the client needs a non-empty string.
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=key or "no-key", max_retries=0,
                                          timeout=tmo, http_client=http)
        # The "pool" transport sends through the same connection pool with the headers the openai
        # client would send (auth, user agent), built once, skipping its per-request machinery.
        self._http = http
        self._url = str(self._client.base_url).rstrip("/") + self.path
        headers = {k: v for k, v in self._client.default_headers.items() if isinstance(v, str)}
        headers.update(self._client.auth_headers)
        self._headers = headers

    # ---- lifecycle
    async def aclose(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "Teacher":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def scrub(self, text: str) -> str:
        """``text`` with the API key masked (servers sometimes echo it in error messages)."""
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "***")
        return text

    # ---- one request
    def body(self, prompt: Any, params: SamplingParams, n: int = 1, seed: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model}
        if self.api == "chat":
            body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        else:
            if not isinstance(prompt, str):
                raise ValueError("the completions API takes a text prompt, not chat messages")
            body["prompt"] = prompt
        if n != 1:
            body["n"] = n
        for k in ("temperature", "top_p"):
            v = getattr(params, k)
            if v is not None:
                body[k] = v
        if params.max_tokens is not None:
            body[self._max_tokens_key] = params.max_tokens
        if params.stop:
            body["stop"] = list(params.stop)
        if seed is not None:
            body["seed"] = int(seed)
        body.update(params.extra)
        return body

    async def complete(self, prompt: Any, params: SamplingParams, n: int = 1, seed: int | None = None) -> Response:
        """Send one request (retrying as the module doc says); ``n`` choices at most.

        Raises :class:`FatalError` (stop the run) or :class:`RequestFailed` (give up on this one).
        """
        est = estimate_tokens(prompt) + (params.max_tokens or 256) * n
        attempt = 0
        while True:
            body = self.body(prompt, params, n, seed)
            wait = self._pause_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._rpm is not None:
                await self._rpm.acquire(1)
            charged = await self._tpm.acquire(est) if self._tpm is not None else 0.0
            try:
                async with self._sem:
                    self.stats.requests += 1
                    t0 = time.perf_counter()
                    resp = await self._send(body)
                    latency = time.perf_counter() - t0
            except _Retryable as e:
                self.stats.errors[e.kind] += 1
                self._breaker(e)
                if e.kind == "status:429" and e.retry_after:
                    self._pause_until = max(self._pause_until, time.monotonic() + min(e.retry_after, self.max_retry_after))
                if attempt >= self.max_retries:
                    self.stats.failed += 1
                    raise RequestFailed(self.scrub(f"{e} (gave up after {attempt + 1} attempts)"), e.kind,
                                        attempt + 1, e.status) from None
                if e.retry_after is not None and e.retry_after > self.max_retry_after:
                    self.stats.failed += 1
                    raise RequestFailed(self.scrub(f"{e}; the server asks to wait {e.retry_after:.0f}s, more "
                                                   f"than {self.max_retry_after:.0f}s"), e.kind, attempt + 1,
                                        e.status) from None
                delay = self._delay(attempt, e.retry_after)
                self.stats.retries += 1
                if self.on_retry is not None:
                    self.on_retry(e.kind)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            except RequestFailed as e:
                self._down_since, self._down_count = None, 0  # the server answered
                e.attempts = attempt + 1
                self.stats.failed += 1
                raise
            except FatalError:
                self._down_since, self._down_count = None, 0
                raise
            self._down_since, self._down_count = None, 0
            if self._tpm is not None:  # charge usage beyond the estimate; never refund (OpenAI does not)
                self._tpm.adjust(min(0.0, charged - (resp.prompt_tokens + resp.completion_tokens)))
            resp.attempts = attempt + 1
            resp.latency_s = latency
            self.stats.ok += 1
            self.stats.busy_s += latency
            self.stats.prompt_tokens += resp.prompt_tokens
            self.stats.completion_tokens += resp.completion_tokens
            return resp

    def _breaker(self, e: _Retryable) -> None:
        """Count connection failures in a row; raise FatalError once they span ``breaker_s``."""
        if e.kind != "connection":
            self._down_since, self._down_count = None, 0
            return
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        self._down_count += 1
        down = now - self._down_since
        if self.breaker_s > 0 and self._down_count >= 3 and down >= self.breaker_s:
            raise FatalError(self.scrub(
                f"cannot connect to {self.base_url}: every request for the last {down:.0f}s failed to connect "
                f"({self._down_count} attempts in a row; last: {e}); is the server running (did it crash)? "
                "Start it again"), None, "server_down")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after * self._rng.uniform(1.0, 1.1)
        return min(self.max_backoff, self.backoff * 2 ** attempt) * self._rng.uniform(0.5, 1.0)

    async def _send(self, body: dict[str, Any]) -> Response:
        """One HTTP attempt: a :class:`Response`, or raises _Retryable / RequestFailed / FatalError."""
        if self.transport == "openai":
            return await self._send_openai(body)
        hx = self._httpx
        try:
            r = await self._http.post(self._url, content=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                                      headers=self._headers)
        except hx.ConnectTimeout:
            raise _Retryable("connection", "connection error: ConnectTimeout") from None
        except hx.TimeoutException:
            raise _Retryable("timeout", f"request timed out after {self.timeout:g}s") from None
        except hx.RequestError as e:
            raise _Retryable("connection", f"connection error: {type(e).__name__}") from None
        if r.status_code >= 400:
            try:
                err_body: Any = json.loads(r.content)
            except (ValueError, UnicodeDecodeError):
                err_body = r.text
            self._raise_status(r.status_code, err_body, r.headers, body.get("n", 1))
        return self._parse(r)

    async def _send_openai(self, body: dict[str, Any]) -> Response:
        """The same attempt through ``AsyncOpenAI.post`` (its error classes, ~40% more client CPU)."""
        oa = self._openai
        try:
            r = await self._client.post(self.path, body=body, cast_to=self._httpx.Response)
        except oa.APITimeoutError as e:
            if isinstance(e.__cause__ or e.__context__, self._httpx.ConnectTimeout):
                raise _Retryable("connection", "connection error: ConnectTimeout") from None
            raise _Retryable("timeout", f"request timed out after {self.timeout:g}s") from None
        except oa.APIConnectionError as e:
            cause = e.__cause__ or e.__context__
            detail = f": {type(cause).__name__}" if cause is not None else ""
            raise _Retryable("connection", f"connection error{detail}") from None
        except oa.APIStatusError as e:
            self._raise_status(e.status_code, e.body if e.body is not None else _safe_text(e.response),
                               e.response.headers, body.get("n", 1))
        return self._parse(r)

    def _raise_status(self, status: int, body: Any, headers, n: int) -> None:
        msg, code, param = _error_message(body, f"HTTP {status}")
        msg = self.scrub(msg)
        ra = _retry_after(headers)
        if status == 429 and code == "insufficient_quota":
            raise FatalError(f"{self.host} says the account is out of quota (429 insufficient_quota: {msg}); "
                             "add credit or use another key, then rerun to resume", status, code)
        if status in RETRY_STATUS or status >= 500:
            raise _Retryable(f"status:{status}", f"HTTP {status}: {msg}", status, ra)
        if status == 400 and _context_length(msg, code):
            raise RequestFailed(f"HTTP 400: {msg}", "context_length", 1, status)
        if (status == 400 and self._max_tokens_key == "max_tokens" and "max_completion_tokens" in msg
                and (param == "max_tokens" or "max_tokens" in msg)):
            self._max_tokens_key = "max_completion_tokens"  # retried at once with the field the model wants
            raise _Retryable("max_tokens_renamed", f"HTTP 400: {msg}", status, 0.0)
        if status in FATAL_STATUS:
            raise FatalError(self._fatal_message(status, msg, code), status, code,
                             n_rejected=(status in (400, 422) and n > 1))
        raise RequestFailed(f"HTTP {status}: {msg}", f"status:{status}", 1, status)

    def _fatal_message(self, status: int, msg: str, code: str | None) -> str:
        where = f"{self.host}{self.path}"
        if status == 401:
            key = (f"${self.api_key_env} is not set" if not self._key_set
                   else f"check the key in ${self.api_key_env}")
            return f"{where} rejected the API key (401: {msg}); {key} (or name another variable with --api-key-env)"
        if status == 403:
            return f"{where} refused access (403: {msg}); the key in ${self.api_key_env} lacks permission for model {self.model!r}"
        if status == 404:
            if code == "model_not_found" or "model" in msg.lower():
                return (f"{self.host} does not serve model {self.model!r} (404: {msg}); check {self.model_flag} "
                        f"(GET {self.base_url.rstrip('/')}/models lists them)")
            return (f"{where} not found (404: {msg}); check --base-url (it usually ends in /v1) and --api "
                    f"({self.api!r}: does the server offer this endpoint?)")
        return f"{where} rejected the request ({status}: {msg}); check the sampling options and {self.model_flag}"

    def _parse(self, r) -> Response:
        try:
            data = json.loads(r.content)
        except (ValueError, UnicodeDecodeError) as e:
            raise _Retryable("malformed", f"malformed response body ({type(e).__name__}: {str(e)[:80]})") from None
        if not isinstance(data, dict):
            raise _Retryable("malformed", f"response body is a JSON {type(data).__name__}, not an object")
        if "error" in data and not data.get("choices"):  # some servers send errors with status 200
            msg, code, _ = _error_message(data, "error")
            raise _Retryable("server_error", f"server error in a 200 response: {self.scrub(msg)}")
        raw = data.get("choices")
        if not isinstance(raw, list) or not raw:
            raise _Retryable("empty_choices", "the response has no choices")
        choices = []
        for i, c in enumerate(raw):
            if not isinstance(c, dict):
                raise _Retryable("malformed", "a choice is not an object")
            if self.api == "chat":
                m = c.get("message") or {}
                text = m.get("content") if isinstance(m, dict) else None
            else:
                text = c.get("text")
            if not isinstance(text, str):
                continue  # e.g. a content-filtered choice; the caller sees fewer choices than asked
            idx = c.get("index", i)
            # a server that echoes the request (headers included) must not get the key into a rationale
            choices.append(Choice(self.scrub(text), c.get("finish_reason"), idx if isinstance(idx, int) else i))
        if not choices:
            reasons = ",".join(str(c.get("finish_reason")) for c in raw if isinstance(c, dict))
            raise _Retryable("empty_choices", f"no choice has text (finish_reason {reasons})")
        usage = data.get("usage") or {}
        pt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        ct = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return Response(choices=choices, prompt_tokens=pt if isinstance(pt, int) else 0,
                        completion_tokens=ct if isinstance(ct, int) else 0, model=data.get("model"),
                        attempts=1, latency_s=0.0)


def _safe_text(response) -> str:
    try:
        return response.text
    except Exception:  # pragma: no cover
        return ""


# --------------------------------------------------------------------------- driver


async def run_jobs(teacher: Teacher, jobs: Iterable[Job], params: SamplingParams,
                   on_result: Callable[[Job, Any], Iterable[Job] | None],
                   workers: int | None = None,
                   fatal_handler: Callable[[Job, FatalError], bool] | None = None) -> None:
    """Run ``jobs`` with ``workers`` (default: the teacher's concurrency) requests in flight.

    ``on_result(job, result)`` runs on the event loop as each job ends, with the
    :class:`Response` or the :class:`RequestFailed`; it may return more jobs to run (they go
    first). A :class:`FatalError` cancels every request in flight and is raised, unless
    ``fatal_handler(job, error)`` returns True: then ``on_result`` gets the error instead (e.g.
    to retry an ``n > 1`` request that the server rejected as ``n = 1`` requests).
    """
    it = iter(jobs)
    extra: deque[Job] = deque()
    fatal: list[BaseException] = []

    def next_job() -> Job | None:
        if extra:
            return extra.popleft()
        return next(it, None)

    async def worker() -> None:
        while not fatal:
            job = next_job()
            if job is None:
                return
            try:
                res: Any = await teacher.complete(job.prompt, params, n=job.n, seed=job.seed)
            except RequestFailed as e:
                res = e
            except FatalError as e:
                if fatal_handler is None or not fatal_handler(job, e):
                    raise
                res = e
            more = on_result(job, res)
            if more:
                extra.extend(more)

    n = max(1, workers or teacher.concurrency)
    tasks: list[asyncio.Task] = []
    try:
        while True:
            tasks = [asyncio.create_task(worker()) for _ in range(n)]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    fatal.append(t.exception())
            if fatal:
                raise fatal[0]
            if not extra:  # jobs re-queued after the other workers had left: go again
                return
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class NChoices:
    """``n`` choices per prompt, asked ``n_per_request`` at a time, with the fallback both
    ``sample`` and ``infer`` need: a server that rejects ``n`` (400/422 on an ``n > 1`` request)
    or returns fewer choices than asked (``transformers serve`` answers ``n = 4`` with one) switches
    every later request to ``n = 1``, and the choices still missing are asked one request each.

    Usage with :func:`run_jobs` (``keys`` are the caller's indices of the wanted choices, e.g. k)::

        nc = NChoices(n_per_request, on_fallback=lambda why: warn(f"{why}; one request per choice"))
        jobs = (Job(prompt, n=len(ks), seed=..., tag=(pid, ks)) for ks in nc.chunks(range(n)))
        def on_result(job, res):               # res may be the FatalError of a rejected n
            got, missing = nc.take(job, res, ks)   # choices for ks[:len(got)]; ask `missing` again
        await run_jobs(teacher, jobs, params, on_result, fatal_handler=nc.fatal_handler)
    """

    def __init__(self, n_per_request: int, on_fallback: Callable[[str], None] | None = None):
        if n_per_request < 1:
            raise ValueError("n_per_request must be >= 1")
        self.n_per_request = int(n_per_request)
        self.on_fallback = on_fallback
        self.fallback: str | None = None  # why the fallback happened (None: it did not)

    def chunks(self, keys: Iterable[Any]) -> Iterable[list[Any]]:
        """``keys`` in runs of at most ``n_per_request`` (read lazily: a fallback applies at once)."""
        keys = list(keys)
        i = 0
        while i < len(keys):
            chunk = keys[i:i + max(1, self.n_per_request)]
            i += len(chunk)
            yield chunk

    def fatal_handler(self, job: Job, err: FatalError) -> bool:
        """For run_jobs: hand a rejected ``n > 1`` to on_result (to fall back) instead of stopping."""
        return bool(getattr(err, "n_rejected", False)) and job.n > 1

    def take(self, job: Job, res: Any, keys: list[Any]) -> tuple[list[Choice], list[Any]]:
        """(the choices received, in index order, at most one per key; the keys still missing).

        ``res`` is a :class:`Response` or the :class:`FatalError` of a rejected ``n``; a
        :class:`RequestFailed` is the caller's to handle.
        """
        if isinstance(res, FatalError):
            self.fall_back(f"the server rejected n={job.n} ({res})")
            return [], list(keys)
        choices = sorted(res.choices, key=lambda c: c.index)[: len(keys)]
        missing = list(keys[len(choices):])
        if missing:
            self.fall_back(f"the server returned {len(choices)} of {job.n} choices")
        return choices, missing

    def fall_back(self, why: str) -> None:
        if self.n_per_request > 1:
            self.n_per_request = 1
            self.fallback = why
            if self.on_fallback is not None:
                self.on_fallback(why)


def complete_many(base_url: str, model: str, prompts: list[Any], params: SamplingParams, n: int = 1,
                  seeds: list[int | None] | None = None, **teacher_kwargs) -> list["Response | RequestFailed"]:
    """Synchronous convenience: one request per prompt, results in input order."""
    results: list[Any] = [None] * len(prompts)

    async def main() -> None:
        async with Teacher(base_url, model, **teacher_kwargs) as t:
            jobs = [Job(p, n=n, seed=(seeds[i] if seeds else None), tag=i) for i, p in enumerate(prompts)]

            def on_result(job: Job, res: Any) -> None:
                results[job.tag] = res

            await run_jobs(t, jobs, params, on_result)

    asyncio.run(main())
    return results
