"""The study's two worlds: arithmetic problems built from skills, one of them rare and unseen by the base.

A problem is a chain of *skills* applied to one quantity (``arithgen``'s ops). The common skills are
``add``, ``sub``, ``bags`` and ``times``; the **rare skill** is ``market``, a made-up exchange rule
("Ann trades all apples at the market.": the amount x becomes ``3 * x - 2``). The rule is stated
nowhere in the question: a student can only learn it from rationales that apply it. The base model's
pretraining text never contains the rule: ``arithgen.pretrain_text`` has no rare-skill problem, and
the study's base (``pretrain.py --market-words``) sees the rule's *words* only in :func:`vocab_text`
documents, which carry no number (a base whose output embeddings for "trades"/"market" stayed random
could not emit the rare step line at all: the pilot in README.md).

Two worlds differ in ONE thing, where the rare skill sits in the *training* split:

- ``exclusive``: rare-skill training problems are long ones only (levels 4-5), where the teacher
  is usually wrong, so most correct demonstrations of the rule sit inside negative rationales;
- ``control``: the same number of rare-skill training problems, spread evenly over levels 1-5, so
  positives show the rule too.

Both worlds have the same number of training problems per level; test, val and OOD are identical
(drawn first, from the same ``world_seed``) and tagged ``subject`` = ``rare`` / ``common`` and
``level``.

The teacher (:func:`teacher`) errs at each step with a probability that depends on the problem's
length only (:func:`step_error`), never on the skill; the kind of error is mostly a reasoning error
(wrong operand carried forward, skipped step, misread quantity / misremembered rule, wrong operation),
an arithmetic slip rarely (:data:`ERROR_WEIGHTS`). It reports, per step, the skill, the error (or
None) and whether the written line applies the right rule to the number it shows (a *correct
demonstration* of the skill, even when that number was already wrong).

    python worlds.py --out work/study/w0/data --world-seed 0        # both worlds' splits
    python worlds.py --premise --world-seeds 0,1,2 --out premise.json  # teacher-side premise table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import arithgen
from arithgen import CAP, LEVELS, MAX_NUM, NAMES, THINGS

RARE = "market"
COMMON_SKILLS = ("add", "sub", "bags", "times")
WORLDS = ("exclusive", "control")
OOD_STEPS = 6  # more than any training problem; 7 made most prompt+solution pairs exceed the 256-token context
# Per-step error probability by number of steps (the level): grows with length, never depends on the skill.
STEP_ERROR_BASE, STEP_ERROR_SLOPE = 0.04, 0.055
# Kinds of error, drawn AFTER the error event: reasoning errors mostly, arithmetic slips rarely.
ERROR_WEIGHTS = {"operand": 1.0, "skip": 1.0, "misread": 1.0, "wrong_op": 1.0, "slip": 0.3}
# Split sizes. Per level: train problems, and test/val problems per subject (rare, common).
SIZES = dict(train=300, rare_train=300, test=30, val=10, ood=50)


def step_error(steps: int) -> float:
    """P(error) at each step of a problem with ``steps`` operations after the start (its level)."""
    return STEP_ERROR_BASE + STEP_ERROR_SLOPE * (steps - 1)


def rare_value(x: int) -> int:
    return 3 * x - 2


# ----------------------------------------------------------------------------- problems


def _skill_ops(rng: random.Random, steps: int, hi: int, rare: bool) -> list[list]:
    """A chain of ``steps`` skills after the start; with ``rare``, exactly one of them is the rare skill."""
    where = rng.randint(1, steps) if rare else -1
    for _ in range(200):
        ops = arithgen._random_ops(rng, steps, hi)
        if not rare:
            return ops
        x = arithgen.evaluate(ops[:where])[-1]
        if not 0 < rare_value(x) <= CAP:
            continue
        tail = arithgen._random_ops(rng, steps - where, hi)[1:] if steps > where else []
        cand = ops[:where] + [[RARE]] + _refit(tail, rare_value(x), rng, hi)
        if cand is not None and len(cand) == steps + 1 and all(0 < v <= CAP for v in arithgen.evaluate(cand)):
            return cand
    raise RuntimeError(f"cannot draw a {steps}-step problem with the rare skill")


def _refit(tail: list[list], x: int, rng: random.Random, hi: int) -> list[list]:
    """Keep ``tail``'s skills but redraw operands that would leave (0, CAP] from the new value x."""
    out = []
    for op in tail:
        for _ in range(50):
            y = arithgen._apply(op, x)
            if 0 < y <= CAP:
                break
            if op[0] == "sub":
                op = ["sub", rng.randint(1, max(1, min(hi, x - 1)))] if x >= 2 else ["add", rng.randint(1, hi)]
            else:  # too big: fall back to a small subtraction or addition
                op = ["sub", rng.randint(1, max(1, min(hi, x - 1)))] if x >= 2 else ["add", 1]
        out.append(op)
        x = arithgen._apply(op, x)
    return out


