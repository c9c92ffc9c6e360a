"""``negkd sample`` end to end against a loopback OpenAI-compatible server (tests/fake_openai.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI, drop, empty_choices, hang, http_error, malformed  # noqa: E402

from negkd.cli import app  # noqa: E402

KEY = "sk-test-0123456789abcdefSECRET"
FAST = ["--timeout", "0.4", "--backoff", "0.01", "--max-retries", "4"]


def write_problems(path: Path, n: int, prefix: str = "p") -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"{prefix}{i}", "question": f"What is {i} + {i}? Use $x^{{{i}}}$.",
                                 "answer": str(2 * i), "subject": "algebra"}) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def keys_of(recs) -> list[tuple[str, int]]:
    return [(r["id"], r["k"]) for r in recs]


def sample(runner, srv, probs, out, *extra, key=KEY):
    args = ["sample", str(probs), "-o", str(out), "--base-url", srv.url, "--model", "teacher", *FAST, *extra]
    env = {"OPENAI_API_KEY": key} if key is not None else {"OPENAI_API_KEY": ""}
    return runner.invoke(app, args, env={**env, "COLUMNS": "200"})  # wide: usage errors come in a wrapped box


@pytest.fixture
def server():
    with FakeOpenAI(api_key=KEY) as srv:
        yield srv


def test_full_run_with_every_fault_kind(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 6)
    server.inject(http_error(429, retry_after=0.05), http_error(500), http_error(502), hang(5), drop(),
                  malformed(), empty_choices())
    out = tmp_path / "run"
    r = sample(runner, server, probs, out, "--n", "3", "--concurrency", "4")
    assert r.exit_code == 0, r.output
    recs = read_jsonl(out / "samples.jsonl")
    assert sorted(keys_of(recs)) == sorted((f"p{i}", k) for i in range(6) for k in range(3))
    assert len(set(keys_of(recs))) == len(recs) == 18
    assert keys_of(recs) == sorted(keys_of(recs), key=lambda x: (int(x[0][1:]), x[1])), "not in problem order"
    assert (out / "errors.jsonl").read_text() == ""
    assert server.pending_faults() == 0
    from negkd.schemas import read_samples

    assert len(read_samples(out / "samples.jsonl")) == 18  # what `negkd split` reads
    man = json.loads((out / "manifest.json").read_text())
    errs = man["this_run"]["errors"]
    assert errs == {"status:429": 1, "status:500": 1, "status:502": 1, "timeout": 1, "connection": 1,
                    "malformed": 1, "empty_choices": 1}
    assert man["this_run"]["retries"] == 7 and man["this_run"]["requests"] == 18 + 7
    assert man["samples"] == 18 and man["failed"] == 0 and man["outputs"]["samples.jsonl"]["records"] == 18
    # the sample contract: problem fields carried, k, rationale, meta with seed and finish reason
    r0 = recs[0]
    assert r0["question"].startswith("What is 0 + 0?") and r0["answer"] == "0" and r0["subject"] == "algebra"
    assert r0["rationale"].endswith("$.") and r0["meta"]["finish_reason"] == "stop"
    seeds = [r["meta"]["seed"] for r in recs]
    assert len(set(seeds)) == 18, "per-sample seeds must differ"
    assert set(seeds) == {q.seed for q in server.requests}  # a retry re-sends its request's seed


def test_failures_are_accounted_and_retry_failed_recovers_them(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 5)
    server.inject(http_error(500), match=lambda q: "What is 3 + 3?" in q.prompt, times=100)
    out = tmp_path / "run"
    r = sample(runner, server, probs, out, "--n", "4", "--max-retries", "1")
    assert r.exit_code == 0, r.output
    assert "4 samples failed for good" in r.output and "--retry-failed" in r.output
    recs, errs = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "errors.jsonl")
    assert sorted(keys_of(errs)) == [("p3", k) for k in range(4)]
    assert all(e["kind"] == "status:500" and e["attempts"] == 2 and "HTTP 500" in e["reason"] for e in errs)
    assert set(keys_of(recs)) | set(keys_of(errs)) == {(f"p{i}", k) for i in range(5) for k in range(4)}
    assert not set(keys_of(recs)) & set(keys_of(errs))
    man = json.loads((out / "manifest.json").read_text())
    assert man["failed"] == 4 and man["samples"] == 16

    # a plain rerun does not hammer the server again; --retry-failed does, and recovers them
    n_before = len(server.requests)
    r = sample(runner, server, probs, out, "--n", "4", "--max-retries", "1")
    assert r.exit_code == 0 and len(server.requests) == n_before and "--retry-failed" in r.output
    server._faults.clear()
    r = sample(runner, server, probs, out, "--n", "4", "--max-retries", "1", "--retry-failed")
    assert r.exit_code == 0, r.output
    assert len(server.requests) == n_before + 4
    recs = read_jsonl(out / "samples.jsonl")
    assert len(recs) == 20 and len(set(keys_of(recs))) == 20
    assert (out / "errors.jsonl").read_text() == ""
    assert json.loads((out / "manifest.json").read_text())["failed"] == 0


def test_rerun_of_finished_run_is_a_noop(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    out = tmp_path / "run"
    assert sample(runner, server, probs, out, "--n", "2").exit_code == 0
    before = (out / "samples.jsonl").read_bytes()
    n_req = len(server.requests)
    r = sample(runner, server, probs, out, "--n", "2")
    assert r.exit_code == 0 and "up to date" in r.output
    assert len(server.requests) == n_req and (out / "samples.jsonl").read_bytes() == before


def test_changed_sampling_args_on_partial_run_are_refused(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 4)
    out = tmp_path / "run"
    server.inject(http_error(401), match=lambda q: "What is 2 + 2?" in q.prompt)  # stops the run part-way
    r = sample(runner, server, probs, out, "--n", "2", "--concurrency", "1")
    assert r.exit_code == 1 and not (out / "manifest.json").exists()
    partial = read_jsonl(out / "samples.jsonl")
    assert 0 < len(partial) < 8
    r = sample(runner, server, probs, out, "--n", "2", "--temperature", "0.9")
    assert r.exit_code == 1
    assert "partial run with other sampling arguments" in r.output and "--temperature 0.5 -> 0.9" in r.output
    assert read_jsonl(out / "samples.jsonl") == partial
    # the same arguments resume; --overwrite starts again with the new ones
    r = sample(runner, server, probs, out, "--n", "2")
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    assert len(read_jsonl(out / "samples.jsonl")) == 8
    r = sample(runner, server, probs, out, "--n", "2", "--temperature", "0.9", "--overwrite")
    assert r.exit_code == 0, r.output
    assert {q["meta"]["seed"] for q in read_jsonl(out / "samples.jsonl")} and \
        json.loads((out / "manifest.json").read_text())["args"]["temperature"] == 0.9


def test_torn_last_line_is_truncated_on_resume(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    out = tmp_path / "run"
    server.inject(http_error(401), match=lambda q: "What is 2 + 2?" in q.prompt)
    assert sample(runner, server, probs, out, "--n", "2", "--concurrency", "1").exit_code == 1
    with open(out / "samples.jsonl", "ab") as fh:
        fh.write(b'{"id": "p2", "k": 0, "rationale": "half a li')  # what a kill mid-write leaves
    r = sample(runner, server, probs, out, "--n", "2")
    assert r.exit_code == 0, r.output
    assert "torn last line" in r.output
    recs = read_jsonl(out / "samples.jsonl")
    assert sorted(keys_of(recs)) == [(f"p{i}", k) for i in range(3) for k in range(2)]


def test_corrupt_middle_line_is_an_error_with_location(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    out = tmp_path / "run"
    server.inject(http_error(401), match=lambda q: "What is 2 + 2?" in q.prompt)
    assert sample(runner, server, probs, out, "--n", "2", "--concurrency", "1").exit_code == 1
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("not json\n" + "".join(lines))
    r = sample(runner, server, probs, out, "--n", "2")
    assert r.exit_code == 1 and "samples.jsonl:1: corrupt sample line" in r.output


def test_kill_mid_run_then_rerun_gives_every_sample_once(tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 40)
    out = tmp_path / "run"
    with FakeOpenAI(api_key=KEY, latency=0.03) as srv:
        cmd = [sys.executable, "-m", "negkd", "sample", str(probs), "-o", str(out), "--base-url", srv.url,
               "--model", "teacher", "--n", "3", "--concurrency", "3", *FAST]
        env = {**os.environ, "OPENAI_API_KEY": KEY, "NEGKD_PLAIN_PROGRESS": "1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        path = out / "samples.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 15:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
        assert not (out / "manifest.json").exists()
        n_killed = path.read_bytes().count(b"\n")
        assert 15 <= n_killed < 120
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "resuming" in rerun.stderr
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    recs = [json.loads(line) for line in raw.splitlines()]  # no corrupt line
    assert Counter(keys_of(recs)) == Counter({(f"p{i}", k): 1 for i in range(40) for k in range(3)})
    assert (out / "errors.jsonl").read_text() == ""
    man = json.loads((out / "manifest.json").read_text())
    # the rerun asked only for what was missing (the killed run's in-flight requests at most re-sent)
    assert man["this_run"]["written"] == 120 - n_killed


def test_api_key_never_written_or_printed(runner, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    out = tmp_path / "run"
    # a server that echoes the key back in error bodies and in rationales must not leak it either
    with FakeOpenAI(api_key=KEY) as srv:
        srv.inject(http_error(500, message=f"upstream refused key {KEY}"), times=2)
        srv.inject(http_error(500, message=f"upstream refused key {KEY}"), match=lambda q: "What is 1 + 1" in q.prompt,
                   times=50)
        r = sample(runner, srv, probs, out, "--n", "2", "--max-retries", "2")
        assert r.exit_code == 0, r.output
        errs = read_jsonl(out / "errors.jsonl")
        assert errs and all("***" in e["reason"] for e in errs)
        r401 = sample(runner, srv, probs, tmp_path / "bad", "--n", "2", key=KEY[::-1])
        assert r401.exit_code == 1
    for text in (r.output, r401.output):
        assert KEY not in text and KEY[::-1] not in text
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert KEY.encode() not in data, f"API key leaked into {f.name}"
    assert (out / "manifest.json").exists()
    man = (out / "manifest.json").read_text()
    assert "127.0.0.1" in man and '"model": "teacher"' in man and '"temperature": 0.5' in man


@pytest.mark.parametrize("content,needle", [
    (None, "no such file"),
    ("", "empty file"),
    ('{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": "q2", "answer": 2\n', "p.jsonl:2: malformed JSON"),
    ('{"id": "a", "question": "q", "answer": "1"}\n{"id": "a", "question": "q2", "answer": "2"}\n', "p.jsonl:2: duplicate id"),
    ('{"id": "a", "answer": "1"}\n', "p.jsonl:1: missing field 'question'"),
])
def test_bad_problem_file_exits_1_and_writes_nothing(runner, server, tmp_path, content, needle):
    probs = tmp_path / "p.jsonl"
    if content is not None:
        probs.write_text(content)
    out = tmp_path / "run"
    r = sample(runner, server, probs, out)
    assert r.exit_code == 1 and needle in r.output, r.output
    assert "Traceback" not in r.output
    assert not out.exists() and len(server.requests) == 0


def test_unauthorized_stops_at_once_with_a_clear_message(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 30)
    out = tmp_path / "run"
    r = sample(runner, server, probs, out, "--n", "4", "--concurrency", "2", key="sk-wrong")
    assert r.exit_code == 1
    assert "rejected the API key (401" in r.output and "$OPENAI_API_KEY" in r.output
    assert len(server.requests) <= 3, "kept sending after a 401"
    assert not out.exists(), "a run that got nothing should leave nothing behind"
    r = sample(runner, server, probs, out, "--n", "4", key=None)
    assert r.exit_code == 1 and "$OPENAI_API_KEY is not set" in r.output


def test_unknown_model_stops_with_a_clear_message(runner, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    with FakeOpenAI(models=["gpt-x"]) as srv:
        r = sample(runner, srv, probs, tmp_path / "run", "--n", "2")
    assert r.exit_code == 1 and "does not serve model 'teacher'" in r.output and "--model" in r.output


def test_bad_options_are_usage_errors(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    for extra in (["--shard", "2/2"], ["--shard", "x"], ["--n", "0"], ["--top-p", "0"], ["--concurrency", "0"]):
        r = sample(runner, server, probs, tmp_path / "run", *extra)
        assert r.exit_code == 2, (extra, r.output)
    r = runner.invoke(app, ["sample", str(probs), "-o", str(tmp_path / "run"), "--model", "m"], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "--backend openai needs --base-url" in r.output
    r = runner.invoke(app, ["sample", str(probs), "-o", str(tmp_path / "run"), "--model", "m", "--base-url", "localhost:8000"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "expected an http:// or https:// URL" in r.output
    r = sample(runner, server, probs, tmp_path / "run", "--format", "csv")
    assert r.exit_code == 2 and "--format" in r.output
    r = sample(runner, server, probs, tmp_path / "run", "--prompt", "no-such-prompt")
    assert r.exit_code == 1 and "not a built-in prompt" in r.output
    r = sample(runner, server, probs, tmp_path / "run", "--backend", "hf", "--temperature", "0")
    assert r.exit_code == 2 and "--temperature must be > 0" in r.output
    r = sample(runner, server, probs, tmp_path / "run", "--chat-template")
    assert r.exit_code == 2 and "applies to --backend hf" in r.output
    r = sample(runner, server, probs, tmp_path / "run", *[a for i in range(5) for a in ("--stop", f"S{i}")])
    assert r.exit_code == 2 and "--stop given 5 times" in r.output
    assert not (tmp_path / "run").exists()


def test_n_per_request_uses_the_api_n(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    out = tmp_path / "run"
    r = sample(runner, server, probs, out, "--n", "5", "--n-per-request", "4")
    assert r.exit_code == 0, r.output
    assert sorted(q.n for q in server.requests) == [1, 1, 1, 4, 4, 4]
    recs = read_jsonl(out / "samples.jsonl")
    assert len(recs) == 15 and len(set(keys_of(recs))) == 15
    assert len({r["rationale"] for r in recs}) == 15
    man = json.loads((out / "manifest.json").read_text())
    # usage is recorded once per request, so the totals match what the server reported
    assert man["usage"]["completion_tokens"] == sum(len(r["rationale"].split()) for r in recs)


@pytest.mark.parametrize("n_mode", ["reject", "ignore"])
def test_n_per_request_falls_back_when_unsupported(runner, tmp_path, n_mode):
    probs = write_problems(tmp_path / "p.jsonl", 4)
    out = tmp_path / "run"
    with FakeOpenAI(n_mode=n_mode) as srv:
        r = sample(runner, srv, probs, out, "--n", "3", "--n-per-request", "3", "--concurrency", "1")
        assert r.exit_code == 0, r.output
        assert "falling back to one request per sample" in r.output
        assert srv.requests[-1].n == 1
    recs = read_jsonl(out / "samples.jsonl")
    assert Counter(keys_of(recs)) == Counter({(f"p{i}", k): 1 for i in range(4) for k in range(3)})


def test_shards_partition_the_problems(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 7)
    got = []
    for k in range(3):
        out = tmp_path / f"s{k}"
        r = sample(runner, server, probs, out, "--n", "1", "--shard", f"{k}/3")
        assert r.exit_code == 0, r.output
        got.append([x["id"] for x in read_jsonl(out / "samples.jsonl")])
    assert got[0] == ["p0", "p3", "p6"] and got[1] == ["p1", "p4"] and got[2] == ["p2", "p5"]
    r = sample(runner, server, probs, tmp_path / "lim", "--n", "1", "--limit", "4", "--shard", "1/2")
    assert [x["id"] for x in read_jsonl(tmp_path / "lim" / "samples.jsonl")] == ["p1", "p3"]


def test_dry_run_counts_and_sends_nothing(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 5)
    out = tmp_path / "run"
    r = sample(runner, server, probs, out, "--n", "4", "--n-per-request", "3", "--dry-run", "--price-in", "1",
               "--price-out", "2")
    assert r.exit_code == 0, r.output
    assert len(server.requests) == 0 and not out.exists()
    out_lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in r.output.splitlines()
                 if line.count("│") == 3}
    assert out_lines["samples to request"] == "20" and out_lines["requests"] == "10"
    assert "cost" in out_lines


def test_completions_api_with_fewshot_prompt(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 2)
    out = tmp_path / "run"
    r = sample(runner, server, probs, out, "--n", "1", "--api", "completions", "--prompt", "gsm8k")
    assert r.exit_code == 0, r.output
    req = server.requests[0]
    assert req.path == "/v1/completions"
    text = req.body["prompt"]
    assert text.count("Problem:\n") == 5 and text.endswith("Use $x^{0}$.\nSolution:\n") or \
        text.endswith("Use $x^{1}$.\nSolution:\n")
    assert "The answer is $\\boxed{210}$." in text and req.body["stop"] == ["\n\nProblem:"]


def test_chat_api_sends_fewshot_turns(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 1)
    r = sample(runner, server, probs, tmp_path / "run", "--n", "1")
    assert r.exit_code == 0, r.output
    msgs = server.requests[0].body["messages"]
    assert msgs[0]["role"] == "system" and "\\boxed{}" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * 5 + ["user"]
    assert msgs[-1]["content"] == "Problem:\nWhat is 0 + 0? Use $x^{0}$."
    assert "stop" not in server.requests[0].body


def test_custom_prompt_file(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 1)
    pf = tmp_path / "prompt.json"
    pf.write_text(json.dumps({"instruction": "Be terse.", "examples": [{"question": "1+1?", "rationale": "2. \\boxed{2}"}],
                              "template": "Q ({subject}): {question}"}))
    r = sample(runner, server, probs, tmp_path / "run", "--n", "1", "--prompt", str(pf))
    assert r.exit_code == 0, r.output
    msgs = server.requests[0].body["messages"]
    assert msgs[0]["content"] == "Be terse." and msgs[1]["content"] == "Q (algebra): 1+1?"
    assert msgs[-1]["content"].startswith("Q (algebra): What is 0 + 0?")
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [Path(i["path"]).name for i in man["inputs"]] == ["p.jsonl", "prompt.json"]


def test_duplicate_rate_warns(runner, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    out = tmp_path / "run"
    with FakeOpenAI(lambda req, i: "Same every time. $\\boxed{1}$") as srv:
        r = sample(runner, srv, probs, out, "--n", "4")
    assert r.exit_code == 0
    assert "duplicate another one for the same problem" in r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["duplicate_rate"] == 0.75


def test_truncated_rationales_are_counted(runner, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 2)
    out = tmp_path / "run"
    with FakeOpenAI(lambda req, i: (f"cut {req.seed}", "length" if req.seed % 2 else "stop")) as srv:
        r = sample(runner, srv, probs, out, "--n", "4", "--max-tokens", "16")
        seeds = [q.seed for q in srv.requests]
        assert all(q.body["max_tokens"] == 16 for q in srv.requests)
    assert r.exit_code == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["truncated"] == sum(s % 2 for s in seeds) and man["truncated"] > 0


def test_cost_in_summary_and_manifest(runner, server, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 2)
    out = tmp_path / "run"
    r = sample(runner, server, probs, out, "--n", "2", "--price-in", "2", "--price-out", "10")
    assert r.exit_code == 0
    man = json.loads((out / "manifest.json").read_text())
    u = man["usage"]
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
    assert man["cost"] == pytest.approx(u["prompt_tokens"] * 2e-6 + u["completion_tokens"] * 1e-5, abs=1e-6)
    assert "cost (all runs)" in r.output


def test_directory_lock_refuses_a_second_writer(tmp_path):
    from negkd.errors import UserError
    from negkd.steps.sample import _lock

    fd = _lock(tmp_path)
    try:
        with pytest.raises(UserError, match="another `negkd sample`"):
            _lock(tmp_path)
    finally:
        os.close(fd)
    os.close(_lock(tmp_path))  # free again


def test_help_documents_every_flag(runner):
    r = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "240"})
    assert r.exit_code == 0
    for flag in ["--output", "--base-url", "--model", "--backend", "--api", "--prompt", "--format", "--n",
                 "--temperature", "--top-p", "--max-tokens", "--seed", "--n-per-request", "--concurrency",
                 "--rpm", "--tpm", "--timeout", "--max-retries", "--api-key-env", "--limit", "--shard",
                 "--dry-run", "--retry-failed", "--overwrite", "--price-in", "--price-out", "--chat-template"]:
        assert flag in r.output, flag
    assert "Example: negkd sample" in r.output


def test_builtin_demonstrations_box_the_right_answers():
    from negkd.fewshot import BUILTIN, load_prompt
    from negkd.grading import last_boxed

    assert [last_boxed(r) for _, r in BUILTIN["math"].examples] == ["32", "\\frac{1}{9}", "2", "2",
                                                                    "[2,5)\\cup(5,\\infty)"]
    assert [last_boxed(r) for _, r in BUILTIN["gsm8k"].examples] == ["6", "5", "210", "23"]
    p = load_prompt("math")
    text = p.completion_text({"question": "What is $1+1$?"})
    assert text.endswith("Problem:\nWhat is $1+1$?\nSolution:\n")
    assert text.count("\\boxed{") == 1 + 5  # the instruction asks for it; each demonstration uses it


def test_hf_backend_same_contract(runner, tiny_model, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 2)
    out = tmp_path / "run"
    r = runner.invoke(app, ["sample", str(probs), "-o", str(out), "--backend", "hf", "--model", str(tiny_model),
                            "--n", "3", "--max-tokens", "8", "--prompt", "zero-shot", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    recs = read_jsonl(out / "samples.jsonl")
    assert keys_of(recs) == [(f"p{i}", k) for i in range(2) for k in range(3)]
    assert all(isinstance(x["rationale"], str) and x["meta"]["finish_reason"] in ("stop", "length") for x in recs)
    man = json.loads((out / "manifest.json").read_text())
    assert man["endpoint"]["backend"] == "hf" and man["samples"] == 6
    # --chat-template renders through the tokenizer's template; a rerun is a no-op
    r = runner.invoke(app, ["sample", str(probs), "-o", str(tmp_path / "chat"), "--backend", "hf", "--model",
                            str(tiny_model), "--n", "1", "--max-tokens", "4", "--chat-template", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(tmp_path / "chat" / "samples.jsonl")) == 2
    r = runner.invoke(app, ["sample", str(probs), "-o", str(out), "--backend", "hf", "--model", str(tiny_model),
                            "--n", "3", "--max-tokens", "8", "--prompt", "zero-shot", "--device", "cpu"])
    assert r.exit_code == 0 and "up to date" in r.output


def test_manifest_records_the_host_even_when_nothing_was_left_to_send(runner, server, tmp_path):
    """Killed after the last sample was appended but before manifest.json: the rerun sends nothing
    and must still record where the samples came from."""
    probs = write_problems(tmp_path / "p.jsonl", 2)
    out = tmp_path / "run"
    assert sample(runner, server, probs, out, "--n", "2").exit_code == 0
    host = server.url.split("//", 1)[1].split("/", 1)[0]
    assert json.loads((out / "manifest.json").read_text())["endpoint"]["host"] == host
    (out / "manifest.json").unlink()
    before = len(server.requests)
    r = sample(runner, server, probs, out, "--n", "2")
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["endpoint"]["host"] == host and man["samples"] == 4
    assert len(server.requests) == before  # nothing re-requested
