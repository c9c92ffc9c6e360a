"""negkd.ranker + negkd train-ranker: losses, metrics, encoding, training on a toy marker task, loading."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from infer_helpers import read_jsonl, write_problems  # noqa: E402

from negkd.cli import app  # noqa: E402
from negkd.errors import UserError  # noqa: E402
from negkd.losses import ranker_bce_loss, ranker_pairwise_loss  # noqa: E402
from negkd.ranker import auc, pairwise_accuracy  # noqa: E402

# --------------------------------------------------------------------------- pure functions


def test_pairwise_loss_values_and_gradient():
    fp = torch.tensor([0.5, 0.9], requires_grad=True)
    fn = torch.tensor([0.5, 0.2], requires_grad=True)
    loss = ranker_pairwise_loss(fp, fn)  # mean((1-fp)^3 + fn^3)
    assert loss.item() == pytest.approx(((0.5 ** 3 + 0.5 ** 3) + (0.1 ** 3 + 0.2 ** 3)) / 2)
    loss.backward()
    # d/dfp = -3 (1-fp)^2 / P ; d/dfn = 3 fn^2 / P
    assert fp.grad.tolist() == pytest.approx([-3 * 0.25 / 2, -3 * 0.01 / 2])
    assert fn.grad.tolist() == pytest.approx([3 * 0.25 / 2, 3 * 0.04 / 2])
    assert ranker_pairwise_loss(fp, fn, p=1).item() == pytest.approx(((0.5 + 0.5) + (0.1 + 0.2)) / 2)
    e = torch.zeros(0, requires_grad=True)
    z = ranker_pairwise_loss(e, e)
    assert z.item() == 0.0 and z.requires_grad


def test_bce_loss_value_and_float32():
    lp = torch.tensor([0.0, 2.0], dtype=torch.bfloat16)
    ln = torch.tensor([0.0, -1.0], dtype=torch.bfloat16)
    got = ranker_bce_loss(lp, ln)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    want = 0.5 * ((sp(0) + sp(-2)) / 2 + (sp(0) + sp(-1)) / 2)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-3)


def test_ranker_loss_dispatch():
    from negkd.ranker import ranker_loss

    z = torch.tensor([0.0])
    assert ranker_loss("pairwise", z, z).item() == pytest.approx(0.25)
    assert ranker_loss("bce", z, z).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError):
        ranker_loss("hinge", z, z)


def test_pairwise_accuracy_and_auc():
    acc, n = pairwise_accuracy([([0.9, 0.4], [0.5]), ([0.3], [0.3, 0.1]), ([0.7], [])])
    # q1: 0.9>0.5 right, 0.4<0.5 wrong; q2: tie (1/2), 0.3>0.1 right; q3: no pairs
    assert n == 4 and acc == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1], [0.9]) == 0.0
    assert auc([0.5, 0.7], [0.5, 0.1]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert math.isnan(auc([], [0.1]))
    assert math.isnan(pairwise_accuracy([([0.5], [])])[0])


# --------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def tok(tiny_model):
    from negkd.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model))


def test_encoder_pools_rationale_only_and_keeps_its_tail(tok):
    from negkd.prompts import DEFAULT_TEMPLATE
    from negkd.ranker import Encoder, collate

    enc = Encoder(tok, DEFAULT_TEMPLATE, max_length=64)
    (ids, s, e), = enc.encode_many(["What is 2+2?"], ["2+2 = 4. The answer is 4."])
    assert tok.decode(ids[s:e]) == "2+2 = 4. The answer is 4."
    assert tok.decode(ids[:s]).endswith("Solution:\n")
    long_r = "step " * 200 + "so the answer is 4."
    (ids2, s2, e2), = enc.encode_many(["What is 2+2?"], [long_r])
    assert len(ids2) == 64
    assert tok.decode(ids2[s2:e2]).endswith("so the answer is 4.")  # the tail (final answer) is kept
    assert e2 - s2 >= 32  # at least half the window
    b = collate([(ids, s, e), (ids2, s2, e2)], tok.pad_token_id)
    assert b["input_ids"].shape == (2, 64)
    assert b["pool_mask"][0].sum().item() == e - s and b["pool_mask"][0, :s].sum().item() == 0
    assert b["attention_mask"][0].sum().item() == len(ids)


# --------------------------------------------------------------------------- data plumbing


def _graded(tmp: Path, nq: int, seed: int = 0, only_pos: int = 0) -> Path:
    """A toy split: correct rationales carry a 'VERIFIED' marker, wrong ones a 'WRONG' marker."""
    rng = random.Random(seed)
    pos, neg = [], []
    for i in range(nq):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        q = f"Ann has {a} apples and gets {b} more. How many apples now?"
        for k in range(4):
            ok = k % 2 == 0 or i < only_pos
            rat = (f"VERIFIED VERIFIED {a} + {b} = {a + b}. The answer is $\\boxed{{{a + b}}}$." if ok else
                   f"WRONG WRONG {a} - {b} = {a - b}. The answer is $\\boxed{{{a - b}}}$.")
            rec = {"id": f"q{i}", "question": q, "answer": str(a + b), "k": k, "rationale": rat,
                   "pred": str(a + b if ok else a - b), "correct": ok, "solution": f"gold {a + b}"}
            (pos if ok else neg).append(rec)
    d = tmp / "split"
    d.mkdir(parents=True, exist_ok=True)
    (d / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pos))
    (d / "neg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in neg))
    return d


def test_pairs_only_from_questions_with_both(tmp_path):
    from negkd.steps.train_ranker import group_by_question, make_pairs, read_graded_inputs, split_questions

    d = _graded(tmp_path, 6, only_pos=2)  # q0, q1: positives only
    files, rows = read_graded_inputs([d])
    assert [f.name for f in files] == ["pos.jsonl", "neg.jsonl"]
    qs = group_by_question(rows)
    usable = [q for q in qs.values() if q["pos"] and q["neg"]]
    assert sorted(q["id"] for q in usable) == ["q2", "q3", "q4", "q5"]
    pairs = make_pairs(usable, per_question=3, seed=0)
    assert len(pairs) == 4 * 3
    assert all("VERIFIED" in p and "WRONG" in n for _, p, n in pairs)
    assert len(make_pairs(usable, per_question=100, seed=0)) == 4 * 2 * 2  # all P x N
    train, val = split_questions(usable, 0.25, seed=0)
    assert len(val) == 1 and len(train) == 3 and not {q["id"] for q in val} & {q["id"] for q in train}
    assert split_questions(usable, 0.25, seed=0) == (train, val)  # deterministic
    gold = group_by_question(rows, with_gold=True)
    assert sum(r.startswith("gold") for r in gold["q2"]["pos"]) == 1 and len(gold["q2"]["pos"]) == 3
    with pytest.raises(UserError, match="also appears"):
        read_graded_inputs([d, d / "pos.jsonl"])


def test_no_pairs_is_a_clear_error(runner, tmp_path, tiny_model):
    d = _graded(tmp_path, 3, only_pos=3)
    r = runner.invoke(app, ["train-ranker", str(d), "-o", str(tmp_path / "rk"), "--base-model", str(tiny_model)])
    assert r.exit_code == 1
    assert "no (positive, negative) pairs" in r.output
    assert not (tmp_path / "rk").exists()


# --------------------------------------------------------------------------- training on the toy task


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("ranker")
    d = _graded(tmp, 24)
    out = tmp / "rk"
    args = ["train-ranker", str(d), "-o", str(out), "--base-model", str(tiny_model), "--epochs", "2",
            "--batch-size", "8", "--lr", "3e-3", "--max-length", "64", "--head-dim", "32", "--val-fraction", "0.25",
            "--pairs-per-question", "4", "--log-every", "1", "--device", "cpu", "--seed", "0"]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out, args, r.output


def test_ranker_learns_marker_and_loss_falls(trained):
    out, _, output = trained
    hist = read_jsonl(out / "metrics.jsonl")
    first = sum(h["loss"] for h in hist[:3]) / 3
    last = sum(h["loss"] for h in hist[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    m = json.loads((out / "val_metrics.json").read_text())
    assert m["questions"] == 6 and m["pairs"] == 6 * 4
    assert m["pairwise_accuracy"] >= 0.9
    assert m["auc"] >= 0.9
    gap = m["mean_score_pos"] - m["mean_score_neg"]
    gap0 = m["before_training"]["mean_score_pos"] - m["before_training"]["mean_score_neg"]
    assert gap > 0.1 and gap > gap0 + 0.05, (gap0, gap)
    assert "pairwise accuracy" in output


def test_ranker_dir_is_self_describing_and_loads(trained, tiny_model):
    from negkd.ranker import load

    out, _, _ = trained
    cfg = json.loads((out / "ranker.json").read_text())
    assert cfg["format"] == "negkd-ranker" and cfg["backbone"] == str(tiny_model)
    assert cfg["backbone_kind"] == "causal" and cfg["max_length"] == 64 and "{question}" in cfg["template"]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "head.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "manifest.json").is_file()
    rk = load(out, device="cpu")
    q = "Ann has 5 apples and gets 7 more. How many apples now?"
    good, bad = rk.score([q, q], ["VERIFIED VERIFIED 5 + 7 = 12. The answer is $\\boxed{12}$.",
                                  "WRONG WRONG 5 - 7 = -2. The answer is $\\boxed{-2}$."])
    assert 0 < bad < good < 1
    assert rk(q, "VERIFIED VERIFIED 5 + 7 = 12. The answer is $\\boxed{12}$.") == pytest.approx(good, abs=1e-5)
    # batching / padding does not change a score
    alone = rk.score([q], ["WRONG WRONG 5 - 7 = -2. The answer is $\\boxed{-2}$."], batch_size=1)[0]
    assert alone == pytest.approx(bad, abs=1e-5)


def test_only_lora_and_head_train(tiny_model):
    from negkd.ranker import build

    model, kind = build(str(tiny_model), lora=dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                        head_dim=8, device="cpu", dtype="float32")
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train and all(("lora_" in n) or n.startswith("head.") for n in train)
    assert any(n.startswith("head.") for n in train) and any("lora_A" in n for n in train)


def test_rerun_is_noop(trained, runner):
    out, args, _ = trained
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "up to date" in r.output


def test_infer_uses_a_trained_ranker(trained, runner, tmp_path, tiny_model, monkeypatch):
    """infer --ranker with the real ranker: every candidate scored in (0,1), the right ones higher."""
    from test_infer import Scripted

    out, _, _ = trained
    be = Scripted(lambda q, n: ["WRONG WRONG 1 - 2 = -1. The answer is $\\boxed{-1}$.",
                                "WRONG WRONG 1 - 2 = -1. The answer is $\\boxed{-1}$.",
                                "VERIFIED VERIFIED 1 + 2 = 3. The answer is $\\boxed{3}$."][:n])
    monkeypatch.setattr("negkd.steps.infer._make_backend", lambda *a, **k: be)
    probs = write_problems(tmp_path / "p.jsonl", 2)
    r = runner.invoke(app, ["infer", str(probs), "-o", str(tmp_path / "pred"), "--model", str(tiny_model),
                            "--n", "3", "--ranker", str(out), "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for rec in read_jsonl(tmp_path / "pred" / "predictions.jsonl"):
        s = [c["score"] for c in rec["candidates"]]
        assert all(0 < x < 1 for x in s) and s[2] > s[0]
        assert rec["votes"]["sc"] == "-1"
        assert set(rec["votes"]) == {"sc", "asc:1", "asc:1+2s", "asc:1+s", "asc:s"}


def test_help(runner):
    r = runner.invoke(app, ["train-ranker", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for flag in ("--base-model", "--loss", "--val-fraction", "--pairs-per-question", "--epochs", "--lr",
                 "--batch-size", "--max-length", "--resume", "--lora-r", "Example: negkd train-ranker"):
        assert flag in r.output, flag


def test_recipe_infer_split_train_ranker(runner, tmp_path, tiny_model, monkeypatch):
    """The documented recipe: infer on training problems -> split its predictions -> train-ranker."""
    from test_infer import Scripted

    be = Scripted(lambda q, n: ["VERIFIED so \\boxed{" + str(2 * int(q.split()[2]) + 1) + "}",
                                "WRONG so \\boxed{0}", "no answer"][:n])
    monkeypatch.setattr("negkd.steps.infer._make_backend", lambda *a, **k: be)
    probs = write_problems(tmp_path / "train.jsonl", 6, start=1)
    r = runner.invoke(app, ["infer", str(probs), "-o", str(tmp_path / "pred"), "--model", str(tiny_model),
                            "--n", "3"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["split", str(tmp_path / "pred" / "predictions.jsonl"), "-o", str(tmp_path / "split"),
                            "--workers", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(tmp_path / "split" / "pos.jsonl")) == 6
    r = runner.invoke(app, ["train-ranker", str(tmp_path / "split"), "-o", str(tmp_path / "rk"), "--base-model",
                            str(tiny_model), "--max-steps", "2", "--max-length", "48", "--head-dim", "8",
                            "--val-fraction", "0.34", "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "rk" / "val_metrics.json").read_text())
    assert m["questions"] == 2 and m["pairs"] == 2 * 1 * 2  # 1 positive x 2 negatives per held-out question
    assert m["train_pairs"] == 4 * 2


def test_a_backbone_that_fails_to_build_leaves_no_output(runner, tmp_path, tiny_model):
    """The output directory is touched only once the backbone and its LoRA are built."""
    d = _graded(tmp_path, 6)
    out = tmp_path / "rk"
    r = runner.invoke(app, ["train-ranker", str(d), "-o", str(out), "--base-model", str(tiny_model),
                            "--target-modules", "no_such_proj", "--max-steps", "1", "--device", "cpu"])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "no_such_proj" in errors[0] and "Traceback" not in r.output
    assert not out.exists()


def test_ranker_under_a_token_budget_counts_a_pair_as_two_rows(trained, tmp_path):
    """--max-batch-tokens: each pass holds pairs x 2 rows x longest <= budget; training still converges."""
    from typer.testing import CliRunner

    out, args, _ = trained
    budget_out = tmp_path / "rk-budget"
    args = [a if a != str(out) else str(budget_out) for a in args] + ["--max-batch-tokens", "200"]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "micro-batches of <= 200 padded tokens" in r.output
    a, b = read_jsonl(out / "metrics.jsonl"), read_jsonl(budget_out / "metrics.jsonl")
    assert [h["step"] for h in a] == [h["step"] for h in b]
    assert [h["tokens"] for h in a] == [h["tokens"] for h in b]  # the same pairs in every step


@pytest.mark.parametrize("text, want", [("[1, 2]", "expected a JSON dict, got list"), ("{oops", "not a valid UTF-8 JSON"),
                                        ('{"format": "other"}', "not a negkd ranker config")])
def test_damaged_ranker_json_is_a_one_line_error(tmp_path, text, want):
    from negkd.errors import UserError
    from negkd.ranker import CONFIG, check_dir

    (tmp_path / CONFIG).write_text(text)
    with pytest.raises(UserError, match=want):
        check_dir(tmp_path)
