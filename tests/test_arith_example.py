"""Fast unit tests for examples/arith: problem generator, synthetic teacher (and its HTTP server),
pretraining corpus, statistics. No torch; well under a second or two."""

from __future__ import annotations

import json
import math
import random
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

ARITH = Path(__file__).resolve().parents[1] / "examples" / "arith"
sys.path.insert(0, str(ARITH))

import arithgen  # noqa: E402
import stats  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return arithgen.make_splits(1234, sizes={"train": 60, "val": 5, "test": 20}, ood_size=40)


def test_splits_contract_sizes_and_disjointness(splits):
    from negkd.grading import extract_answer

    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "val": 25, "test": 100, "ood": 40}
    questions = [p["question"] for v in splits.values() for p in v]
    assert len(questions) == len(set(questions)), "splits share a question"
    ids = [p["id"] for v in splits.values() for p in v]
    assert len(ids) == len(set(ids))
    for name, recs in splits.items():
        for p in recs:
            assert set(p) >= {"id", "question", "answer", "solution", "level", "subject"}
            assert extract_answer(p["solution"]) == p["answer"]
            assert int(p["answer"]) == arithgen.evaluate(p["ops"])[-1] > 0
            n_ops = len(p["ops"]) - 1
            if name == "ood":
                assert n_ops == arithgen.OOD_STEPS == p["level"] and p["subject"] == "ood"
            else:
                assert n_ops == p["level"] in arithgen.LEVELS and p["subject"] == f"steps{p['level']}"
    assert max(len(p["ops"]) - 1 for p in splits["train"]) < arithgen.OOD_STEPS


def test_splits_fixed_by_seed(splits):
    again = arithgen.make_splits(1234, sizes={"train": 60, "val": 5, "test": 20}, ood_size=40)
    assert again == splits
    other = arithgen.make_splits(99, sizes={"train": 60, "val": 5, "test": 20}, ood_size=40)
    assert [p["question"] for p in other["test"]] != [p["question"] for p in splits["test"]]


def test_gold_solution_equations_are_right(splits):
    import re

    for p in splits["train"][:100] + splits["ood"]:
        for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", p["solution"]):
            assert eval(f"{a}{op}{b}") == int(c), p["solution"]


def test_parse_question_inverts_the_text_even_inside_a_fewshot_prompt(splits):
    p, q = splits["test"][7], splits["train"][3]
    prompt = f"Solve it.\nProblem:\n{q['question']}\nSolution:\n{q['solution']}\n\nProblem:\n{p['question']}\nSolution:\n"
    ops, name, thing = arithgen.parse_question(prompt)
    assert ops == p["ops"] and arithgen.question_text(ops, name, thing) == p["question"]
    assert arithgen.parse_question("What is 2 + 2?") is None
    assert arithgen.parse_question("Ann has 3 apples. Ann eats 2 apples. How many apples does Ann have now?") is None


def test_teacher_is_deterministic_noisy_and_harder_levels_err_more(splits):
    from negkd.grading import extract_answer

    wrong, total, kinds = Counter(), Counter(), Counter()
    step_right = step_total = 0
    for p in splits["train"]:
        ops, name, thing = arithgen.parse_question(p["question"])
        for i in range(4):
            text, errors = arithgen.teacher_rationale(ops, name, thing, seed=5, index=i)
            assert (text, errors) == arithgen.teacher_rationale(ops, name, thing, seed=5, index=i)
            assert text.endswith("}$.")
            ok = extract_answer(text) == p["answer"]
            assert ok or errors, "a faithful rationale must be right"
            total[p["level"]] += 1
            wrong[p["level"]] += not ok
            kinds.update(errors)
            if not ok:  # most steps of a wrong rationale are still right equations
                import re

                eqs = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", text)
                step_total += len(eqs)
                step_right += sum(eval(f"{a}{o}{b}") == int(c) for a, o, b, c in eqs)
    rate = {lv: wrong[lv] / total[lv] for lv in total}
    overall = sum(wrong.values()) / sum(total.values())
    assert 0.30 <= overall <= 0.60, rate
    assert rate[1] < rate[3] < rate[5], rate
    assert set(kinds) == set(arithgen.ERROR_KINDS), kinds
    assert step_right / step_total > 0.75
    # different seeds give different rationales for some problems
    ops, name, thing = arithgen.parse_question(splits["train"][-1]["question"])
    assert len({arithgen.teacher_rationale(ops, name, thing, seed=s)[0] for s in range(20)}) > 1


def test_pretrain_text_has_no_finetuning_format_and_avoids_eval_questions(splits):
    rng = random.Random(0)
    avoid = {p["question"] for p in splits["test"]}
    docs = [arithgen.pretrain_text(rng, avoid) for _ in range(300)]
    for d in docs:
        assert "Problem:" not in d and "Solution:" not in d and "How many" not in d
        assert all(q not in d for q in list(avoid)[:50])
    # both working styles occur, and some documents (not most) close with a boxed answer
    assert 0.3 < sum(" = " in d and " more: " in d or "starts with" in d for d in docs) / len(docs) < 0.7
    assert 0.15 < sum("\\boxed{" in d for d in docs) / len(docs) < 0.45
    # the equations in a document are that document's own: final value matches the statement's chain
    d = docs[0]
    statement, eqs = d.split("\n")[0], "\n".join(d.split("\n")[1:])
    name = statement.split()[0]
    thing = statement.split(".")[0].split()[-1]
    ops, _, _ = arithgen.parse_question(f"{statement} How many {thing} does {name} have now?")
    assert f"{name} has {arithgen.evaluate(ops)[-1]} {thing}." in eqs


