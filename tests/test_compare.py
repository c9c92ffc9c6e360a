"""``negkd compare`` through the CLI: known differences found, identical sets not, Holm, overlap, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from negkd.cli import app
from negkd.stats import holm

SUBJECTS = ("algebra", "geometry")


def run_file(path: Path, solved: list[bool]) -> Path:
    """One run: problem i is solved (both candidates right) or not (both wrong)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = [{"id": f"p{i:03d}", "question": f"q{i}", "answer": "1", "subject": SUBJECTS[i % 2], "level": 1 + i % 3,
             "candidates": [{"rationale": "", "pred": "1" if ok else "2"}] * 2}
            for i, ok in enumerate(solved)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    (path.parent / "manifest.json").write_text('{"command": "infer"}\n')  # a finished `negkd infer` run
    return path


def pattern(n: int, rate: float, offset: int = 0) -> list[bool]:
    """Deterministic solved pattern with the given rate (problem i solved iff frac((i+offset)*rate) < rate)."""
    return [((i + offset) * rate) % 1.0 < rate for i in range(n)]


def compare(runner, *argv) -> tuple[object, dict | None]:
    r = runner.invoke(app, ["compare", *map(str, argv)], env={"COLUMNS": "200"})
    out = None
    for i, a in enumerate(argv):
        if a == "-o" and (Path(argv[i + 1]) / "compare.json").exists():
            out = json.loads((Path(argv[i + 1]) / "compare.json").read_text())
    return r, out


def test_known_difference_is_found(runner, tmp_path):
    n = 200
    for s in range(2):  # 2 seeds each; B solves 20 more problems than A in every seed
        a = pattern(n, 0.4, offset=s)
        b = [ok or (not ok and i % 6 == 0) for i, ok in enumerate(a)]
        run_file(tmp_path / "a" / f"seed{s}" / "predictions.jsonl", a)
        run_file(tmp_path / "b" / f"seed{s}" / "predictions.jsonl", b)
    r, res = compare(runner, f"cotkd={tmp_path / 'a'}", f"nat={tmp_path / 'b'}/seed*", "-o", tmp_path / "cmp",
                     "--n-boot", 1000)
    assert r.exit_code == 0, r.output
    assert res["reference"] == "cotkd" and res["sets"]["nat"]["seeds"] == 2 and res["problems"] == n
    c = res["comparisons"][0]
    assert (c["a"], c["b"], c["paired_seeds"]) == ("cotkd", "nat", True)
    assert set(c["metrics"]) == {"greedy", "maj@N", "pass@1", "pass@N"}
    g = c["overall"]["greedy"]
    wins = [sum(i % 6 == 0 and not ok for i, ok in enumerate(pattern(n, 0.4, offset=s))) for s in range(2)]
    assert g["diff"] == pytest.approx(sum(wins) / 2 / n, abs=1e-6)
    assert g["ci"][0] > 0 and g["ci"][1] > g["diff"] > g["ci"][0]
    assert g["p"] < 0.001 and g["p_holm"] == g["p"]  # one comparison: Holm changes nothing
    sa = res["sets"]["cotkd"]["overall"]["greedy"]
    assert sa["per_seed"] == pytest.approx([sum(pattern(n, 0.4, s)) / n for s in range(2)], abs=1e-6)
    assert sa["std"] is not None
    # per subject and level, with record counts
    assert set(c["by_subject"]) == set(SUBJECTS) and c["by_subject"]["algebra"]["records"] == n // 2
    assert set(c["by_level"]) == {"1", "2", "3"}
    assert res["sets"]["nat"]["by_level"]["1"]["greedy"]["mean"] is not None
    # overlap: every problem A solves, B solves too
    o = c["overlap"]["greedy"]
    assert o["only_a"] == 0 and o["only_b"] == pytest.approx(sum(wins) / 2) and o["seed_pairs"] == 2
    assert "pass@1" in c["overlap"]  # both candidates agree: still 0/1 per problem
    assert "nat vs cotkd" in r.output and "p Holm" in r.output and "solved sets" in r.output


def test_identical_sets_give_p_one_and_a_ci_at_zero(runner, tmp_path):
    f = run_file(tmp_path / "x" / "predictions.jsonl", pattern(120, 0.55))
    g = run_file(tmp_path / "y.jsonl", pattern(120, 0.55))
    r, res = compare(runner, f.parent, g, "-o", tmp_path / "cmp", "--n-boot", 500)
    assert r.exit_code == 0, r.output
    c = res["comparisons"][0]
    assert (c["a"], c["b"], c["paired_seeds"]) == ("x", "y", True)
    for m, v in c["overall"].items():
        assert v["p"] == 1.0 and v["p_holm"] == 1.0 and v["diff"] == 0.0
        assert v["ci"][0] <= 0.0 <= v["ci"][1]
    o = c["overlap"]["greedy"]
    assert o["kappa"] == pytest.approx(1.0) and o["only_a"] == 0 and o["only_b"] == 0
    p = sum(pattern(120, 0.55)) / 120
    assert o["observed_over_expected"] == pytest.approx(1 / p, rel=1e-5)
    assert res["sets"]["x"]["overall"]["greedy"]["std"] is None  # one seed: no std


def test_holm_across_all_pairs_and_determinism(runner, tmp_path):
    n = 150
    sets = []
    for name, rate in (("a", 0.3), ("b", 0.45), ("c", 0.33)):
        run_file(tmp_path / name / "predictions.jsonl", pattern(n, rate))
        sets.append(tmp_path / name)
    out = tmp_path / "cmp"
    r, res = compare(runner, *sets, "-o", out, "--pairs", "all", "--n-boot", 300, "--n-perm", 500, "--seed", 7)
    assert r.exit_code == 0, r.output
    comps = res["comparisons"]
    assert [(c["a"], c["b"]) for c in comps] == [("a", "b"), ("a", "c"), ("b", "c")]
    for m in ("greedy", "maj@N"):
        raw = [c["overall"][m]["p"] for c in comps]
        assert [c["overall"][m]["p_holm"] for c in comps] == pytest.approx(holm(raw), abs=1e-6)
        assert all(c["overall"][m]["p_holm"] >= c["overall"][m]["p"] for c in comps)
    first = (out / "compare.json").read_text()
    r = runner.invoke(app, ["compare", *map(str, sets), "-o", str(out), "--pairs", "all", "--n-boot", "300",
                            "--n-perm", "500", "--seed", "7", "--overwrite"])
    assert r.exit_code == 0 and (out / "compare.json").read_text() == first  # seeded: identical output
    r = runner.invoke(app, ["compare", *map(str, sets), "-o", str(out), "--pairs", "all", "--n-boot", "300",
                            "--n-perm", "500", "--seed", "7"])
    assert r.exit_code == 0 and "up to date" in r.output


def test_compare_agrees_with_eval(runner, tmp_path):
    """One implementation of accuracy: compare's per-set means are eval's numbers."""
    recs = [{"id": "r1", "question": "q", "answer": "\\frac12", "level": 1,
             "candidates": [{"pred": "0.5"}, {"pred": "1"}, {"pred": "1"}, {"pred": "\\frac{1}{2}"}]},
            {"id": "r2", "question": "q", "answer": "7", "level": 2,
             "candidates": [{"pred": "5"}, {"pred": "7"}, {"pred": "5"}, {"pred": "7"}]}]
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in recs))
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({**r, "candidates": r["candidates"][::-1]}) + "\n" for r in recs))
    r, res = compare(runner, a, b, "-o", tmp_path / "cmp", "--k", 2, "--n-boot", 200)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(a), str(b), "-o", str(tmp_path / "ev"), "--k", "2"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())["files"]
    for name in ("a", "b"):
        for m, v in res["sets"][name]["overall"].items():
            assert v["mean"] == pytest.approx(ev[name]["overall"][m]), (name, m)
    assert "pass@2" in res["comparisons"][0]["metrics"]
    assert "pass@1" not in res["comparisons"][0]["overlap"]  # fractional per problem: no solved set


