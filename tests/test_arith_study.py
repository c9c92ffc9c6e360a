"""Fast tests of the worlds study in examples/arith: the two worlds' generator, the teacher's error
process, the study statistics (hierarchical bootstrap, DiD, Holm, kappa). No torch."""

from __future__ import annotations

import json
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ARITH = Path(__file__).resolve().parents[1] / "examples" / "arith"
sys.path.insert(0, str(ARITH))

import arithgen  # noqa: E402
import studystats as ss  # noqa: E402
import worlds  # noqa: E402

SMALL = dict(train=40, rare_train=30, test=6, val=2, ood=4)


@pytest.fixture(scope="module")
def splits():
    return worlds.make_world_splits(3, SMALL)


def test_rare_skill_sits_only_where_the_world_says(splits):
    for w in worlds.WORLDS:
        train = splits[f"train-{w}"]
        assert Counter(p["level"] for p in train) == {lv: SMALL["train"] for lv in arithgen.LEVELS}
        rare = Counter(p["level"] for p in train if p["subject"] == "rare")
        assert sum(rare.values()) == SMALL["rare_train"]  # the same number of rare-skill problems in both worlds
        assert dict(rare) == {lv: n for lv, n in worlds.world_counts(w, SMALL["rare_train"]).items() if n}
        for p in train:  # the subject tag tells the truth, and a rare problem applies the rule exactly once
            n_rare = sum(op[0] == worlds.RARE for op in p["ops"])
            assert n_rare == (p["subject"] == "rare")
            assert worlds.question_has_rare(p["question"]) == (p["subject"] == "rare")
    assert set(worlds.world_counts("exclusive", 30)) == set(arithgen.LEVELS)
    assert all(n == 0 for lv, n in worlds.world_counts("exclusive", 30).items() if lv < 4)
    assert all(n == 6 for n in worlds.world_counts("control", 30).values())


def test_shared_splits_are_identical_tagged_and_disjoint_from_training(splits):
    again = worlds.make_world_splits(3, SMALL)
    assert again == splits  # fixed by the world seed
    other = worlds.make_world_splits(4, SMALL)
    assert [p["question"] for p in other["test"]] != [p["question"] for p in splits["test"]]
    shared = {p["question"] for s in ("test", "val", "ood") for p in splits[s]}
    for w in worlds.WORLDS:
        assert not shared & {p["question"] for p in splits[f"train-{w}"]}
    for s in ("test", "val"):
        c = Counter((p["level"], p["subject"]) for p in splits[s])
        assert c == {(lv, subj): SMALL[s] for lv in arithgen.LEVELS for subj in ("rare", "common")}
    assert {p["level"] for p in splits["ood"]} == {worlds.OOD_STEPS}
    ids = [p["id"] for s in ("test", "val", "ood", "train-exclusive") for p in splits[s]]
    assert len(ids) == len(set(ids))
    for p in splits["test"] + splits["train-control"]:
        assert int(p["answer"]) == arithgen.evaluate(p["ops"])[-1] > 0
        assert p["solution"].endswith(f"\\boxed{{{p['answer']}}}$.")
        assert arithgen.parse_question(p["question"])[0] == p["ops"]  # the teacher server can read it back


def test_gold_rare_step_applies_the_rule():
    rng = random.Random(0)
    p = worlds.make_problem(rng, 3, "x", rare=True)
    lines = [line for sk, line in worlds.gold_steps(p["ops"], "Ann") if sk == worlds.RARE]
    (line,) = lines
    m = re.search(r"3 \* (\d+) - 2 = (\d+)", line)
    assert int(m.group(2)) == 3 * int(m.group(1)) - 2


def test_pretraining_never_shows_the_rare_skill():
    rng = random.Random(1)
    docs = [arithgen.pretrain_text(rng) for _ in range(400)]
    assert not any("market" in d or "trades" in d for d in docs)
    import pretrain

    corpus = pretrain.tokenizer_corpus({"train": worlds.make_world_splits(3, SMALL)["train-control"]}, n_docs=50)
    assert not any("market" in d for d in corpus)


