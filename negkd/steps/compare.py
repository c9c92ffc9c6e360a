"""negkd compare: is one student better than another? Paired statistics over seeds and problems."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from negkd.errors import UserError, choice

PAIRS = ("first", "all")
BINARY = ("greedy", "first", "maj@N", "pass@N", "sc@N")  # 0/1 per problem: solved sets are defined


def command(
    sets: Annotated[
        list[str],
        typer.Argument(
            help="Prediction sets, the first is the reference. Each is [NAME=]PATH with PATH an `negkd infer` "
            "output dir or a predictions.jsonl[.gz] (one run), a directory whose subdirectories are runs "
            "(seeds of one method), or a quoted glob such as 'runs/nat-s*' (each match a run). NAME "
            "defaults to the directory / file name.",
            show_default=False,
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory (compare.json).", show_default=False)],
    pairs: Annotated[str, typer.Option("--pairs", callback=choice(PAIRS),
                                       help="first: every set against the first; all: every pair of sets.")] = "first",
    n_boot: Annotated[int, typer.Option("--n-boot", min=100, help="Bootstrap replicates for the 95% CI.")] = 2000,
    n_perm: Annotated[int, typer.Option("--n-perm", min=100, help="Random sign flips for the paired test "
                                                                  "(exact enumeration when <= 16 problems differ).")] = 10000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap and the permutation test (the "
                                                     "output is deterministic for a given seed).")] = 0,
    k: Annotated[
        Optional[list[int]], typer.Option("--k", min=1, help="Extra k for pass@k (repeatable), as in `negkd eval`.")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option("--workers", min=1, help="Grading processes for math-verify (default: all CPU cores).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo the step even if OUTPUT holds a finished run.")] = False,
) -> None:
    """Compare students on the same problems: mean ± std over seeds, paired differences with a
    95% CI and p-values (raw and Holm-adjusted), per subject and level, and solved-set overlap.

    Metrics are exactly `negkd eval`'s (same code: negkd/metrics.py): greedy or first, maj@N,
    pass@1, pass@N, any --k, and sc@N / asc@N[w] when the records carry infer's votes. A pair is
    compared on the metrics both sets report for every problem.

    Statistics, for a pair (A, B) with A the earlier set: diff = mean(B) - mean(A) (positive: B is
    better), averaged over seeds and problems. CI: 95% percentile interval of a hierarchical
    bootstrap that resamples seeds (paired by index when A and B have the same number of
    seeds, independently otherwise), then problems (the same problems for A and B). p: two-sided
    paired sign-flip permutation test over problems on the per-problem differences averaged over
    seeds (problems are the random unit; seed noise is in the CI, not in p). p_holm: Holm-adjusted
    over the pairs of this call, separately for each metric and each slice (overall, each subject,
    each level). Overlap (0/1 metrics): shared / only_a / only_b / neither solved counts, Cohen's
    kappa and observed / expected shared solves with expected = P * pA * pB under independence,
    averaged over seed pairs (by index, or all Sa x Sb pairs when the seed counts differ).

    Every run of every set must hold the same problem ids with the same gold answers (else exit 1,
    naming some differing ids).

    compare.json: {"reference": name, "problems": P, "settings": {n_boot, n_perm, seed, pairs, k,
    ci, test, holm_family}, "sets": {name: {"runs": [paths], "seeds": S, "overall": {metric:
    {"mean", "std" (null for one seed), "per_seed": [..]}}, "by_subject" / "by_level": {slice:
    {"records": n, metric: {"mean", "std"}}}}}, "comparisons": [{"a", "b", "paired_seeds",
    "metrics": [...], "not_compared": [...], "overall": {metric: {"a", "b", "diff", "ci": [lo, hi],
    "p", "p_holm"}}, "by_subject" / "by_level": {slice: {"records": n, metric: {same}}},
    "overlap": {metric: {"seed_pairs", "n", "shared", "only_a", "only_b", "neither", "kappa",
    "expected_shared", "observed_over_expected"}}}]}. Accuracies and differences are fractions
    in [0, 1] (the table prints percentage points).

    Example: negkd compare cotkd='runs/cotkd-s*' nat='runs/nat-s*' nce=runs/nce-seeds -o runs/compare
    """
    from negkd.console import log
    from negkd.io import RunDir
    from negkd.metrics import score_files
    from negkd.schemas import read_predictions

    specs = [_expand(s) for s in sets]
    names = [n for n, _ in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise typer.BadParameter(f"two sets are named {dup[0]!r}; name them with NAME=PATH", param_hint="SETS")
    if len(specs) < 2:
        raise typer.BadParameter("give at least two prediction sets (the first is the reference)", param_hint="SETS")
    ks = sorted({1, *(k or [])})
    paths = [p for _, ps in specs for p in ps]
    args = {"sets": {n: [str(p) for p in ps] for n, ps in specs}, "pairs": pairs, "n_boot": n_boot,
            "n_perm": n_perm, "seed": seed, "k": ks}
    run = RunDir(output, "compare", args, inputs=paths, overwrite=overwrite)
    if run.up_to_date():
        return
    files = [read_predictions(p) for p in paths]  # validates every record before any output
    ids = _check_same_problems(paths, files)
    log(f"read {len(paths)} runs of {len(specs)} sets, {len(ids):,} problems each")
    rows, gstats = score_files(files, ks, workers)
    log(f"graded {gstats.get('unique', 0):,} distinct (answer, gold) pairs "
        f"({gstats.get('math_verify', 0):,} by math-verify)")

    # per set: runs in order, each a {id: metrics row}
    runs_of: dict[str, list[dict]] = {}
    i = 0
    for name, ps in specs:
        runs_of[name] = []
        for _ in ps:
            runs_of[name].append({r["id"]: row for r, row in zip(files[i], rows[i])})
            i += 1
    ref = files[0]
    by_id = {r["id"]: r for r in ref}
    from negkd.metrics import level_of, subject_of

    slices = {"by_subject": [subject_of(by_id[x]) for x in ids], "by_level": [level_of(by_id[x]) for x in ids]}
    result = compare_sets(runs_of, ids, slices, pairs=pairs, n_boot=n_boot, n_perm=n_perm, seed=seed)
    result["settings"]["k"] = ks
    for name, ps in specs:
        result["sets"][name]["runs"] = [str(p) for p in ps]
    run.start()
    try:
        run.write_json("compare.json", result)
        run.finish(problems=len(ids), comparisons=[
            {"a": c["a"], "b": c["b"], **{m: {"diff": v["diff"], "p_holm": v["p_holm"]} for m, v in c["overall"].items()}}
            for c in result["comparisons"]])
    except BaseException:
        run.cleanup()
        raise
    _print(result)
    log(f"wrote {output}/compare.json")


# --------------------------------------------------------------------------- inputs

def _expand(spec: str) -> tuple[str, list[Path]]:
    """``[NAME=]PATH`` -> (name, run files). PATH: a run (file or infer dir), a dir of runs, or a glob."""
    import glob

    from negkd.io import resolve_input

    name, path = None, spec
    head, sep, tail = spec.partition("=")
    if sep and head and "/" not in head and not Path(spec).exists():
        name, path = head, tail
    if any(ch in path for ch in "*?["):
        matches = sorted(glob.glob(path))
        if not matches:
            raise UserError(f"{path}: the glob matches nothing")
        runs = [resolve_input(Path(m), ["predictions.jsonl"], produced_by="infer") for m in matches]
        return name or Path(path).name, runs
    p = Path(path)
    if p.is_dir() and not any((p / f).exists() for f in ("predictions.jsonl", "predictions.jsonl.gz")):
        subs = [d for d in sorted(p.iterdir()) if d.is_dir()
                and any((d / f).exists() for f in ("predictions.jsonl", "predictions.jsonl.gz"))]
        if not subs:
            raise UserError(f"{p}: holds no predictions.jsonl and no run subdirectories with one; pass an "
                            "`negkd infer` output dir, a predictions file, or a directory of such runs")
        return name or p.name, [resolve_input(d, ["predictions.jsonl"], produced_by="infer") for d in subs]
    f = resolve_input(p, ["predictions.jsonl"], produced_by="infer")
    from negkd.metrics import labels

    return name or labels([f])[0], [f]


def _check_same_problems(paths: list[Path], files: list[list[dict]]) -> list[str]:
    """The sorted problem ids every run holds; refuses runs with other ids or other gold answers."""
    gold = {r["id"]: r["answer"] for r in files[0]}
    for path, recs in zip(paths[1:], files[1:]):
        have = {r["id"]: r["answer"] for r in recs}
        only_ref, only_here = sorted(set(gold) - set(have)), sorted(set(have) - set(gold))
        if only_ref or only_here:
            parts = []
            if only_ref:
                parts.append(f"{len(only_ref)} only in {paths[0]} (e.g. {', '.join(map(repr, only_ref[:3]))})")
            if only_here:
                parts.append(f"{len(only_here)} only in {path} (e.g. {', '.join(map(repr, only_here[:3]))})")
            raise UserError(f"{path}: holds other problems than {paths[0]}: {'; '.join(parts)}; compare needs "
                            "the same problems in every run (infer them on the same problem file)")
        for pid, ans in have.items():
            if gold[pid] != ans:
                raise UserError(f"{path}: problem {pid!r} has gold answer {ans!r} but {gold[pid]!r} in {paths[0]}; "
                                "compare needs the same problem file for every run")
    return sorted(gold)


# --------------------------------------------------------------------------- statistics

def compare_sets(runs_of: dict[str, list[dict]], ids: list[str], slices: dict[str, list[str]], pairs: str = "first",
                 n_boot: int = 2000, n_perm: int = 10000, seed: int = 0) -> dict:
    """The compare.json payload (less "runs" and settings.k) from per-run {id: metrics row} dicts.

    runs_of: set name -> runs (seeds) -> {problem id: metrics row}; ids: the problems (same in
    every run); slices: slice kind -> each problem's slice value (aligned with ids).
    """
    import numpy as np

    from negkd.stats import hierarchical_bootstrap, holm, mean_std, overlap, sign_flip_test

    names = list(runs_of)
    arrays: dict[str, tuple[list[str], np.ndarray]] = {}  # name -> (metrics, (S, P, M))
    for name, runs in runs_of.items():
        metrics = _common_metrics([row for run in runs for row in run.values()])
        arrays[name] = (metrics, np.array([[[run[x][m] for m in metrics] for x in ids] for run in runs], dtype=float))
    slice_idx = {kind: {v: np.array([i for i, s in enumerate(vals) if s == v]) for v in sorted(set(vals))}
                 for kind, vals in slices.items()}
    slice_idx = {kind: sl for kind, sl in slice_idx.items() if list(sl) != ["-"]}

    out: dict = {"reference": names[0], "problems": len(ids), "settings": {
        "n_boot": n_boot, "n_perm": n_perm, "seed": seed, "pairs": pairs, "ci": 0.95,
        "test": "two-sided paired sign-flip permutation test over problems on seed-averaged per-problem differences",
        "holm_family": "the pairs of this call, per metric and per slice"}, "sets": {}, "comparisons": []}
    for name, (metrics, a) in arrays.items():
        per_seed = a.mean(axis=1)  # (S, M)
        mu, sd = mean_std(per_seed)
        entry: dict = {"seeds": a.shape[0], "overall": {
            m: {"mean": _f(mu[j]), "std": None if sd is None else _f(sd[j]), "per_seed": [_f(v) for v in per_seed[:, j]]}
            for j, m in enumerate(metrics)}}
        for kind, sl in slice_idx.items():
            entry[kind] = {}
            for v, idx in sl.items():
                mu, sd = mean_std(a[:, idx].mean(axis=1))
                entry[kind][v] = {"records": int(idx.size), **{
                    m: {"mean": _f(mu[j]), "std": None if sd is None else _f(sd[j])} for j, m in enumerate(metrics)}}
        out["sets"][name] = entry

    todo = [(names[0], b) for b in names[1:]] if pairs == "first" else \
        [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    for an, bn in todo:
        (ma, a), (mb, b) = arrays[an], arrays[bn]
        metrics = [m for m in ma if m in mb]
        a_, b_ = a[:, :, [ma.index(m) for m in metrics]], b[:, :, [mb.index(m) for m in metrics]]
        paired = a_.shape[0] == b_.shape[0]

        def stats(idx) -> dict:
            xb, xa = b_[:, idx], a_[:, idx]
            bs = hierarchical_bootstrap(xb, xa, n_boot=n_boot, seed=seed, paired_seeds=paired)
            p = sign_flip_test(xb.mean(axis=0) - xa.mean(axis=0), n_perm=n_perm, seed=seed)
            return {m: {"a": _f(xa[..., j].mean()), "b": _f(xb[..., j].mean()), "diff": _f(bs["diff"][j]),
                        "ci": [_f(bs["lo"][j]), _f(bs["hi"][j])], "p": _f(p[j]), "p_holm": None}
                    for j, m in enumerate(metrics)}

        comp: dict = {"a": an, "b": bn, "paired_seeds": paired, "metrics": metrics,
                      "not_compared": sorted(set(ma) ^ set(mb)), "overall": stats(np.arange(len(ids)))}
        for kind, sl in slice_idx.items():
            comp[kind] = {v: {"records": int(idx.size), **stats(idx)} for v, idx in sl.items()}
        comp["overlap"] = {}
        for j, m in enumerate(metrics):
            if not (np.isin(a_[..., j], (0.0, 1.0)).all() and np.isin(b_[..., j], (0.0, 1.0)).all()):
                continue  # fractional per-problem values (pass@k, k < N): no solved set
            seed_pairs = [(s, s) for s in range(a_.shape[0])] if paired else \
                [(s, t) for s in range(a_.shape[0]) for t in range(b_.shape[0])]
            ovs = [overlap(a_[s, :, j] > 0.5, b_[t, :, j] > 0.5) for s, t in seed_pairs]
            comp["overlap"][m] = {"seed_pairs": len(ovs), **{key: _avg([o[key] for o in ovs]) for key in ovs[0]}}
        out["comparisons"].append(comp)

    # Holm within each (scope, metric) family over the pairs of this call
    comps = out["comparisons"]
    scopes = [("overall", None)] + [(kind, v) for kind, sl in slice_idx.items() for v in sl]
    for kind, v in scopes:
        fam: dict[str, list[dict]] = {}
        for c in comps:
            block = c["overall"] if v is None else c[kind][v]
            for m in c["metrics"]:
                fam.setdefault(m, []).append(block[m])
        for cells in fam.values():
            for cell, adj in zip(cells, holm([cell["p"] for cell in cells])):
                cell["p_holm"] = _f(adj)
    return out


def _common_metrics(rows: list[dict]) -> list[str]:
    """Metrics every row reports, in first-seen order."""
    from negkd.metrics import metric_names

    return [m for m in metric_names(rows) if all(m in r for r in rows)]


def _f(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if x != x else round(x, 6)


def _avg(vals: list):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return round(sum(vals) / len(vals), 6) if len(vals) > 1 or isinstance(vals[0], float) else vals[0]


# --------------------------------------------------------------------------- table

def _pp(x) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def _pct(m: dict) -> str:
    if m["mean"] is None:
        return "-"
    return f"{100 * m['mean']:.2f}" + ("" if m.get("std") is None else f" ± {100 * m['std']:.2f}")


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}"


def _p(x) -> str:
    return "-" if x is None else (f"{x:.4f}" if x >= 1e-4 else f"{x:.1e}")


def _print(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from negkd.console import out

    sets = result["sets"]
    for c in result["comparisons"]:
        a, b = c["a"], c["b"]
        sa, sb = sets[a]["seeds"], sets[b]["seeds"]
        t = Table(title=f"{escape(b)} vs {escape(a)}: accuracy % (mean ± std over seeds), diff = {escape(b)} − {escape(a)} "
                        f"in points", caption=f"{result['problems']:,} problems; 95% CI: hierarchical bootstrap "
                        f"(seeds, then problems); p: paired sign-flip test; Holm over the {len(result['comparisons'])} "
                        "comparison(s)", title_justify="left")
        for col in ("metric", f"{a} ({sa} seed{'s' * (sa > 1)})", f"{b} ({sb} seed{'s' * (sb > 1)})",
                    "diff [95% CI]", "p", "p Holm"):
            t.add_column(escape(col), justify="left" if col == "metric" else "right")
        for m in c["metrics"]:
            v = c["overall"][m]
            t.add_row(escape(m), _pct(sets[a]["overall"][m]), _pct(sets[b]["overall"][m]),
                      f"{_pp(v['diff'])} [{_pp(v['ci'][0])}, {_pp(v['ci'][1])}]", _p(v["p"]), _p(v["p_holm"]))
        out.print(t)
        if c["not_compared"]:
            out.print(f"not compared (reported by one set only): {escape(', '.join(c['not_compared']))}")
        if c["overlap"]:
            t = Table(title=f"solved sets: {escape(b)} vs {escape(a)}", caption="expected shared = P·pA·pB if "
                      "independent; kappa: agreement beyond chance", title_justify="left")
            for col in ("metric", "shared", f"only {a}", f"only {b}", "neither", "kappa", "obs / exp shared"):
                t.add_column(escape(col), justify="left" if col == "metric" else "right")
            for m, o in c["overlap"].items():
                t.add_row(escape(m), *[_n(o[key]) for key in ("shared", "only_a", "only_b", "neither")],
                          "-" if o["kappa"] is None else f"{o['kappa']:.3f}",
                          "-" if o["observed_over_expected"] is None else f"{o['observed_over_expected']:.3f}")
            out.print(t)
        head = [m for m in ("greedy", "first", "maj@N") if m in c["metrics"]]
        for kind in ("by_subject", "by_level"):
            if kind not in c or not head:
                continue
            t = Table(title=f"{escape(b)} − {escape(a)} by {kind[3:]}: diff in points [95% CI] (p Holm)",
                      title_justify="left")
            t.add_column(kind[3:])
            t.add_column("n", justify="right")
            for m in head:
                t.add_column(escape(m), justify="right")
            for v, block in c[kind].items():
                t.add_row(escape(v), f"{block['records']:,}", *[
                    f"{_pp(block[m]['diff'])} [{_pp(block[m]['ci'][0])}, {_pp(block[m]['ci'][1])}] ({_p(block[m]['p_holm'])})"
                    for m in head])
            out.print(t)
