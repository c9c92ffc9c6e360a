"""Training-loop throughput: negkd's length-grouped dynamic padding vs. the paper's padding scheme,
and the step-time overhead of NAT over a plain LoRA — side by side, one run, tiny model, CPU.

Data: N rationales sampled from the paper's released teacher data (question + rationale,
tokenized with the tiny model's tokenizer, so the lengths follow the real distribution).

- ``negkd``:     ``fit()`` as the training commands run it: length-grouped batches, each padded
                 to its own longest member.
- ``reference``: the paper's code's scheme: random batches, every sequence padded to the
                 longest in the dataset (labels still masked: only the padding scheme differs).

Both go through the same ``fit()`` over the same examples for one epoch (every sequence seen
once), so tokens/s counts real (non-padding) tokens and compares like with like.

    python bench/train.py                       # N=256, batch 8
    python bench/train.py --n 512 --json out.json

Targets (issue 4): negkd >= 3x the reference's tokens/s, < 10% padding.

negkd against TRL's SFTTrainer + PEFT (fed negkd's exact batches, with a loss-parity check) and
negkd with vs without --max-batch-tokens, at 512 real rationales and a hidden-512 LLaMA, each row
in its own process for an honest peak RSS: ``bench/train_peer.py`` (needs ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tdg" / "gpt35_math_train_8.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TDG teacher data (.jsonl.gz)")
    ap.add_argument("--n", type=int, default=256, help="rationales to sample")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=4096, help="truncation (the tiny model is built for 4096)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    ap.add_argument("--gate-dim", type=int, default=128, help="NAT unit width d_g for the overhead figure")
    ap.add_argument("--overhead-batches", type=int, default=12, help="batches for the paired NAT/LoRA timing")
    ap.add_argument("--overhead-only", action="store_true", help="only the paired NAT/LoRA timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from rich.console import Console

    out = Console(width=150, highlight=False)
    from negkd.data import Collator, build_examples, lengths
    from negkd.modeling import load_model, load_tokenizer
    from negkd.prompts import DEFAULT_TEMPLATE
    from negkd.schemas import iter_samples
    from negkd.tiny import build_tiny_model
    from negkd.training import TrainConfig, fit, make_accelerator

    if not args.data.exists():
        sys.exit(f"{args.data}: not found (the bench needs the paper's teacher data; pass --data)")
    rows = [s for _, s in iter_samples(args.data)]
    rows = random.Random(args.seed).sample(rows, min(args.n, len(rows)))

    tmp = Path(tempfile.mkdtemp(prefix="negkd-bench-"))
    model_dir = build_tiny_model(tmp / "tiny", max_positions=args.max_length)
    tok = load_tokenizer(str(model_dir))
    exs, stats = build_examples(rows, tok, DEFAULT_TEMPLATE, max_length=args.max_length)
    lens = lengths(exs)
    lmax = max(lens)
    acc = make_accelerator("cpu")

    def lora_model(targets=("q_proj", "v_proj")):
        from negkd.lora import attach_lora

        torch.manual_seed(0)
        return attach_lora(load_model(str(model_dir), device="cpu", dtype="float32"), 8, 16, 0.05, list(targets))

    def nat_model():
        from peft import LoraConfig, get_peft_model

        from negkd import nat

        torch.manual_seed(0)
        neg = get_peft_model(load_model(str(model_dir), device="cpu", dtype="float32"),
                             LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        neg.save_pretrained(str(tmp / "neg"))
        m = load_model(str(model_dir), device="cpu", dtype="float32")
        nat.attach_new(m, tmp / "neg", gate_dim=args.gate_dim)
        return m

    def run(name, model, group, collate, items=exs, steps=None):
        cfg = TrainConfig(batch_size=args.batch_size, grad_accum=1, epochs=1, max_steps=steps, lr=1e-4, warmup=0,
                          log_every=10 ** 9, save_every=0, group_by_length=group)
        d = tmp / name
        t0 = time.perf_counter()
        res = fit(model, items, config=cfg, out_dir=d, collate_fn=collate, lengths=[len(e["input_ids"]) for e in items],
                  accelerator=acc, desc=name)
        wall = time.perf_counter() - t0
        return {"scheme": name, "steps": res.step, "real_tokens": res.tokens, "positions": res.padded_tokens,
                "padding": res.padding_share, "seconds": wall, "tokens_per_s": res.tokens / wall,
                "step_s": wall / res.step}

    dyn = Collator(tok.pad_token_id)
    to_max = Collator(tok.pad_token_id, pad_to_multiple_of=lmax)  # every batch padded to the dataset's longest
    run("warmup", lora_model(), True, dyn, items=exs[:2 * args.batch_size])  # first-call costs out of the timings

    over = nat_overhead(lora_model(), nat_model(), exs, dyn, args)
    if args.overhead_only:
        print(json.dumps(over))
        return
    ours = run("negkd", lora_model(), True, dyn)
    ref = run("reference", lora_model(), False, to_max)
    ratio = ours["tokens_per_s"] / ref["tokens_per_s"]
    from rich.table import Table

    tab = Table(title=f"fit() throughput, tiny LLaMA (CPU, {args.threads} thread), {len(exs)} MATH rationales "
                      f"(tokens: mean {sum(lens) / len(lens):.0f}, max {lmax}), batch {args.batch_size}")
    for c in ("scheme", "steps", "real tokens", "computed positions", "padding", "seconds", "tokens/s", "s/step"):
        tab.add_column(c, justify="right" if c != "scheme" else "left")
    for r in (ours, ref):
        label = {"negkd": "negkd (length-grouped, dynamic)", "reference": "paper (pad to dataset max)"}[r["scheme"]]
        tab.add_row(label, str(r["steps"]), f"{r['real_tokens']:,}", f"{r['positions']:,}", f"{100 * r['padding']:.1f}%",
                    f"{r['seconds']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.3f}")
    out.print(tab)
    out.print(f"negkd / paper tokens/s: {ratio:.2f}x (target >= 3x); negkd padding {100 * ours['padding']:.1f}% "
              f"(target < 10%), paper padding {100 * ref['padding']:.1f}%")
    out.print(f"NAT step time over plain LoRA (q_proj,v_proj, r=8, d_g={args.gate_dim}; hidden size 96), paired on "
              f"the same {over['batches']} batches: total {100 * over['total']:+.1f}%, median per batch "
              f"{100 * over['median']:+.1f}% (LoRA {over['lora_s']:.1f}s vs NAT {over['nat_s']:.1f}s)")
    out.print(f"truncated rows: {stats.truncated} (max_length {args.max_length})")
    if args.json:
        args.json.write_text(json.dumps({"negkd": ours, "reference": ref, "ratio": ratio,
                                         "nat_overhead": over, "n": len(exs), "threads": args.threads,
                                         "batch_size": args.batch_size}, indent=2) + "\n")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def nat_overhead(lora, natm, exs, collate, args) -> dict:
    """Paired timing: one optimizer step of plain LoRA then of NAT on the same batch, for
    batches spread over an epoch's plan (pairing cancels drift in a shared machine's load)."""
    import statistics

    import torch

    from negkd import nat
    from negkd.training import Plan, lm_loss

    plan = Plan([len(e["input_ids"]) for e in exs], args.batch_size, 1, 1, 0, args.seed)
    steps = [plan.step(i)[1][0] for i in range(plan.steps_per_epoch)]
    k = max(1, len(steps) // args.overhead_batches)
    batches = [collate([exs[i] for i in mb]) for mb in steps[::k][:args.overhead_batches]]
    nat.track_gates(natm, True)  # as train-pos runs it

    def make_step(model):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(b):
            t = time.perf_counter()
            with nat.gate_mask(model, b["attention_mask"]) if nat.nat_layers(model) else _null():
                loss, _ = lm_loss(model, b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            nat.gate_means(model) if nat.nat_layers(model) else None
            return time.perf_counter() - t

        return step

    s_lora, s_nat = make_step(lora), make_step(natm)
    s_lora(batches[-1]), s_nat(batches[-1])  # warm-up
    tl, tn = [], []
    for b in batches:
        tl.append(s_lora(b))
        tn.append(s_nat(b))
    return {"batches": len(batches), "lora_s": sum(tl), "nat_s": sum(tn), "total": sum(tn) / sum(tl) - 1,
            "median": statistics.median(n / l_ for n, l_ in zip(tn, tl)) - 1}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
