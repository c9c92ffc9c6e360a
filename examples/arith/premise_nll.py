"""The premise check's model side: how well each student already predicts CORRECT rare-skill steps.

For every rare-skill problem in ``--problems`` (its gold solution), the mean negative log-likelihood
per token of the gold rare-skill line ("Ann trades at the market: 3 * 14 - 2 = 40."), given the
prompt (negkd's default template) and the gold lines before it, under each ``--student NAME=DIR``
(a PEFT adapter from train-neg / train-pos --no-neg / calibrate, or a NAT checkpoint). If the
negatives carry the rare skill and the positives do not, the neg-only student assigns these steps a
lower NLL than the CoT-KD student.

    python premise_nll.py --base work/base --problems val.jsonl --student cotkd=RUN/cotkd \\
        --student neg=RUN/neg --out premise_nll.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worlds  # noqa: E402


def rare_step_spans(problem: dict) -> tuple[str, str] | None:
    """(completion text before the rare-skill line, the rare-skill line), or None without one."""
    lines = problem["solution"].split("\n")
    for i, line in enumerate(lines):
        if " at the market: " in line:
            return "".join(ln + "\n" for ln in lines[:i]), line
    return None


def nll_rare_steps(model, tokenizer, problems: list[dict], template: str) -> dict:
    """Mean NLL per token (nats) of the rare-skill lines, pooled over problems; (prompt + prefix) is
    tokenized as negkd's training does (prompt with special tokens, completion without)."""
    import torch

    from negkd.prompts import build_prompt

    total, count, per_problem = 0.0, 0, []
    for p in problems:
        span = rare_step_spans(p)
        if span is None:
            continue
        prefix, line = span
        ids_p = tokenizer(build_prompt(p, template), add_special_tokens=True)["input_ids"]
        ids_pre = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        ids_line = tokenizer(line, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids_p + ids_pre + ids_line])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        start = len(ids_p) + len(ids_pre)
        logp = torch.log_softmax(logits[start - 1:-1], dim=-1)  # predicts tokens start..end
        target = ids[0, start:]
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        total += float(nll.sum())
        count += len(target)
        per_problem.append(float(nll.mean()))
    return {"nll_per_token": total / count if count else math.nan, "tokens": count, "problems": len(per_problem)}


def load_student(base: str, student: Path):
    from negkd.generation import model_kind
    from negkd.modeling import load_model, load_tokenizer

    if model_kind(str(student)) == "nat":
        from negkd import nat

        model, tok, _ = nat.load(student, device="cpu", dtype="float32", base_model=base)
        return model.eval(), tok
    from peft import PeftModel

    model = load_model(base, device="cpu", dtype="float32")
    model = PeftModel.from_pretrained(model, str(student)).eval()
    return model, load_tokenizer(base)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the base model directory the students were trained on")
    ap.add_argument("--problems", type=Path, required=True, help="problems JSONL (rare-skill ones are scored)")
    ap.add_argument("--student", action="append", required=True, help="NAME=DIR (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    import torch

    from negkd.prompts import DEFAULT_TEMPLATE

    torch.set_num_threads(1)
    problems = [json.loads(l) for l in args.problems.open() if l.strip()]
    problems = [p for p in problems if worlds.question_has_rare(p["question"])]
    res = {}
    for spec in args.student:
        name, _, d = spec.partition("=")
        if not d:
            sys.exit(f"--student {spec!r}: expected NAME=DIR")
        model, tok = load_student(args.base, Path(d))
        res[name] = {"dir": d, **nll_rare_steps(model, tok, problems, DEFAULT_TEMPLATE)}
        print(f"{name}: NLL of correct rare-skill steps {res[name]['nll_per_token']:.3f} nats/token "
              f"over {res[name]['problems']} problems", flush=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