def test_study_base_sees_the_rare_words_but_never_the_rule():
    """pretrain.py --market-words: some documents carry "trades ... at the market", none a number
    near it, so the rule (3 * x - 2) is still learnable only from distillation data."""
    import pretrain

    rng = random.Random(2)
    docs = [pretrain.document(rng, market_words=0.05) for _ in range(2000)]
    market = [d for d in docs if "market" in d]
    assert 50 <= len(market) <= 160  # ~5% of 2,000
    assert all("trades" in d or " trade " in d for d in market)
    assert not any(re.search(r"\d", d) for d in market)  # no amount, so no rule
    assert all("at the market" in d for d in market)
    splits = {"train": worlds.make_world_splits(3, SMALL)["train-control"]}
    corpus = pretrain.tokenizer_corpus(splits, n_docs=400, market_words=0.05)
    assert any("market" in d for d in corpus) and not any(re.search(r"market.*\d|\d.*market", d) for d in corpus)
    assert not any("market" in pretrain.document(random.Random(i)) for i in range(300))  # v1: off by default


def test_per_step_error_rate_depends_on_length_not_on_skill():
    """Many seeded teacher samples at levels 2 and 5: the per-step error rate of the rare skill equals the
    common skills' (two-proportion z-test, |z| < 3.5) and the level's nominal rate; it grows with length."""
    rng = random.Random(11)
    rates = {}
    for level in (2, 5):
        ev = Counter()
        n = Counter()
        kinds = Counter()
        for i in range(400):
            p = worlds.make_problem(rng, level, f"p{i}", rare=i % 2 == 0)
            ops, name, thing = arithgen.parse_question(p["question"])
            for k in range(3):
                _, steps = worlds.teacher(ops, name, thing, seed=1, index=k)
                assert len(steps) == len(ops)
                for st in steps[1:]:  # the start amount has fewer possible errors; compare skill steps
                    key = "rare" if st["skill"] == worlds.RARE else "common"
                    n[key] += 1
                    ev[key] += st["error"] is not None
                    kinds[st["error"]] += 1
        pr, pc = ev["rare"] / n["rare"], ev["common"] / n["common"]
        pool = (ev["rare"] + ev["common"]) / (n["rare"] + n["common"])
        z = (pr - pc) / math.sqrt(pool * (1 - pool) * (1 / n["rare"] + 1 / n["common"]))
        assert abs(z) < 3.5, (level, pr, pc, z)
        expect = worlds.step_error(level)
        assert abs(pool - expect) < 4 * math.sqrt(expect * (1 - expect) / (n["rare"] + n["common"])), (pool, expect)
        rates[level] = pool
        errs = {k: v for k, v in kinds.items() if k}
        assert errs["slip"] < min(errs[k] for k in ("operand", "skip", "misread", "wrong_op"))  # slips are rare
    assert rates[5] > rates[2] + 0.1


def test_teacher_step_records_match_the_text():
    rng = random.Random(5)
    seen = Counter()
    for i in range(300):
        p = worlds.make_problem(rng, 4, f"p{i}", rare=True)
        ops, name, thing = arithgen.parse_question(p["question"])
        text, steps = worlds.teacher(ops, name, thing, seed=2, index=0)
        assert (text, steps) == worlds.teacher(ops, name, thing, seed=2, index=0)
        ok = text.rsplit("boxed{", 1)[1].split("}")[0] == p["answer"]
        if all(st["error"] is None for st in steps):
            assert ok and text.count("\n") >= len(ops)
        rare = [st for st in steps if st["skill"] == worlds.RARE]
        assert len(rare) == 1
        line = [ln for ln in text.split("\n") if "market" in ln]
        if rare[0]["error"] == "skip":
            assert not line
            continue
        m = re.search(r"(\d) \* (-?\d+) - (\d+) = (-?\d+)|(-?\d+) \* 2 = (-?\d+)", line[0])
        if m.group(1):
            right = m.group(1) == "3" and m.group(3) == "2" and int(m.group(4)) == 3 * int(m.group(2)) - 2
        else:
            right = False
        assert right == rare[0]["demo_ok"], (line, rare)
        seen[rare[0]["error"]] += 1
    assert set(seen) >= {None, "operand", "misread", "wrong_op"}


def test_premise_exclusive_world_hides_rare_demonstrations_in_negatives():
    t = worlds.premise(0, seeds=(0,), n=2, sizes=dict(train=60, rare_train=50, test=2, val=1, ood=1))
    assert t["exclusive"]["share_in_pos"] < 0.45 < t["control"]["share_in_pos"]
    for w in worlds.WORLDS:
        assert t[w]["rare_demos_in_pos"] + t[w]["rare_demos_in_neg"] > 50


# ----------------------------------------------------------------------------- statistics


def test_holm_known_values():
    assert ss.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert ss.holm([0.5]) == [0.5]
    assert ss.holm([0.02, 0.9]) == pytest.approx([0.04, 0.9])
    assert ss.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped, monotone


