"""``negkd eval`` through the CLI: greedy / maj@N / pass@k / ASC rules, side by side, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from negkd.cli import app
from negkd.steps.evaluate import pass_at_k


def cand(pred):
    return {"rationale": "..." if pred is None else f"so \\boxed{{{pred}}}", "pred": pred}


RECORDS = [
    {"id": "r1", "question": "q1", "answer": "\\frac12", "subject": "algebra", "level": 1,
     "candidates": [cand("0.5"), cand("1"), cand("\\frac{1}{2}"), cand(None)],
     "votes": {"sc": "0.5", "asc:1": "0.5", "asc:1+2s": "0.5", "asc:1+s": "1", "asc:s": "1"}},
    {"id": "r2", "question": "q2", "answer": "7", "subject": "geometry", "level": 2,
     "candidates": [cand("5"), cand("7"), cand("5"), cand("7")],
     "votes": {"sc": "5", "asc:1": "5", "asc:1+2s": "5", "asc:1+s": "7", "asc:s": "7.0"}},
    {"id": "r3", "question": "q3", "answer": "3", "subject": "algebra", "level": 2,
     "candidates": [cand(None), cand(None)],
     "votes": {"sc": None, "asc:1": None, "asc:1+2s": None, "asc:1+s": None, "asc:s": None}},
]


def write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_pass_at_k_estimator():
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(2, 1, 8) == 1.0  # k > n reads as k = n


def test_eval_metrics_side_by_side(runner, tmp_path):
    a = write(tmp_path / "nat.jsonl", RECORDS)
    bdir = tmp_path / "cotkd"
    bdir.mkdir()
    write(bdir / "predictions.jsonl", [{**RECORDS[1], "candidates": [cand("7")] * 4, "votes": None}])
    (bdir / "manifest.json").write_text('{"command": "infer"}\n')  # a finished `negkd infer`
    out = tmp_path / "eval"
    r = runner.invoke(app, ["eval", str(a), str(bdir), "-o", str(out), "--k", "2"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())["files"]
    assert list(m) == ["nat", "cotkd"]
    o = m["nat"]["overall"]
    assert o["records"] == 3
    assert o["greedy"] == pytest.approx(1 / 3)
    assert o["maj@N"] == pytest.approx((1 + 0 + 0) / 3)  # r2 is a 2-2 tie: "5" came first and wins
    assert o["pass@1"] == pytest.approx((0.5 + 0.5) / 3)
    assert o["pass@2"] == pytest.approx((5 / 6 + 5 / 6) / 3)
    assert o["pass@N"] == pytest.approx(2 / 3)
    assert o["sc@N"] == pytest.approx(1 / 3)
    assert o["asc@N[1+s]"] == pytest.approx(1 / 3) and o["asc@N[s]"] == pytest.approx(1 / 3)
    assert o["asc@N[1]"] == pytest.approx(1 / 3)
    assert m["nat"]["asc_overturns"]["asc:1+s"] == {"records": 3, "overturned": 2, "right": 1, "wrong": 1, "neither": 0}
    assert m["nat"]["asc_overturns"]["asc:1"]["overturned"] == 0
    assert m["nat"]["unparseable_candidates"] == 3
    assert m["nat"]["by_subject"]["algebra"]["records"] == 2
    assert m["nat"]["by_subject"]["geometry"]["maj@N"] == 0.0
    assert m["nat"]["by_level"]["2"]["greedy"] == 0.0
    b = m["cotkd"]["overall"]
    assert b["greedy"] == 1.0 and b["maj@N"] == 1.0 and "sc@N" not in b
    assert "maj@N" in r.output and "cotkd" in r.output and "overturned" in r.output
    assert "asc@N[s]" in r.output  # not swallowed as rich markup
    # rerun: nothing to do
    r2 = runner.invoke(app, ["eval", str(a), str(bdir), "-o", str(out), "--k", "2"])
    assert r2.exit_code == 0 and "up to date" in r2.output


@pytest.mark.parametrize(
    "records,message",
    [
        ([{"id": "x", "question": "q", "answer": "1", "candidates": []}], "bad.jsonl:1: a prediction needs 'candidates'"),
        ([{"id": "x", "question": "q", "candidates": [cand("1")]}], "bad.jsonl:1: missing field 'answer'"),
        ([{**RECORDS[0]}, {**RECORDS[0]}], "bad.jsonl:2: duplicate id 'r1'"),
    ],
)
def test_bad_predictions_fail_cleanly(runner, tmp_path, records, message):
    out = tmp_path / "eval"
    r = runner.invoke(app, ["eval", str(write(tmp_path / "bad.jsonl", records)), "-o", str(out)])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not out.exists()


def test_missing_and_malformed_files(runner, tmp_path):
    r = runner.invoke(app, ["eval", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no such file" in r.output
    bad = tmp_path / "m.jsonl"
    bad.write_bytes(b'{"id": "x"\n')
    r = runner.invoke(app, ["eval", str(bad), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "m.jsonl:1: malformed JSON" in r.output
    bad.write_bytes(b"\xff\xfe\n")
    r = runner.invoke(app, ["eval", str(bad), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "not valid UTF-8" in r.output
    assert not (tmp_path / "o").exists()


def test_maj_at_n_breaks_ties_like_infer_votes(runner, tmp_path):
    """One tie rule: eval's maj@N credits exactly the answer `voting.vote` (infer's sc vote) picks."""
    from negkd.steps.infer import compute_votes

    recs = []
    for i, (preds, gold) in enumerate([(["7", "5", "5", "7"], "7"), (["5", "7", "7", "5"], "7"),
                                       (["1", "2", "3"], "3"), (["3", "2", "1"], "3"), ([None, "4", "2"], "4")]):
        recs.append({"id": f"t{i}", "question": "q", "answer": gold, "candidates": [cand(p) for p in preds],
                     "votes": compute_votes(preds, None)})
    out = tmp_path / "eval"
    r = runner.invoke(app, ["eval", str(write(tmp_path / "ties.jsonl", recs)), "-o", str(out)])
    assert r.exit_code == 0, r.output
    o = json.loads((out / "metrics.json").read_text())["files"]["ties"]["overall"]
    assert [rec["votes"]["sc"] for rec in recs] == ["7", "5", "1", "3", "4"]
    assert o["sc@N"] == pytest.approx(3 / 5)
    assert o["maj@N"] == o["sc@N"]  # was (0.5 + 0.5 + 1/3 + 1/3 + 0.5) / 5 with fractional ties
