"""train-neg / train-pos end to end on the tiny model (CPU): outputs, loading, resume, errors, help."""

import json
import math
import random
import re

import pytest
import torch
from safetensors.torch import load_file

from negkd.cli import app

COMMON = ["--batch-size", "8", "--grad-accum", "1", "--lr", "1e-2", "--log-every", "1", "--warmup", "0",
          "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_split(d, n=40, seed=0):
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    pos, neg = [], []
    for i in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        base = {"id": f"q{i}", "question": f"What is {a} + {b}?", "answer": str(a + b)}
        pos.append({**base, "k": 0, "rationale": f"{a} + {b} = {a + b}. The answer is $\\boxed{{{a + b}}}$.",
                    "pred": str(a + b), "correct": True})
        neg.append({**base, "k": 1, "rationale": f"{a} + {b} = {a + b + 1}. The answer is $\\boxed{{{a + b + 1}}}$.",
                    "pred": str(a + b + 1), "correct": False})
    for name, rows in (("pos.jsonl", pos), ("neg.jsonl", neg)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "manifest.json").write_text('{"command": "split"}\n')  # a finished `negkd split` directory
    return d


def invoke(runner, args):
    res = runner.invoke(app, args)
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def metrics(d):
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """train-neg then train-pos (NAT) once for the module."""
    from typer.testing import CliRunner

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    split = write_split(root / "split")
    runner = CliRunner()
    neg = root / "neg"
    r = invoke(runner, ["train-neg", str(split), "-o", str(neg), "--base-model", str(tiny_model), "--max-steps", "12",
                        "--save-every", "5", *COMMON])
    assert r.exit_code == 0, r.output
    nat_dir = root / "nat"
    r2 = invoke(runner, ["train-pos", str(split), "-o", str(nat_dir), "--neg", str(neg), "--max-steps", "12",
                         "--gate-dim", "16", *COMMON])
    assert r2.exit_code == 0, r2.output
    return {"split": split, "neg": neg, "nat": nat_dir, "runner": runner, "root": root}


def test_train_neg_writes_a_stock_peft_adapter(trained, tiny_model):
    from peft import PeftModel

    from negkd.modeling import load_model, load_tokenizer

    neg = trained["neg"]
    for f in ("adapter_config.json", "adapter_model.safetensors", "negkd.json", "manifest.json", "metrics.jsonl",
              "tokenizer.json"):
        assert (neg / f).exists(), f
    meta = json.loads((neg / "negkd.json").read_text())
    assert meta["kind"] == "neg-lora" and meta["base_model"] == str(tiny_model)
    assert meta["template"] == "Problem:\n{question}\nSolution:\n" and meta["chat_template"] is False
    assert meta["data_stats"]["kept"] == 40 and len(meta["data"][0]["sha256"]) == 64
    man = json.loads((neg / "manifest.json").read_text())
    assert man["command"] == "train-neg" and man["steps"] == 12 and "adapter_model.safetensors" in man["outputs"]
    m = metrics(neg)
    assert [r["step"] for r in m] == list(range(1, 13)) and m[-1]["loss"] < 0.97 * m[0]["loss"]
    assert sorted(p.name for p in (neg / "checkpoints").iterdir()) == ["step-00000012"]
    tok = load_tokenizer(str(neg))  # the checkpoint folder carries its tokenizer
    ids = tok(["Problem:\nWhat is 1 + 2?\nSolution:\n"], return_tensors="pt")["input_ids"]
    peft_model = PeftModel.from_pretrained(load_model(str(tiny_model), device="cpu"), str(neg)).eval()
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
        assert not torch.allclose(peft_model(ids).logits, base, atol=1e-4)  # the adapter is trained


def test_rerun_is_a_no_op(trained, tiny_model):
    neg = trained["neg"]
    before = (neg / "manifest.json").read_text()
    r = invoke(trained["runner"], ["train-neg", str(trained["split"]), "-o", str(neg), "--base-model", str(tiny_model),
                                   "--max-steps", "12", "--save-every", "5", *COMMON])
    assert r.exit_code == 0 and "up to date" in r.output
    assert (neg / "manifest.json").read_text() == before


def test_train_pos_nat_checkpoint_neg_untouched_and_reloads(trained, tiny_model):
    from negkd import nat
    from negkd.modeling import load_model

    neg, nat_dir = trained["neg"], trained["nat"]
    for f in ("nat_config.json", "nat_model.safetensors", "negkd.json", "manifest.json", "tokenizer.json"):
        assert (nat_dir / f).exists(), f
    # the frozen Neg-LoRA is bit-identical to train-neg's adapter
    adapter = load_file(str(neg / "adapter_model.safetensors"))
    sd = load_file(str(nat_dir / "nat_model.safetensors"))
    n = 0
    for key, t in adapter.items():
        mod = nat.canonical(key.split(".lora_")[0])
        which = "lora_A_neg" if ".lora_A." in key else "lora_B_neg"
        assert torch.equal(sd[f"{mod}.{which}.weight"], t), key
        n += 1
    assert n == 8
    # the Pos-LoRA and unit did train
    assert any(float(v.abs().sum()) > 0 for k, v in sd.items() if "lora_B_pos" in k)
    m = metrics(nat_dir)
    assert m[-1]["loss"] < m[0]["loss"]
    gates = [k for k in m[-1] if k.startswith("g_neg/")]
    assert sorted(gates) == ["g_neg/0.q_proj", "g_neg/0.v_proj", "g_neg/1.q_proj", "g_neg/1.v_proj"]
    assert all(-0.5 <= m[-1][k] <= 0.5 for k in gates)
    doc = json.loads((nat_dir / "nat_config.json").read_text())
    assert doc["nat"]["gate_dim"] == 16 and doc["nat"]["beta"] == 0.5 and doc["kind"] == "nat"
    # two independent save paths agree: nat.load(DIR) == base + Neg-LoRA + the checkpoint's trained tensors
    model, tok, meta = nat.load(nat_dir, device="cpu")
    assert meta["template"] == "Problem:\n{question}\nSolution:\n"
    ref = load_model(str(tiny_model), device="cpu")
    nat.attach_new(ref, neg, gate_dim=16)
    trained_sd = load_file(str(nat_dir / "checkpoints" / "step-00000012" / "trainable.safetensors"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in trained_sd:
                p.copy_(trained_sd[name])
    ref.eval()
    assert set(trained_sd) == set(nat.trainable_names(ref))
    ids = tok(["Problem:\nWhat is 3 + 4?\nSolution:\n"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4


def test_resume_extends_a_run_and_metrics_continue(trained, tiny_model):
    runner, split, root = trained["runner"], trained["split"], trained["root"]
    out = root / "neg-resume"
    args = ["train-neg", str(split), "-o", str(out), "--base-model", str(tiny_model), *COMMON]
    assert invoke(runner, [*args, "--max-steps", "3"]).exit_code == 0
    first = metrics(out)
    r = invoke(runner, [*args, "--max-steps", "6"])
    assert r.exit_code == 1 and "--overwrite" in r.output  # a finished run with other settings
    r = invoke(runner, [*args, "--max-steps", "6", "--resume"])
    assert r.exit_code == 0, r.output
    m = metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6] and m[:3] == first
    man = json.loads((out / "manifest.json").read_text())
    assert man["steps"] == 6 and man["resumed_from"] == 3
    r = invoke(runner, [*args, "--max-steps", "6", "--resume", "--lr", "5e-3"])
    assert r.exit_code == 1 and "lr" in r.output


def test_baselines_no_neg_and_mix_are_stock_adapters(trained, tiny_model):
    runner, split, root = trained["runner"], trained["split"], trained["root"]
    for flag, kind, rows in ((["--no-neg"], "pos-lora", 40), (["--mix", str(split / "neg.jsonl")], "mix-lora", 80)):
        out = root / kind
        r = invoke(runner, ["train-pos", str(split / "pos.jsonl"), "-o", str(out), "--base-model", str(tiny_model),
                            *flag, "--max-steps", "2", *COMMON])
        assert r.exit_code == 0, r.output
        assert (out / "adapter_config.json").exists() and not (out / "nat_config.json").exists()
        meta = json.loads((out / "negkd.json").read_text())
        assert meta["kind"] == kind and meta["data_stats"]["kept"] == rows


@pytest.mark.parametrize("extra,code,msg", [
    ([], 2, "exactly one of"),
    (["--no-neg", "--mix", "x.jsonl"], 2, "exactly one of"),
    (["--nt", "x.jsonl", "--ul", "x.jsonl"], 2, "got --nt and --ul"),
    (["--neg", "x", "--nt", "x.jsonl"], 2, "got --neg and --nt"),
    (["--mix", "x.jsonl", "--neg-weight", "0.1"], 2, "applies to --nt/--ul only"),
    (["--nt", "x.jsonl", "--neg-weight", "-0.1"], 2, "must be a finite number >= 0"),
    (["--ul", "x.jsonl", "--neg-weight", "nan"], 2, "must be a finite number >= 0"),
    (["--ul", "x.jsonl", "--neg-weight", "inf"], 2, "must be a finite number >= 0"),
    (["--no-neg"], 1, "needs --base-model"),
    (["--ul", "x.jsonl"], 1, "needs --base-model"),
])
def test_train_pos_mode_flags(trained, extra, code, msg):
    r = invoke(trained["runner"], ["train-pos", str(trained["split"]), "-o", str(trained["root"] / "bad"), *extra])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", r.output).split())  # rich's error box wraps the message
    assert r.exit_code == code and msg in text, r.output
    assert not (trained["root"] / "bad").exists()


def test_nt_ul_baselines_train_stock_adapters(trained, tiny_model):
    """--nt NEG / --ul NEG: stock PEFT adapters trained on positives + negatives, both terms logged,
    the weight and parameter counts recorded."""
    from peft import PeftModel

    from negkd.modeling import load_model, load_tokenizer

    runner, split, root = trained["runner"], trained["split"], trained["root"]
    tok = load_tokenizer(str(tiny_model))
    ids = tok(["Problem:\nWhat is 3 + 4?\nSolution:\n"], return_tensors="pt")["input_ids"]
    for flag, neg_arg, kind, extra in (("--nt", split, "nt-lora", []),
                                       ("--ul", split / "neg.jsonl", "ul-lora", ["--neg-weight", "0.5"])):
        out = root / kind
        r = invoke(runner, ["train-pos", str(split / "pos.jsonl"), "-o", str(out), "--base-model", str(tiny_model),
                            flag, str(neg_arg), *extra, "--max-steps", "3", *COMMON])
        assert r.exit_code == 0, r.output
        assert "trainable parameters: lora 6,144, total 6,144" in r.output
        assert (out / "adapter_config.json").exists() and not (out / "nat_config.json").exists()
        meta = json.loads((out / "negkd.json").read_text())
        w = 0.05 if flag == "--nt" else 0.5
        assert meta["kind"] == kind and meta["data_stats"]["kept"] == 80 and meta["neg_weight"] == w
        assert meta["trainable_params"] == {"lora": 6144, "total": 6144}  # 2 layers x (q, v) x r 8 x (96 + 96)
        man = json.loads((out / "manifest.json").read_text())
        assert man["args"]["mode"] == kind and man["args"]["neg_weight"] == w
        assert man["trainable_params"]["total"] == 6144
        for rec in metrics(out):
            assert rec["loss_pos"] > 0 and rec["loss"] == pytest.approx(rec["loss_pos"] + rec["loss_neg"])
            assert (rec["loss_neg"] < 0) if flag == "--nt" else (rec["loss_neg"] > 0)
            if flag == "--nt":  # the cap: -w ln V <= term
                assert rec["loss_neg"] >= -w * math.log(len(tok)) - 1e-9
        peft_model = PeftModel.from_pretrained(load_model(str(tiny_model), device="cpu"), str(out)).eval()
        with torch.no_grad():
            with peft_model.disable_adapter():
                base = peft_model(ids).logits
            assert not torch.allclose(peft_model(ids).logits, base, atol=1e-4)
    nat_meta = json.loads((trained["nat"] / "negkd.json").read_text())
    c = nat_meta["trainable_params"]
    assert set(c) == {"pos_lora", "gate_qk", "gate_w1w2", "total"} and c["pos_lora"] == 4 * 8 * 192
    assert c["total"] == c["pos_lora"] + c["gate_qk"] + c["gate_w1w2"]


def test_nt_resume_matches_an_uninterrupted_run(trained, tiny_model):
    """Both streams' data position (one mixed plan) survive an interruption: 2 steps + --resume to 4
    give the adapter of 4 uninterrupted steps."""
    runner, split, root = trained["runner"], trained["split"], trained["root"]

    def run(out, steps, *more):
        r = invoke(runner, ["train-pos", str(split), "-o", str(out), "--base-model", str(tiny_model), "--nt",
                            str(split), "--neg-weight", "0.3", "--max-steps", str(steps), "--batch-size", "4",
                            "--grad-accum", "2", "--lr", "1e-2", "--log-every", "1", "--warmup", "0",
                            "--schedule", "constant", "--device", "cpu", *more])  # same LR in 2 + 2 as in 4
        assert r.exit_code == 0, r.output

    run(root / "nt-straight", 4)
    run(root / "nt-resumed", 2)
    run(root / "nt-resumed", 4, "--resume")
    a = load_file(str(root / "nt-straight" / "adapter_model.safetensors"))
    b = load_file(str(root / "nt-resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    m_res, m_all = metrics(root / "nt-resumed"), metrics(root / "nt-straight")
    assert [x["step"] for x in m_res] == [1, 2, 3, 4]
    for x, y in zip(m_res, m_all):
        assert x["loss_pos"] == pytest.approx(y["loss_pos"]) and x["loss_neg"] == pytest.approx(y["loss_neg"])
    man = json.loads((root / "nt-resumed" / "manifest.json").read_text())
    assert man["resumed_from"] == 2 and man["steps"] == 4
    r = invoke(runner, ["train-pos", str(split), "-o", str(root / "nt-resumed"), "--base-model", str(tiny_model),
                        "--nt", str(split), "--neg-weight", "0.2", "--max-steps", "5", "--batch-size", "4",
                        "--grad-accum", "2", "--lr", "1e-2", "--log-every", "1", "--warmup", "0", "--schedule",
                        "constant", "--device", "cpu", "--resume"])
    assert r.exit_code == 1 and "neg_weight" in r.output  # a changed weight is a different run


def _error(runner, args, tmp_path, msg, code=None):
    out = tmp_path / "out"
    r = invoke(runner, [*args, "-o", str(out), "--device", "cpu"])
    if code is None:  # a bad flag value is a usage error (2); a bad input (a file, a directory) is 1
        code = 2 if msg.startswith("--") and "resume" not in msg else 1
    assert r.exit_code == code, r.output
    lines = [x for x in r.output.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and msg in lines[0], r.output
    assert not (out / "manifest.json").exists() and not (out / "checkpoints").exists()
    return lines[0]


def test_bad_inputs_fail_with_one_line(trained, tiny_model, tmp_path):
    runner, split = trained["runner"], trained["split"]
    _error(runner, ["train-neg", str(split), "--base-model", str(tmp_path / "nope")], tmp_path, "no such model directory")
    from transformers import ViTConfig

    ViTConfig().save_pretrained(str(tmp_path / "vit"))
    _error(runner, ["train-neg", str(split), "--base-model", str(tmp_path / "vit")], tmp_path,
           "not a causal language model")
    _error(runner, ["train-neg", str(split), "--base-model", str(tiny_model), "--target-modules", "c_attn"], tmp_path,
           "matches no linear layer")
    (tmp_path / "empty.jsonl").write_text("\n")
    _error(runner, ["train-neg", str(tmp_path / "empty.jsonl"), "--base-model", str(tiny_model)], tmp_path, "empty file")
    _error(runner, ["train-neg", str(split / "pos.jsonl"), "--base-model", str(tiny_model)], tmp_path,
           "holds no negatives")
    _error(runner, ["train-pos", str(split), "--neg", str(split)], tmp_path, "not a LoRA adapter directory")
    # a Neg-LoRA trained on another base
    from negkd.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", hidden=64, layers=1, heads=2, intermediate=128)
    _error(runner, ["train-pos", str(split), "--neg", str(trained["neg"]), "--base-model", str(other)], tmp_path,
           "differs from the base")
    _error(runner, ["train-pos", str(split), "--neg", str(trained["neg"]), "--target-modules", "k_proj"], tmp_path,
           "NAT wraps the Neg-LoRA's modules")
    _error(runner, ["train-neg", str(split), "--base-model", str(tiny_model), "--batch-size", "0"], tmp_path,
           "--batch-size")


def test_qlora_4bit_trains_on_cpu(trained, tiny_model):
    from peft import PeftModel

    from negkd.modeling import load_model

    out = trained["root"] / "q4"
    r = invoke(trained["runner"], ["train-neg", str(trained["split"]), "-o", str(out), "--base-model", str(tiny_model),
                                   "--load-in-4bit", "--max-steps", "2", *COMMON])
    assert r.exit_code == 0, r.output
    m = metrics(out)
    assert len(m) == 2 and all(x["loss"] == x["loss"] for x in m)  # finite, not NaN
    base = load_model(str(tiny_model), device="cpu", load_in_4bit=True)
    assert getattr(base, "is_loaded_in_4bit", False)
    PeftModel.from_pretrained(base, str(out))


def test_nat_on_a_4bit_base_and_8bit_lora_train_on_cpu(trained, tiny_model):
    """QLoRA paths beyond train-neg: NAT (train-pos) on a 4-bit base, and an 8-bit train-neg, on CPU."""
    from negkd import nat

    out = trained["root"] / "nat-q4"
    r = invoke(trained["runner"], ["train-pos", str(trained["split"]), "-o", str(out), "--neg", str(trained["neg"]),
                                   "--load-in-4bit", "--max-steps", "2", *COMMON])
    assert r.exit_code == 0, r.output
    m = metrics(out)
    assert len(m) == 2 and all(x["loss"] == x["loss"] for x in m)
    assert any(k.startswith("g_neg/") for k in m[-1])  # the gate ran on the quantized layers
    model, _, meta = nat.load(out, device="cpu", load_in_4bit=True)
    assert getattr(model, "is_loaded_in_4bit", False) and nat.nat_layers(model)
    out8 = trained["root"] / "neg-q8"
    r = invoke(trained["runner"], ["train-neg", str(trained["split"]), "-o", str(out8), "--base-model", str(tiny_model),
                                   "--load-in-8bit", "--max-steps", "2", *COMMON])
    assert r.exit_code == 0, r.output
    assert all(x["loss"] == x["loss"] for x in metrics(out8))


def test_missing_bitsandbytes_message(trained, tiny_model, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    line = _error(trained["runner"], ["train-neg", str(trained["split"]), "--base-model", str(tiny_model),
                                      "--load-in-4bit"], tmp_path, "need bitsandbytes")
    assert "pip install bitsandbytes" in line


def _params(cmd):
    import typer.main

    click_cmd = typer.main.get_command(app).commands[cmd]
    return {p.name: p for p in click_cmd.params}


def test_help_documents_every_flag_and_training_flags_are_shared(runner):
    for cmd in ("train-neg", "train-pos"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Example: negkd" in r.output
        for p in _params(cmd).values():
            assert p.help or getattr(p, "param_type_name", "") == "argument", (cmd, p.name)
    neg, pos = _params("train-neg"), _params("train-pos")
    shared = set(neg) & set(pos) - {"target_modules"}
    assert {"lr", "batch_size", "grad_accum", "resume", "save_every", "load_in_4bit", "chat_template",
            "max_length", "seed", "dtype", "device", "gradient_checkpointing"} <= shared
    for name in shared:
        if name in ("neg", "pos", "base_model"):
            continue
        assert (neg[name].help, neg[name].default, neg[name].opts) == (pos[name].help, pos[name].default,
                                                                       pos[name].opts), name


def test_train_pos_neg_must_be_a_neg_lora(trained, tiny_model, tmp_path):
    import shutil

    runner, split = trained["runner"], trained["split"]
    other = tmp_path / "pos-lora"
    shutil.copytree(trained["neg"], other)
    meta = json.loads((other / "negkd.json").read_text())
    (other / "negkd.json").write_text(json.dumps({**meta, "kind": "pos-lora"}))
    line = _error(runner, ["train-pos", str(split), "--neg", str(other)], tmp_path,
                  f"--neg {other}: is a pos-lora adapter, not a Neg-LoRA", code=1)
    assert "negkd train-neg NEG -o DIR --base-model M" in line
    _error(runner, ["train-pos", str(split), "--neg", str(trained["nat"])], tmp_path, "is a nat adapter, not a Neg-LoRA")
    # a stock PEFT adapter (no negkd.json) is still accepted, its recorded base checked
    stock = tmp_path / "stock"
    shutil.copytree(trained["neg"], stock)
    (stock / "negkd.json").unlink()
    (stock / "manifest.json").unlink()
    r = invoke(runner, ["train-pos", str(split), "-o", str(tmp_path / "nat"), "--neg", str(stock), "--base-model",
                        str(tiny_model), "--max-steps", "1", "--gate-dim", "4", *COMMON])
    assert r.exit_code == 0, r.output


def test_encoder_models_are_not_causal_lms(trained, tmp_path):
    from transformers import BertConfig

    from negkd.modeling import check_causal_lm

    kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    BertConfig(**kw).save_pretrained(str(tmp_path / "bert"))
    line = _error(trained["runner"], ["train-neg", str(trained["split"]), "--base-model", str(tmp_path / "bert")],
                  tmp_path, "is an encoder (bert), not a causal LM")
    assert "decoder-only model such as LLaMA/Qwen2/Mistral" in line
    assert not (tmp_path / "out").exists()
    BertConfig(is_decoder=True, **kw).save_pretrained(str(tmp_path / "bert-decoder"))
    assert check_causal_lm(tmp_path / "bert-decoder").is_decoder


def test_refused_resume_leaves_the_finished_run_untouched(trained, tiny_model):
    from negkd.io import sha256_file

    runner, split, root = trained["runner"], trained["split"], trained["root"]
    out = root / "neg-refused"
    args = ["train-neg", str(split), "-o", str(out), "--base-model", str(tiny_model), *COMMON]
    assert invoke(runner, [*args, "--max-steps", "3"]).exit_code == 0

    def tree():
        return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}

    before = tree()
    assert {"manifest.json", "adapter_model.safetensors", "adapter_config.json"} <= set(before)
    r = invoke(runner, [*args, "--max-steps", "2", "--resume"])
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "beyond this run's 2 steps" in lines[0], r.output
    assert tree() == before  # manifest.json, adapter, metrics and checkpoints byte for byte


@pytest.mark.parametrize("arch, targets", [("qwen2", "q_proj,v_proj"), ("gpt_neox", "query_key_value")])
def test_other_architectures_train_neg_and_nat(arch, targets, trained, tmp_path):
    """Not only LLaMA: a tiny Qwen2 and a tiny GPT-NeoX (fused query_key_value) through train-neg and
    train-pos (NAT), with the NAT unit attached to the architecture's own projection names."""
    import transformers

    from negkd import nat
    from negkd.tiny import build_tokenizer, builtin_corpus

    tok = build_tokenizer(builtin_corpus())
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.GPTNeoXConfig(**common)
        model = transformers.GPTNeoXForCausalLM(cfg)
    base = tmp_path / arch
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    neg = tmp_path / "neg"
    r = invoke(trained["runner"], ["train-neg", str(trained["split"]), "-o", str(neg), "--base-model", str(base),
                                   "--target-modules", targets, "--max-steps", "2", *COMMON])
    assert r.exit_code == 0, r.output
    out = tmp_path / "nat"
    r = invoke(trained["runner"], ["train-pos", str(trained["split"]), "-o", str(out), "--neg", str(neg),
                                   "--max-steps", "2", *COMMON])
    assert r.exit_code == 0, r.output
    m, _, _ = nat.load(out, device="cpu")
    names = list(nat.nat_layers(m))
    assert len(names) == 2 * len(targets.split(",")) and all(n.rsplit(".", 1)[-1] in targets.split(",") for n in names)
