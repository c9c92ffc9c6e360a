"""Multi-step arithmetic word problems, their gold rationales, and a noisy synthetic teacher.

A problem is a chain of operations on one quantity ("Ann has 5 apples. Ann finds 3 more apples.
...  How many apples does Ann have now?"). The *level* (1..5) is the number of operations after
the starting amount, and sets the size of the numbers; the out-of-distribution split (``ood``)
has ``OOD_STEPS`` operations, more than any training problem.

Everything here is pure Python (no torch) and deterministic given its seeds:

- :func:`make_problem` / :func:`make_splits`: problems in negkd's problem contract (``id``,
  ``question``, ``answer``, ``solution`` ending in ``\\boxed{}``, ``level``, ``subject``), plus the
  structured ``ops`` they were built from.
- :func:`parse_question`: the inverse of the question text (the teacher server uses it to
  recover the problem from whatever prompt ``negkd sample`` sends it).
- :func:`teacher_rationale`: a step-by-step rationale that makes realistic mistakes (arithmetic
  slip, wrong operand carried forward, skipped step, misread quantity, wrong operation) with a
  per-step probability that grows with the level, so wrong rationales are mostly right steps.
- :func:`pretrain_text`: unlabelled "statement followed by its own equations" text for
  pretraining the base model (not the fine-tuning format: no ``Problem:``/``Solution:``, no
  ``\\boxed{}``).

``python arithgen.py --out DIR`` writes ``train/val/test/ood.jsonl`` and ``pretrain.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lea"]
THINGS = ["apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps", "marbles", "beads"]
LEVELS = (1, 2, 3, 4, 5)
OOD_STEPS = 7
MAX_NUM = {1: 9, 2: 9, 3: 15, 4: 20, 5: 25, "ood": 15}  # operand range by level
CAP = 400  # no intermediate value above this (keeps the numbers short)
# Per-step probability that the teacher makes a mistake, by level: P(wrong rationale) is then
# about 1 - (1 - p)^level = 0.12 / 0.26 / 0.41 / 0.55 / 0.67 (~0.40 over uniform levels).
STEP_ERROR = {1: 0.12, 2: 0.14, 3: 0.16, 4: 0.18, 5: 0.20}
ERROR_KINDS = ("slip", "operand", "skip", "misread", "wrong_op")

# ----------------------------------------------------------------------------- problems
# An op is a list: ["start", a] | ["bags0", a, b] | ["add", b] | ["sub", b] | ["bags", a, b] | ["times", k]


def _apply(op: list, x: int) -> int:
    kind = op[0]
    if kind == "start":
        return op[1]
    if kind == "bags0":
        return op[1] * op[2]
    if kind == "add":
        return x + op[1]
    if kind == "sub":
        return x - op[1]
    if kind == "bags":
        return x + op[1] * op[2]
    if kind == "times":
        return x * op[1]
    if kind == "market":  # the study's rare skill (worlds.py): a made-up exchange rule, never in pretraining
        return 3 * x - 2
    raise ValueError(f"unknown op {kind!r}")


def evaluate(ops: list[list]) -> list[int]:
    """The running value after each op."""
    xs, x = [], 0
    for op in ops:
        x = _apply(op, x)
        xs.append(x)
    return xs


def _sentence(op: list, name: str, thing: str) -> str:
    kind = op[0]
    if kind == "start":
        return f"{name} has {op[1]} {thing}."
    if kind == "bags0":
        return f"{name} has {op[1]} bags with {op[2]} {thing} in each."
    if kind == "add":
        return f"{name} finds {op[1]} more {thing}."
    if kind == "sub":
        return f"{name} gives away {op[1]} {thing}."
    if kind == "bags":
        return f"{name} buys {op[1]} bags with {op[2]} {thing} in each."
    if kind == "market":
        return f"{name} trades all {thing} at the market."
    if kind == "times":
        word = {2: "twice", 3: "three times"}[op[1]]
        return f"{name} ends up with {word} as many {thing} as before."
    raise ValueError(kind)


def question_text(ops: list[list], name: str, thing: str) -> str:
    return " ".join(_sentence(op, name, thing) for op in ops) + f" How many {thing} does {name} have now?"


def _random_ops(rng: random.Random, steps: int, hi: int) -> list[list]:
    if rng.random() < 0.3:
        ops = [["bags0", rng.randint(2, 5), rng.randint(2, min(hi, 9))]]
    else:
        ops = [["start", rng.randint(2, hi)]]
    x = _apply(ops[0], 0)
    for _ in range(steps):
        while True:
            kind = rng.choices(["add", "sub", "bags", "times"], weights=[3, 3, 2, 1.5])[0]
            if kind == "add":
                op = ["add", rng.randint(1, hi)]
            elif kind == "sub":
                if x < 2:
                    continue
                op = ["sub", rng.randint(1, min(hi, x - 1))]
            elif kind == "bags":
                op = ["bags", rng.randint(2, 4), rng.randint(2, min(hi, 9))]
            else:
                op = ["times", rng.choice([2, 2, 3])]
            y = _apply(op, x)
            if 0 < y <= CAP:
                break
        ops.append(op)
        x = y
    return ops


def _step_line(op: list, x: int, name: str, thing: str) -> tuple[str, int]:
    """The gold rationale line for one op applied to ``x``, and the new value."""
    kind = op[0]
    y = _apply(op, x)
    if kind == "start":
        return f"{name} starts with {y} {thing}.", y
    if kind == "bags0":
        return f"{name} starts with {op[1]} * {op[2]} = {y} {thing}.", y
    if kind == "add":
        return f"{name} finds {op[1]} more: {x} + {op[1]} = {y}.", y
    if kind == "sub":
        return f"{name} gives away {op[1]}: {x} - {op[1]} = {y}.", y
    if kind == "bags":
        c = op[1] * op[2]
        return f"{name} buys {op[1]} * {op[2]} = {c} more: {x} + {c} = {y}.", y
    if kind == "market":
        return f"{name} trades at the market: 3 * {x} - 2 = {y}.", y
    return f"{name} now has {op[1]} times as many: {x} * {op[1]} = {y}.", y


def gold_solution(ops: list[list], name: str, thing: str) -> str:
    lines, x = [], 0
    for op in ops:
        line, x = _step_line(op, x, name, thing)
        lines.append(line)
    lines.append(f"The answer is $\\boxed{{{x}}}$.")
    return "\n".join(lines)


def make_problem(rng: random.Random, level, pid: str) -> dict:
    steps = OOD_STEPS if level == "ood" else int(level)
    ops = _random_ops(rng, steps, MAX_NUM[level])
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    return {
        "id": pid,
        "question": question_text(ops, name, thing),
        "answer": str(evaluate(ops)[-1]),
        "solution": gold_solution(ops, name, thing),
        "level": OOD_STEPS if level == "ood" else int(level),
        "subject": "ood" if level == "ood" else f"steps{level}",
        "ops": ops,
    }


SPLIT_SIZES = {"train": 400, "val": 30, "test": 60}  # per level; ood is OOD_SIZE problems
OOD_SIZE = 200


def make_splits(seed: int = 1234, sizes: dict | None = None, ood_size: int = OOD_SIZE) -> dict[str, list[dict]]:
    """Disjoint train/val/test splits (``sizes`` per level) and an OOD split, fixed by ``seed``.

    Test, val and OOD are drawn first; train never repeats one of their questions.
    """
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in ("test", "ood", "val", "train"):
        recs = []
        levels = ["ood"] if split == "ood" else list(LEVELS)
        for level in levels:
            n = ood_size if split == "ood" else sizes[split]
            got = tries = 0
            while got < n:
                tries += 1
                if tries > 50 * n:
                    raise RuntimeError(f"cannot draw {n} distinct level-{level} problems")
                p = make_problem(rng, level, f"{split}-{level}-{got}")
                if p["question"] in seen:
                    continue
                seen.add(p["question"])
                recs.append(p)
                got += 1
        out[split] = recs
    return out


# ----------------------------------------------------------------------------- parsing

_PATTERNS = [
    (re.compile(r"^(\w+) has (\d+) bags with (\d+) (\w+) in each\.$"), "bags0"),
    (re.compile(r"^(\w+) has (\d+) (\w+)\.$"), "start"),
    (re.compile(r"^(\w+) finds (\d+) more (\w+)\.$"), "add"),
    (re.compile(r"^(\w+) gives away (\d+) (\w+)\.$"), "sub"),
    (re.compile(r"^(\w+) buys (\d+) bags with (\d+) (\w+) in each\.$"), "bags"),
    (re.compile(r"^(\w+) ends up with (twice|three times) as many (\w+) as before\.$"), "times"),
    (re.compile(r"^(\w+) trades all (\w+) at the market\.$"), "market"),
]
_START = re.compile(r"(\w+) has (?:\d+ bags with \d+ \w+ in each|\d+ \w+)\.")
_QUESTION = re.compile(r"How many (\w+) does (\w+) have now\?")


def parse_question(text: str) -> tuple[list[list], str, str] | None:
    """Recover ``(ops, name, thing)`` from the LAST problem found in ``text`` (a question, or a
    whole prompt that may hold few-shot examples before it). ``None`` if there is none."""
    ends = list(_QUESTION.finditer(text))
    if not ends:
        return None
    end = ends[-1]
    thing, name = end.group(1), end.group(2)
    starts = [m for m in _START.finditer(text, 0, end.start()) if m.group(1) == name]
    if not starts:
        return None
    body = text[starts[-1].start():end.start()].strip()
    sentences = re.findall(r"[^.]*\.", body)
    ops: list[list] = []
    for s in sentences:
        s = s.strip()
        for pat, kind in _PATTERNS:
            m = pat.match(s)
            if m:
                g = m.groups()
                if kind in ("start", "add", "sub"):
                    ops.append([kind, int(g[1])])
                elif kind in ("bags0", "bags"):
                    ops.append([kind, int(g[1]), int(g[2])])
                elif kind == "market":
                    ops.append(["market"])
                else:
                    ops.append(["times", 2 if g[1] == "twice" else 3])
                break
        else:
            return None
    if not ops or ops[0][0] not in ("start", "bags0") or any(o[0] in ("start", "bags0") for o in ops[1:]):
        return None
    return ops, name, thing


# ----------------------------------------------------------------------------- teacher


def _level_of(ops: list[list]) -> int:
    return min(max(len(ops) - 1, 1), 5)


def _rng_for(question: str, seed, index: int) -> random.Random:
    h = hashlib.sha256(f"{question}|{seed}|{index}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def _misread(rng: random.Random, v: int) -> int:
    if v >= 10 and rng.random() < 0.5:
        s = str(v)
        w = int(s[::-1])
        if w != v:
            return w
    return max(1, v + rng.choice([-2, -1, 1, 2]))


def teacher_rationale(ops: list[list], name: str, thing: str, seed=None, index: int = 0,
                      step_error: dict | None = None) -> tuple[str, list[str]]:
    """A teacher rationale for the problem and the list of mistakes it made (empty = faithful).

    Deterministic in (problem, seed, index). Mistakes are carried forward like a real model's:
    every later step computes correctly from the wrong value.
    """
    question = question_text(ops, name, thing)
    rng = _rng_for(question, seed, index)
    p = (step_error or STEP_ERROR)[_level_of(ops)]
    lines: list[str] = []
    if rng.random() < 0.3:
        lines.append(rng.choice(["Let's solve it step by step.", "We track the number of " + thing + "."]))
    then = rng.random() < 0.5  # wording varies between samples like a real teacher's
    errors: list[str] = []
    x, prev = 0, 0
    for i, op in enumerate(ops):
        op = list(op)
        kind = rng.choice(ERROR_KINDS) if (i > 0 and rng.random() < p) else None
        if i == 0 and rng.random() < p / 2:  # the starting amount can be misread too
            kind = "misread"
        if kind == "skip":
            errors.append("skip")
            continue
        base = x
        if kind == "misread":
            j = 2 if op[0] in ("bags0", "bags") and rng.random() < 0.5 else 1
            if op[0] == "times":
                op[1] = 5 - op[1]  # twice <-> three times
            else:
                op[j] = _misread(rng, op[j])
            if op[0] == "sub" and op[1] > x:
                op[1] = max(1, x - 1)
        elif kind == "operand":
            if prev == x:  # nothing different to carry; fall back to a slip
                kind = "slip"
            else:
                base = prev
        elif kind == "wrong_op":
            swap = {"add": "sub", "sub": "add", "bags": "bags*", "times": "add"}
            new = swap.get(op[0])
            if new == "sub" and op[1] > x:
                new = None
            if new is None or op[0] in ("start", "bags0"):
                kind = "slip"
            elif new == "bags*":  # multiplies instead of adding: x * a*b ... keep it small: x + a + b
                c = op[1] + op[2]
                y = x + c
                lines.append(("Then " if then else "") + f"{name} buys {op[1]} + {op[2]} = {c} more: {x} + {c} = {y}.")
                errors.append(kind)
                prev, x = x, y
                continue
            else:
                op = [new, op[1]]
        line, y = _step_line(op, base, name, thing)
        if kind == "slip":
            delta = rng.choice([-3, -2, -1, 1, 2, 3])
            if y + delta < 0:
                delta = -delta
            wrong = y + delta
            line = line[: line.rfind(str(y))] + str(wrong) + line[line.rfind(str(y)) + len(str(y)):]
            y = wrong
        if kind:
            errors.append(kind)
        if then and i > 0:
            line = "Then " + line
        lines.append(line)
        prev, x = x, y
    if rng.random() < 0.5:
        lines.append(f"So {name} has {x} {thing} now.")
    lines.append(f"The answer is $\\boxed{{{x}}}$.")
    return "\n".join(lines), errors


# ----------------------------------------------------------------------------- pretraining text


def pretrain_text(rng: random.Random, avoid: set[str] = frozenset()) -> str:
    """One unlabelled document: a problem statement followed by its own working, either as bare
    equations or as one sentence per step (the phrasing of worked solutions), then the total, and
    in 30% of documents a closing "The answer is $\\boxed{N}$." line. No question sentence and no
    ``Problem:``/``Solution:`` format: that is left for LoRA to learn. Why the worked steps and the
    boxed line are here: LoRA leaves the (tied) embeddings frozen, so a token the base never saw keeps
    its random embedding and the student cannot learn to emit it; with bare equations only, students
    wrote the steps but garbled "The answer is \\boxed{..}" and every one scored 0%. A real base model
    has seen \\boxed{} in LaTeX math text."""
    while True:
        level = rng.choice(LEVELS)
        ops = _random_ops(rng, level, MAX_NUM[level])
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        q = question_text(ops, name, thing)
        if q not in avoid:
            break
    statement = " ".join(_sentence(op, name, thing) for op in ops)
    lines, x = [], 0
    worked = rng.random() < 0.5
    for op in ops:
        y = _apply(op, x)
        if worked:  # worked solutions vary their wording a little ("Then ...", "So ... now.")
            line = _step_line(op, x, name, thing)[0]
            lines.append(("Then " + line) if lines and rng.random() < 0.3 else line)
        elif op[0] == "bags0":
            lines.append(f"{op[1]} * {op[2]} = {y}")
        elif op[0] == "bags":
            c = op[1] * op[2]
            lines.append(f"{op[1]} * {op[2]} = {c}")
            lines.append(f"{x} + {c} = {y}")
        elif op[0] != "start":
            sym = {"add": "+", "sub": "-", "times": "*"}[op[0]]
            lines.append(f"{x} {sym} {op[1]} = {y}")
        x = y
    total = f"So {name} has {x} {thing} now.\n" if worked and rng.random() < 0.3 else f"{name} has {x} {thing}.\n"
    if rng.random() < 0.3:  # boxed final answers occur in math text (a real base has seen \boxed in LaTeX)
        total += f"The answer is $\\boxed{{{x}}}$.\n"
    return statement + "\n" + "".join(e + "\n" for e in lines) + total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for train/val/test/ood.jsonl")
    ap.add_argument("--seed", type=int, default=1234, help="split seed (fixes every split)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(args.seed)
    for name, recs in splits.items():
        write_split(args.out, name, recs)
        print(f"{name}: {len(recs)} problems")


def write_split(out: Path, name: str, recs: list[dict]) -> None:
    """``out/NAME.jsonl``, one problem per line, written atomically (a temporary file, then a rename)."""
    tmp = out / f".{name}.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    tmp.replace(out / f"{name}.jsonl")


if __name__ == "__main__":
    main()
