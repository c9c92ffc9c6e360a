"""Where `negkd split`'s labels differ from the classic string-only rule, and why.

    .venv/bin/python bench/split_vs_string.py /tmp/split35        # a finished `negkd split` of a TDG file
    .venv/bin/python bench/split_vs_string.py /tmp/split4 --examples 3

The reference counts in ../shared/data/README.md use the Hendrycks rule: the last ``\\boxed{}`` of
the rationale against the last ``\\boxed{}`` of the gold solution, compared after string
normalisation. This script re-labels every graded row of the split with a re-implementation of
that rule (:func:`string_rule`), counts the rows on which the two disagree, sorts them into
causes, and prints a few examples of each so every difference can be checked by eye.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _fix_fracs(s: str) -> str:
    """``\\frac12`` / ``\\frac1{2}`` -> ``\\frac{1}{2}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for p in parts[1:]:
        out += "\\frac"
        if p.startswith("{") or len(p) < 2:
            out += p
            continue
        a, b, rest = p[0], p[1], p[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def normalise(s: str) -> str:
    """The string normalisation of the Hendrycks MATH grader, re-implemented from its description."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    s = re.sub(r"\\text\{\s*[^}]*\}$", "", s) if not s.startswith("\\text") else s  # a trailing unit
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:  # "x = 5" -> "5"
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = re.sub(r"^(\d+)/(\d+)$", r"\\frac{\1}{\2}", s)
    return s


def string_rule(rationale: str, gold_solution: str) -> bool:
    from negkd.grading import last_boxed

    p, g = last_boxed(rationale), last_boxed(gold_solution)
    if p is None or g is None:
        return False
    return normalise(p) == normalise(g)


def cause(row: dict) -> str:
    """A short reason for a disagreement, from the row's own fields."""
    from negkd.grading import last_boxed

    box = last_boxed(row["rationale"])
    if row["correct"]:
        if box is None:
            return "negkd right: answer given as 'The answer is X' / 'Final Answer' (no \\boxed)"
        return "negkd right: same value, different form (equivalence beyond string normalisation)"
    if box is not None and row["pred"] != box:
        return ("string rule positive, negkd negative: several adjacent boxes read as one list answer "
                "(a hedge over answers is not counted correct)")
    return "string rule positive, negkd negative: normalised strings match, the mathematics does not"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("split", type=Path, help="output directory of `negkd split` (pos.jsonl, neg.jsonl)")
    ap.add_argument("--examples", type=int, default=2, help="examples printed per cause")
    args = ap.parse_args()
    rows = []
    for name in ("pos.jsonl", "neg.jsonl"):
        with open(args.split / name, encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh]
    ref = [string_rule(r["rationale"], r.get("solution") or "") for r in rows]
    ours = [r["correct"] for r in rows]
    print(f"{len(rows):,} rationales: negkd {sum(ours):,} positive, string rule {sum(ref):,} positive")
    flips = [(r, o) for r, o, s in zip(rows, ours, ref) if o != s]
    up = sum(o for _, o in flips)
    print(f"disagreements: {len(flips):,} ({up:,} negkd-only positives, {len(flips) - up:,} string-only positives)")
    by = defaultdict(list)
    for r, _ in flips:
        by[cause(r)].append(r)
    for c, rs in sorted(by.items(), key=lambda kv: -len(kv[1])):
        print(f"\n{len(rs):6,}  {c}")
        for r in rs[: args.examples]:
            from negkd.grading import last_boxed

            tail = r["rationale"].strip().replace("\n", " ")[-110:]
            print(f"        {r['id']} k={r['k']}: gold {last_boxed(r.get('solution') or '')!r}, negkd pred "
                  f"{r['pred']!r}, last box {last_boxed(r['rationale'])!r}\n          ...{tail!r}")
    kinds = Counter("unparseable" if r["pred"] is None else "parsed" for r in rows if not r["correct"])
    print(f"\nnegatives: {kinds['parsed']:,} with a wrong answer, {kinds['unparseable']:,} unparseable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
