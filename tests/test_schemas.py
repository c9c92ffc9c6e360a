"""schemas.py: the record contracts and every foreign-format reader."""

from __future__ import annotations

import gzip
import json

import pytest

from negkd.errors import UserError
from negkd.schemas import detect_format, read_graded, read_predictions, read_problems, read_samples


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def test_negkd_problems_carry_unknown_keys(tmp_path):
    p = _write(tmp_path / "p.jsonl", [{"id": 1, "question": "1+1?", "answer": 2, "extra": {"x": 1}, "level": "Level 2"}])
    [rec] = read_problems(p)
    assert rec == {"id": "1", "question": "1+1?", "answer": "2", "extra": {"x": 1}, "level": 2}


def test_math_reader_takes_gold_from_last_box(tmp_path):
    p = _write(tmp_path / "math.jsonl", [{
        "unique_id": "train/algebra/0.json", "problem": "Find $x$.", "level": "Level 5", "type": "Algebra",
        "solution": "First $\\boxed{1}$ then $x = \\boxed{\\frac{1}{2}}$.",
    }])
    [rec] = read_problems(p)
    assert rec["id"] == "train/algebra/0.json"
    assert rec["answer"] == "\\frac{1}{2}"
    assert rec["subject"] == "Algebra" and rec["level"] == 5 and rec["question"] == "Find $x$."
    assert detect_format(json.loads(p.read_text())) == "math"


def test_math500_reader(tmp_path):
    p = _write(tmp_path / "m500.jsonl", [{"problem": "Q", "solution": "S \\boxed{3}", "answer": "3",
                                          "subject": "Algebra", "level": 1, "unique_id": "test/a/1.json"}])
    [rec] = read_problems(p)
    assert (rec["id"], rec["answer"], rec["subject"], rec["level"]) == ("test/a/1.json", "3", "Algebra", 1)


def test_gsm8k_reader_strips_commas_and_keeps_solution(tmp_path):
    p = _write(tmp_path / "gsm.jsonl", [{"question": "How many?", "answer": "2 * 500 = <<2*500=1000>>1000\n#### 1,000"}])
    [rec] = read_problems(p)
    assert rec["answer"] == "1000" and rec["id"] == "gsm:1" and rec["solution"].endswith("#### 1,000")


def test_tdg_teacher_data_expands_to_samples(tmp_path):
    p = tmp_path / "tdg.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({
            "question": "Problem:\nWhat is 1+1?", "answer": "So $\\boxed{2}$.", "level": "Level 1", "type": "Prealgebra",
            "generated_answer": ["Solution:\nIt is $\\boxed{2}$.", "It is $\\boxed{3}$."], "tdg_source": "f.jsonl:0",
        }) + "\n")
    samples = read_samples(p)
    assert [(s["id"], s["k"]) for s in samples] == [("f.jsonl:0", 0), ("f.jsonl:0", 1)]
    assert samples[0]["question"] == "What is 1+1?"  # "Problem:\n" prefix of the GPT-3.5 file removed
    assert samples[0]["rationale"] == "It is $\\boxed{2}$."  # "Solution:\n" prefix removed
    assert samples[0]["answer"] == "2" and samples[0]["solution"] == "So $\\boxed{2}$."
    assert "generated_answer" not in samples[0]
    assert read_problems(p)[0]["answer"] == "2"


def test_svamp_asdiv_multiarith_gsmhard(tmp_path):
    sv = tmp_path / "svamp.json"
    sv.write_text(json.dumps([{"ID": "chal-1", "Body": "Each pack costs 76.", "Question": "How much?",
                               "Equation": "( 76.0 )", "Answer": 76.0, "Type": "x"}]))
    [r] = read_problems(sv)
    assert (r["id"], r["question"], r["answer"]) == ("chal-1", "Each pack costs 76. How much?", "76")
    ad = _write(tmp_path / "asdiv.jsonl", [{"body": "Seven apples.", "question": "How many?", "answer": "9 (apples)",
                                            "formula": "7+2=9", "idx": 0}])
    [r] = read_problems(ad)
    assert (r["id"], r["answer"], r["unit"]) == ("0", "9", "apples")
    ma = _write(tmp_path / "ma.jsonl", [{"input": "Q?", "target": 39}])
    assert read_problems(ma)[0]["answer"] == "39"
    gh = _write(tmp_path / "gh.jsonl", [{"input": "Q?", "code": "def f(): pass", "target": 2.5}])
    [r] = read_problems(gh)
    assert r["answer"] == "2.5" and "code" not in r