def test_different_problems_are_refused(runner, tmp_path):
    a = run_file(tmp_path / "a.jsonl", pattern(10, 0.5))
    b = run_file(tmp_path / "b.jsonl", pattern(12, 0.5))
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["compare", str(a), str(b), "-o", str(out)])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "other problems" in lines[0] and "'p010', 'p011'" in lines[0], r.output
    assert not out.exists()
    # same ids, other gold answer
    c = tmp_path / "c.jsonl"
    c.write_text(a.read_text().replace('"answer": "1"', '"answer": "3"', 1))
    r = runner.invoke(app, ["compare", str(a), str(c), "-o", str(out)])
    assert r.exit_code == 1 and "'p000' has gold answer '3'" in r.output and not out.exists()


def test_bad_arguments(runner, tmp_path):
    a = run_file(tmp_path / "a.jsonl", pattern(10, 0.5))
    r = runner.invoke(app, ["compare", str(a), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2  # one set: nothing to compare
    r = runner.invoke(app, ["compare", f"x={a}", f"x={a}", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "named 'x'" in r.output
    r = runner.invoke(app, ["compare", str(a), str(tmp_path / "nope*"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "matches nothing" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["compare", str(a), str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no run subdirectories" in r.output
    r = runner.invoke(app, ["compare", str(a), str(a), "-o", str(tmp_path / "o"), "--pairs", "some"])
    assert r.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_metrics_one_set_lacks_are_not_compared(runner, tmp_path):
    a = run_file(tmp_path / "a.jsonl", pattern(20, 0.5))
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({**json.loads(line), "decoding": "sampled"}) + "\n"
                         for line in a.read_text().splitlines()))
    r, res = compare(runner, a, b, "-o", tmp_path / "cmp", "--n-boot", 200)
    assert r.exit_code == 0, r.output
    c = res["comparisons"][0]
    assert c["not_compared"] == ["first", "greedy"] and "greedy" not in c["overall"] and "maj@N" in c["overall"]
    assert "not compared" in r.output