def test_hier_bootstrap_identical_sets_and_a_known_difference():
    rng = np.random.default_rng(0)
    a = (rng.random((5, 200)) < 0.5).astype(int)
    r = ss.hier_bootstrap(ss.diff, [a, a], reps=300)
    assert r["estimate"] == 0 and r["ci"] == [0, 0] and r["p"] == 1.0
    b = a.copy()
    b[:, :60] = 0  # B fails 60 problems A may solve: A - B = 100 * mean(a[:, :60]) * 60 / 200
    a[:, :60] = 1
    r = ss.hier_bootstrap(ss.diff, [a, b], reps=500, seed=1)
    assert r["estimate"] == pytest.approx(30.0)
    assert r["ci"][0] > 20 and r["ci"][1] < 40 and r["p"] < 0.01


def test_hier_bootstrap_ci_matches_the_analytic_se_and_widens_with_seed_spread():
    """One seed: the problem bootstrap SE of an accuracy is sqrt(p(1-p)/n). Seeds that disagree
    systematically (a seed-level effect) must widen the CI compared with resampling problems only."""
    rng = np.random.default_rng(2)
    a = (rng.random((1, 2000)) < 0.3).astype(int)
    zero = np.zeros_like(a)
    r = ss.hier_bootstrap(ss.diff, [a, zero], reps=1000)
    se = 100 * math.sqrt(0.3 * 0.7 / 2000)
    assert (r["ci"][1] - r["ci"][0]) / 3.92 == pytest.approx(se, rel=0.15)
    shift = np.array([0.0, 0.4, 0.1, 0.5, 0.2])[:, None]  # accuracy differs a lot between seeds
    m = (rng.random((5, 400)) < 0.2 + shift).astype(int)
    zero = np.zeros_like(m)
    full = ss.hier_bootstrap(ss.diff, [m, zero], reps=800, seed=3)
    probs = ss.hier_bootstrap(ss.diff, [m, zero], reps=800, seed=3, resample_seeds=False)
    assert full["ci"][1] - full["ci"][0] > 2 * (probs["ci"][1] - probs["ci"][0])


def test_did_finds_a_known_difference_and_none_when_worlds_agree():
    rng = np.random.default_rng(4)
    base = (rng.random((5, 300)) < 0.4).astype(int)
    up = lambda m, k: np.where(np.arange(m.shape[1]) < k, 1, m)  # noqa: E731  solve the first k problems
    # exclusive: A solves 90 extra problems; control: 30 extra -> DiD = 100 * (60 extra / 300) * P(unsolved)
    a1, a2 = up(base, 90), up(base, 30)
    expect = 100 * ((a1 - base).sum() - (a2 - base).sum()) / base.size
    r = ss.hier_bootstrap(ss.did, [a1, base, a2, base], reps=500)
    assert r["estimate"] == pytest.approx(expect) and expect > 10
    assert r["ci"][0] > 0 and r["p"] < 0.01
    same = ss.hier_bootstrap(ss.did, [a1, base, a1, base], reps=200)
    assert same["estimate"] == 0 and same["p"] == 1.0


def test_overlap_statistics_known_values():
    a = [1, 1, 0, 0] * 25
    assert ss.kappa(a, a) == pytest.approx(1.0)
    assert ss.kappa(a, [1 - x for x in a]) == pytest.approx(-1.0)
    b = [1, 0, 1, 0] * 25  # independent of a: kappa 0, shared = expected
    assert ss.kappa(a, b) == pytest.approx(0.0)
    assert ss.shared_ratio(a, b) == pytest.approx(1.0)
    assert ss.shared_ratio(a, a) == pytest.approx(2.0)
    assert ss.p_b_given_not_a(a, b) == pytest.approx(0.5)
    assert math.isnan(ss.p_b_given_not_a([1, 1], [0, 1]))


# ----------------------------------------------------------------------------- report (synthetic runs)


