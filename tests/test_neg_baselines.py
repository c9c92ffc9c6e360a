"""train-pos's NT/UL baselines inside fit() (exact per-step averaging of each term), NAT gate
statistics over completion tokens only, and the trainable-parameter counts / --gate-dim warning."""

import math

import pytest
import torch

from negkd import losses
from negkd.data import Collator, build_examples
from negkd.prompts import DEFAULT_TEMPLATE
from negkd.steps import train_pos
from negkd.training import TrainConfig, fit, make_accelerator


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tiny_model):
    from negkd.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model))


def mixed_rows():
    """4 positives and 4 negatives of uneven lengths (so per-micro-batch means would differ)."""
    rows = []
    for i in range(8):
        a, b = i + 2, 2 * i + 1
        neg = i % 2 == 1
        r = f"{a} + {b} = {a + b + neg}. The answer is $\\boxed{{{a + b + neg}}}$."
        rows.append({"id": f"q{i}", "k": int(neg), "question": f"What is {a} + {b}?", "answer": str(a + b),
                     "rationale": " ".join([r] * (1 + i % 3)), "correct": not neg})
    return rows


def lora_model(tiny_model):
    from negkd.lora import attach_lora
    from negkd.modeling import load_model

    torch.manual_seed(0)
    return attach_lora(load_model(str(tiny_model), device="cpu", dtype="float32"), 8, 16, 0.0, ["q_proj", "v_proj"])


@pytest.mark.parametrize("which", ["nt", "ul"])
def test_each_term_is_averaged_over_its_own_tokens_across_the_step(which, tiny_model, tok, tmp_path, monkeypatch):
    """One SGD step over 8 mixed rows: 1x8, 2x4 and 4x2 micro-batches all give the update of the
    hand-written loss NLL(all positive tokens) -/+ w * term(all negative tokens), and log it."""
    exs, _ = build_examples(mixed_rows(), tok, DEFAULT_TEMPLATE)
    assert sum(e["neg"] for e in exs) == 4
    w = 0.5
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))

    ref = lora_model(tiny_model)
    batch = Collator(tok.pad_token_id)(exs)
    neg = torch.tensor([e["neg"] for e in exs]).unsqueeze(1)
    pos_l, neg_l = batch["labels"].masked_fill(neg, -100), batch["labels"].masked_fill(~neg, -100)
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    fn = losses.nt_loss if which == "nt" else losses.ul_loss
    want = fn(logits, pos_l, logits, neg_l, weight=w)
    want.backward()
    want_delta = torch.cat([-p.grad.flatten() for _, p in ref.named_parameters() if p.requires_grad])
    want_pos = float(losses.masked_nll(logits.detach(), pos_l))

    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        m = lora_model(tiny_model)
        before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        cfg = TrainConfig(batch_size=bs, grad_accum=ga, max_steps=1, lr=1.0, warmup=0, schedule="constant",
                          max_grad_norm=0, log_every=1)
        res = fit(m, exs, config=cfg, out_dir=tmp_path / f"{which}{bs}", collate_fn=Collator(tok.pad_token_id),
                  loss_fn=train_pos.neg_loss(which, w), weight_fn=train_pos.neg_weight_fn,
                  accelerator=make_accelerator("cpu"))
        delta = torch.cat([(p.detach() - before[n]).flatten() for n, p in m.named_parameters() if p.requires_grad])
        torch.testing.assert_close(delta, want_delta, rtol=1e-4, atol=1e-7)
        rec = res.history[0]
        assert math.isclose(rec["loss"], float(want), rel_tol=1e-5), (bs, ga)
        assert math.isclose(rec["loss_pos"], want_pos, rel_tol=1e-5)
        assert math.isclose(rec["loss_pos"] + rec["loss_neg"], rec["loss"], rel_tol=1e-9)
        assert (rec["loss_neg"] < 0) == (which == "nt")


def test_a_step_without_negatives_has_a_zero_negative_term(tiny_model, tok, tmp_path):
    exs, _ = build_examples([r for r in mixed_rows() if r["correct"]], tok, DEFAULT_TEMPLATE)
    cfg = TrainConfig(batch_size=2, grad_accum=2, max_steps=1, lr=1e-3, warmup=0, log_every=1)
    res = fit(lora_model(tiny_model), exs, config=cfg, out_dir=tmp_path, collate_fn=Collator(tok.pad_token_id),
              loss_fn=train_pos.neg_loss("ul", 0.05), weight_fn=train_pos.neg_weight_fn,
              accelerator=make_accelerator("cpu"))
    rec = res.history[0]
    assert rec["loss_neg"] == 0.0 and rec["loss"] == rec["loss_pos"] > 0


