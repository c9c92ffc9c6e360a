"""`negkd calibrate` (NCE) on the tiny model: train-neg -> train-pos -> calibrate -> stock PEFT.

The pipeline fixture trains real (tiny, few-step) Neg-LoRA and NAT checkpoints through the CLI,
with a high learning rate so the Neg-LoRA-only and NAT models really differ (beta > 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from negkd.cli import app

FAST = ["--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2", "--warmup", "0", "--log-every", "1"]


def _rows(n: int, correct: bool, solution: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i + 3, 2 * i + 1
        res = a + b if correct else a - b
        op = "+" if correct else "-"
        rec = {"id": f"p{i}", "question": f"Ann has {a} pens and gets {b} more. How many pens now?",
               "answer": str(a + b), "k": 0 if correct else 1,
               "rationale": f"Ann has {a} {op} {b} = {res} pens. The answer is $\\boxed{{{res}}}$.",
               "pred": str(res), "correct": correct}
        if solution:
            rec["solution"] = f"{a} + {b} = {a + b}, so the answer is $\\boxed{{{a + b}}}$."
        out.append(rec)
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _invoke(args: list[str]):
    r = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    return r


def _ok(args: list[str]):
    r = _invoke(args)
    assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    return r


@pytest.fixture(scope="module")
def pipe(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("nce")
    pos = _write(d / "pos.jsonl", _rows(10, True))
    neg = _write(d / "neg.jsonl", _rows(10, False))
    _ok(["train-neg", str(neg), "-o", str(d / "neg"), "--base-model", str(tiny_model), "--max-steps", "3", *FAST])
    _ok(["train-pos", str(pos), "-o", str(d / "nat"), "--neg", str(d / "neg"), "--max-steps", "3",
         "--gate-dim", "16", "--template", "plain", *FAST])
    return {"dir": d, "pos": pos, "neg_data": neg, "neg": d / "neg", "nat": d / "nat", "base": tiny_model}


def _tree_hashes(d: Path) -> dict[str, str]:
    from negkd.io import sha256_file

    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# ----------------------------------------------------------------------------- end to end


def test_calibrate_end_to_end_loads_with_stock_peft(pipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    nat_before = _tree_hashes(pipe["nat"])
    out = tmp_path / "nce"
    r = _ok(["calibrate", str(pipe["pos"]), "-o", str(out), "--nat", str(pipe["nat"]), "--max-steps", "3",
             "--lora-r", "4", *FAST])
    assert "beta over" in r.output

    # the teacher checkpoint is untouched, bit for bit
    assert _tree_hashes(pipe["nat"]) == nat_before

    # self-describing output, manifest last
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "negkd.json",
                 "metrics.jsonl", "calibration.jsonl", "manifest.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "calibrate" and manifest["steps"] == 3
    assert max(p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()) == (out / "manifest.json").stat().st_mtime_ns
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".calibration.part-*"))
    meta = json.loads((out / "negkd.json").read_text())
    assert meta["kind"] == "nce-lora" and meta["base_model_path"] == str(Path(pipe["base"]).resolve())
    assert meta["template"] == "{question}\n"  # defaulted to the NAT checkpoint's (train-pos --template plain)
    assert meta["chat_template"] is False and meta["nce"]["calibration"] is True
    assert {d["sha256"] for d in meta["data"]} == {i["sha256"] for i in manifest["inputs"]}

    # metrics: CE, KD and the beta distribution per step
    mets = _records(out / "metrics.jsonl")
    assert [m["step"] for m in mets] == [1, 2, 3]
    for m in mets:
        assert {"loss", "ce", "kd", "beta_mean", "beta_min", "beta_max"} <= set(m)
        assert 0 <= m["beta_min"] <= m["beta_mean"] <= m["beta_max"] < 1
        assert m["loss"] == pytest.approx(0.5 * m["ce"] + 0.5 * m["kd"], rel=1e-4)
    assert mets[-1]["beta_max"] > 0  # the Neg-LoRA-only model really differs from NAT

    # calibration.jsonl: one record per example seen, with its id and k
    cal = _records(out / "calibration.jsonl")
    assert len(cal) == len({c["idx"] for c in cal}) == 10  # 3 steps x 4 >= 10 examples: all seen once
    assert {c["id"] for c in cal} == {f"p{i}" for i in range(10)} and {c["k"] for c in cal} == {0}
    assert all(0 < c["beta"] < 1 and c["beta"] == pytest.approx(__import__("math").tanh(c["kl"]), abs=1e-5)
               for c in cal)

    # only lora_A / lora_B of the student are saved, under stock PEFT names
    from safetensors.torch import load_file

    keys = list(load_file(str(out / "adapter_model.safetensors")))
    assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    assert not any("_neg" in k or "_pos" in k or "gate" in k for k in keys)

    # stock PEFT: load, generate, merge
    base = AutoModelForCausalLM.from_pretrained(str(pipe["base"]))
    tok = AutoTokenizer.from_pretrained(str(out))
    model = PeftModel.from_pretrained(base, str(out)).eval()
    enc = tok("Ann has 3 pens and gets 1 more. How many pens now?\n", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert gen.shape[1] > enc["input_ids"].shape[1]
        z_adapter = model(**enc).logits
        with model.disable_adapter():
            z_base = model(**enc).logits
        merged = model.merge_and_unload()
        z_merged = merged(**enc).logits
    assert not torch.allclose(z_adapter, z_base, atol=1e-5)  # the student learned something
    assert torch.allclose(z_adapter, z_merged, atol=1e-4)

    # an identical rerun is a no-op that says so
    r = _ok(["calibrate", str(pipe["pos"]), "-o", str(out), "--nat", str(pipe["nat"]), "--max-steps", "3",
             "--lora-r", "4", *FAST])
    assert "up to date" in r.output


def test_resume_extends_run_and_merges_calibration(pipe, tmp_path):
    out = tmp_path / "nce"
    args = ["calibrate", str(pipe["pos"]), "-o", str(out), "--nat", str(pipe["nat"]), "--lora-r", "4",
            "--with-gold", *FAST]
    _ok(args + ["--max-steps", "2"])
    first = {c["idx"]: c for c in _records(out / "calibration.jsonl")}
    assert len(first) == 8  # 2 steps x 4 of 20 examples
    r = _ok(args + ["--max-steps", "5", "--resume"])
    assert "resuming" in r.output
    mets = _records(out / "metrics.jsonl")
    assert [m["step"] for m in mets] == [1, 2, 3, 4, 5]
    cal = _records(out / "calibration.jsonl")
    assert len(cal) == len({c["idx"] for c in cal}) == 20  # 10 rationales + 10 gold solutions, each once
    # beta depends on the frozen teacher only: the same example gets the same value after resuming
    again = {c["idx"]: c for c in cal}
    assert all(again[i]["beta"] == first[i]["beta"] for i in first)
    gold = [c for c in cal if c["source"] == "gold"]
    assert len(gold) == 10 and all(c["k"] is None for c in gold)
    assert json.loads((out / "manifest.json").read_text())["steps"] == 5


def test_beta_is_computed_once_per_example_and_reused_exactly(pipe):
    """The Neg-LoRA-only pass runs once per example: a micro-batch whose rows all have a beta
    reuses it (same loss bit for bit); a batch with an unseen row computes afresh."""
    from negkd.data import Collator, build_examples
    from negkd.modeling import load_model, load_tokenizer
    from negkd.steps.calibrate import NCEObjective, build_student

    tok = load_tokenizer(str(pipe["base"]))
    examples, _ = build_examples(_rows(4, True), tok, "{question}\n")
    col = Collator(tok.pad_token_id)
    la = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    student = build_student(load_model(str(pipe["base"]), device="cpu", dtype="float32"), pipe["nat"], la)
    obj = NCEObjective(student)
    first, _ = obj(student, col(examples[:2]))
    assert (obj.neg_passes, obj.cached_batches) == (1, 0)
    again, _ = obj(student, col(examples[:2]))
    assert (obj.neg_passes, obj.cached_batches) == (1, 1)
    assert again.item() == first.item()
    fresh = NCEObjective(student)  # no cache: the same beta computed again
    _, beta_f, kl_f, _ = fresh.teacher(*(col(examples[:2])[k] for k in ("input_ids", "attention_mask", "labels")))
    _, beta_c, kl_c, _ = obj.teacher(*(col(examples[:2])[k] for k in ("input_ids", "attention_mask", "labels")),
                                     idx=col(examples[:2])["idx"])
    assert torch.equal(beta_f, beta_c) and torch.equal(kl_f, kl_c) and float(beta_c.min()) > 0
    obj(student, col(examples[1:3]))  # example 2 is new: the whole micro-batch is computed
    assert (obj.neg_passes, obj.cached_batches) == (2, 2)


def test_resume_across_epochs_equals_an_uninterrupted_run(pipe, tmp_path, monkeypatch):
    """Betas reused in epoch 2 come from the records when the run was interrupted in epoch 1: the
    resumed adapter equals the uninterrupted one bit for bit."""
    from safetensors.torch import load_file

    from negkd.steps.calibrate import NCEObjective

    base = ["calibrate", str(pipe["pos"]), "--nat", str(pipe["nat"]), "--lora-r", "4", "--max-steps", "6",
            "--save-every", "1", *FAST]  # 10 examples, batch 4: 3 steps an epoch
    _ok(base + ["-o", str(tmp_path / "a")])
    real, calls = NCEObjective.__call__, {"n": 0}

    def dies_at_step_3(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, model, batch)

    monkeypatch.setattr(NCEObjective, "__call__", dies_at_step_3)
    assert _invoke(base + ["-o", str(tmp_path / "b")]).exit_code != 0
    monkeypatch.setattr(NCEObjective, "__call__", real)
    made, init = [], NCEObjective.__init__
    monkeypatch.setattr(NCEObjective, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    r = _ok(base + ["-o", str(tmp_path / "b"), "--resume"])
    assert "resuming" in r.output
    # step 3 (2 unseen examples) computes; epoch 2 (steps 4-6) reuses the recorded and the new betas
    assert (made[-1].neg_passes, made[-1].cached_batches) == (1, 3)
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cal = {c["idx"]: c["beta"] for c in _records(tmp_path / "a" / "calibration.jsonl")}
    assert len(cal) == 10 and all(0 < v < 1 for v in cal.values())


def test_no_calibration_is_plain_kd_and_gold_from_a_split_dir(pipe, tmp_path):
    split = tmp_path / "split"  # a `negkd split` directory; neg.jsonl has 2 problems with no positive
    split.mkdir()
    _write(split / "pos.jsonl", _rows(10, True))
    _write(split / "neg.jsonl", _rows(12, False))
    (split / "manifest.json").write_text('{"command": "split"}\n')
    out = tmp_path / "kd"
    _ok(["calibrate", str(split), "-o", str(out), "--nat", str(pipe["nat"]), "--max-steps", "2", "--with-gold",
         "--no-calibration", "--kd-weight", "1.0", "--beta-offset", "1.0", *FAST])
    mets = _records(out / "metrics.jsonl")
    assert all(m["beta_max"] == 0 and m["beta_min"] == 0 for m in mets)
    assert all(m["loss"] == pytest.approx(m["kd"], rel=1e-5) for m in mets)  # lam = 1: pure KD, weight 1
    assert not (out / "calibration.jsonl").exists()
    meta = json.loads((out / "negkd.json").read_text())
    assert meta["nce"]["calibration"] is False
    assert meta["data_stats"]["kept"] == 10 + 12  # 10 positives + one gold solution per problem (12)
    inputs = [Path(i["path"]).name for i in json.loads((out / "manifest.json").read_text())["inputs"]]
    assert inputs == ["pos.jsonl", "nat", "neg.jsonl"]


# ----------------------------------------------------------------------------- in-process: what each pass sees


def test_teacher_and_student_passes_and_gradient_flow(pipe, tmp_path):
    """Teacher passes = the NAT / Neg-LoRA-only models with the student off; the student pass =
    plain base + student LoRA (NAT off); gradients reach the student adapter only."""
    from peft import PeftModel

    from negkd import nat, nce
    from negkd.data import Collator, build_examples
    from negkd.modeling import load_model, load_tokenizer
    from negkd.steps.calibrate import NCEObjective, build_student

    tok = load_tokenizer(str(pipe["base"]))
    rows = _rows(3, True)
    examples, _ = build_examples(rows, tok, "{question}\n")
    batch = Collator(tok.pad_token_id)(examples)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    torch.manual_seed(0)
    la = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    student = build_student(load_model(str(pipe["base"]), device="cpu", dtype="float32"), pipe["nat"], la)
    with torch.no_grad():  # a non-trivial student so "adapter disabled" is observable
        for n, p in student.named_parameters():
            if "lora_B.default" in n:
                p.normal_(0, 0.5)
    student.save_pretrained(str(tmp_path / "stu"))
    student.train()
    obj = NCEObjective(student, kd_weight=0.5, temperature=2.0, beta_offset=0.5)

    p_nat, beta, kl, mask = obj.teacher(ids, am, labels)
    assert student.training and nat.get_mode(student) == "off"  # state restored after the teacher passes
    assert not p_nat.requires_grad and p_nat.dtype == torch.float32

    ref, _, _ = nat.load(pipe["nat"], device="cpu", dtype="float32")  # the NAT model alone, no student
    with torch.no_grad():
        z_nat = ref(input_ids=ids, attention_mask=am).logits[:, :-1]
        with nat.using_mode(ref, "neg-only"):
            z_neg = ref(input_ids=ids, attention_mask=am).logits[:, :-1]
    assert torch.allclose(p_nat, nce.teacher_probs(z_nat, 2.0), atol=1e-6)
    assert torch.allclose(beta, nce.calibration_weight(z_nat, z_neg, mask, 2.0), atol=1e-6)
    assert torch.all(beta > 0)

    skip = obj._skip(labels)
    assert skip == min(e["n_prompt"] for e in examples) - 1 and skip > 0  # the shortest prompt
    loss, logs = obj(student, batch)  # logits of the leading prompt positions are never computed
    plain = PeftModel.from_pretrained(load_model(str(pipe["base"]), device="cpu", dtype="float32"),
                                      str(tmp_path / "stu"))
    with torch.no_grad():
        z_stu = plain(input_ids=ids, attention_mask=am).logits
    z, y = nce.shift(z_stu, labels)
    want, parts = nce.nce_loss(z, y, p_nat, beta, kd_weight=0.5, temperature=2.0, beta_offset=0.5)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["ce"].item() == pytest.approx(parts["ce"].item(), rel=1e-5)

    nat_before = {k: v.clone() for k, v in nat.state_dict(student).items()}
    loss.backward()
    with_grad = sorted(n for n, p in student.named_parameters() if p.grad is not None)
    trainable = sorted(n for n, p in student.named_parameters() if p.requires_grad)
    assert with_grad == trainable and with_grad
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in with_grad)
    for name, layer in nat.nat_layers(student).items():
        for p in layer.parameters():
            assert p.grad is None and not p.requires_grad
    torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1.0).step()
    after = nat.state_dict(student)
    assert all(torch.equal(nat_before[k], after[k]) for k in nat_before)


# ----------------------------------------------------------------------------- bad input


def test_bad_nat_dir_and_base_model_are_one_line_errors(pipe, tmp_path):
    from negkd.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", hidden=64, heads=2, intermediate=128)
    cases = [
        (["--nat", str(tmp_path / "missing")], "no such directory"),
        (["--nat", str(pipe["pos"])], "is a file"),
        (["--nat", str(pipe["neg"])], "not a NAT checkpoint"),
        (["--nat", str(pipe["nat"]), "--base-model", str(other)], "was trained on"),
        (["--nat", str(pipe["nat"]), "--kd-weight", "1.5"], "--kd-weight"),
        (["--nat", str(pipe["nat"]), "--temperature", "0"], "--temperature"),
    ]
    for extra, msg in cases:
        out = tmp_path / "out"
        r = _invoke(["calibrate", str(pipe["pos"]), "-o", str(out), *extra])
        # a bad flag value is a usage error (exit 2), a bad directory a failed run (exit 1)
        assert r.exit_code == (2 if msg.startswith("--") else 1), (extra, r.output)
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (extra, r.output)
        assert not out.exists(), extra  # nothing written

    # only negatives in POS
    r = _invoke(["calibrate", str(pipe["neg_data"]), "-o", str(tmp_path / "out"), "--nat", str(pipe["nat"])])
    assert r.exit_code == 1 and "error:" in r.output and "positives" in r.output
    # the recorded base passed explicitly is accepted (checked before any training: reuse a finished run dir)
    from negkd.steps.calibrate import read_nat, resolve_base

    meta = read_nat(pipe["nat"])
    assert resolve_base(meta, str(pipe["base"]), pipe["nat"]) == str(pipe["base"])
    assert resolve_base(meta, None, pipe["nat"]) == str(Path(pipe["base"]).resolve())
    from negkd.errors import UserError

    moved = {**meta, "base_model": str(tmp_path / "gone"), "base_model_path": str(tmp_path / "gone")}
    with pytest.raises(UserError, match="no longer exists"):
        resolve_base(moved, None, pipe["nat"])


def test_help_documents_every_flag(runner):
    r = runner.invoke(app, ["calibrate", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for flag in ("--nat", "--base-model", "--kd-weight", "--temperature", "--beta-offset", "--no-calibration",
                 "--with-gold", "--chat-template", "--template", "--loss-on-prompt", "--lora-r", "--resume",
                 "--max-steps", "--device", "Example:"):
        assert flag in r.output, flag


def test_gradient_checkpointing_recomputes_the_student_not_the_teacher(pipe):
    """With activation recomputation the backward re-runs the forward after the teacher passes:
    it must see the student (NAT off, student adapter on), giving the same gradients."""
    from negkd.data import Collator, build_examples
    from negkd.modeling import load_model, load_tokenizer
    from negkd.steps.calibrate import NCEObjective, build_student

    tok = load_tokenizer(str(pipe["base"]))
    examples, _ = build_examples(_rows(2, True), tok, "{question}\n")
    batch = Collator(tok.pad_token_id)(examples)
    la = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        model = load_model(str(pipe["base"]), device="cpu", dtype="float32", gradient_checkpointing=gc)
        student = build_student(model, pipe["nat"], la, gradient_checkpointing=gc)
        with torch.no_grad():
            for n, p in student.named_parameters():
                if "lora_B.default" in n:
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
        student.train()
        loss, _ = NCEObjective(student)(student, batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_bad_target_modules_leave_no_output_dir(pipe, tmp_path):
    out = tmp_path / "out"
    r = _invoke(["calibrate", str(pipe["pos"]), "-o", str(out), "--nat", str(pipe["nat"]),
                 "--target-modules", "nonexistent_proj", "--device", "cpu"])
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "nonexistent_proj: matches no linear layer" in lines[0], r.output
    assert not out.exists()  # the run starts only once the student is built


def test_refused_resume_leaves_the_finished_run_untouched(pipe, tmp_path):
    out = tmp_path / "nce"
    args = ["calibrate", str(pipe["pos"]), "-o", str(out), "--nat", str(pipe["nat"]), "--lora-r", "4", *FAST]
    _ok(args + ["--max-steps", "2"])
    before = _tree_hashes(out)
    r = _invoke(args + ["--max-steps", "1", "--resume"])
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "beyond this run's 1 steps" in lines[0], r.output
    assert _tree_hashes(out) == before  # manifest.json, adapter, metrics and checkpoints as they were
