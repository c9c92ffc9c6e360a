"""negkd `train-pos --no-neg` against TRL's SFTTrainer + PEFT LoRA, and negkd with vs without
--max-batch-tokens: throughput and peak RSS side by side, one run, CPU.

Setup (issue 15 §4): N real GPT-3.5 rationales (question + rationale) from the paper's teacher
data, a random LLaMA (hidden 512, 8 layers, BPE vocab ~10.7k trained on those texts), LoRA r=8
alpha 16 dropout 0.05 on q_proj,v_proj (the same PEFT adapter, same seed, in every row), batch
8, max length 1024, fp32, AdamW lr 1e-4 constant, grad-norm clip 1.0, 2 threads, no gradient
checkpointing (TRL's SFTConfig turns it on by default; negkd's --gradient-checkpointing is off).

Rows, each in its own subprocess (so peak RSS is the row's own), interleaved over --rounds:

- ``negkd``          : ``fit()`` as train-pos --no-neg runs it (length-grouped, dynamic padding).
- ``negkd-budget``   : the same with ``--max-batch-tokens`` (default 2048): the same rows per
                       optimizer step, cut into passes of <= 2048 padded tokens.
- ``trl-exact``      : TRL SFTTrainer fed negkd's exact batches (a sequential sampler over the
                       rows in negkd's plan order): same ids, labels, batches, adapter init.
- ``trl-default``    : TRL's defaults (random batches, padded to the longest in each); with --all.

Before timing, a loss-parity check: one batch, identical ids/labels, negkd's ``lm_loss`` vs
TRL's ``compute_loss`` on the same model (eval mode). Throughput counts *target* tokens
(labels != -100 after the shift) per second of the training call; peak RSS is the worker's
``ru_maxrss``. Loss curves: max |difference| per step against negkd's.

    python bench/train_peer.py                      # 512 rationales, 20 steps, 1 round
    python bench/train_peer.py --steps 40 --rounds 3 --all --json out.json

Targets: negkd >= 1.1x TRL's tokens/s on identical batches; with the budget, peak RSS <= 0.6x
negkd's at >= 0.95x its throughput, loss curves within noise.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tdg" / "gpt35_math_train_8.jsonl.gz"
GiB = 2 ** 30


# ---------------------------------------------------------------- shared setup (parent and workers)


def load_examples(work: Path):
    from negkd.data import build_examples
    from negkd.modeling import load_tokenizer
    from negkd.prompts import DEFAULT_TEMPLATE

    spec = json.loads((work / "spec.json").read_text())
    rows = json.loads((work / "rows.json").read_text())
    tok = load_tokenizer(str(work / "model"))
    exs, stats = build_examples(rows, tok, DEFAULT_TEMPLATE, max_length=spec["max_length"])
    return spec, tok, exs, stats


def lora_model(work: Path):
    import torch

    from negkd.lora import attach_lora
    from negkd.modeling import load_model

    torch.manual_seed(0)
    return attach_lora(load_model(str(work / "model"), device="cpu", dtype="float32"), 8, 16, 0.05,
                       ["q_proj", "v_proj"])


def plan_rows(spec, exs) -> list[list[int]]:
    """negkd's micro-batches (no budget) for ``spec['steps']`` optimizer steps, in order."""
    from negkd.data import lengths
    from negkd.training import Plan

    plan = Plan(lengths(exs), spec["batch_size"], 1, 1, 0, spec["seed"])
    return [plan.step(s)[1][0] for s in range(spec["steps"])]


def n_target(labels) -> int:
    return int((labels[:, 1:] != -100).sum())


# ---------------------------------------------------------------- workers (one row each)


def worker_negkd(work: Path, budget: int | None) -> dict:
    from negkd.data import Collator, lengths
    from negkd.training import TrainConfig, fit, make_accelerator

    spec, tok, exs, _ = load_examples(work)
    model = lora_model(work)
    count, collate = counting(Collator(tok.pad_token_id))

    cfg = TrainConfig(batch_size=spec["batch_size"], grad_accum=1, max_steps=spec["steps"], lr=1e-4, warmup=0,
                      schedule="constant", max_grad_norm=1.0, seed=spec["seed"], log_every=1, save_every=0,
                      max_batch_tokens=budget)
    t0 = time.perf_counter()
    res = fit(model, exs, config=cfg, out_dir=work / f"run-negkd-{budget}-{time.time_ns()}", collate_fn=collate,
              lengths=lengths(exs), accelerator=make_accelerator("cpu"), desc="negkd")
    sec = time.perf_counter() - t0
    return {**count, "seconds": sec, "tokens": res.tokens, "losses": [r["loss"] for r in res.history]}


