"""Accuracy of prediction records: the one implementation behind ``negkd eval`` and ``negkd compare``.

Per record (a prediction: a problem + ``candidates`` + optional ``votes``), ``score`` gives a row
of metrics, each in [0, 1]:

- ``greedy`` (or ``first`` when ``decoding`` is ``sampled``): is the first candidate correct;
- ``maj@N``: is the majority answer over all N candidates correct (answers grouped by
  mathematical equivalence; a tie goes to the group that occurred first: ``negkd.voting.winner``,
  the same rule ``negkd infer`` uses for its ``votes``);
- ``pass@k`` (unbiased estimator, ``pass_at_k``) and ``pass@N`` (any candidate correct);
- ``sc@N``, ``asc@N[w]``: is the answer infer's voting rule chose correct (records with ``votes``).

Grading is ``negkd.grading`` (the same as ``negkd split``). ``grade`` does the expensive part
once for many files (every distinct (answer, gold) pair judged once, in worker processes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from math import comb
from pathlib import Path

from negkd.errors import UserError

SLICES = ("by_subject", "by_level")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k); k > n is read as k = n."""
    k = min(k, n)
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def votes_of(r: dict) -> dict:
    """A record's ``votes`` as {rule: answer or None} ({} when absent)."""
    v = r.get("votes")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise UserError(f"record {r.get('id')!r}: 'votes' must be an object of rule -> answer")
    return {str(key): (None if a is None else str(a)) for key, a in v.items()}


def vote_metric(rule: str) -> str:
    """The metric name of one of infer's voting rules: sc -> sc@N, asc:w -> asc@N[w]."""
    if rule == "sc":
        return "sc@N"
    if rule.startswith("asc:"):
        return f"asc@N[{rule[4:]}]"
    return f"vote[{rule}]"


def subject_of(rec: dict) -> str:
    return str(rec.get("subject") or rec.get("type") or "-")


def level_of(rec: dict) -> str:
    return str(rec.get("level", "-"))


def candidate_preds(r: dict) -> list[str | None]:
    """Every candidate's answer: the stored pred; re-extracted only where a rationale has none."""
    from negkd.grading import extract_answer

    preds = [c["pred"] if c.get("pred") is not None or not isinstance(c.get("rationale"), str)
             else extract_answer(c["rationale"]) for c in r["candidates"]]
    return [None if p is None else str(p) for p in preds]


class Graded:
    """Grading state shared by many records: verdicts of (answer, gold) pairs and equivalence groups."""

    def __init__(self, records: Sequence[dict], workers: int | None = None):
        from negkd.grading import judge_many
        from negkd.voting import BatchEquiv

        self.preds = [candidate_preds(r) for r in records]
        pairs = {(p, r["answer"]) for r, ps in zip(records, self.preds) for p in ps if p is not None}
        pairs |= {(v, r["answer"]) for r in records for v in votes_of(r).values() if v is not None}
        pairs = sorted(pairs)
        self.stats: dict = {}
        self.verdict = dict(zip(pairs, judge_many(pairs, workers, stats=self.stats)))
        self.equiv = BatchEquiv(workers)
        self.groups = self.equiv.group_all(self.preds)
        self.equiv.settle((a, v["sc"]) for r in records if (v := votes_of(r)).get("sc") is not None
                          for rule, a in v.items() if rule.startswith("asc:") and a is not None)

    def ok(self, ans: str | None, gold: str) -> bool:
        return ans is not None and self.verdict[(ans, gold)]


