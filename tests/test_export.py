"""``negkd export``: TRL datasets (SFT / KTO / DPO) that `datasets` loads, and merged adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from infer_helpers import make_adapter, read_jsonl
from negkd.cli import app

PROMPT = "Problem:\n{q}\nSolution:\n"


def sample(qid: str, k: int, correct: bool, rationale: str | None = None) -> dict:
    return {"id": qid, "question": f"What is {qid}?", "answer": "1", "k": k,
            "rationale": rationale if rationale is not None else f"{qid} {'good' if correct else 'bad'} #{k}",
            "pred": "1" if correct else "2", "correct": correct}


def write_split(d: Path) -> Path:
    """q1: 2 positives, 5 negatives; q2: 1 positive, no negative; q3: no positive, 2 negatives;
    q4: 3 positives, 1 negative; one empty positive rationale (dropped)."""
    d.mkdir(parents=True, exist_ok=True)
    pos = [sample("q1", 0, True), sample("q1", 3, True), sample("q2", 0, True), sample("q4", 0, True),
           sample("q4", 1, True), sample("q4", 2, True), sample("q2", 5, True, rationale="  ")]
    neg = [sample("q1", k, False) for k in (1, 2, 4, 5, 6)] + [sample("q3", 0, False), sample("q3", 1, False),
                                                               sample("q4", 3, False)]
    (d / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pos))
    (d / "neg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in neg))
    return d


def export(runner, *argv):
    return runner.invoke(app, ["export", *map(str, argv)])


def load(path: Path):
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train")


def test_sft_and_kto_round_trip(runner, tmp_path):
    split = write_split(tmp_path / "split")
    r = export(runner, split, "-o", tmp_path / "sft", "--format", "trl-sft")
    assert r.exit_code == 0, r.output
    ds = load(tmp_path / "sft" / "train.jsonl")
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 6  # the empty rationale is dropped
    src = read_jsonl(tmp_path / "sft" / "source.jsonl")
    assert src[0] == {"id": "q1", "k": 0}
    assert ds[0] == {"prompt": PROMPT.format(q="What is q1?"), "completion": "q1 good #0"}  # no EOS: TRL adds it
    man = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert man["rows"] == 6 and man["dropped_empty"] == 1 and man["args"]["template"] == PROMPT.replace("{q}", "{question}")

    r = export(runner, split, "-o", tmp_path / "kto", "--format", "trl-kto", "--template", "plain")
    assert r.exit_code == 0, r.output
    ds = load(tmp_path / "kto" / "train.jsonl")
    assert ds.column_names == ["prompt", "completion", "label"] and ds.features["label"].dtype == "bool"
    assert sum(ds["label"]) == 6 and len(ds) == 6 + 8
    for row, s in zip(ds, read_jsonl(tmp_path / "kto" / "source.jsonl")):
        assert row["prompt"] == f"What is {s['id']}?\n"  # the plain template
        assert row["completion"].startswith(f"{s['id']} {'good' if row['label'] else 'bad'} #{s['k']}")
    # rerun: nothing to do; other settings: refused
    r = export(runner, split, "-o", tmp_path / "kto", "--format", "trl-kto", "--template", "plain")
    assert r.exit_code == 0 and "up to date" in r.output
    r = export(runner, split, "-o", tmp_path / "kto", "--format", "trl-kto")
    assert r.exit_code == 1 and "arguments differ: template" in r.output


def test_dpo_pairs_come_from_one_question_and_are_seeded(runner, tmp_path):
    split = write_split(tmp_path / "split")
    r = export(runner, split, "-o", tmp_path / "dpo", "--format", "trl-dpo", "--pairs-per-question", 3)
    assert r.exit_code == 0, r.output
    ds = load(tmp_path / "dpo" / "train.jsonl")
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    src = read_jsonl(tmp_path / "dpo" / "source.jsonl")
    assert len(ds) == len(src) == 3 + 1  # q1: min(3, 5 negatives); q4: 1 negative; q2, q3: no pairs
    for row, s in zip(ds, src):
        q = s["id"]
        assert row["prompt"] == PROMPT.format(q=f"What is {q}?")
        assert row["chosen"] == f"{q} good #{s['chosen_k']}" and row["rejected"] == f"{q} bad #{s['rejected_k']}"
    q1 = [s for s in src if s["id"] == "q1"]
    assert len({s["rejected_k"] for s in q1}) == 3  # negatives without replacement
    uses = [sum(s["chosen_k"] == k for s in q1) for k in (0, 3)]
    assert sorted(uses) == [1, 2]  # 3 pairs, 2 positives used round-robin
    man = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert (man["questions"], man["questions_with_pairs"], man["questions_without_negative"],
            man["questions_without_positive"]) == (4, 2, 1, 1)
    # seeded: the same seed gives the same file, another seed other pairs
    r = export(runner, split, "-o", tmp_path / "dpo2", "--format", "trl-dpo", "--pairs-per-question", 3)
    assert (tmp_path / "dpo2" / "source.jsonl").read_text() == (tmp_path / "dpo" / "source.jsonl").read_text()
    drawn = set()
    for seed in range(6):
        r = export(runner, split, "-o", tmp_path / f"s{seed}", "--format", "trl-dpo", "--pairs-per-question", 3,
                   "--seed", seed)
        assert r.exit_code == 0, r.output
        drawn.add((tmp_path / f"s{seed}" / "source.jsonl").read_text())
    assert len(drawn) > 1


def test_conversational_form(runner, tmp_path):
    split = write_split(tmp_path / "split")
    r = export(runner, split, "-o", tmp_path / "dpo", "--format", "trl-dpo", "--chat-template")
    assert r.exit_code == 0, r.output
    ds = load(tmp_path / "dpo" / "train.jsonl")
    row = ds[0]
    assert row["prompt"] == [{"role": "user", "content": PROMPT.format(q="What is q1?")}]
    assert row["chosen"][0]["role"] == "assistant" and row["chosen"][0]["content"].startswith("q1 good")
    assert row["rejected"][0]["role"] == "assistant" and row["rejected"][0]["content"].startswith("q1 bad")
    r = export(runner, split / "pos.jsonl", "-o", tmp_path / "sft", "--format", "trl-sft", "--chat-template")
    assert r.exit_code == 0, r.output
    row = load(tmp_path / "sft" / "train.jsonl")[0]
    assert row["completion"] == [{"role": "assistant", "content": "q1 good #0"}]


@pytest.mark.parametrize("bad,message", [
    ("{\"id\": \"q9\"\n", "pos.jsonl:2: malformed JSON"),
    (json.dumps({k: v for k, v in sample("q9", 0, True).items() if k != "correct"}) + "\n",
     "pos.jsonl:2: a graded sample needs 'correct'"),
])
def test_bad_input_names_file_and_line(runner, tmp_path, bad, message):
    split = write_split(tmp_path / "split")
    pos = split / "pos.jsonl"
    pos.write_text(pos.read_text().splitlines(keepends=True)[0] + bad)
    out = tmp_path / "o"
    r = export(runner, split, "-o", out, "--format", "trl-dpo")
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.output
    assert not out.exists()


def test_nothing_to_export_and_usage_errors(runner, tmp_path):
    d = tmp_path / "onlypos"
    d.mkdir()
    (d / "pos.jsonl").write_text(json.dumps(sample("q1", 0, True)) + "\n")
    r = export(runner, d, "-o", tmp_path / "o", "--format", "trl-dpo")
    assert r.exit_code == 1 and "no (positive, negative) pairs" in r.output and not (tmp_path / "o").exists()
    r = export(runner, tmp_path / "empty-nothing", "-o", tmp_path / "o", "--format", "trl-sft")
    assert r.exit_code == 1 and "no such file" in r.output
    r = export(runner, d, "-o", tmp_path / "o", "--format", "trl-orpo")
    assert r.exit_code == 2
    r = export(runner, d, "-o", tmp_path / "o", "--format", "merged", "--dtype", "float8")
    assert r.exit_code == 2 and "--dtype 'float8'" in r.output


def _greedy(model, tok, prompts):
    import torch

    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(g[0, ids["input_ids"].shape[1]:].tolist())
    return out


def test_merged_model_generates_like_the_adapter(runner, tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ad = make_adapter(tiny_model, tmp_path / "adapter", template="Q: {question}\nA:")
    out = tmp_path / "merged"
    r = export(runner, ad, "-o", out, "--format", "merged")
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists() and (out / "manifest.json").is_file()
    assert json.loads((out / "negkd.json").read_text())["template"] == "Q: {question}\nA:"
    tok = AutoTokenizer.from_pretrained(str(out))
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    prompts = ["Ann has 3 apples", "Problem:\n2 + 2\nSolution:\n", "hello"]
    base_out = _greedy(base, tok, prompts)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(ad)).eval()
    adapter_out = _greedy(peft, tok, prompts)
    assert adapter_out != base_out  # the adapter is not a no-op
    assert _greedy(merged, tok, prompts) == adapter_out
    r = export(runner, ad, "-o", out, "--format", "merged")
    assert r.exit_code == 0 and "up to date" in r.output


def test_merged_refuses_nat_and_quantized_bases(runner, tmp_path, tiny_model):
    nat = tmp_path / "nat"
    nat.mkdir()
    (nat / "nat_config.json").write_text("{}")
    r = export(runner, nat, "-o", tmp_path / "o", "--format", "merged")
    assert r.exit_code == 1 and "NAT checkpoint" in r.output and "negkd calibrate" in r.output
    r = export(runner, tmp_path, "-o", tmp_path / "o", "--format", "merged")
    assert r.exit_code == 1 and "not a PEFT adapter" in r.output
    qbase = tmp_path / "qbase"
    shutil.copytree(tiny_model, qbase)
    cfg = json.loads((qbase / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qbase / "config.json").write_text(json.dumps(cfg))
    ad = make_adapter(tiny_model, tmp_path / "adapter")
    r = export(runner, ad, "-o", tmp_path / "o", "--format", "merged", "--base-model", qbase)
    assert r.exit_code == 1 and "quantized" in r.output and "--base-model" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_trl_dpo_trainer_runs_on_an_export(runner, tmp_path, tiny_model):
    """TRL's DPOTrainer reads an exported file as it is (two steps on the tiny model)."""
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    split = write_split(tmp_path / "split")
    r = export(runner, split, "-o", tmp_path / "dpo", "--format", "trl-dpo")
    assert r.exit_code == 0, r.output
    ds = load(tmp_path / "dpo" / "train.jsonl")
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2,
                     learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     max_length=64)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    try:
        res = trainer.train()
    finally:  # TRL's Trainer leaves accelerate's process-wide state behind (DPOConfig: bf16 mixed precision);
        from accelerate.state import AcceleratorState  # later in-process negkd runs would inherit it

        AcceleratorState._reset_state(reset_partial_state=True)
    assert res.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(x == x for x in losses)