def counting(inner):
    """Wrap a collator so it counts what every forward pass sees: target and real tokens, padded
    positions, passes and the largest pass; returns (the counts dict, the wrapped collator)."""
    count = {"target": 0, "real": 0, "positions": 0, "passes": 0, "max_positions": 0}

    def collate(items):
        b = inner(items)
        count["target"] += n_target(b["labels"])
        count["positions"] += b["input_ids"].numel()
        count["real"] += int(b["attention_mask"].sum())
        count["max_positions"] = max(count["max_positions"], b["input_ids"].numel())
        count["passes"] += 1
        return b

    return count, collate


def _trl_trainer(work: Path, spec, tok, exs, exact: bool, **cfg_kw):
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    if exact:
        order = [i for mb in plan_rows(spec, exs) for i in mb]
    else:
        order = list(range(len(exs)))
    ds = Dataset.from_list([{"input_ids": exs[i]["input_ids"], "labels": exs[i]["labels"]} for i in order])

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset) if exact else super()._get_train_sampler(*a, **k)

    args = SFTConfig(output_dir=str(work / f"trl-{time.time_ns()}"), per_device_train_batch_size=spec["batch_size"],
                     max_steps=spec["steps"], learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, dataloader_num_workers=0, max_length=spec["max_length"], seed=spec["seed"],
                     bf16=False, fp16=False, optim="adamw_torch", disable_tqdm=True,
                     gradient_checkpointing=False, **cfg_kw)  # TRL defaults it on; negkd off, as here
    return Trainer(model=lora_model(work), args=args, train_dataset=ds, processing_class=tok)


def worker_trl(work: Path, exact: bool, extra: dict) -> dict:
    spec, tok, exs, _ = load_examples(work)
    trainer = _trl_trainer(work, spec, tok, exs, exact, **extra)
    count, collate = counting(trainer.data_collator)

    trainer.data_collator = collate
    t0 = time.perf_counter()
    trainer.train()
    sec = time.perf_counter() - t0
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {**count, "seconds": sec, "losses": losses}


def loss_parity(work: Path) -> dict:
    """One batch, identical ids/labels: negkd's lm_loss vs TRL's compute_loss on one model (eval mode)."""
    import torch

    from negkd.data import Collator
    from negkd.training import lm_loss

    spec, tok, exs, _ = load_examples(work)
    trainer = _trl_trainer(work, {**spec, "steps": 1}, tok, exs, exact=True)
    model = trainer.model
    model.eval()
    rows = plan_rows({**spec, "steps": 1}, exs)[0]
    ours = Collator(tok.pad_token_id)([exs[i] for i in rows])
    theirs = trainer.data_collator([{"input_ids": exs[i]["input_ids"], "labels": exs[i]["labels"]} for i in rows])
    same = torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours["labels"], theirs["labels"])
    with torch.no_grad():
        a = float(lm_loss(model, ours)[0])
        b = float(trainer.compute_loss(model, {k: v for k, v in theirs.items() if torch.is_tensor(v)}))
    return {"same_ids_and_labels": same, "negkd_loss": a, "trl_loss": b, "abs_diff": abs(a - b)}


def worker_main(argv: list[str]) -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--row", required=True)
    a = ap.parse_args(argv)
    spec = json.loads((a.work / "spec.json").read_text())
    torch.set_num_threads(spec["threads"])
    from negkd.modeling import quiet_libraries

    quiet_libraries()
    if a.row == "parity":
        out = loss_parity(a.work)
    elif a.row == "negkd":
        out = worker_negkd(a.work, None)
    elif a.row == "negkd-budget":
        out = worker_negkd(a.work, spec["budget"])
    elif a.row == "trl-exact":
        out = worker_trl(a.work, True, {})
    elif a.row == "trl-default":
        out = worker_trl(a.work, False, {})
    elif a.row == "trl-group":
        out = worker_trl(a.work, False, {"group_by_length": True})
    else:
        raise SystemExit(f"unknown row {a.row}")
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- parent


def build(work: Path, args) -> None:
    from negkd.prompts import DEFAULT_TEMPLATE
    from negkd.schemas import iter_samples
    from negkd.tiny import build_tiny_model

    rows = [s for _, s in iter_samples(args.data)]
    rows = random.Random(args.seed).sample(rows, min(args.n, len(rows)))
    (work / "rows.json").write_text(json.dumps(rows))
    corpus = [DEFAULT_TEMPLATE.format(question=r["question"]) + (r.get("rationale") or "") for r in rows]
    build_tiny_model(work / "model", corpus=corpus, hidden=512, layers=8, heads=8, intermediate=1376,
                     vocab_size=args.vocab, max_positions=args.max_length)
    (work / "spec.json").write_text(json.dumps({"steps": args.steps, "batch_size": args.batch_size,
                                                "max_length": args.max_length, "seed": args.seed,
                                                "threads": args.threads, "budget": args.max_batch_tokens}))


