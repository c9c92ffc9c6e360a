"""negkd.client against a real loopback HTTP server: retries, fatal errors, limits, the job driver."""

from __future__ import annotations

import asyncio
import email.utils
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import (FakeOpenAI, delay, drop, empty_choices, hang, http_error,  # noqa: E402
                         malformed)

from negkd.client import (FatalError, Job, RateLimiter, RequestFailed, SamplingParams, Teacher,  # noqa: E402
                          _retry_after, complete_many, endpoint_host, run_jobs)

FAST = dict(timeout=0.4, backoff=0.01, max_retries=3)
PARAMS = SamplingParams(temperature=0.5, top_p=0.9, max_tokens=64)


def _run(coro):
    return asyncio.run(coro)


async def _one(url, prompt="Problem:\nWhat is 2+2?", api="chat", n=1, seed=7, **kw):
    async with Teacher(url, "fake-model", api=api, **{**FAST, **kw}) as t:
        r = await t.complete(prompt, PARAMS, n=n, seed=seed)
        return r, t.stats


def test_chat_request_wire_format_and_response():
    with FakeOpenAI() as srv:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Problem:\nWhat is 2+2?"}]
        r, stats = _run(_one(srv.url, msgs, n=3, seed=11))
        body = srv.requests[-1].body
        assert srv.requests[-1].path == "/v1/chat/completions"
        assert body["messages"] == msgs and body["n"] == 3 and body["seed"] == 11
        assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["max_tokens"] == 64
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert len({c.text for c in r.choices}) == 3 and all("\\boxed{" in c.text for c in r.choices)
        assert all(c.finish_reason == "stop" for c in r.choices)
        assert r.prompt_tokens > 0 and r.completion_tokens == sum(len(c.text.split()) for c in r.choices)
        assert r.attempts == 1 and stats.requests == 1 and stats.ok == 1 and stats.retries == 0


@pytest.mark.parametrize("transport", ["pool", "openai"])
def test_both_transports_send_auth_and_the_same_body(transport):
    with FakeOpenAI(api_key="sk-abc") as srv:
        r, _ = _run(_one(srv.url, "hi", n=2, seed=3, transport=transport, api_key="sk-abc"))
        req = srv.requests[-1]
        assert req.headers["authorization"] == "Bearer sk-abc" and req.headers["content-type"] == "application/json"
        assert req.body == {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "n": 2,
                            "temperature": 0.5, "top_p": 0.9, "max_tokens": 64, "seed": 3}
        assert len(r.choices) == 2


def test_completions_api_sends_text_prompt_and_stop():
    with FakeOpenAI(lambda req, i: (" 4.\n", "length")) as srv:
        async def go():
            async with Teacher(srv.url, "m", api="completions", **FAST) as t:
                return await t.complete("Problem:\nWhat is 2+2?\nSolution:\n",
                                        SamplingParams(temperature=0.0, stop=["\n\nProblem:"]))
        r = _run(go())
        req = srv.requests[-1]
        assert req.path == "/v1/completions" and req.body["prompt"].endswith("Solution:\n")
        assert req.body["stop"] == ["\n\nProblem:"] and "n" not in req.body and "seed" not in req.body
        assert r.choices[0].text == " 4.\n" and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("fault,kind", [
    (http_error(500), "status:500"),
    (http_error(503), "status:503"),
    (http_error(408), "status:408"),
    (http_error(409), "status:409"),
    (hang(3), "timeout"),
    (drop(), "connection"),
    (malformed(), "malformed"),
    (empty_choices(), "empty_choices"),
])
@pytest.mark.parametrize("transport", ["pool", "openai"])
def test_transient_faults_are_retried_and_counted(fault, kind, transport):
    with FakeOpenAI() as srv:
        srv.inject(fault, fault)
        r, stats = _run(_one(srv.url, transport=transport))
        assert r.attempts == 3 and len(r.choices) == 1
        assert stats.requests == 3 and stats.retries == 2 and stats.ok == 1 and stats.failed == 0
        assert stats.errors == {kind: 2}
        assert srv.pending_faults() == 0


