"""negkd infer: predictions + votes, resume, greedy determinism, backends' errors, end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from infer_helpers import make_adapter, read_jsonl, write_problems

from negkd.cli import app
from negkd.generation import Generation


# --------------------------------------------------------------------------- a scripted backend


class Scripted:
    """Stands in for the hf backend: candidate texts come from ``script(question, n)``."""

    name = "scripted"

    def __init__(self, script, stop_after: int | None = None):
        self.script, self.stop_after, self.done = script, stop_after, 0
        self.tokenizer = None
        self.prompts: list[str] = []

    def generate(self, prompts, *, n, **kw):
        for i, p in enumerate(prompts):
            if self.stop_after is not None and self.done >= self.stop_after:
                raise KeyboardInterrupt
            self.prompts.append(p)
            q = re.search(r"Problem:\n(.*)\nSolution:\n", p, re.S).group(1)
            texts = self.script(q, n)
            self.done += 1
            yield i, [Generation(text=t, n_tokens=len(t.split()) + 1, finished=True) for t in texts]


class FakeRanker:
    """Scores a rationale by a marker in it: 'GOOD' -> 0.99, else 0.01."""

    def score(self, questions, rationales, batch_size=32):
        return [0.99 if "GOOD" in r else 0.01 for r in rationales]


@pytest.fixture
def scripted(monkeypatch):
    def use(script, stop_after=None):
        be = Scripted(script, stop_after)
        monkeypatch.setattr("negkd.steps.infer._make_backend", lambda *a, **k: be)
        return be

    return use


@pytest.fixture
def fake_ranker(monkeypatch, tmp_path):
    d = tmp_path / "ranker"
    d.mkdir()
    (d / "ranker.json").write_text("{}")
    monkeypatch.setattr("negkd.ranker.check_dir", lambda p: {})
    monkeypatch.setattr("negkd.ranker.load", lambda *a, **k: FakeRanker())
    return d


def _infer(runner, *args):
    return runner.invoke(app, ["infer", *map(str, args)], catch_exceptions=False)


# --------------------------------------------------------------------------- votes


def flip_script(q, n):
    """Two bad candidates agree on 99; one GOOD one says the right answer; one says nothing."""
    return ["so \\boxed{99}", "thus \\boxed{99.0}", "GOOD so \\boxed{7}", "no idea"][:n]


def test_votes_written_and_ranker_flips_majority(runner, tmp_path, tiny_model, scripted, fake_ranker):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    scripted(flip_script)
    r = _infer(runner, probs, "-o", tmp_path / "out", "--model", tiny_model, "--n", 4, "--ranker", fake_ranker)
    assert r.exit_code == 0, r.output
    recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert sorted(x["id"] for x in recs) == ["q0", "q1", "q2"]
    for rec in recs:
        assert [c["pred"] for c in rec["candidates"]] == ["99", "99.0", "7", None]
        assert [c["score"] for c in rec["candidates"]] == [0.01, 0.01, 0.99, 0.01]
        v = rec["votes"]
        assert v["sc"] in ("99", "99.0")  # 99 and 99.0 are one equivalence class: 2 votes vs 1
        assert v["asc:1"] == v["sc"]
        assert v["asc:s"] == "7"  # 0.99 vs 0.02
        assert v["asc:1+2s"] == "7"  # 2.98 vs 2.04
        assert v["asc:1+s"] in ("99", "99.0")  # 1.99 vs 2.02
        assert set(v) == {"sc", "asc:1", "asc:1+2s", "asc:1+s", "asc:s"}
        assert rec["question"].startswith("Ann has") and "answer" in rec
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["outputs"]["predictions.jsonl"]["records"] == 3
    assert man["candidates"] == 12 and man["unparseable"] == 3
    assert man["asc_overturned"] == 0  # headline 1+s keeps the majority here


def test_headline_weight_and_no_ranker(runner, tmp_path, tiny_model, scripted, fake_ranker):
    probs = write_problems(tmp_path / "p.jsonl", 1)
    scripted(flip_script)
    r = _infer(runner, probs, "-o", tmp_path / "a", "--model", tiny_model, "--n", 4, "--ranker", fake_ranker,
               "--asc-weight", "s")
    assert r.exit_code == 0, r.output
    assert read_jsonl(tmp_path / "a" / "predictions.jsonl")[0]["votes"]["asc:s"] == "7"
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["asc_overturned"] == 1
    assert "asc:s overturned sc" in r.output
    r = _infer(runner, probs, "-o", tmp_path / "b", "--model", tiny_model, "--n", 4)
    assert r.exit_code == 0, r.output
    rec = read_jsonl(tmp_path / "b" / "predictions.jsonl")[0]
    assert set(rec["votes"]) == {"sc"}
    assert all("score" not in c for c in rec["candidates"])


def test_all_unparseable_votes_null(runner, tmp_path, tiny_model, scripted, fake_ranker):
    probs = write_problems(tmp_path / "p.jsonl", 2)
    scripted(lambda q, n: ["GOOD but no answer"] * n)
    r = _infer(runner, probs, "-o", tmp_path / "out", "--model", tiny_model, "--n", 3, "--ranker", fake_ranker)
    assert r.exit_code == 0, r.output
    for rec in read_jsonl(tmp_path / "out" / "predictions.jsonl"):
        assert all(c["pred"] is None for c in rec["candidates"])
        assert rec["votes"] == {"sc": None, "asc:1": None, "asc:1+2s": None, "asc:1+s": None, "asc:s": None}


def test_compute_votes_unparseable_never_wins():
    from negkd.steps.infer import compute_votes

    # three unparseable candidates with top scores vs one parseable with a low score
    v = compute_votes([None, None, None, "5"], [0.99, 0.99, 0.99, 0.01])
    assert all(a == "5" for a in v.values())


# --------------------------------------------------------------------------- resume / rerun


def test_interrupted_run_resumes_each_id_once(runner, tmp_path, tiny_model, scripted):
    probs = write_problems(tmp_path / "p.jsonl", 7)
    out = tmp_path / "out"
    scripted(lambda q, n: ["\\boxed{1}"] * n, stop_after=3)
    r = _infer(runner, probs, "-o", out, "--model", tiny_model, "--n", 2)
    assert r.exit_code == 130  # interrupted
    assert not (out / "manifest.json").exists()
    assert len(read_jsonl(out / "predictions.jsonl")) == 3
    with open(out / "predictions.jsonl", "a") as fh:  # a torn line from a kill mid-write
        fh.write('{"id": "q3", "question": "Ann')
    be = scripted(lambda q, n: ["\\boxed{1}"] * n)
    r = _infer(runner, probs, "-o", out, "--model", tiny_model, "--n", 2)
    assert r.exit_code == 0, r.output
    ids = [x["id"] for x in read_jsonl(out / "predictions.jsonl")]
    assert sorted(ids) == [f"q{i}" for i in range(7)]  # each exactly once
    assert be.done == 4  # only the missing problems were generated
    man = json.loads((out / "manifest.json").read_text())
    assert man["resumed_from"] == 3
    assert not (out / ".infer-state.json").exists()
    # a finished run is a no-op; other settings are refused without --overwrite
    be = scripted(lambda q, n: ["\\boxed{1}"] * n)
    r = _infer(runner, probs, "-o", out, "--model", tiny_model, "--n", 2)
    assert r.exit_code == 0 and be.done == 0 and "up to date" in r.output
    r = _infer(runner, probs, "-o", out, "--model", tiny_model, "--n", 3)
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = _infer(runner, probs, "-o", out, "--model", tiny_model, "--n", 3, "--overwrite")
    assert r.exit_code == 0
    assert all(len(x["candidates"]) == 3 for x in read_jsonl(out / "predictions.jsonl"))


def test_unfinished_run_with_other_settings_refused(runner, tmp_path, tiny_model, scripted):
    probs = write_problems(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    scripted(lambda q, n: ["\\boxed{1}"] * n, stop_after=1)
    assert _infer(runner, probs, "-o", out, "--model", tiny_model, "--n", 2).exit_code == 130
    scripted(lambda q, n: ["\\boxed{1}"] * n)
    r = _infer(runner, probs, "-o", out, "--model", tiny_model, "--n", 2, "--temperature", 0.3)
    assert r.exit_code == 1
    assert "unfinished" in r.output and "temperature" in r.output


def test_read_done_ids_rejects_corruption_in_the_middle(tmp_path):
    from negkd.errors import UserError
    from negkd.steps.infer import read_done_ids

    p = tmp_path / "predictions.jsonl"
    p.write_text('{"id": "a"}\n{"id": \n{"id": "b"}\n')
    with pytest.raises(UserError, match=r"predictions.jsonl:2"):
        read_done_ids(p, {"a", "b"})
    p.write_text('{"id": "a"}\n{"id": "b"')
    assert read_done_ids(p, {"a", "b"}) == {"a"}
    assert p.read_text() == '{"id": "a"}\n'


@pytest.mark.slow
def test_sigkill_then_resume_real_model(runner, tmp_path, tiny_model):
    """A real process killed with SIGKILL mid-run, then resumed: every id exactly once."""
    probs = write_problems(tmp_path / "p.jsonl", 12)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "negkd", "infer", str(probs), "-o", str(out), "--model", str(tiny_model),
           "--n", "2", "--max-new-tokens", "32", "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NEGKD_PLAIN_PROGRESS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pred = out / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not pred.exists() or pred.read_text().count("\n") < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = pred.read_text().count("\n")
    assert 3 <= n_before < 12
    r = _infer(runner, probs, "-o", out, "--model", tiny_model, "--n", 2, "--max-new-tokens", 32,
               "--batch-size", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    ids = [x["id"] for x in read_jsonl(pred)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(12))


# --------------------------------------------------------------------------- selection, templates


def test_limit_shard_template_and_chat(runner, tmp_path, tiny_model, scripted):
    probs = write_problems(tmp_path / "p.jsonl", 10)
    be = scripted(lambda q, n: ["\\boxed{2}"] * n)
    r = _infer(runner, probs, "-o", tmp_path / "s", "--model", tiny_model, "--n", 1, "--limit", 7, "--shard", "2/3")
    assert r.exit_code == 0, r.output
    assert [x["id"] for x in read_jsonl(tmp_path / "s" / "predictions.jsonl")] == ["q2", "q5"]
    assert be.prompts[0].startswith("Problem:\nAnn has 2 apples")
    # a template recorded in an adapter's negkd metadata is the default; chat wraps it
    ad = make_adapter(tiny_model, tmp_path / "ad", template="Q: {question}\nProblem:\n{question}\nSolution:\n")
    be = scripted(lambda q, n: ["\\boxed{2}"] * n)
    r = _infer(runner, probs, "-o", tmp_path / "t", "--model", ad, "--n", 1, "--limit", 1)
    assert r.exit_code == 0, r.output
    assert be.prompts[0].startswith("Q: Ann has 0 apples")
    be = scripted(lambda q, n: ["\\boxed{2}"] * n)
    be.tokenizer = _tok(tiny_model)
    r = _infer(runner, probs, "-o", tmp_path / "c", "--model", tiny_model, "--n", 1, "--limit", 1,
               "--chat-template")
    assert r.exit_code == 0, r.output
    assert be.prompts[0].startswith("<|user|>\nProblem:\nAnn") and be.prompts[0].endswith("<|assistant|>\n")


def _tok(path):
    from negkd.modeling import load_tokenizer

    return load_tokenizer(str(path), padding_side="left")


@pytest.mark.parametrize("args, msg", [
    (["--shard", "3/3"], "--shard"),
    (["--shard", "x"], "--shard"),
    (["--asc-weight", "2s"], "--asc-weight"),
    (["--n", "0"], "--n"),
    (["--temperature", "0"], "--greedy"),
    (["--top-p", "1.5"], "--top-p"),
    (["--backend", "openai"], "--base-url"),
    (["--ranker", "/nonexistent/ranker"], "train-ranker"),
    (["--adapter", "/nonexistent/adapter"], "adapter"),
    (["--limit", "0"], "--limit"),
])
def test_bad_flags_exit_2_bad_paths_exit_1_and_write_nothing(runner, tmp_path, tiny_model, args, msg):
    probs = write_problems(tmp_path / "p.jsonl", 2)
    r = _infer(runner, probs, "-o", tmp_path / "out", "--model", tiny_model, *args)
    assert r.exit_code == (2 if msg.startswith("--") else 1), r.output  # usage errors are 2 in every command
    assert msg in r.output
    assert not (tmp_path / "out").exists()


def test_bad_problem_file_names_file_and_line(runner, tmp_path, tiny_model):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": \n')
    r = _infer(runner, p, "-o", tmp_path / "out", "--model", tiny_model)
    assert r.exit_code == 1
    assert f"{p}:2" in r.output
    assert not (tmp_path / "out").exists()


def test_vllm_backend_clear_error(runner, tmp_path, tiny_model):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    probs = write_problems(tmp_path / "p.jsonl", 1)
    r = _infer(runner, probs, "-o", tmp_path / "out", "--model", tiny_model, "--backend", "vllm")
    assert r.exit_code == 1
    assert "pip install 'negkd[vllm]'" in r.output
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_vllm_refuses_flags_it_would_ignore(runner, tmp_path, tiny_model):
    """Checked before vLLM is imported: the same message whether or not vLLM is installed."""
    probs = write_problems(tmp_path / "p.jsonl", 1)
    for flag in (["--load-in-4bit"], ["--load-in-8bit"]):
        r = _infer(runner, probs, "-o", tmp_path / "out", "--model", tiny_model, "--backend", "vllm", *flag)
        assert r.exit_code == 1, flag
        assert "not supported by --backend vllm" in r.output and " ".join(flag) in r.output
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_nat_checkpoint_only_on_hf(runner, tmp_path, tiny_model):
    nat = tmp_path / "nat"
    nat.mkdir()
    (nat / "negkd.json").write_text(json.dumps({"kind": "nat", "base_model": str(tiny_model)}))
    probs = write_problems(tmp_path / "p.jsonl", 1)
    r = _infer(runner, probs, "-o", tmp_path / "out", "--model", nat, "--backend", "vllm")
    assert r.exit_code == 1
    assert "NAT checkpoint runs only on --backend hf" in r.output


def test_help_lists_every_flag(runner):
    r = runner.invoke(app, ["infer", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for flag in ("--model", "--adapter", "--ranker", "--asc-weight", "--n", "--temperature", "--top-p",
                 "--max-new-tokens", "--greedy", "--seed", "--batch-size", "--limit", "--shard", "--template",
                 "--chat-template", "--backend", "--base-url", "--overwrite", "Example: negkd infer"):
        assert flag in r.output, flag


# --------------------------------------------------------------------------- the real hf backend


def test_greedy_is_deterministic_real_model(runner, tmp_path, tiny_model):
    probs = write_problems(tmp_path / "p.jsonl", 3)
    outs = []
    for name, bs in (("a", 1), ("b", 8)):
        r = _infer(runner, probs, "-o", tmp_path / name, "--model", tiny_model, "--greedy", "--max-new-tokens", 12,
                   "--batch-size", bs, "--device", "cpu")
        assert r.exit_code == 0, r.output
        recs = sorted(read_jsonl(tmp_path / name / "predictions.jsonl"), key=lambda x: x["id"])
        assert all(len(x["candidates"]) == 1 for x in recs)
        outs.append([x["candidates"] for x in recs])
    assert outs[0] == outs[1]


def test_end_to_end_adapter_infer_then_eval(runner, tmp_path, tiny_model):
    """tiny model + LoRA adapter + a ranker trained by `negkd train-ranker` (here with --loss bce)
    -> infer --n 4 -> eval: every row filled, the ASC rows included."""
    import random

    probs = write_problems(tmp_path / "p.jsonl", 4)
    ad = make_adapter(tiny_model, tmp_path / "adapter")
    split = tmp_path / "split"
    split.mkdir()
    (split / "manifest.json").write_text('{"command": "split"}\n')
    rng = random.Random(0)
    for name, ok in (("pos.jsonl", True), ("neg.jsonl", False)):
        with open(split / name, "w") as fh:
            for i in range(6):
                a, b = rng.randint(1, 9), rng.randint(1, 9)
                fh.write(json.dumps({"id": f"t{i}", "question": f"{a} + {b}?", "answer": str(a + b), "k": int(not ok),
                                     "rationale": f"so \\boxed{{{a + b if ok else a - b}}}", "correct": ok}) + "\n")
    ranker = tmp_path / "ranker"
    r = runner.invoke(app, ["train-ranker", str(split), "-o", str(ranker), "--base-model", str(tiny_model), "--loss", "bce",
                            "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--val-fraction", "0.34",
                            "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "pred"
    r = _infer(runner, probs, "-o", out, "--model", ad, "--n", 4, "--max-new-tokens", 16, "--device", "cpu",
               "--ranker", ranker)
    assert r.exit_code == 0, r.output
    recs = read_jsonl(out / "predictions.jsonl")
    assert len(recs) == 4 and all(len(x["candidates"]) == 4 for x in recs)
    assert all(c["tokens"] >= 1 and "finished" in c and 0 < c["score"] < 1 for x in recs for c in x["candidates"])
    assert all(x["decoding"] == "sampled" for x in recs)
    man = json.loads((out / "manifest.json").read_text())
    assert man["args"]["base"] == str(tiny_model) and man["args"]["adapter"] == str(ad)
    assert man["tokens_per_s"] > 0
    r = runner.invoke(app, ["eval", str(out), "-o", str(tmp_path / "ev")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["files"]["pred"]
    assert m["overall"]["records"] == 4
    # sampled candidates: the first one is reported as "first", never as "greedy"
    assert "greedy" not in m["overall"]
    for row in ("first", "maj@N", "pass@1", "pass@N", "sc@N", "asc@N[1]", "asc@N[1+2s]", "asc@N[1+s]", "asc@N[s]"):
        assert isinstance(m["overall"][row], float), row
    assert set(m["asc_overturns"]) == {"asc:1", "asc:1+2s", "asc:1+s", "asc:s"}
    assert m["asc_overturns"]["asc:1"]["overturned"] == 0  # w = 1 is the plain majority


def test_eval_reads_infer_votes(runner, tmp_path, tiny_model, scripted, fake_ranker):
    """The majority is wrong and one GOOD candidate is right: eval must credit the ASC rules
    that follow the ranker (s, 1+2s) and count their overturns as right."""
    probs = write_problems(tmp_path / "p.jsonl", 3)
    gold = {json.loads(line)["question"]: json.loads(line)["answer"] for line in probs.read_text().splitlines()}
    scripted(lambda q, n: ["so \\boxed{99}", "thus \\boxed{99}", f"GOOD so \\boxed{{{gold[q]}}}", "no idea"])
    r = _infer(runner, probs, "-o", tmp_path / "pred", "--model", tiny_model, "--n", 4, "--ranker", fake_ranker)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(tmp_path / "pred"), "-o", str(tmp_path / "ev")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["files"]["pred"]
    o = m["overall"]
    assert o["first"] == 0.0 and o["maj@N"] == 0.0 and o["sc@N"] == 0.0 and o["pass@N"] == 1.0
    assert o["asc@N[s]"] == 1.0 and o["asc@N[1+2s]"] == 1.0 and o["asc@N[1+s]"] == 0.0 and o["asc@N[1]"] == 0.0
    assert m["asc_overturns"]["asc:s"]["right"] == 3 and m["asc_overturns"]["asc:1+s"]["overturned"] == 0


def test_nat_checkpoint_runs_on_hf(runner, tmp_path, tiny_model):
    """A NAT checkpoint dir as --model: base read from its metadata, unit attached. A fresh unit
    (B_pos = W_2 = 0) leaves the base unchanged, so its greedy output equals the base model's."""
    from negkd import nat
    from negkd.modeling import load_model

    ad = make_adapter(tiny_model, tmp_path / "neg")
    model = load_model(str(tiny_model), device="cpu", dtype="float32")
    cfg = nat.attach_new(model, ad)
    nat.save(model, tmp_path / "nat", cfg, meta={"kind": "nat", "base_model": str(tiny_model),
                                                "template": "Problem:\n{question}\nSolution:\n"})
    probs = write_problems(tmp_path / "p.jsonl", 2)
    outs = {}
    for name, spec in (("nat", tmp_path / "nat"), ("base", tiny_model)):
        r = _infer(runner, probs, "-o", tmp_path / f"o-{name}", "--model", spec, "--greedy", "--max-new-tokens", 10,
                   "--device", "cpu")
        assert r.exit_code == 0, r.output
        outs[name] = {x["id"]: x["candidates"] for x in read_jsonl(tmp_path / f"o-{name}" / "predictions.jsonl")}
    assert outs["nat"] == outs["base"]
    man = json.loads((tmp_path / "o-nat" / "manifest.json").read_text())
    assert man["args"]["nat"] == str(tmp_path / "nat") and man["args"]["base"] == str(tiny_model)