def _synthetic_study(effect: int):
    """60 test problems; every method solves the same random 40% per seed, NAT also solves the first
    ``effect`` rare problems in the exclusive world only."""
    rng = np.random.default_rng(7)
    problems = {f"t{subj}{lv}{i}": {"subject": subj, "level": lv}
                for subj in ("rare", "common") for lv in (1, 2, 3, 4, 5) for i in range(6)}
    ids = sorted(problems)
    rare = [i for i in ids if problems[i]["subject"] == "rare"]
    seeds = [0, 1, 2]
    base = [{i: bool(rng.random() < 0.4) for i in ids} for _ in seeds]
    acc = {}
    for w in ("exclusive", "control"):
        acc[w] = {m: [dict(b) for b in base] for m in ("cotkd", "cotkd_long", "mix", "neg", "natnull", "nce", "gold")}
        acc[w]["nat"] = [{i: (v or (w == "exclusive" and i in rare[:effect])) for i, v in b.items()} for b in base]
    return {"problems": problems, "acc": acc, "seeds": seeds, "params": {"cotkd": 1000, "nat": 1500},
            "premise": {"exclusive": {"pos": 30, "neg": 70}, "control": {"pos": 60, "neg": 40}},
            "nll": {"exclusive": {"cotkd": [2.0, 2.2], "neg": [1.0, 1.1]}},
            "curves": {w: {"cotkd": [(10, 20.0), (20, 30.0)], "nat": [(10, 25.0), (20, 35.0)]} for w in ("exclusive", "control")},
            "votes": {"exclusive": {"nce": [{"sc@N": 0.5, "asc@N[1+s]": 0.55}]}},
            "vote_correct": {"exclusive": {"nce": {"sc": [dict(b) for b in base],
                                                   "asc:1+s": [{i: True for i in ids} for _ in seeds]}}},
            "rankers": {"exclusive": [{"seed": 0, "questions": 6, "positives": 50, "negatives": 40, "train_questions": 55,
                                       "pairwise_accuracy": 0.61, "auc": 0.72, "mean_score_pos": 0.52,
                                       "mean_score_neg": 0.47, "before_training": {"pairwise_accuracy": 0.5, "auc": 0.49}}]},
            "vote_changes": {"exclusive": {"nce": [{"problems": 300, "changed": 60, "tied": 58, "sc_right": 3,
                                                    "asc_right": 5},
                                                   {"problems": 300, "changed": 10, "tied": 10, "sc_right": 1,
                                                    "asc_right": 0}]}}}