def test_retry_after_is_honoured_and_pauses_other_requests():
    with FakeOpenAI() as srv:
        srv.inject(http_error(429, retry_after=0.3))

        async def go():
            async with Teacher(srv.url, "m", concurrency=4, **FAST) as t:
                t0 = time.perf_counter()
                first = asyncio.create_task(t.complete("a", PARAMS))
                while not t.stats.errors:  # until the 429 has arrived: a new request must wait out the pause
                    await asyncio.sleep(0.005)
                t_429 = time.perf_counter()
                second = await t.complete("b", PARAMS)
                t_second = time.perf_counter() - t_429
                r = await first
                return r, second, t_second, time.perf_counter() - t0, t.stats

        r, second, t_second, total, stats = _run(go())
        assert r.attempts == 2 and second.attempts == 1
        assert total >= 0.3, "the retry came before Retry-After elapsed"
        assert t_second >= 0.2, "a request sent during a 429 pause did not wait"
        assert stats.errors == {"status:429": 1}


def test_retry_after_parsing():
    assert _retry_after({"retry-after": "2"}) == 2.0
    assert _retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= _retry_after({"retry-after": date}) <= 31
    assert _retry_after({"retry-after": "soon"}) is None and _retry_after({}) is None


def test_gives_up_after_max_retries():
    with FakeOpenAI() as srv:
        srv.inject(http_error(500), times=10)
        with pytest.raises(RequestFailed) as ei:
            _run(_one(srv.url, max_retries=2))
        e = ei.value
        assert e.attempts == 3 and e.kind == "status:500" and e.status == 500
        assert "gave up after 3 attempts" in e.reason
        assert len(srv.requests) == 3


def test_exponential_backoff_grows():
    with FakeOpenAI() as srv:
        srv.inject(http_error(500), times=3)
        t0 = time.perf_counter()
        r, _ = _run(_one(srv.url, backoff=0.05))
        # delays 0.05*{1,2,4} each scaled by U(0.5, 1): at least 0.175 s, at most 0.35 s
        assert r.attempts == 4 and 0.17 <= time.perf_counter() - t0 < 5.0  # upper bound loose: shared CPUs


@pytest.mark.parametrize("status,code,needle", [
    (401, "invalid_api_key", "rejected the API key"),
    (403, None, "refused access"),
    (404, "model_not_found", "does not serve model"),
    (400, None, "rejected the request"),
    (422, None, "rejected the request"),
    (429, "insufficient_quota", "out of quota"),
])
@pytest.mark.parametrize("transport", ["pool", "openai"])
def test_fatal_statuses_are_not_retried(status, code, needle, transport):
    with FakeOpenAI() as srv:
        srv.inject(http_error(status, code=code, message="nope"), times=5)
        with pytest.raises(FatalError) as ei:
            _run(_one(srv.url, transport=transport))
        assert needle in str(ei.value) and ei.value.status == status
        assert len(srv.requests) == 1


def test_unauthorized_message_names_the_variable_and_hides_the_key(monkeypatch):
    secret = "sk-live-abcdef0123456789"
    echo = f"Incorrect API key provided: {secret}."
    with FakeOpenAI() as srv:
        srv.inject(http_error(401, message=echo), times=2)  # a server that echoes the key it got
        monkeypatch.setenv("MY_KEY", secret)
        with pytest.raises(FatalError) as ei:
            _run(_one(srv.url, api_key_env="MY_KEY"))
        msg = str(ei.value)
        assert "$MY_KEY" in msg and secret not in msg and "***" in msg
        monkeypatch.delenv("MY_KEY")
        with pytest.raises(FatalError) as ei:
            _run(_one(srv.url, api_key_env="MY_KEY"))
        assert "$MY_KEY is not set" in str(ei.value)


def test_context_length_400_fails_only_that_request():
    with FakeOpenAI() as srv:
        srv.inject(http_error(400, code="context_length_exceeded",
                              message="This model's maximum context length is 4096 tokens."))
        with pytest.raises(RequestFailed) as ei:
            _run(_one(srv.url))
        assert ei.value.kind == "context_length" and ei.value.attempts == 1


def test_max_tokens_renamed_for_models_that_want_max_completion_tokens():
    with FakeOpenAI() as srv:
        srv.inject(http_error(400, message="Unsupported parameter: 'max_tokens' is not supported with this "
                                           "model. Use 'max_completion_tokens' instead."))
        r, stats = _run(_one(srv.url))
        assert r.attempts == 2 and "max_tokens" in srv.requests[0].body
        assert srv.requests[1].body["max_completion_tokens"] == 64 and "max_tokens" not in srv.requests[1].body