def test_teacher_server_speaks_openai_chat_and_completions(splits):
    import teacher_server

    srv = teacher_server.serve(0)
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        p = splits["test"][11]
        ops, name, thing = arithgen.parse_question(p["question"])

        def post(path, body):
            req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())

        body = {"model": "arith-teacher", "seed": 3, "n": 2, "messages": [
            {"role": "system", "content": "Solve step by step."},
            {"role": "user", "content": f"Problem:\n{p['question']}"}]}
        out = post("/chat/completions", body)
        texts = [c["message"]["content"] for c in out["choices"]]
        assert texts == [arithgen.teacher_rationale(ops, name, thing, seed=3, index=i)[0] for i in range(2)]
        again = post("/chat/completions", body)
        assert [c["message"]["content"] for c in again["choices"]] == texts
        comp = post("/completions", {"model": "m", "prompt": f"Problem:\n{p['question']}\nSolution:\n", "seed": 3})
        assert comp["choices"][0]["text"] == texts[0]
        with pytest.raises(urllib.error.HTTPError) as e:
            post("/chat/completions", {"messages": [{"role": "user", "content": "hello"}]})
        assert e.value.code == 400
        with urllib.request.urlopen(url + "/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["id"] == teacher_server.MODEL
    finally:
        srv.shutdown()


def test_stats_functions():
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert stats.mean_std([4.0]) == (4.0, 0.0)
    # McNemar: 8 discordant pairs all one way -> p = 2 / 2^8
    a = [True] * 8 + [True, False]
    b = [False] * 8 + [True, False]
    n10, n01, p = stats.mcnemar_exact(a, b)
    assert (n10, n01) == (8, 0) and math.isclose(p, 2 / 256)
    assert stats.mcnemar_exact(a, a)[2] == 1.0
    # t distribution: known two-sided critical values
    assert math.isclose(stats.t_two_sided_p(12.706, 1), 0.05, abs_tol=1e-4)
    assert math.isclose(stats.t_two_sided_p(4.303, 2), 0.05, abs_tol=1e-4)
    assert math.isclose(stats.t_two_sided_p(2.0, 2), 0.1835, abs_tol=1e-4)
    t, p = stats.paired_t([0.5, 0.6, 0.7], [0.4, 0.45, 0.5])
    assert t > 0 and 0 < p < 0.1
    assert stats.paired_t([0.5], [0.4]) is None
    point, lo, hi = stats.paired_bootstrap([(a, b)], reps=300)
    assert math.isclose(point, 80.0) and lo <= point <= hi
    assert stats.overlap({1, 2, 3}, {3, 4}) == {"a": 3, "b": 2, "both": 1, "iou": 0.25}


def test_seed_pooled_statistics_treat_the_problem_as_the_unit():
    """Three seeds on the same 10 problems where A beats B on the same 4 problems every time: pooling
    (seed, problem) pairs would count 12 discordant pairs (p = 2/4096); by problem there are 4 (p = 1/8)."""
    a = [True] * 4 + [False] * 6
    b = [False] * 10
    groups = [(a, b)] * 3
    n10, n01, p = stats.problem_sign_test(groups)
    assert (n10, n01) == (4, 0) and math.isclose(p, 2 / 16)
    assert stats.problem_sign_test([(a, b)]) == stats.mcnemar_exact(a, b)  # one seed: McNemar
    # problems favouring A in one seed and B in another cancel out
    c = [True] + [False] * 9
    assert stats.problem_sign_test([(c, b), (b, c)])[:2] == (0, 0)
    point, lo, hi = stats.paired_bootstrap(groups, reps=500, seed=1)
    assert math.isclose(point, 40.0)
    # one draw of problems for all seeds: a drawn problem moves all 3 seeds at once, so every
    # replicate is a multiple of 10 points (3 of 30 outcomes); resampling within seeds would give 3.33 steps
    assert lo < point < hi
    assert math.isclose(round(lo / 10) * 10, lo) and math.isclose(round(hi / 10) * 10, hi)


def test_driver_reads_accuracy_from_a_real_eval_run(runner, tmp_path):
    """run.accuracy (LR tuning) and report._eval_overall read what `negkd eval` writes, in %."""
    import report
    import run

    from negkd.cli import app

    rows = [{"id": f"val-{i}", "question": "q", "answer": "2", "decoding": "greedy",
             "candidates": [{"rationale": "r", "pred": "2" if i < 3 else "5"}]} for i in range(4)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(app, ["eval", str(tmp_path / "predictions.jsonl"), "-o", str(tmp_path / "m"), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert run.accuracy(json.loads((tmp_path / "m" / "metrics.json").read_text())) == 75.0
    assert report._eval_overall(tmp_path / "m") == 75.0