def test_forced_format_and_unknown_format(tmp_path):
    p = _write(tmp_path / "p.jsonl", [{"id": "a", "question": "q", "answer": "#### 5"}])
    assert read_problems(p, "negkd")[0]["answer"] == "#### 5"
    with pytest.raises(UserError, match="unknown --format 'csv'"):
        read_problems(p, "csv")


@pytest.mark.parametrize("recs, msg", [
    ([{"id": "a", "question": "q", "answer": "1"}, {"id": "a", "question": "q2", "answer": "2"}],
     ":2: duplicate id 'a'"),
    ([{"id": "a", "answer": "1"}], ":1: missing field 'question'"),
    ([{"id": "a", "question": "q"}], ":1: missing field 'answer'"),
    ([{"id": "a", "question": "  ", "answer": "1"}], ":1: 'question' must be a non-empty string"),
])
def test_problem_errors(tmp_path, recs, msg):
    p = _write(tmp_path / "p.jsonl", recs)
    with pytest.raises(UserError, match=msg):
        read_problems(p)


def test_samples_graded_predictions_contracts(tmp_path):
    base = {"id": "a", "question": "q", "answer": "1"}
    p = _write(tmp_path / "s.jsonl", [{**base, "k": 0, "rationale": "r"}, {**base, "k": 0, "rationale": "r2"}])
    with pytest.raises(UserError, match=r":2: duplicate \(id, k\)"):
        read_samples(p)
    p = _write(tmp_path / "s.jsonl", [{**base, "k": "0", "rationale": "r"}])
    with pytest.raises(UserError, match="'k' must be an integer"):
        read_samples(p)
    p = _write(tmp_path / "g.jsonl", [{**base, "k": 0, "rationale": "r", "pred": "1"}])
    with pytest.raises(UserError, match="needs 'correct'.*negkd split"):
        read_graded(p)
    p = _write(tmp_path / "g.jsonl", [{**base, "k": 0, "rationale": "r", "pred": "1", "correct": True}])
    assert read_graded(p)[0]["correct"] is True
    p = _write(tmp_path / "pr.jsonl", [{**base, "candidates": []}])
    with pytest.raises(UserError, match="non-empty list"):
        read_predictions(p)
    p = _write(tmp_path / "pr.jsonl", [{**base, "candidates": [{"rationale": "r", "pred": None}]}])
    assert read_predictions(p)[0]["candidates"][0]["pred"] is None


def test_predictions_expand_to_samples_for_the_ranker_recipe(tmp_path):
    base = {"id": "a", "question": "q", "answer": "1"}
    p = _write(tmp_path / "pred.jsonl", [{**base, "candidates": [{"rationale": "r0", "pred": "1"},
                                                                   {"rationale": "r1", "pred": None}],
                                          "votes": {"sc": "1"}}])
    samples = read_samples(p)
    assert [(s["id"], s["k"], s["rationale"]) for s in samples] == [("a", 0, "r0"), ("a", 1, "r1")]
    assert "candidates" not in samples[0] and "votes" not in samples[0]


def test_duplicate_samples_are_refused_in_every_sample_format(tmp_path):
    """Concatenated shards of teacher data or predictions must not double a (id, k) silently."""
    tdg = {"question": "Problem:\nq", "answer": "\\boxed{1}", "generated_answer": ["a", "b"], "id": "p1"}
    p = _write(tmp_path / "t.jsonl", [tdg, tdg])
    with pytest.raises(UserError, match=r"t.jsonl:2: duplicate \(id, k\) = \('p1', 0\) \(first at .*t.jsonl:1\)"):
        read_samples(p)
    pred = {"id": "a", "question": "q", "answer": "1", "candidates": [{"rationale": "r", "pred": "1"}]}
    p = _write(tmp_path / "pr.jsonl", [pred, {**pred, "id": "b"}, pred])
    with pytest.raises(UserError, match=r"pr.jsonl:3: duplicate \(id, k\) = \('a', 0\)"):
        read_samples(p)
    assert len(read_samples(_write(tmp_path / "ok.jsonl", [pred, {**pred, "id": "b"}]))) == 2
