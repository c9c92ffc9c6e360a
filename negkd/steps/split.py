"""negkd split: grade every rationale against its gold answer; write positives and negatives."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from negkd.errors import UserError, choice

SAMPLE_FORMATS = ("auto", "negkd", "tdg", "predictions")


def command(
    input: Annotated[
        Path,
        typer.Argument(
            help="Samples to grade: a .jsonl(.gz) file of sample records (id, question, answer, k, "
            "rationale), the paper's released teacher file (TDG format: generated_answer lists), "
            "`negkd infer` predictions (one sample per candidate), or the output directory of "
            "`negkd sample` / `negkd infer` (reads its samples.jsonl / predictions.jsonl).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output directory (pos.jsonl, neg.jsonl, stats.json).", show_default=False)
    ],
    workers: Annotated[
        Optional[int], typer.Option("--workers", min=1, help="Grading processes for math-verify (default: all CPU cores).")
    ] = None,
    drop_unparseable: Annotated[
        bool,
        typer.Option("--drop-unparseable", help="Leave rationales with no extractable final answer out of neg.jsonl (they are still counted)."),
    ] = False,
    fmt: Annotated[
        str, typer.Option("--format", callback=choice(SAMPLE_FORMATS), help=f"Input format: {', '.join(SAMPLE_FORMATS)} (auto: detected from the first record).")
    ] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo the step even if OUTPUT holds a finished run.")] = False,
    allow_unfinished: Annotated[bool, typer.Option(
        "--allow-unfinished", help="Accept the directory of an unfinished (killed or running) step and use the "
        "records it holds so far, with a warning. Default: refuse it and print the command that finishes it.")] = False,
) -> None:
    """Grade each rationale (positive = reaches the gold final answer) and split the samples.

    The final answer is the last \\boxed{} of a rationale (else "The answer is X" / "Final Answer: X",
    else "#### X"); it is compared with the gold answer by mathematical equivalence (a fast
    normaliser, then math-verify in worker processes). Each output row is the sample plus "pred"
    (the extracted answer, null when unparseable) and "correct". Unparseable rationales are
    negatives, counted apart.

    Example: negkd split samples/ -o split/   then   negkd train-neg split/ -o neg-adapter/
    """
    from negkd.console import log, progress
    from negkd.grading import grade_many
    from negkd.io import RunDir, resolve_input
    from negkd.schemas import iter_samples

    if fmt not in SAMPLE_FORMATS:
        raise UserError(f"unknown --format {fmt!r} for samples; choose one of {', '.join(SAMPLE_FORMATS)}")
    path = resolve_input(input, ["samples.jsonl", "predictions.jsonl"], produced_by="sample",
                         allow_unfinished=allow_unfinished)
    run = RunDir(output, "split", {"format": fmt, "drop_unparseable": drop_unparseable}, inputs=[path],
                 overwrite=overwrite)
    if run.up_to_date():
        return
    t_read = time.perf_counter()
    samples = [s for _, s in iter_samples(path, fmt)]  # validates every record before any output
    gstats: dict = {"read_s": round(time.perf_counter() - t_read, 3)}
    log(f"read {len(samples):,} rationales for {len({s['id'] for s in samples}):,} problems from {path}")

    with progress() as bar:
        task = None

        def advance(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                log(f"fast path settled {gstats['fast_path']:,} of {gstats['unique']:,} distinct "
                    f"(answer, gold) pairs; math-verify checks {total:,}")
                if total == 0:
                    return
                task = bar.add_task("math-verify", total=total)
            if done:
                bar.update(task, completed=done)

        graded = grade_many([(s["rationale"], s["answer"]) for s in samples], workers, advance, stats=gstats)

    rows = [{**s, "pred": pred, "correct": ok} for s, (pred, ok) in zip(samples, graded)]
    stats = _stats(rows)
    stats["grading"] = gstats
    run.start()
    try:
        t_write = time.perf_counter()
        run.write_jsonl("pos.jsonl", (r for r in rows if r["correct"]))
        run.write_jsonl("neg.jsonl", (r for r in rows if not r["correct"] and not (drop_unparseable and r["pred"] is None)))
        gstats["write_s"] = round(time.perf_counter() - t_write, 3)  # pos.jsonl + neg.jsonl
        run.write_json("stats.json", stats)
        run.finish(totals=stats["total"])
    except BaseException:
        run.cleanup()
        raise
    _print_table(stats)
    t = stats["total"]
    if t["empty"]:
        from negkd.console import warn

        warn(f"{t['empty']:,} of {t['rationales']:,} rationales are empty (whitespace only); they are graded "
             "negative and count as unparseable")
    log(f"wrote {output}/pos.jsonl ({t['positive']:,}) and neg.jsonl "
        f"({t['negative'] - (t['unparseable'] if drop_unparseable else 0):,}); next: negkd train-neg {output} -o <dir>")


def _counts(rows: list[dict]) -> dict:
    n = len(rows)
    pos = sum(r["correct"] for r in rows)
    unp = sum(r["pred"] is None for r in rows)
    empty = sum(not str(r.get("rationale") or "").strip() for r in rows)  # whitespace only: negative
    per_problem: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per_problem[r["id"]].append(r["correct"])
    return {
        "rationales": n,
        "positive": pos,
        "negative": n - pos,
        "unparseable": unp,
        "empty": empty,
        "share_positive": round(pos / n, 4) if n else 0.0,
        "problems": len(per_problem),
        "problems_no_positive": sum(not any(v) for v in per_problem.values()),
        "problems_all_positive": sum(all(v) for v in per_problem.values()),
    }


def _stats(rows: list[dict]) -> dict:
    by_subject: dict[str, list[dict]] = defaultdict(list)
    by_level: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_subject[str(r.get("subject") or "-")].append(r)
        by_level[str(r.get("level", "-"))].append(r)
    return {
        "total": _counts(rows),
        "by_subject": {k: _counts(v) for k, v in sorted(by_subject.items())},
        "by_level": {k: _counts(v) for k, v in sorted(by_level.items())},
        "rationales_per_problem": dict(sorted(Counter(Counter(r["id"] for r in rows).values()).items())),
    }


def _print_table(stats: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from negkd.console import out

    cols = [("rationales", "rationales"), ("pos", "positive"), ("% pos", "share_positive"),
            ("unparsed", "unparseable"), ("problems", "problems"),
            ("0 pos", "problems_no_positive"), ("all pos", "problems_all_positive")]
    for title, key in (("subject", "by_subject"), ("level", "by_level")):
        if key == "by_level" and list(stats[key]) == ["-"]:
            continue
        table = Table(title=f"split by {title}", title_justify="left")
        table.add_column(title)
        for name, _ in cols:
            table.add_column(name, justify="right")
        rows = list(stats[key].items()) + [("total", stats["total"])]
        for i, (name, c) in enumerate(rows):
            cells = [f"{100 * c[k]:.1f}" if k == "share_positive" else f"{c[k]:,}" for _, k in cols]
            table.add_row(escape(name), *cells, end_section=i == len(rows) - 2)
        out.print(table)
