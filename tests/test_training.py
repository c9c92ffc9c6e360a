"""negkd.training.fit: learning, exact resume, token-weighted accumulation, generic use."""

import json

import pytest
import torch

from negkd.data import Collator, build_examples, lengths
from negkd.errors import UserError
from negkd.prompts import DEFAULT_TEMPLATE
from negkd.training import TrainConfig, fit, latest_checkpoint, lr_lambda, make_accelerator


def toy_rows(n=48, seed=0):
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        rows.append({"id": f"p{i}", "k": 0, "question": f"What is {a} + {b}?", "answer": str(a + b),
                     "rationale": f"{a} + {b} = {a + b}. The answer is $\\boxed{{{a + b}}}$."})
    return rows


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_model):
    from negkd.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    exs, _ = build_examples(toy_rows(), tok, DEFAULT_TEMPLATE)
    return tok, exs


def lora_model(tiny_model, seed=0, dropout=0.05, targets="all-linear"):
    from negkd.lora import attach_lora
    from negkd.modeling import load_model

    torch.manual_seed(seed)
    return attach_lora(load_model(str(tiny_model), device="cpu", dtype="float32"), 8, 16, dropout, targets)


def _fit(model, exs, tok, out, **kw):
    cfg_kw = {k: kw.pop(k) for k in list(kw) if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{"batch_size": 8, "grad_accum": 1, "lr": 1e-2, "log_every": 1, "warmup": 0, **cfg_kw})
    return fit(model, exs, config=cfg, out_dir=out, collate_fn=Collator(tok.pad_token_id), lengths=lengths(exs),
               accelerator=make_accelerator("cpu"), **kw)


def test_loss_falls_and_saved_adapter_reproduces_logits(tiny_model, setup, tmp_path):
    from peft import PeftModel

    from negkd.lora import save_adapter
    from negkd.modeling import load_model

    tok, _ = setup
    rows = [dict(r, rationale="Let's think step by step. The answer is 42.") for r in toy_rows()]
    exs, _ = build_examples(rows, tok, DEFAULT_TEMPLATE)  # a learnable target for a random tiny base
    res = _fit(lora_model(tiny_model), exs, tok, tmp_path, max_steps=24, save_fn=lambda m, d: save_adapter(m, d))
    losses = [r["loss"] for r in res.history]
    assert res.step == 24 and len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 25))
    assert all(r["tokens_per_s"] > 0 and 0 <= r["padding"] < 0.1 for r in recs)
    ck = latest_checkpoint(tmp_path)
    assert ck.name == "step-00000024"
    ids = torch.tensor([exs[0]["input_ids"]])
    loaded = PeftModel.from_pretrained(load_model(str(tiny_model), device="cpu", dtype="float32"), str(ck)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, res.model.eval()(ids).logits)


def test_resume_after_interruption_continues_the_same_curve(tiny_model, setup, tmp_path):
    tok, exs = setup
    full = _fit(lora_model(tiny_model), exs, tok, tmp_path / "full", max_steps=9, grad_accum=2, batch_size=4)

    from negkd.training import lm_loss, lm_weight

    calls = {"n": 0}

    def dies_at_step_7(model, batch):  # 2 micro-batches per step
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _fit(lora_model(tiny_model), exs, tok, out, max_steps=9, grad_accum=2, batch_size=4, save_every=4,
             loss_fn=dies_at_step_7, weight_fn=lm_weight)
    assert latest_checkpoint(out).name == "step-00000004"
    with pytest.raises(UserError, match="--resume"):
        _fit(lora_model(tiny_model), exs, tok, out, max_steps=9, grad_accum=2, batch_size=4)
    with pytest.raises(UserError, match="lr"):
        _fit(lora_model(tiny_model), exs, tok, out, max_steps=9, grad_accum=2, batch_size=4, lr=5e-3, resume=True)
    res = _fit(lora_model(tiny_model, seed=99), exs, tok, out, max_steps=9, grad_accum=2, batch_size=4,
               save_every=4, resume=True)
    assert res.resumed_from == 4 and res.step == 9
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 10))  # nothing lost, nothing duplicated
    torch.testing.assert_close([r["loss"] for r in recs], [r["loss"] for r in full.history], rtol=1e-5, atol=1e-6)
    assert [r["lr"] for r in recs] == pytest.approx([r["lr"] for r in full.history])


