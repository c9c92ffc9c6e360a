"""Turn the runs under work/TAG into RESULTS.md: accuracy table (mean ± std over seeds), paired
tests per comparison, SC vs ASC, and the Table-1 overlap analysis.

Per-problem correctness is recomputed from each predictions.jsonl with ``negkd.grading.equivalent``
(the grader ``negkd eval`` uses) and checked against eval's own metrics.json where it reports an
overall accuracy.

    python report.py --tag quick --seeds 0     # rebuild RESULTS.md from finished runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import stats  # noqa: E402

WORK = HERE / "work"
NAMES = {"gold": "fine-tune on gold", "cotkd": "CoT-KD (pos only)", "mix": "MIX (pos+neg as pos)",
         "neg": "neg-only (train-neg)", "nat": "NAT", "nce": "NAT+NCE"}
ORDER = ["gold", "cotkd", "mix", "neg", "nat", "nce"]
COMPARISONS = [("nat", "cotkd"), ("mix", "cotkd"), ("nce", "nat"), ("nce", "cotkd"), ("cotkd", "gold"),
               ("nat", "mix")]


def _pred_of(rec: dict, rule: str):
    if rule == "greedy":
        c = rec.get("candidates") or []
        return c[0].get("pred") if c else None
    return (rec.get("votes") or {}).get(rule)


def correctness(pred_file: Path, rule: str = "greedy", prefix: str | None = None) -> dict[str, bool]:
    from negkd.grading import equivalent

    out = {}
    with pred_file.open() as f:
        for line in f:
            r = json.loads(line)
            if prefix and not r["id"].startswith(prefix + "-"):
                continue
            p = _pred_of(r, rule)
            out[r["id"]] = bool(p is not None and equivalent(str(p), str(r["answer"])))
    return out


def pass_at_n(pred_file: Path) -> dict[str, bool]:
    from negkd.grading import equivalent

    out = {}
    for line in pred_file.open():
        r = json.loads(line)
        out[r["id"]] = any(c.get("pred") is not None and equivalent(str(c["pred"]), str(r["answer"]))
                           for c in r.get("candidates") or [])
    return out


def levels(split: str) -> dict[str, int]:
    return {json.loads(l)["id"]: json.loads(l)["level"] for l in (WORK / "data" / f"{split}.jsonl").open()}


def run_dir(tag: str, seed: int, variant: str, lr: float) -> Path:
    return WORK / tag / f"seed{seed}" / f"{variant}-lr{lr:g}"


def pred_dir(tag: str, seed: int, variant: str, lr: float) -> Path:
    return WORK / tag / f"seed{seed}" / f"{variant}-lr{lr:g}-pred"


def finished(tag: str, seeds: list[int], lrs: dict) -> list[str]:
    """Variants whose greedy predictions exist (with a manifest: infer finished) for every seed."""
    return [v for v in ORDER if all((pred_dir(tag, s, v, lrs[v]) / "manifest.json").is_file() for s in seeds)]


def best_variant(tag: str, seeds: list[int], lrs: dict) -> str:
    """The variant with the highest mean greedy accuracy on the val split (never the test split)."""
    def val(v):
        accs = []
        for s in seeds:
            c = correctness(pred_dir(tag, s, v, lrs[v]) / "predictions.jsonl", prefix="val")
            accs.append(sum(c.values()) / len(c))
        return sum(accs) / len(accs)

    return max([v for v in finished(tag, seeds, lrs) if v != "neg"], key=val)


def _eval_overall(metrics_dir: Path) -> float | None:
    """`negkd eval`'s overall greedy accuracy in % (its metrics.json holds fractions), or None."""
    p = metrics_dir / "metrics.json"
    if not p.is_file():
        return None
    (m,) = json.loads(p.read_text())["files"].values()  # one predictions file per eval run
    return 100 * m["overall"]["greedy"]


