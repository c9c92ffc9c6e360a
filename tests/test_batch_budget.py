"""--max-batch-tokens: micro-batches under a padded-token budget, same optimizer steps."""

import random

import pytest
import torch

from negkd.data import Collator, budget_split, build_examples, lengths
from negkd.prompts import DEFAULT_TEMPLATE
from negkd.training import Filler, Plan, TrainConfig, fit, make_accelerator
from test_training import lora_model, toy_rows


def _cost(part, lens, rows_per_item=1):
    return len(part) * rows_per_item * max(lens[i] for i in part)


@pytest.mark.parametrize("rows_per_item", [1, 2])
def test_budget_split_bounds_every_part_and_keeps_every_item(rows_per_item):
    rng = random.Random(0)
    lens = [rng.randint(5, 300) for _ in range(64)]
    lens[7] = 900  # over the budget on its own
    rows = list(range(64))
    rng.shuffle(rows)
    parts = budget_split(rows, lens, 800, rows_per_item)
    assert sorted(i for p in parts for i in p) == list(range(64))
    assert [7] in parts
    for p in parts:
        assert _cost(p, lens, rows_per_item) <= 800 or len(p) == 1
    # greedy over the length-sorted items: no two neighbouring parts could have been one
    for a, b in zip(parts, parts[1:]):
        assert _cost(a + b, lens, rows_per_item) > 800
    more = budget_split(rows, lens, 800, rows_per_item, min_parts=len(parts) + 5)
    assert len(more) == len(parts) + 5 and sorted(i for p in more for i in p) == list(range(64))
    assert all(_cost(p, lens, rows_per_item) <= 800 or len(p) == 1 for p in more)


def test_plan_with_budget_covers_the_same_items_per_step_on_every_process():
    rng = random.Random(1)
    lens = [rng.choice([12, 40, 90, 400]) for _ in range(45)]
    for world in (1, 2):
        plain = [Plan(lens, 4, 3, world, r, seed=3) for r in range(world)]
        budg = [Plan(lens, 4, 3, world, r, seed=3, max_tokens=400) for r in range(world)]
        assert budg[0].steps_per_epoch == plain[0].steps_per_epoch
        for s in range(2 * plain[0].steps_per_epoch):  # two epochs
            counts = set()
            for r in range(world):
                e, micro = plain[r].step(s)
                e2, bmicro = budg[r].step(s)
                real = [mb for mb in bmicro if not isinstance(mb, Filler)]
                assert e == e2
                assert sorted(i for mb in real for i in mb) == sorted(i for mb in micro for i in mb)
                assert all(_cost(mb, lens) <= 400 or len(mb) == 1 for mb in bmicro)
                counts.add(len(bmicro))
            assert len(counts) == 1  # every process makes the same number of passes


def test_plan_pads_a_short_process_with_zero_weight_fillers():
    # 5 items, batch 2, 2 processes: the epoch's last micro-batch holds one item; rank 1 gets it
    # while rank 0's two 100-token items need 2 passes under a 150-token budget.
    lens = [100] * 5
    plans = [Plan(lens, 2, 1, 2, r, seed=0, max_tokens=150) for r in range(2)]
    saw_filler = False
    for s in range(plans[0].steps_per_epoch):
        m0, m1 = plans[0].step(s)[1], plans[1].step(s)[1]
        assert len(m0) == len(m1)
        for m in (m0, m1):
            fill = [mb for mb in m if isinstance(mb, Filler)]
            saw_filler |= bool(fill)
            assert all(len(f) == 1 for f in fill)
    assert saw_filler


def test_fit_under_a_budget_makes_the_same_update_with_smaller_passes(tiny_model, tmp_path, monkeypatch):
    """One SGD step on 8 uneven rows: no budget vs a budget that forces several passes."""
    from negkd.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    rows = toy_rows(8, seed=5)
    rows[0]["rationale"] = " ".join([rows[0]["rationale"]] * 4)
    exs, _ = build_examples(rows, tok, DEFAULT_TEMPLATE)
    lens = lengths(exs)
    budget = 2 * sorted(lens)[-2]  # the longest row runs alone, the others in pairs or more
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    deltas, shapes = [], []
    for mbt in (None, budget):
        m = lora_model(tiny_model, dropout=0.0, targets=["q_proj", "v_proj"])
        before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        seen = []
        coll = Collator(tok.pad_token_id)

        def collate(items, coll=coll, seen=seen):
            b = coll(items)
            seen.append(tuple(b["input_ids"].shape))
            return b

        cfg = TrainConfig(batch_size=8, grad_accum=1, lr=1.0, schedule="constant", warmup=0, max_grad_norm=0,
                          max_steps=1, max_batch_tokens=mbt)
        res = fit(m, exs, config=cfg, out_dir=tmp_path / str(mbt), collate_fn=collate, lengths=lens,
                  accelerator=make_accelerator("cpu"))
        deltas.append(torch.cat([(p.detach() - before[n]).flatten() for n, p in m.named_parameters()
                                 if p.requires_grad]))
        shapes.append(seen)
        assert res.tokens == sum(lens)
    assert shapes[0] == [(8, max(lens))]
    assert len(shapes[1]) >= 3 and sum(b for b, _ in shapes[1]) == 8
    assert all(b * L <= budget or b == 1 for b, L in shapes[1])
    assert deltas[0].abs().sum() > 0
    torch.testing.assert_close(deltas[1], deltas[0], rtol=1e-4, atol=1e-7)


