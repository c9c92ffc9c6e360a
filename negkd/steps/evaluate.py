"""negkd eval: accuracy of prediction files (greedy, maj@N, ASC@N, pass@k), side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from negkd.metrics import pass_at_k  # noqa: F401  (re-exported: the estimator lives in negkd.metrics)


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
    grouped by mathematical equivalence; a tie goes to the answer that occurred first, the same rule as `negkd infer`'s votes, so maj@N equals sc@N), pass@k (unbiased estimator;
    k = 1, N and any --k; a record with n < k candidates counts as pass@n), and, when records
    carry "votes" from `negkd infer`, the accuracy of each voting rule (sc@N, asc@N[w] for
    w = 1, 1+2s, 1+s, s) and how often each ASC rule overturned the plain majority, rightly or
    wrongly. Grading is the same as `negkd split`, scoring the same as `negkd compare` (negkd/metrics.py).

    Example: negkd eval infer-nat/ infer-cotkd/ -o eval/
    """
    from negkd.console import log
    from negkd.io import RunDir, resolve_input
    from negkd.metrics import aggregate, labels, score_files
    from negkd.schemas import read_predictions

    paths = [resolve_input(p, ["predictions.jsonl"], produced_by="infer", allow_unfinished=allow_unfinished)
             for p in predictions]
    ks = sorted({1, *(k or [])})
    run = RunDir(output, "eval", {"k": ks}, inputs=paths, overwrite=overwrite)
    if run.up_to_date():
        return
    names = labels(paths)
    files = [read_predictions(p) for p in paths]  # validates every record before any output
    for path, recs in zip(paths, files):
        log(f"read {len(recs):,} predictions from {path}")
    rows, gstats = score_files(files, ks, workers)
    log(f"graded {gstats.get('unique', 0):,} distinct (answer, gold) pairs "
        f"({gstats.get('math_verify', 0):,} by math-verify); grouped answers of {gstats['records']:,} records")

    metrics: dict = {"files": {}}
    for label, path, recs, part in zip(names, paths, files, rows):
        metrics["files"][label] = aggregate(path, recs, part)
    run.start()
    try:
        run.write_json("metrics.json", metrics)
        run.finish(files={lab: m["overall"] for lab, m in metrics["files"].items()})
    except BaseException:
        run.cleanup()
        raise
    _print(metrics)
    log(f"wrote {output}/metrics.json")


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