def _final_loss(d: Path) -> str:
    """The last training-loss record in metrics.jsonl (per completion token; NCE: its mixed objective)."""
    f = d / "metrics.jsonl"
    last = None
    if f.is_file():
        for line in f.open():
            r = json.loads(line)
            if isinstance(r.get("loss"), (int, float)):
                last = r["loss"]
    return "?" if last is None else f"{last:.2f}"


def _fmt(m: float, s: float, n: int) -> str:
    return f"{m:.1f} ± {s:.1f}" if n > 1 else f"{m:.1f}"


def _versions() -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}"]
    for pkg in ("negkd", "torch", "transformers", "peft", "accelerate", "math-verify"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(parts)


def collect(tag: str, seeds: list[int], lrs: dict) -> dict:
    """acc[variant][split] = per-seed list of {id: correct}."""
    res: dict = {v: {"test": [], "ood": [], "val": []} for v in ORDER}
    check = []
    for v in finished(tag, seeds, lrs):
        for s in seeds:
            pred = pred_dir(tag, s, v, lrs[v])
            for split in ("val", "test", "ood"):
                c = correctness(pred / "predictions.jsonl", prefix=split)
                res[v][split].append(c)
                ev = _eval_overall(pred / f"eval-{split}" / "metrics")
                if ev is not None:
                    mine = 100 * sum(c.values()) / len(c)
                    check.append(abs(ev - mine) < 0.051)
    res["_eval_agrees"] = (sum(check), len(check))
    return res


def teacher_stats(tag: str, seeds: list[int]) -> list[str]:
    from collections import Counter

    lines = ["| seed | rationales | positive | unparseable | positive by level 1..5 |", "|---|---|---|---|---|"]
    for s in seeds:
        split = WORK / tag / f"seed{s}" / "split"
        pos, tot, unp = Counter(), Counter(), 0
        for name in ("pos.jsonl", "neg.jsonl"):
            f = split / name
            if not f.is_file():
                continue
            for line in f.open():
                r = json.loads(line)
                tot[r.get("level")] += 1
                pos[r.get("level")] += bool(r.get("correct"))
                unp += r.get("pred") is None
        n = sum(tot.values())
        if n:
            by = " / ".join(f"{100 * pos[lv] / tot[lv]:.0f}" for lv in sorted(tot))
            lines.append(f"| {s} | {n} | {100 * sum(pos.values()) / n:.1f}% | {unp} | {by} |")
    return lines


def write(tag: str, seeds: list[int], lrs: dict, lr_source: str, best: str, wall: float, log: list[str],
          argv: list[str], out: Path | None = None) -> Path:
    import run as runmod

    res = collect(tag, seeds, lrs)
    lv_test = levels("test")
    n = len(seeds)
    L: list[str] = []
    L.append(f"# Arithmetic reproduction — results ({tag}: {n} seed{'s' if n > 1 else ''})\n")
    L.append(f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
             f"`make -C examples/arith {tag}` (`python run.py {' '.join(argv)}`), wall time "
             f"**{wall / 60:.1f} min** from the first start of this tag (including any interrupted attempts it resumed) "
             f"on {os.cpu_count()} CPU cores (load average {os.getloadavg()[1]:.1f} over the last 5 min).\n")
    L.append(f"Versions: {_versions()}.\n")
    t = runmod.TRAIN
    L.append(f"Setup: base = {runmod.PRETRAIN_STEPS}-step pretrained LLaMA (hidden 128, 4 layers, ~0.84M params; "
             f"`work/base/pretrain.json`); teacher = synthetic, {runmod.TEACHER_N} samples per train problem "
             f"(2000 problems, levels 1-5); every variant trains **{t['steps']} optimizer steps x batch "
             f"{t['batch']}** (LoRA r={t['lora_r']}, alpha={t['lora_alpha']}, {t['targets']}; NAT gate d_g=128). "
             f"Learning rates: {lr_source}: " + ", ".join(f"{NAMES[v]} {lrs[v]:g}" for v in ORDER) + ".\n")
    if runmod.TUNED.is_file() and "tuned" in lr_source:  # "tuned now on val" or "fixed, from tuned_lr.json"
        tuned = json.loads(runmod.TUNED.read_text())
        grid = [f"{lr:g}" for lr in tuned["grid"]]
        L.append(f"LR tuning (`{runmod.TUNED.name}`): val greedy accuracy % of each method at each learning rate, "
                 f"seed {tuned['seed']}, same budget; the chosen one in bold.\n")
        L.append("| method | " + " | ".join(f"lr {g}" for g in grid) + " |")
        L.append("|---|" + "---|" * len(grid))
        for v in ORDER:
            cells = [(f"**{tuned['val_greedy'][v][g]:.1f}**" if float(g) == tuned["lr"][v] else
                      f"{tuned['val_greedy'][v][g]:.1f}") if g in tuned["val_greedy"].get(v, {}) else "-" for g in grid]
            L.append(f"| {NAMES[v]} | " + " | ".join(cells) + " |")
        L.append("")
    L.append(f"Test = 300 problems (60 per level 1-5), OOD = 200 problems with {__import__('arithgen').OOD_STEPS} "
             "steps (more than any training problem), val = 150 (LR tuning / model selection only). "
             "Greedy decoding, accuracy in %.\n")

    pj, pb = WORK / "base" / "pretrain.json", WORK / "base" / "probe.json"
    if pj.is_file():
        info = json.loads(pj.read_text())
        L.append("## Base model\n")
        L.append(f"Pretrained {info['stamp']['steps']} steps x 8 x 256 tokens ({info['tokens'] / 1e6:.2f}M tokens) "
                 f"in {info['seconds'] / 60:.1f} min, final LM loss {info['final_loss']:.3f}, "
                 f"{info['parameters'] / 1e6:.2f}M parameters.")
        if pb.is_file():
            pr = json.loads(pb.read_text())
            L.append(f"Probe in its own pretraining format (`probe_base.py`, greedy, {pr['problems']} test "
                     f"statements): final value right on {pr['final_answer_right']}, first equation built from "
                     f"the statement's numbers on {pr['first_equation_copies_statement_numbers']}.")
        L.append("")
    L.append("## Teacher data\n")
    L += teacher_stats(tag, seeds)
    L.append("")

    L.append("## Greedy accuracy (mean ± std over seeds)\n")
    L.append("| method | test | OOD | test L1 | L2 | L3 | L4 | L5 | per-seed test | final train loss |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    acc = {}
    done = finished(tag, seeds, lrs)
    missing = [v for v in ORDER if v not in done]
    for v in done:
        row = [NAMES[v]]
        for split in ("test", "ood"):
            per = [100 * sum(c.values()) / len(c) for c in res[v][split]]
            acc[(v, split)] = per
            row.append(_fmt(*stats.mean_std(per), n))
        for lv in range(1, 6):
            per = [100 * sum(ok for i, ok in c.items() if lv_test[i] == lv) / sum(1 for i in c if lv_test[i] == lv)
                   for c in res[v]["test"]]
            row.append(f"{stats.mean_std(per)[0]:.0f}")
        row.append(" / ".join(f"{x:.1f}" for x in acc[(v, "test")]))
        row.append(" / ".join(_final_loss(run_dir(tag, s, v, lrs[v])) for s in seeds))
        L.append("| " + " | ".join(row) + " |")
    for v in missing:
        L.append(f"| {NAMES[v]} | not run (did not finish in the time budget) | | | | | | | | |")
    for sd in seeds:
        f = run_dir(tag, sd, "nat", lrs["nat"]) / "metrics.jsonl"
        if f.is_file():
            recs = [json.loads(l) for l in f.open()]
            g = {k.split("/", 1)[1]: v for k, v in recs[-1].items() if k.startswith("g_neg/")} if recs else {}
            if g:
                L.append(f"\nNAT gate at the last step (seed {sd}): mean g_neg over {len(g)} adapted layers "
                         f"{sum(g.values()) / len(g):+.3f}, range [{min(g.values()):+.3f}, {max(g.values()):+.3f}] "
                         "(g_neg > 0 adds negative knowledge, < 0 subtracts it; bound ±0.5).")
    agree, total = res["_eval_agrees"]
    L.append(f"\nPer-problem grading recomputed with `negkd.grading.equivalent`; it matches `negkd eval`'s "
             f"metrics.json on {agree}/{total} (model, split) pairs where eval reported an overall accuracy.\n")

    L.append("## Paired comparisons\n")
    L.append("Difference A − B in points. *Sign test*: exact two-sided test with the test problem as the unit "
             "(per problem: seeds A solved minus seeds B solved; A-only / B-only count the problems leaning each "
             "way); with one seed it is McNemar's test. *Bootstrap*: 95% CI resampling problems, one draw for all "
             "seeds (they share the test problems). *t-test*: paired over per-seed accuracies (needs ≥ 2 seeds; "
             "with 3 seeds it has 2 degrees of freedom and little power).\n")
    L.append("| A vs B | split | A − B | bootstrap 95% CI | A-only / B-only | sign-test p | paired-t p |")
    L.append("|---|---|---|---|---|---|---|")
    verdicts = {}
    for a, b in [(a, b) for a, b in COMPARISONS if a in done and b in done]:
        for split in ("test", "ood"):
            groups = []
            for ca, cb in zip(res[a][split], res[b][split]):
                ids = sorted(ca)
                groups.append(([ca[i] for i in ids], [cb[i] for i in ids]))
            n10, n01, p = stats.problem_sign_test(groups)
            d, lo, hi = stats.paired_bootstrap(groups, reps=1000)
            tt = stats.paired_t(acc[(a, split)], acc[(b, split)])
            verdicts[(a, b, split)] = (d, p)
            L.append(f"| {NAMES[a]} vs {NAMES[b]} | {split} | {d:+.1f} | [{lo:+.1f}, {hi:+.1f}] | {n10} / {n01} | "
                     f"{p:.3g} | {'n/a' if tt is None else f'{tt[1]:.3g}'} |")
    L.append("")

    # SC vs ASC on the best student
    L.append(f"## SC vs ASC on the best student ({NAMES[best]}, chosen by mean val greedy accuracy)\n")
    rules = [("greedy", "first sample"), ("sc", f"SC = maj@{runmod.VOTE_N}"), ("asc:1+s", "ASC w=1+s"),
             ("asc:1+2s", "ASC w=1+2s"), ("asc:s", "ASC w=s")]
    vote = {}
    for s in seeds:
        f = WORK / tag / f"seed{s}" / f"vote-{best}" / "predictions.jsonl"
        if not f.is_file():
            continue
        for rule, _ in rules:
            vote.setdefault(rule, []).append(correctness(f, rule))
        vote.setdefault("pass", []).append(pass_at_n(f))
    if vote:
        L.append(f"Every {runmod.VOTE_EVERY}rd test problem ({len(vote['sc'][0])} problems), {runmod.VOTE_N} samples per problem at temperature 0.7 "
                 "(\"first sample\" is the first sampled candidate, not greedy).\n")
        L.append("| rule | test accuracy | per seed |")
        L.append("|---|---|---|")
        for rule, label in rules + [("pass", f"pass@{runmod.VOTE_N} (oracle)")]:
            per = [100 * sum(c.values()) / len(c) for c in vote[rule]]
            L.append(f"| {label} | {_fmt(*stats.mean_std(per), len(per))} | {' / '.join(f'{x:.1f}' for x in per)} |")
        L.append("")
        L.append("| A vs B | A − B | bootstrap 95% CI | A-only / B-only | sign-test p |")
        L.append("|---|---|---|---|---|")
        for rule in ("asc:1+s", "asc:1+2s", "asc:s"):
            groups = []
            for ca, cb in zip(vote[rule], vote["sc"]):
                ids = sorted(ca)
                groups.append(([ca[i] for i in ids], [cb[i] for i in ids]))
            n10, n01, p = stats.problem_sign_test(groups)
            d, lo, hi = stats.paired_bootstrap(groups, reps=1000)
            verdicts[(rule, "sc", "test")] = (d, p)
            L.append(f"| {rule} vs SC | {d:+.1f} | [{lo:+.1f}, {hi:+.1f}] | {n10} / {n01} | {p:.3g} |")
        L.append("")
        for s in seeds:
            vm = WORK / tag / f"seed{s}" / "ranker" / "val_metrics.json"
            if vm.is_file():
                L.append(f"Ranker held-out questions (seed {s}): `{json.dumps(json.loads(vm.read_text()))[:400]}`\n")
    else:
        L.append("(not run)\n")

    # Table 1
    L.append("## Table-1 analysis: positive-only vs negative-only model (test, greedy)\n")
    L.append("| seed | solved by CoT-KD (pos only) | solved by neg-only | both | IoU |")
    L.append("|---|---|---|---|---|")
    for s, cp, cn in zip(seeds, res["cotkd"]["test"], res["neg"]["test"]):  # empty if either is missing
        o = stats.overlap({i for i, ok in cp.items() if ok}, {i for i, ok in cn.items() if ok})
        L.append(f"| {s} | {o['a']} | {o['b']} | {o['both']} | {o['iou']:.2f} |")
    L.append("\n(The paper: 253 vs 166 solved, 29 in common, IoU 0.07, on MATH.)\n")

    L.append("## Findings (stated mechanically from the numbers above)\n")

    def say(a, b, split, claim):
        if (a, b, split) not in verdicts:
            return f"- {claim}: not measured ({NAMES.get(a, a)} or {NAMES.get(b, b)} did not finish)."
        d, p = verdicts[(a, b, split)]
        sig = "significant at 0.05" if p < 0.05 else "not significant"
        if d == 0:
            rel = f"is level with {NAMES.get(b, b)}"
        else:
            rel = f"is {abs(d):.1f} points {'higher' if d > 0 else 'lower'} than {NAMES.get(b, b)}"
        return f"- {claim}: {NAMES.get(a, a)} {rel} on {split} (sign-test p = {p:.3g}, {sig})."

    top = max(stats.mean_std(acc[(v, "test")])[0] for v in done)
    if top < 10:
        L.append(f"- **Caveat: the best student reaches only {top:.1f}% greedy test accuracy, so the students "
                 "have not learnt the task and none of the comparisons below says anything about the method.** "
                 "See the base-model probe above: the base cannot yet copy numbers from the statement.")
    L.append(say("nat", "cotkd", "test", "NAT beats CoT-KD?"))
    L.append(say("nat", "cotkd", "ood", "NAT beats CoT-KD out of distribution?"))
    L.append(say("mix", "cotkd", "test", "MIX hurts?"))
    L.append(say("nce", "nat", "test", "NCE adds on top of NAT?"))
    if ("asc:1+s", "sc", "test") in verdicts:
        L.append(say("asc:1+s", "sc", "test", "ASC beats SC?"))
    L.append("")
    return save(out or HERE / "RESULTS-v1.md", "\n".join(L) + "\n", log)


def save(out: Path, text: str, log: list[str]) -> Path:
    """``text`` plus an "Exact commands" block (paths relative to this folder), written atomically."""
    text += "## Exact commands\n\n```\n" + "".join(c.replace(str(HERE) + "/", "") + "\n" for c in log) + "```\n"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", default="quick")
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args(argv)
    import run as runmod

    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = json.loads(runmod.TUNED.read_text())["lr"] if runmod.TUNED.is_file() else {v: runmod.DEFAULT_LR for v in ORDER}
    best = best_variant(args.tag, seeds, lrs)
    write(args.tag, seeds, lrs, "as recorded", best, float("nan"), [], argv or [])


if __name__ == "__main__":
    main()