def run_row(work: Path, row: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--worker", "--work", str(work), "--row", row],
                       capture_output=True, text=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"row {row} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    if "--worker" in sys.argv:
        return worker_main([x for x in sys.argv[1:] if x != "--worker"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TDG teacher data (.jsonl.gz)")
    ap.add_argument("--n", type=int, default=512, help="rationales to sample")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per row")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians reported)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-batch-tokens", type=int, default=2048, help="negkd-budget row's --max-batch-tokens")
    ap.add_argument("--vocab", type=int, default=10700, help="BPE vocabulary trained on the sampled texts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--all", action="store_true", help="also TRL's default and group_by_length batching")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data}: not found (the bench needs the paper's teacher data; pass --data)")
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("TRL is not installed: pip install -e '.[trl]'")
    from rich.console import Console
    from rich.table import Table

    out = Console(width=160, highlight=False)
    work = Path(tempfile.mkdtemp(prefix="negkd-peer-"))
    build(work, args)
    parity = run_row(work, "parity")
    out.print(f"loss parity on one batch (identical ids/labels: {parity['same_ids_and_labels']}): negkd "
              f"{parity['negkd_loss']:.6f} vs TRL {parity['trl_loss']:.6f} (|diff| {parity['abs_diff']:.2e})")
    rows = ["negkd", "negkd-budget", "trl-exact"] + (["trl-default", "trl-group"] if args.all else [])
    res: dict[str, list[dict]] = {r: [] for r in rows}
    for k in range(args.rounds):
        for r in (rows if k % 2 == 0 else rows[::-1]):
            res[r].append(run_row(work, r))
            x = res[r][-1]
            out.print(f"round {k + 1} {r}: {x['target'] / x['seconds']:.0f} target tok/s, "
                      f"peak RSS {x['peak_rss_gib']:.2f} GiB")

    def med(r, f):
        return statistics.median(f(x) for x in res[r])

    tps = {r: med(r, lambda x: x["target"] / x["seconds"]) for r in rows}
    rss = {r: med(r, lambda x: x["peak_rss_gib"]) for r in rows}
    base = res["negkd"][0]["losses"]
    label = {"negkd": "negkd train-pos --no-neg", "negkd-budget": f"negkd --max-batch-tokens {args.max_batch_tokens}",
             "trl-exact": "TRL fed negkd's exact batches", "trl-default": "TRL default padding",
             "trl-group": "TRL group_by_length"}
    tab = Table(title=f"{args.n} GPT-3.5 rationales, random LLaMA (hidden 512, 8 layers), LoRA r=8 q,v, batch "
                      f"{args.batch_size}, max length {args.max_length}, {args.steps} steps, fp32, {args.threads} "
                      f"threads, {args.rounds} round(s), medians")
    for c in ("row", "target tok/s", "padding", "passes", "largest pass", "peak RSS", "negkd ÷ row (tok/s / RSS)",
              "max |Δloss| vs negkd"):
        tab.add_column(c, justify="left" if c == "row" else "right")
    for r in rows:
        x = res[r][0]
        pad = 1 - x["real"] / x["positions"]
        dl = max(abs(a - b) for a, b in zip(base, x["losses"])) if x["losses"] else float("nan")
        tab.add_row(label[r], f"{tps[r]:.0f}", f"{100 * pad:.1f}%", str(x["passes"]),
                    f"{x['max_positions']:,} tok", f"{rss[r]:.2f} GiB",
                    "-" if r == "negkd" else f"{tps['negkd'] / tps[r]:.2f}x / {rss['negkd'] / rss[r]:.2f}x",
                    "-" if r == "negkd" else f"{dl:.4f}")
    out.print(tab)
    out.print(f"negkd ÷ TRL on identical batches: {tps['negkd'] / tps['trl-exact']:.2f}x tokens/s (target >= 1.1x); "
              f"budget: peak RSS {rss['negkd-budget'] / rss['negkd']:.2f}x (target <= 0.6x) at "
              f"{tps['negkd-budget'] / tps['negkd']:.2f}x throughput (target >= 0.95x)")
    if args.json:
        args.json.write_text(json.dumps({"parity": parity, "rows": res, "tokens_per_s": tps, "peak_rss_gib": rss,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1) + "\n")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