# --------------------------------------------------------------------------- the openai backend


def test_openai_backend_completions_and_votes(runner, tmp_path, tiny_model):
    from fake_openai import FakeOpenAI, http_error

    probs = write_problems(tmp_path / "p.jsonl", 5)

    def responder(req, i):  # two of three candidates agree on the gold answer (2i+1 from the question)
        a = int(re.search(r"Ann has (\d+) apples", req.prompt).group(1))
        return (f"... The answer is $\\boxed{{{2 * a + 1 if i < 2 else 0}}}$.", "stop" if i else "length")

    with FakeOpenAI(responder, models=["student"]) as srv:
        srv.inject(http_error(500))  # one transient failure: retried by the client
        r = _infer(runner, probs, "-o", tmp_path / "out", "--model", tiny_model, "--backend", "openai",
                   "--base-url", srv.url, "--served-model", "student", "--n", 3, "--temperature", 0.5,
                   "--max-new-tokens", 64, "--seed", 10, "--backoff", 0.01)
        assert r.exit_code == 0, r.output
        reqs = [q for q in srv.requests if q.api == "completions"]
    recs = {x["id"]: x for x in read_jsonl(tmp_path / "out" / "predictions.jsonl")}
    assert sorted(recs) == [f"q{i}" for i in range(5)]
    for i in range(5):
        rec = recs[f"q{i}"]
        assert [c["pred"] for c in rec["candidates"]] == [str(2 * i + 1)] * 2 + ["0"]
        assert [c["finished"] for c in rec["candidates"]] == [False, True, True]
        assert rec["votes"] == {"sc": str(2 * i + 1)}
    # the raw training-format prompt went to /completions with the sampling settings
    body = reqs[-1].body
    assert body["prompt"].startswith("Problem:\nAnn has") and body["prompt"].endswith("\nSolution:\n")
    assert body["n"] == 3 and body["temperature"] == 0.5 and body["max_tokens"] == 64 and body["model"] == "student"
    assert len({q.body["seed"] for q in reqs if q.body.get("seed") is not None}) == 5  # one seed per problem
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["client"]["retries"] >= 1


