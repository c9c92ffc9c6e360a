"""The worlds study's controls and model-side helpers on the tiny model, through the real CLI:
NAT-null's neg branch is exactly zero (and otherwise NAT's architecture), CoT-KD-long's step count,
parameter counting from saved tensors, checkpoint copies for learning curves, the premise NLL."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from negkd.cli import app

ARITH = Path(__file__).resolve().parents[1] / "examples" / "arith"
sys.path.insert(0, str(ARITH))

import study  # noqa: E402
import worlds  # noqa: E402

FAST = ["--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2", "--warmup", "0", "--log-every", "1",
        "--device", "cpu", "--template", "default"]


def _ok(args):
    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")


def _rows(n: int, correct: bool) -> list[dict]:
    rng = random.Random(int(correct))
    out = []
    for i in range(n):
        p = worlds.make_problem(rng, 2, f"p{i}", rare=i % 2 == 0)
        text = p["solution"] if correct else p["solution"].replace("= ", "= 1", 1)
        out.append({**p, "k": 0, "rationale": text, "pred": p["answer"], "correct": correct})
    return out


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    import negkd.training as training

    d = tmp_path_factory.mktemp("arith-controls")
    (d / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(8, True)))
    (d / "neg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(8, False)))
    # The watcher polls every 0.5 s; in the study a checkpoint lives S/4 optimizer steps (> 10 s), but the
    # tiny model saves every few ms, so here one poll is forced right after each save (the poll landing
    # between two saves), and the copy logic is what is tested.
    real_save = training._save_checkpoint
    with study.CurveWatcher(d / "neg", d / "neg-curve") as w, pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "_save_checkpoint", lambda *a, **k: (real_save(*a, **k), w._copy()))
        _ok(["train-neg", d / "neg.jsonl", "-o", d / "neg", "--base-model", tiny_model, "--max-steps", 4,
             "--save-every", 2, *FAST])
    zero = study.zero_neg(d / "neg", d / "neg-zero")
    for name, neg in (("nat", d / "neg"), ("natnull", zero)):
        _ok(["train-pos", d / "pos.jsonl", "-o", d / name, "--neg", neg, "--max-steps", 2, "--gate-dim", 8, *FAST])
    _ok(["train-pos", d / "pos.jsonl", "-o", d / "cotkd", "--no-neg", "--base-model", tiny_model, "--max-steps", 2,
         *FAST])
    return d


def test_nat_null_neg_branch_is_exactly_zero_and_nat_architecture(runs):
    orig = load_file(str(runs / "neg" / "adapter_model.safetensors"))
    zero = load_file(str(runs / "neg-zero" / "adapter_model.safetensors"))
    assert orig.keys() == zero.keys()
    bs = [k for k in orig if "lora_B" in k]
    assert bs and any(orig[k].abs().max() > 0 for k in bs)  # the trained Neg-LoRA is not zero ...
    for k in orig:
        if "lora_B" in k:
            assert torch.count_nonzero(zero[k]) == 0  # ... its copy's B is exactly zero
        else:
            assert torch.equal(orig[k], zero[k])
    nat = load_file(str(runs / "nat" / "nat_model.safetensors"))
    null = load_file(str(runs / "natnull" / "nat_model.safetensors"))
    assert {k: v.shape for k, v in nat.items()} == {k: v.shape for k, v in null.items()}  # same architecture
    neg_b = [k for k in null if "lora_B_neg" in k]
    assert neg_b and all(torch.count_nonzero(null[k]) == 0 for k in neg_b)
    assert any(torch.count_nonzero(nat[k]) > 0 for k in neg_b)
    assert study.trainable_params(runs / "nat") == study.trainable_params(runs / "natnull")
    # the zero copy is reused, not rewritten, while the Neg-LoRA is unchanged
    mtime = (runs / "neg-zero" / "adapter_model.safetensors").stat().st_mtime_ns
    study.zero_neg(runs / "neg", runs / "neg-zero")
    assert (runs / "neg-zero" / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_trainable_params_counted_from_saved_tensors(runs):
    cot = load_file(str(runs / "cotkd" / "adapter_model.safetensors"))
    assert study.trainable_params(runs / "cotkd") == sum(v.numel() for v in cot.values())
    nat = load_file(str(runs / "nat" / "nat_model.safetensors"))
    frozen = sum(v.numel() for k, v in nat.items() if "_neg" in k)
    assert frozen > 0
    assert study.trainable_params(runs / "nat") == sum(v.numel() for v in nat.values()) - frozen
    with pytest.raises(FileNotFoundError):
        study.trainable_params(runs)


def test_curve_watcher_keeps_every_checkpoint(runs):
    steps = sorted(p.name for p in (runs / "neg-curve").iterdir())
    assert steps == ["step-00000002", "step-00000004"]  # negkd itself keeps only the newest
    assert len(list((runs / "neg" / "checkpoints").glob("step-*"))) == 1
    for s in steps:
        assert (runs / "neg-curve" / s / "adapter_model.safetensors").is_file()
        assert json.loads((runs / "neg-curve" / s / "negkd.json").read_text())["kind"] == "neg-lora"
    last = load_file(str(runs / "neg-curve" / "step-00000004" / "adapter_model.safetensors"))
    final = load_file(str(runs / "neg" / "adapter_model.safetensors"))
    assert all(torch.equal(last[k], final[k]) for k in final)


def test_cotkd_long_gets_neg_plus_nat_steps_and_controls_share_nat_flags(monkeypatch, tmp_path):
    cmds = {}
    monkeypatch.setattr(study.run, "sh", lambda cmd, out, **kw: cmds.__setitem__(out.name, [str(c) for c in cmd]))
    monkeypatch.setattr(study, "zero_neg", lambda neg, out: out)
    P = {"base": tmp_path / "base", "data": tmp_path}
    for m in study.METHODS:
        study.train(m, 3, 40, tmp_path, P, "exclusive", curve=False)

    def flag(m, f):
        c = cmds[m]
        return c[c.index(f) + 1]

    assert int(flag("cotkd_long", "--max-steps")) == int(flag("neg", "--max-steps")) + int(flag("nat", "--max-steps")) == 80
    for m in ("cotkd", "mix", "gold", "neg", "nat", "natnull", "nce", "nt", "ul"):
        assert flag(m, "--max-steps") == "40"
    # NT / UL with issue 11's flag names, on the same positives + negatives (the split directory)
    assert flag("nt", "--nt") == str(tmp_path / "split") and flag("nt", "--neg-weight") == "0.05"
    assert flag("ul", "--ul") == str(tmp_path / "split") and "--no-neg" not in cmds["ul"]
    nat, null = cmds["nat"], cmds["natnull"]
    assert flag("natnull", "--neg").endswith("neg-zero") and flag("nat", "--neg").endswith("neg")
    assert [c for c in nat if "neg" not in c] == [c for c in null if "neg" not in c]  # same everything else
    assert flag("nat", "--gate-dim") == str(study.GATE_DIM) == "16"
    for m in cmds:
        assert flag(m, "--seed") == "3" and flag(m, "--batch-size") == "16" and flag(m, "--lr") == str(study.LR)


def test_premise_nll_scores_only_the_rare_step(runs, tiny_model):
    import premise_nll

    rng = random.Random(3)
    probs = [worlds.make_problem(rng, 3, f"r{i}", rare=True) for i in range(3)]
    probs.append(worlds.make_problem(rng, 3, "c", rare=False))
    pre, line = premise_nll.rare_step_spans(probs[0])
    assert "market" in line and "market" not in pre and probs[0]["solution"].startswith(pre)
    assert premise_nll.rare_step_spans(probs[-1]) is None
    from negkd.prompts import DEFAULT_TEMPLATE

    model, tok = premise_nll.load_student(str(tiny_model), runs / "neg")
    r = premise_nll.nll_rare_steps(model, tok, probs, DEFAULT_TEMPLATE)
    assert r["problems"] == 3 and r["tokens"] > 3 and math.isfinite(r["nll_per_token"]) and r["nll_per_token"] > 0
    model2, tok2 = premise_nll.load_student(str(tiny_model), runs / "nat")  # a NAT checkpoint loads too
    r2 = premise_nll.nll_rare_steps(model2, tok2, probs, DEFAULT_TEMPLATE)
    assert r2["tokens"] == r["tokens"] and r2["nll_per_token"] != r["nll_per_token"]


def test_methods_this_negkd_lacks_are_named_not_dropped_silently():
    import subprocess

    help_text = subprocess.run([study.NEGKD, "train-pos", "--help"], capture_output=True, text=True,
                               env={**__import__("os").environ, "COLUMNS": "200"}).stdout
    assert "--no-neg" in help_text  # the help was really read
    ok, missing = study.available_methods(study.METHODS)
    for m, flag in study.NEEDS_NEG_LOSS.items():
        assert (m in missing) == (flag not in help_text) and (m in ok) == (flag in help_text)
        if m in missing:
            assert flag in missing[m]
    assert set(ok) | set(missing) == set(study.METHODS)


def test_compare_world_runs_negkd_compare_on_every_seed_and_feeds_the_report(tmp_path, monkeypatch):
    """study.compare_world links exactly the requested seeds' greedy test predictions and runs the real
    `negkd compare` (in-process here); report_study reads its differences and overlap back."""
    import report_study
    import run

    probs = [{"id": f"t{i}", "question": f"q{i}", "answer": str(i), "subject": "rare" if i % 2 else "common",
              "level": 1 + i % 5} for i in range(40)]
    rng = random.Random(0)
    root = tmp_path / "w0"
    solved = {}
    for m, p_ok in (("cotkd", 0.3), ("neg", 0.6)):
        for s in (0, 1, 2):
            d = root / "full" / "exclusive" / f"seed{s}" / f"{m}-pred" / "eval-test"
            d.mkdir(parents=True)
            rows = []
            for p in probs:
                ok = rng.random() < p_ok
                solved[(m, s, p["id"])] = ok
                pred = p["answer"] if ok else "-1"
                rows.append({**p, "candidates": [{"rationale": f"$\\boxed{{{pred}}}$", "pred": pred, "tokens": 3,
                                                  "finished": True}], "votes": {"sc": pred}, "decoding": "greedy"})
            (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "full" / "exclusive" / "seed3").mkdir()  # a seed that is not asked for is not compared
    calls = []

    def in_process(cmd, out=None, env=None, key=None):
        calls.append(cmd)
        r = CliRunner().invoke(app, [str(c) for c in cmd[1:]])
        assert r.exit_code == 0, r.output

    monkeypatch.setattr(run, "sh", in_process)
    got = study.compare_world("exclusive", [0, 1, 2], {"root": root}, "full", ["cotkd", "neg", "nat"])
    assert calls and calls[0][1] == "compare" and got.is_file()
    cmp = json.loads(got.read_text())
    assert cmp["sets"]["neg"]["seeds"] == 3 and cmp["reference"] == "cotkd"
    rare = [p["id"] for p in probs if p["subject"] == "rare"]
    want = 100 * sum(solved[("neg", s, i)] - solved[("cotkd", s, i)] for s in (0, 1, 2) for i in rare) / (3 * len(rare))
    r = report_study.from_compare(cmp, "neg", "cotkd", "rare")
    assert r["estimate"] == pytest.approx(want, abs=1e-3) and r["ci"][0] <= r["estimate"] <= r["ci"][1]
    back = report_study.from_compare(cmp, "cotkd", "neg", "rare")
    assert back["estimate"] == pytest.approx(-want, abs=1e-3) and back["ci"] == (-r["ci"][1], -r["ci"][0])