def test_nat_and_nce_under_a_budget_match_runs_without_it(tiny_model, tmp_path):
    """train-pos (NAT) and calibrate (NCE) from the CLI: the budget changes the passes, not the result."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from test_train_cli import COMMON, invoke, write_split

    torch.set_num_threads(1)
    split = write_split(tmp_path / "split", n=24)
    run = ["--max-steps", "2", "--lora-dropout", "0", *COMMON]
    r = invoke(CliRunner(), ["train-neg", str(split), "-o", str(tmp_path / "neg"), "--base-model", str(tiny_model), *run])
    assert r.exit_code == 0, r.output
    for budget in (None, "60"):
        flag = ["--max-batch-tokens", budget] if budget else []
        nat, nce = tmp_path / f"nat-{budget}", tmp_path / f"nce-{budget}"
        r = invoke(CliRunner(), ["train-pos", str(split), "-o", str(nat), "--neg", str(tmp_path / "neg"),
                                 "--gate-dim", "8", *run, *flag])
        assert r.exit_code == 0, r.output
        r = invoke(CliRunner(), ["calibrate", str(split), "-o", str(nce), "--nat", str(tmp_path / "nat-None"),
                                 *run, *flag])
        assert r.exit_code == 0, r.output
    assert "micro-batches of <= 60 padded tokens" in r.output
    for d, f in (("nat", "nat_model.safetensors"), ("nce", "adapter_model.safetensors")):
        a, b = load_file(str(tmp_path / f"{d}-None" / f)), load_file(str(tmp_path / f"{d}-60" / f))
        assert sorted(a) == sorted(b)
        for k in a:
            # atol 1e-5: the lean NAT unit picks its W_1/W_K gradient path by micro-batch size
            # (nat.LEAN_MIN_TOKENS), so a budget changes float32 summation order, not the math
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_bad_budget_is_a_one_line_error(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from test_train_cli import invoke

    r = invoke(CliRunner(), ["train-neg", str(tmp_path), "-o", str(tmp_path / "out"), "--base-model", str(tiny_model),
                             "--max-batch-tokens", "0"])
    assert r.exit_code == 2 and "--max-batch-tokens 0: must be >= 1" in r.output
    assert not (tmp_path / "out").exists()


def test_interrupted_budget_run_resumes_to_the_same_curve(tiny_model, tmp_path):
    from negkd.errors import UserError
    from negkd.modeling import load_tokenizer
    from negkd.training import latest_checkpoint, lm_loss, lm_weight

    tok = load_tokenizer(str(tiny_model))
    exs, _ = build_examples(toy_rows(24), tok, DEFAULT_TEMPLATE)

    def go(out, **kw):
        cfg = TrainConfig(**{"batch_size": 4, "grad_accum": 2, "lr": 1e-2, "warmup": 0, "log_every": 1,
                             "max_steps": 6, "save_every": 2, "max_batch_tokens": 70, **kw.pop("cfg", {})})
        return fit(lora_model(tiny_model, seed=kw.pop("seed", 0)), exs, config=cfg, out_dir=out,
                   collate_fn=Collator(tok.pad_token_id), lengths=lengths(exs), accelerator=make_accelerator("cpu"),
                   **kw)

    full = go(tmp_path / "full")
    plan = Plan(lengths(exs), 4, 2, 1, 0, seed=0, max_tokens=70)
    passes = [len(plan.step(s)[1]) for s in range(6)]
    assert passes[0] > 2  # the budget splits the 8 rows of a step
    calls = {"n": 0}

    def dies(model, batch):
        calls["n"] += 1
        if calls["n"] > sum(passes[:3]) + 1:  # inside step 4, after the checkpoint at step 2
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "cut", loss_fn=dies, weight_fn=lm_weight)
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000002"
    with pytest.raises(UserError, match="max_batch_tokens"):
        go(tmp_path / "cut", resume=True, cfg={"max_batch_tokens": 200})  # the budget is part of the settings
    res = go(tmp_path / "cut", resume=True, seed=99)
    assert res.resumed_from == 2 and res.step == 6
    torch.testing.assert_close([r["loss"] for r in res.history], [r["loss"] for r in full.history[2:]],
                               rtol=1e-5, atol=1e-6)