def test_openai_backend_chat_and_failed_requests_resume(runner, tmp_path, tiny_model):
    from fake_openai import FakeOpenAI, http_error

    probs = write_problems(tmp_path / "p.jsonl", 3)
    out = tmp_path / "out"
    args = ["--model", tiny_model, "--backend", "openai", "--served-model", "m", "--n", 2, "--chat-template",
            "--greedy", "--max-retries", 1, "--backoff", 0.01]
    with FakeOpenAI(lambda req, i: "so \\boxed{5}") as srv:
        # q1's request keeps failing: it is left out, the others are saved, exit 1
        srv.inject(http_error(503), match=lambda q: "has 1 apples" in q.prompt, times=100)
        r = _infer(runner, probs, "-o", out, "--base-url", srv.url, *args)
        assert r.exit_code == 1
        assert "rerun the same command" in r.output
        assert sorted(x["id"] for x in read_jsonl(out / "predictions.jsonl")) == ["q0", "q2"]
        chat = [q for q in srv.requests if q.api == "chat"][0]
        assert chat.messages == [{"role": "user", "content": chat.prompt}]
        assert chat.prompt.startswith("Problem:\nAnn has") and chat.body["temperature"] == 0.0
    with FakeOpenAI(lambda req, i: "so \\boxed{5}") as srv:
        r = _infer(runner, probs, "-o", out, "--base-url", srv.url, *args)
        assert r.exit_code == 0, r.output
        assert len([q for q in srv.requests if q.api == "chat"]) == 1  # only q1 again
    assert sorted(x["id"] for x in read_jsonl(out / "predictions.jsonl")) == ["q0", "q1", "q2"]


def test_openai_backend_fatal_error_and_adapter_needs_served_name(runner, tmp_path, tiny_model):
    from fake_openai import FakeOpenAI

    probs = write_problems(tmp_path / "p.jsonl", 2)
    with FakeOpenAI(models=["other"]) as srv:
        r = _infer(runner, probs, "-o", tmp_path / "o1", "--model", tiny_model, "--backend", "openai",
                   "--base-url", srv.url, "--served-model", "nope")
        assert r.exit_code == 1 and "error:" in r.output
        ad = make_adapter(tiny_model, tmp_path / "ad")
        r = _infer(runner, probs, "-o", tmp_path / "o2", "--model", ad, "--backend", "openai", "--base-url", srv.url)
        assert r.exit_code == 1 and "--served-model" in r.output
        assert not (tmp_path / "o2").exists()