def test_accumulation_weights_tokens_not_micro_batches(tiny_model, setup, tmp_path, monkeypatch):
    """One SGD step over the same 8 rows: 1x8, 2x4 and 4x2 micro-batches give the same update."""
    tok, exs = setup
    rows = toy_rows(8, seed=5)
    rows[0]["rationale"] = " ".join([rows[0]["rationale"]] * 4)  # make token counts uneven
    exs8, _ = build_examples(rows, tok, DEFAULT_TEMPLATE)
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    deltas = []
    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        m = lora_model(tiny_model, dropout=0.0, targets=["q_proj", "v_proj"])
        before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        _fit(m, exs8, tok, tmp_path / f"{bs}", max_steps=1, batch_size=bs, grad_accum=ga, lr=1.0,
             schedule="constant", max_grad_norm=0)
        deltas.append(torch.cat([(p.detach() - before[n]).flatten() for n, p in m.named_parameters()
                                 if p.requires_grad]))
    assert deltas[0].abs().sum() > 0
    torch.testing.assert_close(deltas[1], deltas[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(deltas[2], deltas[0], rtol=1e-4, atol=1e-7)


def test_fit_is_generic_custom_items_collate_and_loss(tmp_path):
    """The train-ranker shape: non-LM model, custom collate, per-item keys reach the loss."""
    torch.manual_seed(0)
    w_true = torch.randn(5)
    items = [{"x": torch.randn(5), "idx": i} for i in range(64)]
    for it in items:
        it["y"] = float(it["x"] @ w_true)
    model = torch.nn.Linear(5, 1)
    seen = set()

    def collate(batch):
        return {"x": torch.stack([b["x"] for b in batch]), "y": torch.tensor([b["y"] for b in batch]),
                "idx": [b["idx"] for b in batch]}

    def loss_fn(m, b):
        seen.update(b["idx"])
        err = m(b["x"]).squeeze(-1) - b["y"]
        return (err ** 2).mean(), {"mae": err.abs().mean()}

    cfg = TrainConfig(batch_size=16, epochs=30, lr=5e-2, log_every=4, warmup=0, schedule="constant")
    res = fit(model, items, config=cfg, out_dir=tmp_path, collate_fn=collate, loss_fn=loss_fn,
              accelerator=make_accelerator("cpu"))
    assert seen == set(range(64)) and res.step == 120 and res.steps_per_epoch == 4
    assert res.history[-1]["loss"] < 0.01 * res.history[0]["loss"]
    assert "mae" in res.history[-1]


def test_schedule_warmup_then_cosine_and_linear():
    f = lr_lambda(total=10, warmup=2, schedule="cosine")
    assert [round(f(s), 4) for s in (0, 1, 2)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]
    assert f(10) == pytest.approx(0.0) and f(6) == pytest.approx(0.5)
    g = lr_lambda(total=10, warmup=0, schedule="linear")
    assert g(5) == pytest.approx(0.5)
    assert lr_lambda(10, 0, "constant")(9) == 1.0


def test_no_trainable_parameters_is_a_clear_error(tmp_path):
    m = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        fit(m, [1, 2], config=TrainConfig(), out_dir=tmp_path, collate_fn=lambda b: {},
            accelerator=make_accelerator("cpu"))


def test_check_resume_refuses_without_touching_the_dir(tiny_model, setup, tmp_path):
    from negkd.io import sha256_file
    from negkd.training import check_resume

    tok, exs = setup
    model = lora_model(tiny_model)
    _fit(model, exs, tok, tmp_path, max_steps=3)
    before = {p: sha256_file(p) for p in tmp_path.rglob("*") if p.is_file()}

    def check(resume=True, **kw):
        cfg = TrainConfig(**{"batch_size": 8, "grad_accum": 1, "lr": 1e-2, "log_every": 1, "warmup": 0, **kw})
        check_resume(model, lengths(exs), config=cfg, out_dir=tmp_path, fingerprint=None, resume=resume)

    check(max_steps=3)
    check(max_steps=6)  # extending is fine
    with pytest.raises(UserError, match="beyond this run's 2 steps"):
        check(max_steps=2)
    with pytest.raises(UserError, match="lr"):
        check(max_steps=6, lr=5e-3)
    with pytest.raises(UserError, match="pass --resume"):
        check(resume=False, max_steps=6)
    assert {p: sha256_file(p) for p in tmp_path.rglob("*") if p.is_file()} == before


def test_lm_loss_skips_prompt_logits_and_equals_the_full_computation(tiny_model, setup):
    """lm_loss asks the model only for the logits from the batch's shortest prompt on; its loss and
    gradients equal the plain masked NLL over the full logits."""
    from negkd.data import Collator
    from negkd.losses import masked_nll
    from negkd.training import first_target, keeps_logits, lm_loss

    tok, exs = setup
    batch = Collator(tok.pad_token_id)(exs[:4])
    skip = first_target(batch["labels"])
    assert skip == min(e["n_prompt"] for e in exs[:4]) - 1 > 0
    model = lora_model(tiny_model, dropout=0.0)
    assert keeps_logits(model)
    seen = []
    hook = model.get_base_model().register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("logits_to_keep")),
                                                            with_kwargs=True)
    loss, _ = lm_loss(model, batch)
    hook.remove()
    assert seen == [batch["labels"].shape[1] - skip]
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    want = masked_nll(full, batch["labels"])
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7)


def test_token_nll_shifts_labels_not_logits():
    """token_nll: position t scores labels[t+1]; -100 positions are 0; the same values as slicing."""
    import torch.nn.functional as F

    from negkd.losses import token_nll

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 1, 6], [-100, 2, 0, -100, 4]])
    got = token_nll(logits, labels)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="none").view(2, 4)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, want)
    assert got[0, 0] == 0 and got[1, 2] == 0