def test_other_4xx_fails_the_request_without_retry():
    with FakeOpenAI() as srv:
        srv.inject(http_error(413))
        with pytest.raises(RequestFailed) as ei:
            _run(_one(srv.url))
        assert ei.value.kind == "status:413" and len(srv.requests) == 1


def test_concurrency_is_bounded_and_reached():
    with FakeOpenAI(latency=0.05) as srv:
        results = {}

        async def go():
            async with Teacher(srv.url, "m", concurrency=4, **FAST) as t:
                jobs = [Job(f"q{i}", tag=i) for i in range(20)]
                await run_jobs(t, jobs, PARAMS, lambda j, r: results.__setitem__(j.tag, r))
                return t.stats

        stats = _run(go())
        assert srv.max_in_flight == 4
        assert sorted(results) == list(range(20)) and stats.ok == 20


def test_rpm_limit_spaces_requests():
    with FakeOpenAI() as srv:
        async def go():
            async with Teacher(srv.url, "m", concurrency=16, rpm=1200, **FAST) as t:  # 20/s, burst 20
                t0 = time.perf_counter()
                await run_jobs(t, [Job(f"q{i}") for i in range(30)], PARAMS, lambda j, r: None)
                return time.perf_counter() - t0

        elapsed = _run(go())
        assert 0.45 <= elapsed < 10.0  # 20 at once, then 10 more at 20/s


def test_token_bucket_waits_and_adjusts():
    async def go():
        lim = RateLimiter(6000)  # 100 tokens/s, capacity 100
        t0 = time.perf_counter()
        assert await lim.acquire(100) == 100
        await lim.acquire(50)
        waited = time.perf_counter() - t0
        lim.adjust(+1000)  # a refund never overfills the bucket
        assert lim.tokens <= lim.capacity
        assert await lim.acquire(10_000) == 100  # larger than the bucket: charged one full bucket
        return waited

    waited = _run(go())
    assert 0.45 <= waited < 5.0


def test_tpm_limit_charges_max_tokens():
    with FakeOpenAI() as srv:
        async def go():
            # 600 tokens/s, bucket 600; each request costs ~1 + 300 tokens: two per second
            async with Teacher(srv.url, "m", concurrency=8, tpm=36_000, **FAST) as t:
                t0 = time.perf_counter()
                await run_jobs(t, [Job("q") for _ in range(4)], SamplingParams(max_tokens=300), lambda j, r: None)
                return time.perf_counter() - t0

        assert _run(go()) >= 0.25


def test_run_jobs_requeue_and_failures_reach_the_callback():
    with FakeOpenAI() as srv:
        srv.inject(http_error(500), match=lambda r: r.prompt == "bad", times=10)
        seen = []

        def on_result(job, res):
            seen.append((job.tag, type(res).__name__))
            if job.tag == "first":
                return [Job("again", tag="requeued")]
            return None

        async def go():
            async with Teacher(srv.url, "m", concurrency=2, **{**FAST, "max_retries": 1}) as t:
                await run_jobs(t, [Job("first", tag="first"), Job("bad", tag="bad")], PARAMS, on_result)

        _run(go())
        assert sorted(seen) == [("bad", "RequestFailed"), ("first", "Response"), ("requeued", "Response")]


def test_run_jobs_fatal_error_stops_everything():
    with FakeOpenAI(latency=0.05) as srv:
        srv.inject(http_error(401))
        done = []

        async def go():
            async with Teacher(srv.url, "m", concurrency=2, **FAST) as t:
                await run_jobs(t, [Job(f"q{i}") for i in range(200)], PARAMS, lambda j, r: done.append(j))

        with pytest.raises(FatalError):
            _run(go())
        assert len(srv.requests) < 10 and len(done) < 10


def test_slow_response_within_timeout_is_fine():
    with FakeOpenAI() as srv:
        srv.inject(delay(0.1))
        r, stats = _run(_one(srv.url))
        assert r.attempts == 1 and stats.retries == 0


def test_complete_many_sync_helper_keeps_order():
    with FakeOpenAI(lambda req, i: req.prompt.upper()) as srv:
        res = complete_many(srv.url, "m", ["a", "b", "c"], PARAMS, concurrency=3, **FAST)
        assert [r.choices[0].text for r in res] == ["A", "B", "C"]


def test_endpoint_host_drops_credentials_and_path():
    assert endpoint_host("https://user:pw@api.example.com/v1?key=x") == "api.example.com"
    assert endpoint_host("http://127.0.0.1:8000/v1") == "127.0.0.1:8000"
