"""Diagnose the pretrained base in its own (pretraining) format, before any LoRA.

Feeds each sampled test problem's statement (no question, no ``Problem:`` format) and checks
whether the greedy continuation's equations end in "<name> has <answer> <things>." and whether
its first equation copies the first numbers of the statement. A base that cannot copy numbers
from the statement gives LoRA students that invent numbers (notes/arith-scale.md).

    python probe_base.py --base work/base --data work/data --n 60     # writes BASE/probe.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n", type=int, default=60, help="test problems (every k-th, all levels)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base).eval()
    rows = [json.loads(l) for l in (args.data / "test.jsonl").open()]
    rows = rows[:: max(1, len(rows) // args.n)][: args.n]
    final = first_copy = 0
    for p in rows:
        stmt = p["question"].rsplit(" How many", 1)[0] + "\n"
        ids = tok(stmt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=120, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
        name = p["question"].split()[0]
        final += bool(re.search(rf"\b{name} has {p['answer']} ", text))
        nums = re.findall(r"\d+", stmt)
        eq = re.match(r"\s*(\d+) [-+*] (\d+)", text)
        first_copy += bool(eq and eq.group(1) in nums and eq.group(2) in nums)
    res = {"problems": len(rows), "final_answer_right": final, "first_equation_copies_statement_numbers": first_copy}
    (args.base / "probe.json").write_text(json.dumps(res, indent=1) + "\n")
    print(res)


if __name__ == "__main__":
    main()
