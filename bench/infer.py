"""Benchmark: negkd's batched hf generation vs a naive one-candidate-at-a-time loop, and ranker throughput.

Runs side by side in one process on the same model, prompts and sampling settings:

- naive:  for each problem, for each candidate: ``model.generate(one prompt)`` (batch 1)
- negkd:  ``negkd.generation.generate`` (left-padded batches of ``--batch-size`` sequences,
          ``num_return_sequences``), the hf backend of ``negkd infer``
- infer:  the whole ``negkd infer`` command (generation + answer extraction + votes + writing)
- ranker: ``negkd.ranker`` scoring throughput (rationales/s) at batch 1 and ``--ranker-batch-size``

Every candidate runs to ``--max-new-tokens`` (EOS suppressed) so both sides generate exactly
the same number of tokens. Usage (CPU, tiny model built on the fly)::

    python bench/infer.py                       # 32 problems x 16 candidates, 32 new tokens
    python bench/infer.py --model DIR --device cuda --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NEGKD_PLAIN_PROGRESS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: a tiny random LLaMA built in a temp dir)")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (negkd)")
    ap.add_argument("--ranker-batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--naive-problems", type=int, default=None,
                    help="problems for the naive loop (default: all; fewer to save time, rates are per candidate)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args()

    import torch

    from negkd.generation import generate
    from negkd.modeling import load_model, load_tokenizer
    from negkd.prompts import DEFAULT_TEMPLATE, render

    tmp = Path(tempfile.mkdtemp(prefix="negkd-bench-"))
    model_dir = a.model
    if model_dir is None:
        from negkd.tiny import build_tiny_model

        model_dir = str(build_tiny_model(tmp / "tiny"))
    model = load_model(model_dir, device=a.device, dtype="float32")
    tok = load_tokenizer(model_dir)
    # no EOS: every candidate is exactly max_new_tokens long on both sides
    model.generation_config.suppress_tokens = [tok.eos_token_id]
    problems = [{"id": f"b{i}", "question": f"Ann has {i} apples and gets {i + 3} more. How many apples now?",
                 "answer": str(2 * i + 3)} for i in range(a.problems)]
    prompts = [render(DEFAULT_TEMPLATE, p) for p in problems]
    n_cand = a.problems * a.n
    threads = torch.get_num_threads()
    print(f"model {model_dir} on {a.device} ({threads} threads); {a.problems} problems x {a.n} candidates, "
          f"{a.max_new_tokens} new tokens each", flush=True)

    # warm-up (first calls pay one-off costs)
    generate(model, tok, prompts[:2], n=2, temperature=1.0, max_new_tokens=4, batch_size=4)

    # ---- negkd batched
    t0 = time.perf_counter()
    out = generate(model, tok, prompts, n=a.n, temperature=0.7, top_p=1.0, max_new_tokens=a.max_new_tokens,
                   batch_size=a.batch_size, seed=0)
    t_batched = time.perf_counter() - t0
    assert sum(len(g) for g in out) == n_cand
    tok_batched = sum(x.n_tokens for g in out for x in g)

    # ---- naive: one candidate per generate call
    n_naive = a.naive_problems or a.problems
    t0 = time.perf_counter()
    tok_naive = 0
    torch.manual_seed(0)
    with torch.inference_mode():
        for p in prompts[:n_naive]:
            enc = tok(p, return_tensors="pt").to(model.device)
            for _ in range(a.n):
                ids = model.generate(**enc, do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
                                     max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id)
                new = ids[0, enc["input_ids"].shape[1]:]
                tok.decode(new, skip_special_tokens=True)
                tok_naive += new.numel()
    t_naive = time.perf_counter() - t0
    naive_cands = n_naive * a.n

    # ---- the whole infer command
    from negkd.steps import infer as infer_step

    pfile = tmp / "problems.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in problems))
    t0 = time.perf_counter()
    infer_step.command(problems=pfile, output=tmp / "pred", model=model_dir, n=a.n, temperature=0.7, top_p=1.0,
                       max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, device=a.device, dtype="float32",
                       **_defaults(infer_step.command, skip={"problems", "output", "model", "n", "temperature",
                                                             "top_p", "max_new_tokens", "batch_size", "device",
                                                             "dtype"}))
    t_infer = time.perf_counter() - t0  # includes loading the model again
    man = json.loads((tmp / "pred" / "manifest.json").read_text())

    # ---- ranker scoring
    from negkd import ranker as R

    rk_model, kind = R.build(model_dir, lora=dict(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                             head_dim=64, device=a.device, dtype="float32")
    cfg = dict(template=DEFAULT_TEMPLATE, max_length=512, chat_template=False)
    scorer = R.Ranker(rk_model, tok, cfg, torch.device(a.device))
    qs = [p["question"] for p, g in zip(problems, out) for _ in g]
    rs = [x.text for g in out for x in g]
    scorer.score(qs[:8], rs[:8])  # warm-up
    t0 = time.perf_counter()
    scorer.score(qs, rs, batch_size=a.ranker_batch_size)
    t_rank = time.perf_counter() - t0
    m1 = min(len(rs), 64)
    t0 = time.perf_counter()
    scorer.score(qs[:m1], rs[:m1], batch_size=1)
    t_rank1 = time.perf_counter() - t0

    res = {
        "device": a.device, "threads": threads, "problems": a.problems, "n": a.n, "max_new_tokens": a.max_new_tokens,
        "batch_size": a.batch_size,
        "naive": {"candidates": naive_cands, "seconds": round(t_naive, 2),
                  "candidates_per_s": round(naive_cands / t_naive, 2), "tokens_per_s": round(tok_naive / t_naive, 1)},
        "negkd_generate": {"candidates": n_cand, "seconds": round(t_batched, 2),
                           "candidates_per_s": round(n_cand / t_batched, 2),
                           "tokens_per_s": round(tok_batched / t_batched, 1)},
        "negkd_infer_command": {"candidates": n_cand, "seconds_total": round(t_infer, 2),
                                "candidates_per_s_generation": man.get("candidates_per_s"),
                                "tokens_per_s_generation": man.get("tokens_per_s")},
        "ranker": {"rationales": len(rs), "batch_size": a.ranker_batch_size,
                   "rationales_per_s": round(len(rs) / t_rank, 1),
                   "rationales_per_s_batch1": round(m1 / t_rank1, 1)},
    }
    speedup = res["negkd_generate"]["candidates_per_s"] / res["naive"]["candidates_per_s"]
    res["speedup_vs_naive"] = round(speedup, 2)

    print()
    print(f"{'':32s}{'candidates/s':>14s}{'tokens/s':>12s}{'seconds':>10s}")
    print(f"{'naive loop (1 per generate)':32s}{res['naive']['candidates_per_s']:>14.2f}"
          f"{res['naive']['tokens_per_s']:>12.1f}{res['naive']['seconds']:>10.2f}  ({naive_cands} candidates)")
    print(f"{'negkd.generation (batched)':32s}{res['negkd_generate']['candidates_per_s']:>14.2f}"
          f"{res['negkd_generate']['tokens_per_s']:>12.1f}{res['negkd_generate']['seconds']:>10.2f}  ({n_cand} candidates)")
    print(f"{'negkd infer (whole command)':32s}{man.get('candidates_per_s') or 0:>14.2f}"
          f"{man.get('tokens_per_s') or 0:>12.1f}{t_infer:>10.2f}  (rates: generation time; seconds: total incl. load)")
    print(f"speedup, batched vs naive: {speedup:.1f}x (target >= 5x)")
    print(f"ranker scoring: {res['ranker']['rationales_per_s']:.1f} rationales/s at batch {a.ranker_batch_size}, "
          f"{res['ranker']['rationales_per_s_batch1']:.1f} at batch 1")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    sys.exit(0 if speedup >= 5 else 1)


def _defaults(fn, skip: set[str]) -> dict:
    """The default value of every parameter of a Typer command (Annotated defaults)."""
    import inspect

    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in skip:
            continue
        if p.default is inspect.Parameter.empty:
            raise SystemExit(f"bench: {fn.__module__}.command needs {name}")
        out[name] = p.default
    return out


if __name__ == "__main__":
    main()