def test_report_builds_tables_verdicts_and_plots_from_synthetic_runs(tmp_path):
    import report_study

    data = _synthetic_study(effect=20)
    text = report_study.build(data, tmp_path, ["# synthetic\n"], {"nt": "no --nt here", "ul": "no --ul here"}, reps=300)
    rows = {r["test"]: r for r in report_study.family(data, reps=300)}
    h1 = rows["DiD NAT − CoT-KD, rare"]
    rare_ids = [i for i in data["problems"] if data["problems"][i]["subject"] == "rare"]
    gain = sum(not b[i] for b in [dict(x) for x in data["acc"]["control"]["cotkd"]] for i in sorted(rare_ids)[:20])
    assert h1["estimate"] == pytest.approx(100 * gain / (3 * len(rare_ids)))
    assert h1["verdict"] == "holds" and h1["p_holm"] >= h1["p"]
    assert h1["parts"] == (pytest.approx(h1["estimate"]), 0.0)  # all of it in the exclusive world
    assert f"| {h1['estimate']:+.1f} | {h1['estimate']:+.1f} − (+0.0) |" in text
    assert f"- DiD NAT − CoT-KD, rare: exclusive {h1['estimate']:+.1f}, control +0.0; 0% from the control world." in text
    assert "- DiD MIX − CoT-KD, rare: exclusive +0.0, control +0.0; both differences are 0." in text
    assert rows["DiD MIX − CoT-KD, rare"]["estimate"] == 0 and rows["DiD MIX − CoT-KD, rare"]["verdict"].startswith("fails")
    assert rows["DiD NT − CoT-KD, rare"]["not_run"]
    assert rows["NAT − CoT-KD, common, control"]["estimate"] == 0
    assert "| H1 | DiD NAT − CoT-KD, rare | >0 |" in text and "holds" in text
    assert "| NT | - | not run: no --nt here |" in text
    assert "| exclusive | 30 | 70 | 30.0% | 2.100 | 1.050 |" in text
    assert "`asc@N[1+s]`" in text and "`sc@N`" in text and "(`sc@N` is `sc@8`)" in text
    assert "| exclusive | 0 | 55 | 6 | 50 / 40 | 0.50 → 0.61 | 0.49 → 0.72 | 0.520 / 0.470 |" in text
    assert "| exclusive | NAT+NCE | 600 | 70 | 68 | 4 | 5 |" in text
    asc = next(r for r in report_study.secondary(data, reps=200) if r["test"].startswith("NAT+NCE: asc:1+s"))
    solved = sum(sum(b.values()) for b in data["vote_correct"]["exclusive"]["nce"]["sc"])
    assert asc["estimate"] == pytest.approx(100 * (1 - solved / (3 * 60)))
    for png in ("did.png", "curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    none = report_study.family(_synthetic_study(effect=0), reps=200)
    assert next(r for r in none if r["id"] == "H1")["verdict"] == "fails (not significant)"


def test_vote_changes_counts_disagreements_ties_and_who_was_right():
    import study_runs

    def row(i, sc, asc, preds):
        return {"id": i, "votes": {"sc": sc, "asc:1+s": asc}, "candidates": [{"pred": p} for p in preds]}

    records = [row("a", "1", "1", ["1", "1", "2"]),          # same answer: not counted
               row("b", "1", "2", ["1", "2", None, None]),   # a 1-1 tie (unparsed candidates ignored), ASC right
               row("c", "3", "4", ["3", "3", "4"]),          # a margin the ranker overturned, SC right
               row("d", "5", "6", ["5", "5", "6", "7"])]      # differs; top two counts 2 vs 1: not a tie
    sc_right = {"a": True, "b": False, "c": True, "d": False}
    asc_right = {"a": True, "b": True, "c": False, "d": False}
    got = study_runs.vote_changes(records, sc_right, asc_right, "asc:1+s")
    assert got == {"problems": 4, "changed": 3, "tied": 1, "sc_right": 1, "asc_right": 1}


def test_since_started_reads_the_tag_stamp(tmp_path):
    import math
    import time

    import study_runs

    assert math.isnan(study_runs.since_started(tmp_path))
    (tmp_path / ".started").write_text(str(time.time() - 600))
    assert 599 <= study_runs.since_started(tmp_path) < 700


def test_rare_demo_counter():
    import study_runs

    text = "Ann trades at the market: 3 * 14 - 2 = 40.\nBob trades at the market: 3 * 5 - 2 = 12.\n" \
           "Cid trades at the market: 2 * 5 - 2 = 8.\nDee trades at the market: 3 * -1 - 2 = -5."
    assert study_runs.count_rare_demos(text) == 2


def test_teacher_server_serves_the_study_teacher_for_rare_questions():
    import json as _json
    import urllib.request

    import teacher_server

    p = worlds.make_problem(random.Random(2), 4, "x", rare=True)
    ops, name, thing = arithgen.parse_question(p["question"])
    with pytest.raises(ValueError):
        teacher_server.serve(0, "nope")
    srv = teacher_server.serve(0, "study")
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1/completions"
        req = urllib.request.Request(url, _json.dumps({"prompt": f"Problem:\n{p['question']}\nSolution:\n", "seed": 4,
                                                       "n": 3}).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            texts = [c["text"] for c in _json.loads(r.read())["choices"]]
        assert texts == [worlds.teacher(ops, name, thing, seed=4, index=i)[0] for i in range(3)]
    finally:
        srv.shutdown()


def test_teacher_url_serves_either_teacher_and_stops_after_the_block(tmp_path):
    """The drivers' shared server helper (run.teacher_url): the named teacher answers inside the
    block, and nothing listens once the block is left."""
    import urllib.error
    import urllib.request

    import run

    for teacher in ("v1", "study"):
        with run.teacher_url(tmp_path, teacher=teacher) as url:
            with urllib.request.urlopen(f"{url}/models", timeout=10) as r:
                assert r.status == 200
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{url}/models", timeout=2)


def test_busy_time_is_the_union_of_step_intervals_and_counts_sittings(tmp_path):
    import study_runs

    def step(name, start, secs):
        d = tmp_path / name
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"started_at": f"2026-12-04T{start}+00:00", "wall_time_s": secs}))

    step("a", "10:00:00", 600)  # 10:00-10:10
    step("b", "10:05:00", 600)  # 10:05-10:15, overlaps a: together 15 min
    step("b/pred", "10:15:00", 60)  # touches b's end: 16 min
    step("c", "12:00:00", 120)  # after a 1h45 gap: a second sitting, 2 min
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text("{}")  # not a step's manifest: ignored
    busy, sittings = study_runs.busy_time(tmp_path)
    assert busy == pytest.approx(18 * 60) and sittings == 2
    assert study_runs.busy_time(tmp_path, gap_s=3 * 3600) == (pytest.approx(18 * 60), 1)
    assert study_runs.busy_time(tmp_path / "nothing") == (0.0, 0)
