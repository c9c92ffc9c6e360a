"""negkd eval: accuracy of prediction files (greedy, maj@N, ASC@N, pass@k), side by side."""

from __future__ import annotations

from collections import defaultdict
from math import comb
from pathlib import Path
from typing import Annotated, Optional

import typer

from negkd.errors import UserError


def command(
    predictions: Annotated[
        list[Path],
        typer.Argument(
            help="Prediction files (.jsonl[.gz]) or output directories of `negkd infer` (reads predictions.jsonl); "
            "several are compared side by side.",
            show_default=False,
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory (metrics.json).", show_default=False)],
    k: Annotated[
        Optional[list[int]], typer.Option("--k", min=1, help="Extra k for pass@k (repeatable); pass@1 and pass@N are always reported.")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option("--workers", min=1, help="Grading processes for math-verify (default: all CPU cores).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo the step even if OUTPUT holds a finished run.")] = False,
    allow_unfinished: Annotated[bool, typer.Option(
        "--allow-unfinished", help="Accept the directory of an unfinished (killed or running) step and use the "
        "records it holds so far, with a warning. Default: refuse it and print the command that finishes it.")] = False,
) -> None:
    """Score predictions against their gold answers, overall, per subject and per level.

    Metrics: greedy (the first candidate; called "first" when `negkd infer` sampled it), maj@N (majority vote over all N candidates, answers
    grouped by mathematical equivalence, ties split fractionally), pass@k (unbiased estimator;
    k = 1, N and any --k; a record with n < k candidates counts as pass@n), and, when records
    carry "votes" from `negkd infer`, the accuracy of each voting rule (sc@N, asc@N[w] for
    w = 1, 1+2s, 1+s, s) and how often each ASC rule overturned the plain majority, rightly or
    wrongly. Grading is the same as `negkd split` (one implementation).

    Example: negkd eval infer-nat/ infer-cotkd/ -o eval/
    """
    from negkd.console import log
    from negkd.grading import extract_answer, judge_many
    from negkd.io import RunDir, resolve_input
    from negkd.schemas import read_predictions
    from negkd.voting import BatchEquiv

    paths = [resolve_input(p, ["predictions.jsonl"], produced_by="infer", allow_unfinished=allow_unfinished)
             for p in predictions]
    ks = sorted({1, *(k or [])})
    run = RunDir(output, "eval", {"k": ks}, inputs=paths, overwrite=overwrite)
    if run.up_to_date():
        return
    labels = _labels(paths)
    files = [read_predictions(p) for p in paths]  # validates every record before any output
    for path, recs in zip(paths, files):
        log(f"read {len(recs):,} predictions from {path}")

    # every candidate's answer (the stored pred; re-extracted only where a rationale has none)
    preds = [[c["pred"] if c.get("pred") is not None or not isinstance(c.get("rationale"), str)
              else extract_answer(c["rationale"]) for c in r["candidates"]] for recs in files for r in recs]
    preds = [[None if p is None else str(p) for p in ps] for ps in preds]
    recs_all = [r for recs in files for r in recs]
    pairs = {(p, r["answer"]) for r, ps in zip(recs_all, preds) for p in ps if p is not None}
    pairs |= {(v, r["answer"]) for r in recs_all for v in _votes(r).values() if v is not None}
    pairs = sorted(pairs)
    gstats: dict = {}
    verdict = dict(zip(pairs, judge_many(pairs, workers, stats=gstats)))
    equiv = BatchEquiv(workers)
    groups = equiv.group_all(preds)
    equiv.settle((a, v["sc"]) for r in recs_all if (v := _votes(r)).get("sc") is not None
                 for rule, a in v.items() if rule.startswith("asc:") and a is not None)
    log(f"graded {gstats.get('unique', 0):,} distinct (answer, gold) pairs "
        f"({gstats.get('math_verify', 0):,} by math-verify); grouped answers of {len(preds):,} records")

    def ok(ans: str | None, gold: str) -> bool:
        return ans is not None and verdict[(ans, gold)]

    metrics: dict = {"files": {}}
    i = 0
    for label, path, recs in zip(labels, paths, files):
        rows = []
        for r in recs:
            rows.append(_score(r, preds[i], groups[i], ks, ok, equiv))
            i += 1
        metrics["files"][label] = _aggregate(path, recs, rows, ks)
    run.start()
    try:
        run.write_json("metrics.json", metrics)
        run.finish(files={lab: m["overall"] for lab, m in metrics["files"].items()})
    except BaseException:
        run.cleanup()
        raise
    _print(metrics)
    log(f"wrote {output}/metrics.json")


def _labels(paths: list[Path]) -> list[str]:
    out: list[str] = []
    for p in paths:
        name = p.parent.name if p.name.startswith("predictions.jsonl") else p.name.split(".")[0]
        name = name or str(p)
        base, n = name, 2
        while name in out:
            name, n = f"{base}#{n}", n + 1
        out.append(name)
    return out


def _votes(r: dict) -> dict:
    v = r.get("votes")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise UserError(f"record {r.get('id')!r}: 'votes' must be an object of rule -> answer")
    return {str(key): (None if a is None else str(a)) for key, a in v.items()}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k); k > n is read as k = n."""
    k = min(k, n)
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _score(r: dict, preds: list, groups: list[list[int]], ks: list[int], ok, equiv) -> dict:
    gold = r["answer"]
    n = len(preds)
    correct = [ok(p, gold) for p in preds]
    c = sum(correct)
    # the first candidate is "greedy" unless infer says it was sampled (then it is called "first")
    first = "first" if r.get("decoding") == "sampled" else "greedy"
    out = {first: float(correct[0]), "n": n, "unparseable": sum(p is None for p in preds)}
    # majority vote over equivalence groups; the k groups tied at the top share the credit
    if groups:
        best = max(len(g) for g in groups)
        top = [g for g in groups if len(g) == best]
        out["maj@N"] = sum(correct[g[0]] for g in top) / len(top)
    else:
        out["maj@N"] = 0.0
    for k in ks:
        out[f"pass@{k}"] = pass_at_k(n, c, k)
    out["pass@N"] = float(c > 0)
    votes = _votes(r)
    for rule, ans in votes.items():
        out[_vote_metric(rule)] = float(ok(ans, gold))
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


def _vote_metric(rule: str) -> str:
    if rule == "sc":
        return "sc@N"
    if rule.startswith("asc:"):
        return f"asc@N[{rule[4:]}]"
    return f"vote[{rule}]"


def _mean(rows: list[dict]) -> dict:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in ("n", "unparseable", "overturns")]
    out: dict = {"records": len(rows)}
    for key in keys:
        vals = [r[key] for r in rows if key in r]
        out[key] = round(sum(vals) / len(vals), 6) if vals else None
        if len(vals) != len(rows):
            out[f"{key}:records"] = len(vals)
    return out


def _aggregate(path: Path, recs: list[dict], rows: list[dict], ks: list[int]) -> dict:
    by_subject: dict[str, list[dict]] = defaultdict(list)
    by_level: dict[str, list[dict]] = defaultdict(list)
    for rec, row in zip(recs, rows):
        by_subject[str(rec.get("subject") or rec.get("type") or "-")].append(row)
        by_level[str(rec.get("level", "-"))].append(row)
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
        "overall": _mean(rows),
        "by_subject": {k: _mean(v) for k, v in sorted(by_subject.items())},
        "by_level": {k: _mean(v) for k, v in sorted(by_level.items())},
        "asc_overturns": overturns,
    }


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _print(metrics: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from negkd.console import out

    files = metrics["files"]
    n_of = {lab: m["candidates"]["max"] for lab, m in files.items()}
    keys: list[str] = []
    for m in files.values():
        keys += [k for k in m["overall"] if k not in keys and k != "records" and ":records" not in k]
    table = Table(title="accuracy %", caption="N = candidates per question", title_justify="left")
    table.add_column("metric")
    for lab in files:
        table.add_column(f"{lab} (N={n_of[lab]})", justify="right")
    table.add_row("records", *[f"{m['overall']['records']:,}" for m in files.values()])
    for key in keys:
        table.add_row(escape(key), *[_pct(m["overall"].get(key)) for m in files.values()])
    out.print(table)

    for title, part in (("subject", "by_subject"), ("level", "by_level")):
        names: list[str] = []
        for m in files.values():
            names += [s for s in m[part] if s not in names]
        if names == ["-"]:
            continue
        firsts = {lab: "first" if "first" in m["overall"] and "greedy" not in m["overall"] else "greedy"
                  for lab, m in files.items()}
        table = Table(title=f"{'/'.join(sorted(set(firsts.values())))} / maj@N % by {title}", title_justify="left")
        table.add_column(title)
        for lab in files:
            table.add_column(f"{lab} n", justify="right")
            table.add_column(f"{lab} {firsts[lab]}", justify="right")
            table.add_column(f"{lab} maj@N", justify="right")
        for s in names:
            cells = []
            for lab, m in files.items():
                row = m[part].get(s)
                cells += (["-", "-", "-"] if row is None
                          else [f"{row['records']:,}", _pct(row.get(firsts[lab])), _pct(row["maj@N"])])
            table.add_row(s, *cells)
        out.print(table)

    rules = sorted({rule for m in files.values() for rule in m["asc_overturns"]})
    if rules:
        table = Table(title="ASC vs sc", caption="overturned / right / wrong", title_justify="left")
        table.add_column("rule")
        for lab in files:
            table.add_column(lab, justify="right")
        for rule in rules:
            cells = []
            for m in files.values():
                o = m["asc_overturns"].get(rule)
                cells.append("-" if o is None else f"{o['overturned']} / {o['right']} / {o['wrong']}")
            table.add_row(rule, *cells)
        out.print(table)