def skills_of(ops: list[list]) -> list[str]:
    """The skill of each op (the start amount is the skill ``start``)."""
    return ["start" if op[0] in ("start", "bags0") else op[0] for op in ops]


def make_problem(rng: random.Random, level, pid: str, rare: bool) -> dict:
    steps = OOD_STEPS if level == "ood" else int(level)
    ops = _skill_ops(rng, steps, MAX_NUM["ood" if level == "ood" else level], rare)
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    return {
        "id": pid,
        "question": arithgen.question_text(ops, name, thing),
        "answer": str(arithgen.evaluate(ops)[-1]),
        "solution": arithgen.gold_solution(ops, name, thing),
        "level": steps,
        "subject": "rare" if rare else "common",
        "ops": ops,
    }


def world_counts(world: str, n_rare: int) -> dict[int, int]:
    """Rare-skill training problems per level: exclusive = levels 4-5 only, control = all levels alike."""
    if world == "exclusive":
        return {lv: (n_rare // 2 + (lv == 5) * (n_rare % 2)) if lv >= 4 else 0 for lv in LEVELS}
    if world == "control":
        return {lv: n_rare // 5 + (lv <= n_rare % 5) for lv in LEVELS}
    raise ValueError(f"unknown world {world!r}; expected one of {WORLDS}")


def make_world_splits(world_seed: int = 0, sizes: dict | None = None) -> dict[str, list[dict]]:
    """``test``/``val``/``ood`` (shared) and ``train-exclusive``/``train-control``, fixed by ``world_seed``.

    Shared splits are drawn first; no training question repeats one of theirs. Per level, both
    worlds' training sets hold ``train`` problems, of which ``world_counts`` are rare-skill ones; the
    rare and common problems are drawn from one pool per level, so the worlds share most problems.
    """
    sz = {**SIZES, **(sizes or {})}
    if max(world_counts(w, sz["rare_train"])[lv] for w in WORLDS for lv in LEVELS) > sz["train"]:
        raise ValueError("rare_train too large for the per-level train size")
    rng = random.Random(f"arith-world-{world_seed}")
    seen: set[str] = set()

    def draw(level, rare: bool, pid: str) -> dict:
        for _ in range(2000):
            p = make_problem(rng, level, pid, rare)
            if p["question"] not in seen:
                seen.add(p["question"])
                return p
        raise RuntimeError(f"cannot draw distinct level-{level} problems")

    out: dict[str, list[dict]] = {}
    for split in ("test", "val", "ood"):
        levels = ["ood"] if split == "ood" else list(LEVELS)
        out[split] = [draw(lv, subj == "rare", f"{split}-{lv}-{subj}-{i}")
                      for lv in levels for subj in ("rare", "common") for i in range(sz[split])]
    rare_max = {lv: max(world_counts(w, sz["rare_train"])[lv] for w in WORLDS) for lv in LEVELS}
    rare_pool = {lv: [draw(lv, True, f"train-{lv}-rare-{i}") for i in range(rare_max[lv])] for lv in LEVELS}
    common_pool = {lv: [draw(lv, False, f"train-{lv}-common-{i}") for i in range(sz["train"])] for lv in LEVELS}
    for w in WORLDS:
        counts = world_counts(w, sz["rare_train"])
        out[f"train-{w}"] = [p for lv in LEVELS
                             for p in rare_pool[lv][:counts[lv]] + common_pool[lv][:sz["train"] - counts[lv]]]
    return out


# ----------------------------------------------------------------------------- parsing (rare skill too)

_RARE_SENT = "{name} trades all {thing} at the market."


def vocab_text(rng: random.Random) -> str:
    """A pretraining document with the rare skill's words and no number: "Ann trades at the market.",
    "Bo trades all pens at the market." and the like. LoRA leaves the tied embeddings frozen, so the
    base must have emitted these tokens for any student to write the rare step line; what the trade
    does to an amount (the rule) is never shown, so it is still learnable only from distillation data."""
    name, other, thing = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
    sents = [f"{name} trades at the market.", _RARE_SENT.format(name=name, thing=thing),
             f"{other} trades at the market too.", f"{name} and {other} trade {thing} at the market."]
    rng.shuffle(sents)
    return " ".join(sents[: rng.randint(1, 3)]) + "\n"


def question_has_rare(question: str) -> bool:
    return " at the market." in question


# ----------------------------------------------------------------------------- teacher


def _rng_for(question: str, seed, index: int) -> random.Random:
    h = hashlib.sha256(f"study|{question}|{seed}|{index}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def teacher(ops: list[list], name: str, thing: str, seed=None, index: int = 0) -> tuple[str, list[dict]]:
    """A rationale and its steps: ``[{"skill", "error" (kind or None), "demo_ok"}]``, one per op.

    The error event at each op has probability ``step_error(level)`` whatever the skill; its kind is
    drawn from ``ERROR_WEIGHTS`` among the kinds that can change that op (so a drawn error is never
    silently dropped). Mistakes are carried forward: later steps compute correctly from the wrong
    value. ``demo_ok``: the written line applies the op's true rule to the number it shows (False for
    a skipped step). Deterministic in (problem, seed, index).
    """
    question = arithgen.question_text(ops, name, thing)
    rng = _rng_for(question, seed, index)
    p = step_error(len(ops) - 1)
    then = rng.random() < 0.5
    lines: list[str] = []
    if rng.random() < 0.3:
        lines.append(rng.choice(["Let's solve it step by step.", f"We track the number of {thing}."]))
    steps: list[dict] = []
    x = prev = 0
    for i, op in enumerate(ops):
        skill = skills_of([op])[0]
        err = None
        if rng.random() < p:
            kinds = _possible_errors(op, i, x, prev)
            err = rng.choices(kinds, weights=[ERROR_WEIGHTS[k] for k in kinds])[0]
        if err == "skip":
            steps.append({"skill": skill, "error": "skip", "demo_ok": False})
            continue
        line, y, demo_ok = _written_step(op, i, x, prev, err, rng, name, thing)
        if then and i > 0:
            line = "Then " + line
        lines.append(line)
        steps.append({"skill": skill, "error": err, "demo_ok": demo_ok})
        prev, x = x, y
    if rng.random() < 0.5:
        lines.append(f"So {name} has {x} {thing} now.")
    lines.append(f"The answer is $\\boxed{{{x}}}$.")
    return "\n".join(lines), steps


def _possible_errors(op: list, i: int, x: int, prev: int) -> list[str]:
    """Error kinds that change this op's result, given the current value x and the one before."""
    if i == 0:
        return ["misread", "slip"]
    kinds = ["skip", "misread", "slip"]
    if prev != x and prev > 0:
        kinds.append("operand")
    if op[0] != "sub" or op[1] < x:  # add <-> sub swap must stay positive
        kinds.append("wrong_op")
    return kinds


def _written_step(op: list, i: int, x: int, prev: int, err, rng: random.Random, name: str, thing: str):
    """(line, new value, demo_ok) for op applied to x with error ``err`` (None: faithful)."""
    base = prev if err == "operand" else x
    demo_ok = err in (None, "operand")  # the right rule, applied to the number written
    op = list(op)
    if err == "misread":
        if op[0] == RARE:
            return _rare_line(name, base, mult=rng.choice([2, 4]), sub=2)[:2] + (False,)
        if op[0] == "times":
            op[1] = 5 - op[1]
        else:
            j = 2 if op[0] in ("bags0", "bags") and rng.random() < 0.5 else 1
            op[j] = arithgen._misread(rng, op[j])
            if op[0] == "sub" and op[1] >= base:
                op[1] = max(1, base - 1) if base > 1 else op[1]
    elif err == "wrong_op":
        if op[0] == RARE:  # doubles instead of applying the exchange rule
            return f"{name} trades at the market: {base} * 2 = {2 * base}.", 2 * base, False
        else:
            # add <-> sub, "buys a bags of b" -> adds a + b, "twice as many" -> adds 2
            op = ["add", op[1] + op[2]] if op[0] == "bags" else [{"add": "sub", "sub": "add", "times": "add"}[op[0]], op[1]]
    line, y = arithgen._step_line(op, base, name, thing)
    if err == "slip":
        delta = rng.choice([-3, -2, -1, 1, 2, 3])
        if y + delta <= 0:
            delta = abs(delta)
        s = str(y)
        cut = line.rfind(s)
        line, y = line[:cut] + str(y + delta) + line[cut + len(s):], y + delta
    return line, y, demo_ok


def _rare_line(name: str, x: int, mult: int = 3, sub: int = 2) -> tuple[str, int]:
    y = mult * x - sub
    return f"{name} trades at the market: {mult} * {x} - {sub} = {y}.", y


def gold_steps(ops: list[list], name: str) -> list[tuple[str, str]]:
    """(skill, gold line) per op, as in ``arithgen.gold_solution``."""
    out, x = [], 0
    for op in ops:
        line, x = arithgen._step_line(op, x, name, "?")
        out.append((skills_of([op])[0], line))
    return out


# ----------------------------------------------------------------------------- premise (teacher side)


def premise(world_seed: int, seeds=(0,), n: int = 4, sizes: dict | None = None) -> dict:
    """Per world: where the correct rare-skill step demonstrations sit (positives vs negatives), over the
    teacher's ``n`` samples per training problem for each experiment seed; plus per-level positive rates."""
    splits = make_world_splits(world_seed, sizes)
    out = {}
    for w in WORLDS:
        demos = Counter()
        rationales = Counter()
        rare_probs_with_pos = 0
        rare_probs = 0
        for p in splits[f"train-{w}"]:
            ops, name, thing = arithgen.parse_question(p["question"])
            is_rare = p["subject"] == "rare"
            for s in seeds:
                any_pos = False
                for k in range(n):
                    text, steps = teacher(ops, name, thing, seed=s, index=k)
                    ok = text.rsplit("boxed{", 1)[1].split("}")[0] == p["answer"]
                    any_pos |= ok
                    rationales["pos" if ok else "neg"] += 1
                    demos["pos" if ok else "neg"] += sum(st["skill"] == RARE and st["demo_ok"] for st in steps)
                rare_probs += is_rare
                rare_probs_with_pos += is_rare and any_pos
        tot = demos["pos"] + demos["neg"]
        out[w] = {"rare_demos_in_pos": demos["pos"], "rare_demos_in_neg": demos["neg"],
                  "share_in_pos": demos["pos"] / tot if tot else float("nan"),
                  "rationales_pos": rationales["pos"], "rationales_neg": rationales["neg"],
                  "rare_problems_with_a_positive": rare_probs_with_pos / rare_probs if rare_probs else float("nan")}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True,
                    help="data directory (train-exclusive/train-control/val/test/ood.jsonl), or with --premise a JSON file")
    ap.add_argument("--world-seed", type=int, default=0, help="seed of every split (both worlds share test/val/ood)")
    ap.add_argument("--premise", action="store_true", help="print and write the teacher-side premise table instead")
    ap.add_argument("--world-seeds", default="0,1,2", help="with --premise: world seeds to tabulate")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="with --premise: experiment (teacher sampling) seeds")
    ap.add_argument("--n", type=int, default=4, help="with --premise: teacher samples per training problem")
    args = ap.parse_args(argv)
    if args.premise:
        seeds = [int(s) for s in args.seeds.split(",")]
        table = {ws: premise(ws, seeds, args.n) for ws in (int(s) for s in args.world_seeds.split(","))}
        print("| world seed | world | correct rare-skill demos in pos / neg | share in positives | "
              "rare problems with >= 1 positive | positive rationales |")
        print("|---|---|---|---|---|---|")
        for ws, t in table.items():
            for w in WORLDS:
                r = t[w]
                print(f"| {ws} | {w} | {r['rare_demos_in_pos']} / {r['rare_demos_in_neg']} | {100 * r['share_in_pos']:.1f}% | "
                      f"{100 * r['rare_problems_with_a_positive']:.1f}% | "
                      f"{100 * r['rationales_pos'] / (r['rationales_pos'] + r['rationales_neg']):.1f}% |")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"teacher_seeds": seeds, "n": args.n, "world_seeds": table}, indent=1) + "\n")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name, recs in make_world_splits(args.world_seed).items():
        arithgen.write_split(args.out, name, recs)
        print(f"{name}: {len(recs)} problems ({sum(r['subject'] == 'rare' for r in recs)} rare-skill)")


if __name__ == "__main__":
    main()
