"""Benchmark: `negkd split` from the command line against naive math-verify, side by side in one run.

    .venv/bin/python bench/split_cli.py             # 8,000 rationales (the first 1,000 problems)
    .venv/bin/python bench/split_cli.py --full      # ... and the whole 60,000-rationale file once
    .venv/bin/python bench/split_cli.py --rounds 2  # interleaved rounds (medians are printed)

Data: the first --problems problems of ../shared/data/tdg/gpt35_math_train_8.jsonl.gz (8 GPT-3.5
rationales each); skipped with a message when ../shared is absent.

Both rows are subprocesses timed from outside, process start-up included:
- negkd: ``python -m negkd split SLICE -o DIR`` (default --workers: all cores); its phase timers
  come from DIR/stats.json (read, extract, fast path, pool start, math-verify checks, write);
- naive math-verify: ``python bench/split_cli.py --naive SLICE``: one process, the same reader,
  ``verify(parse(gold_solution), parse(rationale))`` for every rationale (gold parsed once per
  problem), math-verify imported inside the timing as a user's script would.

Printed per row: wall seconds, CPU seconds (user + sys of the process and its children: on a busy
machine the fairer figure), positives; then the ratio (target >= 10x at 8,000 rationales) and, with
--full, the 60,000-rationale wall time (target <= 15 s on 2 cores) and its counts against the
ones the README states (21,857 positive, 772 unparseable).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tdg" / "gpt35_math_train_8.jsonl.gz"
README_FULL = {"positive": 21857, "unparseable": 772}  # ../shared/data/README.md, this repo's README


def naive(path: str) -> int:
    """The naive row, run in its own process: math-verify's parse + verify on every rationale."""
    import logging

    from math_verify import parse, verify

    from negkd.schemas import iter_samples

    for name in ("math_verify", "math_verify.grader", "math_verify.parser", "math_verify.utils"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    gold: dict[str, list] = {}
    pos = 0
    for _, r in iter_samples(Path(path)):
        g = gold.get(r["id"])
        if g is None:
            g = gold[r["id"]] = parse(r["solution"])
        p = parse(r["rationale"])
        pos += bool(verify(g, p)) if p and g else False
    print(json.dumps({"positive": pos}))
    return 0


def timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall and CPU (user + sys, children included) seconds of one subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def run_split(src: Path, out: Path) -> tuple[float, float, dict]:
    wall, cpu, _ = timed([sys.executable, "-m", "negkd", "split", str(src), "-o", str(out), "--overwrite"])
    return wall, cpu, json.loads((out / "stats.json").read_text())


def phases(stats: dict) -> str:
    g = {"read_s": math.nan, "extract_s": math.nan, "write_s": math.nan, **stats["grading"]}  # older negkd: fewer timers
    checks = g["math_verify_s"] - g.get("pool_start_s", 0.0)
    return (f"read {g['read_s']:.2f} s, extract {g['extract_s']:.2f} s, fast path {g['fast_path_s']:.2f} s "
            f"({g['fast_path']:,} of {g['unique']:,} distinct pairs), pool start {g.get('pool_start_s', 0):.2f} s, "
            f"{g['math_verify']:,} math-verify checks {checks:.2f} s in {g['workers'] or 'no'} workers, "
            f"write {g['write_s']:.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=1000, help="problems in the slice (8 rationales each)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the two rows")
    ap.add_argument("--full", action="store_true", help="also time `negkd split` on the whole file once")
    ap.add_argument("--naive", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive:
        return naive(args.naive)
    if not DATA.exists():
        print(f"skipped: {DATA} is absent (only on the developers' machines)")
        return 0
    with tempfile.TemporaryDirectory(prefix="negkd-bench-") as tmp:
        src = Path(tmp) / "slice.jsonl.gz"
        with gzip.open(DATA, "rt", encoding="utf-8") as fin, gzip.open(src, "wt", encoding="utf-8") as fout:
            for k, line in enumerate(fin):
                if k >= args.problems:
                    break
                fout.write(line)
        ours, theirs = [], []
        for r in range(args.rounds):
            ours.append(run_split(src, Path(tmp) / "split"))
            wall, cpu, proc = timed([sys.executable, str(Path(__file__).resolve()), "--naive", str(src)])
            theirs.append((wall, cpu, json.loads(proc.stdout.strip().splitlines()[-1])))
            print(f"round {r + 1}: negkd split {ours[-1][0]:.2f} s, naive math-verify {theirs[-1][0]:.2f} s")
        stats = ours[-1][2]
        n = stats["total"]["rationales"]
        med = statistics.median
        ow, oc, tw, tc = (med(x[i] for x in rows) for rows in (ours, theirs) for i in (0, 1))
        print(f"\n{n:,} rationales of {args.problems:,} problems, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f}; medians of {args.rounds} round(s)")
        print(f"{'':26}{'wall s':>8}{'CPU s':>8}{'positive':>10}")
        print(f"{'negkd split (CLI)':26}{ow:8.2f}{oc:8.2f}{stats['total']['positive']:10,}")
        print(f"{'naive math-verify (CLI)':26}{tw:8.2f}{tc:8.2f}{theirs[-1][2]['positive']:10,}")
        print(f"speed-up: {tw / ow:.1f}x wall, {tc / oc:.1f}x CPU (target >= 10x wall)")
        print(f"negkd phases (last round): {phases(stats)}")
        if args.full:
            wall, cpu, full = run_split(DATA, Path(tmp) / "full")
            t = full["total"]
            same = all(t[k] == v for k, v in README_FULL.items())
            print(f"\nfull file, {t['rationales']:,} rationales: negkd split {wall:.2f} s wall, {cpu:.2f} s CPU "
                  f"(target <= 15 s wall); {t['positive']:,} positive, {t['unparseable']:,} unparseable "
                  f"({'as' if same else 'NOT as'} the README states: {README_FULL})")
            print(f"phases: {phases(full)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
