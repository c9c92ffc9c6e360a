"""Pretrain the small base model on unlabelled arithmetic text, once (a rerun reuses it).

A random LLaMA (hidden 128, 4 layers, 4 heads, MLP 344, context 256, tied embeddings: ~0.82M
parameters) and a byte-level BPE tokenizer with digits split into single tokens
(``negkd.tiny.build_tokenizer``) are trained with a plain torch loop on documents of the form
"<problem statement>\\n<its own equations>. <name> has <x> <things>." (``arithgen.pretrain_text``):
no ``Problem:``/``Solution:`` format and no ``\\boxed{}``, so the fine-tuning format is learnt by
LoRA, not here. No test/val/OOD question appears in the corpus.

    python pretrain.py --splits work/data --out work/base --steps 2000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arithgen  # noqa: E402

# bump when arithgen.pretrain_text changes, so a cached base is rebuilt
CORPUS_VERSION = 3
CONFIG = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=256)


def document(rng: random.Random, avoid: set[str] = frozenset(), market_words: float = 0.0) -> str:
    """One pretraining document: ``arithgen.pretrain_text``, or with probability ``market_words`` a
    number-free sentence with the study's rare-skill words (``worlds.vocab_text``; never the rule)."""
    if market_words and rng.random() < market_words:
        import worlds

        return worlds.vocab_text(rng)
    return arithgen.pretrain_text(rng, avoid)


def tokenizer_corpus(splits: dict[str, list[dict]], n_docs: int = 3000, market_words: float = 0.0) -> list[str]:
    """Text the BPE merges are learnt from: pretraining documents plus the fine-tuning format's
    fixed words (vocabulary only; no model is trained on it here). Problems with the study's rare
    skill (worlds.py) are left out, so the rule's lines get no merges of their own (its words do when
    ``market_words`` puts them in the pretraining documents)."""
    rng = random.Random(7)
    docs = [document(rng, market_words=market_words) for _ in range(n_docs)]
    common = [p for p in splits["train"] if "market" not in p["question"]]
    docs += [f"Problem:\n{p['question']}\nSolution:\n{p['solution']}" for p in common[:500]]
    return docs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splits", type=Path, required=True, help="directory with train/val/test/ood.jsonl (from arithgen.py)")
    ap.add_argument("--out", type=Path, required=True, help="model directory to write (skipped if it is complete)")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps (batch 8 x 256 tokens; run.py uses the same)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--market-words", type=float, default=0.0,
                    help="share of documents that are number-free sentences with the worlds study's rare-skill "
                         "words (worlds.vocab_text; the rule itself is never shown). 0 for the v1 reproduction")
    args = ap.parse_args(argv)

    stamp = {"config": CONFIG, "corpus": CORPUS_VERSION, "steps": args.steps, "lr": args.lr, "seed": args.seed, "batch": [8, 256]}
    if args.market_words:  # only then, so the v1 reproduction's cached base stays valid
        stamp["market_words"] = args.market_words
    done = args.out / "pretrain.json"
    if done.is_file() and json.loads(done.read_text()).get("stamp") == stamp:
        print(f"pretrained base model up to date in {args.out}; reusing it")
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from negkd.tiny import build_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    splits = {s: [json.loads(l) for l in (args.splits / f"{s}.jsonl").open()] for s in ("train", "val", "test", "ood")}
    avoid = {p["question"] for s in ("val", "test", "ood") for p in splits[s]}
    tok = build_tokenizer(tokenizer_corpus(splits, market_words=args.market_words), vocab_size=400)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **CONFIG)
    model = LlamaForCausalLM(cfg)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"base model: {nparam / 1e6:.2f}M parameters, vocab {len(tok)}", flush=True)

    B, T = 8, 256
    buf: list[int] = []

    def batch():
        nonlocal buf
        while len(buf) < B * T:
            text = document(rng, avoid, args.market_words)
            buf += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        x = torch.tensor(buf[: B * T]).view(B, T)
        buf = buf[B * T:]
        return x

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    model.train()
    t0 = time.time()
    losses = []
    for step in range(1, args.steps + 1):
        x = batch()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            el = time.time() - t0
            print(f"pretrain step {step}/{args.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                  f"{step * B * T / el:.0f} tok/s {el:.0f}s", flush=True)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    info = {"stamp": stamp, "parameters": nparam, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "tokens": args.steps * B * T, "seconds": round(time.time() - t0, 1)}
    tmp = args.out / "pretrain.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(done)  # written last: its presence means the model is complete
    print(f"saved base model to {args.out} ({info['seconds']}s)")


if __name__ == "__main__":
    main()