def score(r: dict, preds: list, groups: list[list[int]], ks: Sequence[int], ok: Callable, equiv: Callable) -> dict:
    """One record's metrics row (see the module docstring), plus ``n``, ``unparseable`` and, with
    infer's votes, ``overturns`` {asc rule: right | wrong | neither | None (agrees with sc)}."""
    from negkd.voting import winner

    gold = r["answer"]
    n = len(preds)
    correct = [ok(p, gold) for p in preds]
    c = sum(correct)
    # the first candidate is "greedy" unless infer says it was sampled (then it is called "first")
    first = "first" if r.get("decoding") == "sampled" else "greedy"
    out = {first: float(correct[0]), "n": n, "unparseable": sum(p is None for p in preds)}
    # majority vote over equivalence groups, with negkd's one tie rule (the first group wins)
    w = winner([len(g) for g in groups])
    out["maj@N"] = 0.0 if w is None else float(correct[groups[w][0]])
    for k in ks:
        out[f"pass@{k}"] = pass_at_k(n, c, k)
    out["pass@N"] = float(c > 0)
    votes = votes_of(r)
    for rule, ans in votes.items():
        out[vote_metric(rule)] = float(ok(ans, gold))
    if "sc" in votes:
        sc = votes["sc"]
        for rule, ans in votes.items():
            if not rule.startswith("asc:"):
                continue
            same = (ans is None and sc is None) or (ans is not None and sc is not None and (ans == sc or equiv(ans, sc)))
            if not same:
                a_ok, s_ok = ok(ans, gold), ok(sc, gold)
                out.setdefault("overturns", {})[rule] = "right" if a_ok and not s_ok else "wrong" if s_ok and not a_ok else "neither"
            else:
                out.setdefault("overturns", {})[rule] = None
    return out


def score_files(files: Sequence[Sequence[dict]], ks: Sequence[int], workers: int | None = None) -> tuple[list[list[dict]], dict]:
    """Metric rows for every record of every file (graded together), and grading statistics."""
    recs_all = [r for recs in files for r in recs]
    g = Graded(recs_all, workers)
    rows, i = [], 0
    for recs in files:
        part = []
        for r in recs:
            part.append(score(r, g.preds[i], g.groups[i], ks, g.ok, g.equiv))
            i += 1
        rows.append(part)
    stats = {**g.stats, "records": len(recs_all)}
    return rows, stats


def metric_names(rows: Sequence[dict]) -> list[str]:
    """The metric keys of rows, in first-seen order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in ("n", "unparseable", "overturns")]
    return keys


def mean_rows(rows: Sequence[dict]) -> dict:
    out: dict = {"records": len(rows)}
    for key in metric_names(rows):
        vals = [r[key] for r in rows if key in r]
        out[key] = round(sum(vals) / len(vals), 6) if vals else None
        if len(vals) != len(rows):
            out[f"{key}:records"] = len(vals)
    return out


def aggregate(path: Path, recs: Sequence[dict], rows: Sequence[dict]) -> dict:
    """One file's metrics: overall, per subject and level, and the ASC overturn counts."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    by_level: dict[str, list[dict]] = defaultdict(list)
    for rec, row in zip(recs, rows):
        by_subject[subject_of(rec)].append(row)
        by_level[level_of(rec)].append(row)
    overturns: dict[str, dict] = {}
    for row in rows:
        for rule, what in row.get("overturns", {}).items():
            o = overturns.setdefault(rule, {"records": 0, "overturned": 0, "right": 0, "wrong": 0, "neither": 0})
            o["records"] += 1
            if what is not None:
                o["overturned"] += 1
                o[what] += 1
    ns = [row["n"] for row in rows]
    return {
        "path": str(path),
        "candidates": {"min": min(ns), "max": max(ns)},
        "unparseable_candidates": sum(row["unparseable"] for row in rows),
        "overall": mean_rows(rows),
        "by_subject": {k: mean_rows(v) for k, v in sorted(by_subject.items())},
        "by_level": {k: mean_rows(v) for k, v in sorted(by_level.items())},
        "asc_overturns": overturns,
    }


def labels(paths: Sequence[Path]) -> list[str]:
    """Short unique names for prediction files: the infer directory's name, or the file stem."""
    out: list[str] = []
    for p in paths:
        p = Path(p)
        name = p.parent.name if p.name.startswith("predictions.jsonl") else p.name.split(".")[0]
        name = name or str(p)
        base, n = name, 2
        while name in out:
            name, n = f"{base}#{n}", n + 1
        out.append(name)
    return out
