"""What real inference servers do that the happy path does not: ignore ``n``, die mid-run, answer
errors FastAPI-style, return blank text; and the tiny model / vLLM settings they need.

Each server behaviour is reproduced with the loopback fake (tests/fake_openai.py); the real
servers (vLLM's CPU build, ``transformers serve``) are exercised by bench/servers.sh.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI, http_error  # noqa: E402
from infer_helpers import make_adapter, read_jsonl, write_problems  # noqa: E402

from negkd.cli import app  # noqa: E402

FAST = ["--backoff", "0.05", "--max-retries", "50", "--circuit-breaker", "1"]


def run(runner, *args):
    return runner.invoke(app, [*map(str, args)], env={"COLUMNS": "200", "OPENAI_API_KEY": ""})


# --------------------------------------------------------------------------- a server that ignores n


@pytest.mark.parametrize("n_mode", ["ignore", "reject"])
def test_infer_gets_every_candidate_from_a_server_without_n(runner, tmp_path, tiny_model, n_mode):
    """transformers serve answers n=3 with one choice: infer must still record 3 candidates."""
    probs = write_problems(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    with FakeOpenAI(n_mode=n_mode) as srv:
        r = run(runner, "infer", probs, "-o", out, "--model", tiny_model, "--backend", "openai", "--base-url",
                srv.url, "--n", 3, "--max-new-tokens", 16, "--concurrency", 2, "--backoff", 0.05)
        assert r.exit_code == 0, r.output
        reqs = [q for q in srv.requests if q.api == "completions"]
    assert "one request per candidate" in r.output
    recs = read_jsonl(out / "predictions.jsonl")
    assert len(recs) == 4 and all(len(x["candidates"]) == 3 for x in recs)
    for x in recs:  # each candidate its own seed, so a seeded server gives different rationales
        assert len({c["rationale"] for c in x["candidates"]}) == 3
    assert reqs[-1].n == 1 and len({q.seed for q in reqs if q.n == 1}) >= 4 * 2
    man = json.loads((out / "manifest.json").read_text())
    assert man["candidates"] == 12 and man["short"] == 0
    assert man["client"]["n_per_request_used"] == 1 and man["client"]["n_fallback"]


def test_infer_honours_n_when_the_server_does(runner, tmp_path, tiny_model):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    with FakeOpenAI() as srv:
        r = run(runner, "infer", probs, "-o", tmp_path / "out", "--model", tiny_model, "--backend", "openai",
                "--base-url", srv.url, "--n", 4, "--max-new-tokens", 16)
        assert r.exit_code == 0, r.output
        assert sorted(q.n for q in srv.requests) == [4, 4, 4]
    assert "one request per candidate" not in r.output
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["client"]["n_fallback"] is None and man["candidates"] == 12


def test_infer_counts_and_warns_about_problems_with_fewer_candidates(runner, tmp_path, monkeypatch):
    """Whatever the backend, a problem recorded with fewer than --n candidates is said so."""
    from negkd.generation import Generation

    class Short:
        name, tokenizer = "short", None

        def generate(self, prompts, *, n, **kw):
            for i, _ in enumerate(prompts):
                yield i, [Generation(text="\\boxed{1}", n_tokens=2, finished=True)] * (n if i else n - 1)

    monkeypatch.setattr("negkd.steps.infer._make_backend", lambda *a, **k: Short())
    probs = write_problems(tmp_path / "p.jsonl", 3)
    base = tmp_path / "base"
    base.mkdir()
    r = run(runner, "infer", probs, "-o", tmp_path / "out", "--model", base, "--n", 2)
    assert r.exit_code == 0, r.output
    assert "1 problems got fewer than --n 2 candidates" in r.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["short"] == 1


# --------------------------------------------------------------------------- a server that dies


def test_sample_stops_in_seconds_when_the_server_dies_and_a_rerun_resumes(runner, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 30)
    out = tmp_path / "run"
    args = ["sample", probs, "-o", out, "--model", "teacher", "--n", 2, "--concurrency", 2, *FAST]
    with FakeOpenAI(die_after=7) as srv:
        url, port = srv.url, srv.port
        t0 = time.monotonic()
        r = run(runner, *args, "--base-url", url)
        took = time.monotonic() - t0
        assert srv.dead.is_set()
    assert r.exit_code == 1, r.output
    assert took < 10, f"took {took:.1f}s to notice a dead server"
    assert "cannot connect to" in r.output and url in r.output and "rerun the same command" in r.output
    kept = read_jsonl(out / "samples.jsonl")
    assert 5 <= len(kept) <= 8  # what arrived before the crash is on disk
    assert not (out / "manifest.json").exists()
    with FakeOpenAI(port=port) as srv:  # the server is back: the rerun asks only for the rest
        r = run(runner, *args, "--base-url", url)
        assert r.exit_code == 0, r.output
        assert len(srv.requests) == 60 - len(kept)
    recs = read_jsonl(out / "samples.jsonl")
    assert sorted((x["id"], x["k"]) for x in recs) == sorted((f"q{i}", k) for i in range(30) for k in range(2))


def test_infer_stops_in_seconds_when_the_server_dies_and_a_rerun_resumes(runner, tmp_path, tiny_model):
    probs = write_problems(tmp_path / "p.jsonl", 20)
    out = tmp_path / "out"
    args = ["infer", probs, "-o", out, "--model", tiny_model, "--backend", "openai", "--n", 2,
            "--max-new-tokens", 16, "--concurrency", 2, *FAST]
    with FakeOpenAI(die_after=5) as srv:
        url, port = srv.url, srv.port
        t0 = time.monotonic()
        r = run(runner, *args, "--base-url", url)
        took = time.monotonic() - t0
    assert r.exit_code == 1 and took < 10, (took, r.output)
    assert "cannot connect to" in r.output and url in r.output and "rerun the same command" in r.output
    kept = read_jsonl(out / "predictions.jsonl")
    assert 3 <= len(kept) <= 5
    with FakeOpenAI(port=port) as srv:
        r = run(runner, *args, "--base-url", url)
        assert r.exit_code == 0, r.output
        assert len(srv.requests) == 20 - len(kept)
    assert sorted(x["id"] for x in read_jsonl(out / "predictions.jsonl")) == sorted(f"q{i}" for i in range(20))


def test_a_brief_outage_is_retried_not_fatal(runner, tmp_path):
    """Connection drops that do not last --circuit-breaker seconds are ordinary retries."""
    from fake_openai import drop

    probs = write_problems(tmp_path / "p.jsonl", 3)
    with FakeOpenAI() as srv:
        srv.inject(drop(), drop(), drop(), drop())
        r = run(runner, "sample", probs, "-o", tmp_path / "run", "--model", "t", "--n", 1, "--base-url", srv.url,
                "--backoff", "0.01", "--circuit-breaker", "5")
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(tmp_path / "run" / "samples.jsonl")) == 3


# --------------------------------------------------------------------------- FastAPI error bodies


def test_fastapi_detail_errors_are_shown(runner, tmp_path, tiny_model):
    from negkd.client import _error_message

    assert _error_message({"detail": "Model 'x' not found; serving 'tiny'"}, "HTTP 404")[0] == \
        "Model 'x' not found; serving 'tiny'"
    assert _error_message({"detail": [{"loc": ["body", "n"], "msg": "must be 1", "type": "value_error"}]},
                          "HTTP 422")[0] == "n: must be 1"
    probs = write_problems(tmp_path / "p.jsonl", 2)
    with FakeOpenAI() as srv:
        srv.inject(http_error(404, message="The model `nope` is not served; this server serves `tiny`",
                              fastapi=True), times=10)
        r = run(runner, "infer", probs, "-o", tmp_path / "out", "--model", tiny_model, "--backend", "openai",
                "--base-url", srv.url, "--served-model", "nope", "--n", 1)
    assert r.exit_code == 1
    text = " ".join(r.output.split())
    assert "this server serves `tiny`" in text  # the server's own words, not just "HTTP 404"
    assert "check --served-model" in text and "check --model" not in text
    with FakeOpenAI() as srv:
        srv.inject(http_error(400, message="temperature: must be >= 0", fastapi=True))
        r = run(runner, "sample", probs, "-o", tmp_path / "s", "--model", "t", "--base-url", srv.url, "--n", 1)
    assert r.exit_code == 1 and "temperature: must be >= 0" in " ".join(r.output.split())


# --------------------------------------------------------------------------- whitespace-only rationales


def test_blank_rationales_are_counted_in_sample_and_split(runner, tmp_path):
    probs = write_problems(tmp_path / "p.jsonl", 4)

    def responder(req, i):
        return " \n\n " if "has 1 apples" in req.prompt or "has 2 apples" in req.prompt else "so \\boxed{1}"

    with FakeOpenAI(responder) as srv:
        r = run(runner, "sample", probs, "-o", tmp_path / "s", "--model", "t", "--base-url", srv.url, "--n", 2)
    assert r.exit_code == 0, r.output
    assert "4 of 8 rationales are empty" in " ".join(r.output.split())
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["empty"] == 4
    r = run(runner, "split", tmp_path / "s", "-o", tmp_path / "split")
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "split" / "stats.json").read_text())
    assert stats["total"]["empty"] == 4 and "4 of 8 rationales are empty" in " ".join(r.output.split())


# --------------------------------------------------------------------------- the tiny model on vLLM


def test_tiny_model_defaults_fit_vllm_and_the_math_prompt(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    from negkd.fewshot import load_prompt

    cfg = AutoConfig.from_pretrained(tiny_model)
    assert cfg.hidden_size // cfg.num_attention_heads in (32, 64)  # 24 made vLLM's CPU attention fail
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = load_prompt("math").completion_text({"id": "x", "question": "What is $1+1$?", "answer": "2"})
    assert len(tok(text)["input_ids"]) + 256 <= cfg.max_position_embeddings


def test_vllm_backend_gets_an_explicit_dtype(runner, tmp_path, tiny_model, monkeypatch):
    """--dtype auto means float32 off CUDA for every backend; vLLM's own auto would pick bfloat16."""
    seen: dict = {}

    class LLM:
        def __init__(self, **kw):
            seen.update(kw)

        def generate(self, prompts, sp, lora_request=None, use_tqdm=False):
            out = types.SimpleNamespace(text="\\boxed{3}", token_ids=[1, 2], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kw: kw
    lora = types.ModuleType("vllm.lora")
    req = types.ModuleType("vllm.lora.request")
    req.LoRARequest = lambda *a: a
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", req)
    probs = write_problems(tmp_path / "p.jsonl", 2)
    ad = make_adapter(tiny_model, tmp_path / "ad")
    r = run(runner, "infer", probs, "-o", tmp_path / "out", "--model", ad, "--backend", "vllm", "--greedy")
    assert r.exit_code == 0, r.output
    import torch

    want = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    assert seen["dtype"] == want and seen["enable_lora"] is True
    r = run(runner, "infer", probs, "-o", tmp_path / "out2", "--model", ad, "--backend", "vllm", "--greedy",
            "--dtype", "float16")
    assert r.exit_code == 0 and seen["dtype"] == "float16"