# ---------------------------------------------------------------- NAT gate statistics


@pytest.fixture(scope="module")
def neg_dir(tiny_model, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from negkd.modeling import load_model

    torch.manual_seed(1)
    base = load_model(str(tiny_model), device="cpu", dtype="float32")
    m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False))
    d = tmp_path_factory.mktemp("neg") / "adapter"
    m.save_pretrained(str(d))
    return d


def nat_model(tiny_model, neg_dir, gate_dim=16):
    from negkd import nat
    from negkd.modeling import load_model

    la = {"r": 8, "alpha": 16.0, "dropout": 0.0}
    r = train_pos.nat_recipe(neg_dir, la, gate_dim, 0.5)
    torch.manual_seed(0)
    model = r.attach(load_model(str(tiny_model), device="cpu", dtype="float32"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a gate that varies from token to token
        for layer in nat.nat_layers(model).values():
            for attr in ("lora_gate_q", "lora_gate_k", "lora_gate_w1", "lora_gate_w2"):
                getattr(layer, attr).weight.copy_(torch.randn(getattr(layer, attr).weight.shape, generator=g))
    return r, model


@pytest.mark.parametrize("loss_on_prompt", [False, True])
def test_nat_gate_statistics_count_completion_tokens_only(tiny_model, neg_dir, tok, loss_on_prompt):
    """The mean g_neg logged during train-pos is over the rationale + EOS tokens: not the prompt
    (also under --loss-on-prompt) and not padding."""
    from negkd import nat

    r, model = nat_model(tiny_model, neg_dir)
    exs, _ = build_examples(mixed_rows()[:3], tok, DEFAULT_TEMPLATE, loss_on_prompt=loss_on_prompt)
    batch = Collator(tok.pad_token_id)(exs)
    # what the training loss records
    r.loss_fn(model, batch)
    got = r.metrics_fn(model)
    # reference: g_neg per position captured by hooks, averaged over completion positions by hand
    per_layer = {}
    hooks = []
    for name, layer in nat.nat_layers(model).items():
        def grab(mod, args, out, name=name):
            x = args[0].float()
            h0 = mod.base_layer(args[0]).float()
            h_pos = h0 + mod.pos_scale * mod.lora_B_pos(mod.lora_A_pos(x))  # dropout 0
            h_neg = h0 + mod.neg_scale * mod.lora_B_neg(mod.lora_A_neg(x))
            q = mod.lora_gate_q(x)
            s = torch.stack([(mod.lora_gate_k(h_pos) * q).sum(-1), (mod.lora_gate_k(h_neg) * q).sum(-1)])
            per_layer[name] = 2 * mod.beta * torch.softmax(s / mod.temperature, 0)[1] - mod.beta  # (B, L)
        hooks.append(layer.register_forward_hook(grab))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    comp = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    for i, e in enumerate(exs):
        comp[i, e["n_prompt"]:len(e["input_ids"])] = True
    real = batch["attention_mask"].bool()
    assert comp.sum() < real.sum()
    for name, g in per_layer.items():
        key = f"g_neg/{nat.short_name(name)}"
        want = float(g[comp].mean())
        assert math.isclose(got[key], want, rel_tol=1e-4, abs_tol=1e-6), (key, got[key], want)
        assert not math.isclose(got[key], float(g[real].mean()), rel_tol=1e-4, abs_tol=1e-6)  # not the old mean


# ---------------------------------------------------------------- parameter counts and --gate-dim


def test_nat_parameter_counts_per_component_and_gate_dim_warning(tiny_model, neg_dir):
    from negkd import nat

    _, model = nat_model(tiny_model, neg_dir, gate_dim=16)
    c = train_pos.nat_param_counts(model)
    layers = nat.nat_layers(model)
    d, r, g = 96, 8, 16  # tiny model: hidden 96, q_proj and v_proj both 96 -> 96
    assert len(layers) == 4
    assert c["pos_lora"] == 4 * r * (d + d)
    assert c["gate_qk"] == 4 * (d * g + d * g) and c["gate_w1w2"] == 4 * (d * g + g * d)
    assert c["total"] == c["pos_lora"] + c["gate_qk"] + c["gate_w1w2"]
    assert train_pos.check_gate_dim(model, 16, c) is None  # 16 <= 96 / 4
    _, big = nat_model(tiny_model, neg_dir, gate_dim=128)
    msg = train_pos.check_gate_dim(big, 128, train_pos.nat_param_counts(big))
    assert msg and "hidden size 96" in msg and "32x the Pos-LoRA" in msg and "--gate-dim 12" in msg
