"""RESULTS.md and the plots of the worlds study, from the runs under work/study/w<WORLD_SEED>/<tag>.

``study_runs.collect`` reads the finished runs into plain data (per-problem correctness, parameter counts,
premise counts, learning curves, vote accuracies); ``build`` turns that data into the markdown and
the two PNGs (``did.png``, ``curves.png``) and is tested on synthetic inputs. The statistics of the
pre-registered family (README) come from ``studystats``.

    python report_study.py --tag full --seeds 0,1,2,3,4 [--world-seed 0]   # rebuild RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import studystats as ss  # noqa: E402
from study_runs import WORLDS, busy_time, collect, since_started  # noqa: E402

NAMES = {"gold": "fine-tune on gold", "cotkd": "CoT-KD", "cotkd_long": "CoT-KD-long (2S steps)", "mix": "MIX",
         "nt": "NT", "ul": "UL", "neg": "neg-only", "nat": "NAT", "natnull": "NAT-null (zero neg branch)",
         "nce": "NAT+NCE"}
SUBJECTS = ("rare", "common")
REPS = 2000


# ----------------------------------------------------------------------------- statistics


def matrix(per_seed: list[dict[str, bool]], ids: list[str]) -> np.ndarray:
    """(seeds, problems) 0/1 matrix over ``ids``."""
    return np.array([[int(c[i]) for i in ids] for c in per_seed])


def ids_of(problems: dict, subject: str | None = None, level: int | None = None) -> list[str]:
    return sorted(i for i, p in problems.items()
                  if (subject is None or p["subject"] == subject) and (level is None or p["level"] == level))


def family(data: dict, reps: int = REPS) -> list[dict]:
    """The pre-registered family (README): estimates, 95% CIs, raw and Holm-adjusted p, verdicts.
    A test whose methods did not run in both worlds is listed as not run (and left out of Holm)."""
    acc, probs = data["acc"], data["problems"]
    rare, common = ids_of(probs, "rare"), ids_of(probs, "common")

    def have(w, *ms):
        return w in acc and all(m in acc[w] for m in ms)

    rows = []
    for name, m, b, pred in (("H1", "nat", "cotkd", ">0"), ("H2", "mix", "cotkd", ">0"), ("H2", "nt", "cotkd", ">0"),
                             ("H2", "ul", "cotkd", ">0"), ("H1 control", "natnull", "cotkd", "=0")):
        label = f"DiD {NAMES[m]} − {NAMES[b]}, rare"
        if have("exclusive", m, b) and have("control", m, b):
            mats = [matrix(acc[w][x], rare) for w in WORLDS for x in (m, b)]
            parts = (ss.diff(*mats[:2]), ss.diff(*mats[2:]))  # (exclusive, control) differences
            rows.append({"id": name, "test": label, "predicted": pred, "parts": parts,
                         **ss.hier_bootstrap(ss.did, mats, reps)})
        else:
            rows.append({"id": name, "test": label, "predicted": pred, "not_run": True})
    if have("exclusive", "nat", "natnull"):
        r = ss.hier_bootstrap(ss.diff, [matrix(acc["exclusive"][x], rare) for x in ("nat", "natnull")], reps)
        rows.append({"id": "H3", "test": "NAT − NAT-null, rare, exclusive", "predicted": ">0", **r})
    else:
        rows.append({"id": "H3", "test": "NAT − NAT-null, rare, exclusive", "predicted": ">0", "not_run": True})
    for w in WORLDS:
        lab = f"NAT − CoT-KD, common, {w}"
        if have(w, "nat", "cotkd"):
            r = ss.hier_bootstrap(ss.diff, [matrix(acc[w][x], common) for x in ("nat", "cotkd")], reps)
            rows.append({"id": "H4", "test": lab, "predicted": "≈0", **r})
        else:
            rows.append({"id": "H4", "test": lab, "predicted": "≈0", "not_run": True})
    ran = [r for r in rows if not r.get("not_run")]
    # a bootstrap p of 0 is only "< 2 / reps": Holm adjusts that bound
    for r, adj in zip(ran, ss.holm([max(r["p"], 2 / r["reps"]) for r in ran])):
        r["p_holm"] = adj
        r["verdict"] = verdict(r)
    return rows


def verdict(r: dict, margin: float = 5.0) -> str:
    """The README's decision rule for one pre-registered test."""
    lo, hi = r["ci"]
    if r["predicted"] == ">0":
        if r["p_holm"] < 0.05:
            return "holds" if r["estimate"] > 0 else "fails (opposite sign)"
        return "fails (not significant)"
    if r["predicted"] in ("≈0", "=0"):
        if r["p_holm"] < 0.05:
            return "fails (a difference)"
        return "holds" if -margin <= lo and hi <= margin else "inconclusive (CI wider than ±5)"
    raise ValueError(r["predicted"])


SECONDARY = (("nat", "cotkd_long"), ("nce", "nat"), ("nat", "cotkd"), ("natnull", "cotkd"), ("mix", "cotkd"),
             ("nt", "cotkd"), ("ul", "cotkd"), ("neg", "cotkd"), ("cotkd", "gold"))


def from_compare(cmp: dict, a: str, b: str, subject: str) -> dict | None:
    """``a − b`` (accuracy points) on one subject from ``negkd compare``'s compare.json: estimate, its
    hierarchical-bootstrap 95% CI and the sign-flip p (compare reports B − A for each pair (A, B))."""
    for c in cmp.get("comparisons", []):
        if {c["a"], c["b"]} != {a, b}:
            continue
        r = (c.get("by_subject", {}).get(subject) or {}).get("greedy")
        if r is None:
            return None
        sign = 1 if c["b"] == a else -1
        lo, hi = (100 * sign * x for x in r["ci"])
        return {"estimate": 100 * sign * r["diff"], "ci": (min(lo, hi), max(lo, hi)), "p": r["p"], "reps": REPS,
                "source": "compare"}
    return None


def secondary(data: dict, reps: int = REPS) -> list[dict]:
    """Reported, not in the family: controls, NCE on NAT, each method against CoT-KD, per world and
    subject. From ``negkd compare`` (compare.json) where the study ran it, else ``studystats``."""
    acc, probs = data["acc"], data["problems"]
    out = []
    for a, b in SECONDARY:
        for w in WORLDS:
            if w in acc and a in acc[w] and b in acc[w]:
                for subj in SUBJECTS:
                    r = from_compare(data.get("compare", {}).get(w, {}), a, b, subj)
                    if r is None:
                        r = ss.hier_bootstrap(ss.diff, [matrix(acc[w][x], ids_of(probs, subj)) for x in (a, b)], reps)
                        r["source"] = "bootstrap"
                    out.append({"test": f"{NAMES[a]} − {NAMES[b]}", "world": w, "subject": subj, **r})
    for w, per in data.get("vote_correct", {}).items():  # ASC - SC with each voting student, all test problems
        for m, rules in per.items():
            if "sc" not in rules:
                continue
            ids = sorted(rules["sc"][0])
            for rule in sorted(r for r in rules if r.startswith("asc:")):
                if len(rules[rule]) == len(rules["sc"]):
                    r = ss.hier_bootstrap(ss.diff, [matrix(rules[x], ids) for x in (rule, "sc")], reps)
                    out.append({"test": f"{NAMES[m]}: {rule} − sc (votes of `negkd infer`)", "world": w,
                                "subject": "all", **r})
    return out


def overlap(data: dict) -> list[dict]:
    """CoT-KD vs neg-only, pooled over seeds: kappa, observed/expected shared solves, P(neg | CoT-KD fails),
    per subject and level."""
    acc, probs = data["acc"], data["problems"]
    out = []
    for w in WORLDS:
        if not (w in acc and "cotkd" in acc[w] and "neg" in acc[w]):
            continue
        cells = [(subj, None) for subj in SUBJECTS] + [(subj, lv) for subj in SUBJECTS for lv in (1, 2, 3, 4, 5)]
        for subj, lv in cells:
            ids = ids_of(probs, subj, lv)
            if not ids:
                continue
            a = matrix(acc[w]["cotkd"], ids).ravel().astype(bool)
            b = matrix(acc[w]["neg"], ids).ravel().astype(bool)
            out.append({"world": w, "subject": subj, "level": lv if lv else "all", "n": int(a.size),
                        "cotkd": int(a.sum()), "neg": int(b.sum()), "both": int((a & b).sum()),
                        "kappa": ss.kappa(a, b), "obs_exp": ss.shared_ratio(a, b),
                        "p_neg_given_cotkd_fails": ss.p_b_given_not_a(a, b)})
    return out


# ----------------------------------------------------------------------------- plots


def fmt_p(p: float, reps: int, bound: bool = False) -> str:
    """A bootstrap p of 0 means no replicate crossed 0: p < 2 / reps, not p = 0; ``bound``: p is
    a Holm adjustment of such a bound (an upper bound itself)."""
    if p == 0:
        return f"< {2 / reps:.1g}"
    return f"≤ {p:.3g}" if bound else f"{p:.3g}"


def plot_did(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("not_run")]
    fig, ax = plt.subplots(figsize=(10, 0.5 * max(3, len(rows)) + 1.4), dpi=120)
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows):
        color = "tab:green" if r["verdict"] == "holds" else ("tab:red" if r["verdict"].startswith("fails") else "tab:gray")
        ax.errorbar(r["estimate"], y, xerr=[[r["estimate"] - r["ci"][0]], [r["ci"][1] - r["estimate"]]], fmt="o",
                    color=color, capsize=4)
        ax.text(1.01, y, f"Holm p {fmt_p(r['p_holm'], r['reps'], r['p'] == 0)}", transform=ax.get_yaxis_transform(), va="center",
                fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['id']}: {r['test']}" for r in rows], fontsize=8)
    ax.set_xlabel("difference in test accuracy points, 95% CI (bootstrap over seeds, then problems)", fontsize=9)
    ax.set_title("Pre-registered tests (green: holds, red: fails, grey: inconclusive)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(curves: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [w for w in WORLDS if w in curves]
    fig, axes = plt.subplots(1, max(1, len(ws)), figsize=(5.4 * max(1, len(ws)), 4.6), dpi=120, sharey=True,
                             squeeze=False)
    colors = dict(zip(NAMES, plt.get_cmap("tab10").colors))  # one colour per method in every panel
    styles = {"cotkd_long": "--", "natnull": "--"}  # the controls dashed next to what they control
    handles = {}
    for ax, w in zip(axes[0], ws):
        for m, pts in sorted(curves[w].items(), key=lambda kv: list(NAMES).index(kv[0])):
            x, y = zip(*sorted(pts))
            (h,) = ax.plot(x, y, marker="o", ms=3, color=colors[m], ls=styles.get(m, "-"), label=NAMES[m])
            handles[m] = h
        ax.set_title(f"{w} world: val accuracy (seed 0)", fontsize=10)
        ax.set_xlabel("optimizer steps of the method's own training")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val greedy accuracy %")
    order = [m for m in NAMES if m in handles]
    fig.legend([handles[m] for m in order], [NAMES[m] for m in order], fontsize=8, loc="lower center",
               ncol=min(5, len(order)), frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- markdown


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = float(np.mean(xs))
    return f"{m:.1f} ± {float(np.std(xs, ddof=1)):.1f}" if len(xs) > 1 else f"{m:.1f}"


def _acc(per_seed: list[dict], ids: list[str]) -> list[float]:
    return [100 * float(np.mean([c[i] for i in ids])) for c in per_seed]


def build(data: dict, out_dir: Path, header: list[str], missing: dict, reps: int = REPS) -> str:
    """The RESULTS.md text; writes did.png and curves.png into out_dir."""
    probs, acc = data["problems"], data["acc"]
    L = list(header)
    L.append("## 1. Premise check\n")
    L.append("Correct rare-skill step demonstrations (a line applying `3 * x - 2` right to the number it shows) "
             "in the teacher's graded rationales (`negkd split`), over all seeds; and the NLL per token of the gold "
             "rare-skill lines of the rare val problems under each student (mean over seeds, `premise_nll.py`).\n")
    L.append("| world | demos in positives | demos in negatives | share in positives | NLL under CoT-KD | NLL under neg-only |")
    L.append("|---|---|---|---|---|---|")
    for w in WORLDS:
        pr = data["premise"].get(w, {"pos": 0, "neg": 0})
        tot = pr["pos"] + pr["neg"]
        nll = data["nll"].get(w, {})
        share = f"{100 * pr['pos'] / tot:.1f}%" if tot else "-"
        L.append(f"| {w} | {pr['pos']} | {pr['neg']} | {share} | "
                 f"{np.mean(nll['cotkd']):.3f} | {np.mean(nll['neg']):.3f} |" if "cotkd" in nll and "neg" in nll else
                 f"| {w} | {pr['pos']} | {pr['neg']} | {share} | - | - |")
    L.append("")
    L.append("## 2. Greedy test accuracy (%, mean ± std over seeds)\n")
    L.append("| method | trainable params | " + " | ".join(f"{w} {s}" for w in WORLDS for s in SUBJECTS) + " |")
    L.append("|---|---|" + "---|" * 4)
    methods = [m for m in NAMES if any(m in acc.get(w, {}) for w in WORLDS)]
    for m in methods:
        cells = [_ms(_acc(acc[w][m], ids_of(probs, s))) if m in acc.get(w, {}) else "-" for w in WORLDS for s in SUBJECTS]
        n = data["params"].get(m)
        L.append(f"| {NAMES[m]} | {f'{n:,}' if n else '?'} | " + " | ".join(cells) + " |")
    for m, why in missing.items():
        L.append(f"| {NAMES[m]} | - | not run: {why} | | | |")
    L.append("\nTrainable parameters are counted from each run's saved tensors (NAT: Pos-LoRA + gate unit, the frozen "
             "Neg-LoRA excluded; NAT+NCE: its stock adapter, the whole student, since the NAT model is only its teacher during calibration).\n")
    L.append("Rare-skill problems by level (%, mean over seeds):\n")
    L.append("| method | " + " | ".join(f"{w[:4]} L{lv}" for w in WORLDS for lv in (1, 2, 3, 4, 5)) + " |")
    L.append("|---|" + "---|" * 10)
    for m in methods:
        cells = [f"{np.mean(_acc(acc[w][m], ids_of(probs, 'rare', lv))):.0f}" if m in acc.get(w, {}) else "-"
                 for w in WORLDS for lv in (1, 2, 3, 4, 5)]
        L.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    L.append("")
    rows = family(data, reps)
    L.append("## 3. Pre-registered tests\n")
    L.append(f"Hierarchical bootstrap ({reps} replicates: seeds, then problems), two-sided p, Holm across the "
             "family; decision rules in the README. A DiD is the difference of two per-world differences; the "
             "column *exclusive − control* shows which world carries it.\n")
    L.append("| # | test | predicted | estimate | exclusive − control | 95% CI | p | p (Holm) | verdict |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        parts = f"{r['parts'][0]:+.1f} − ({r['parts'][1]:+.1f})" if "parts" in r else ""
        if r.get("not_run"):
            L.append(f"| {r['id']} | {r['test']} | {r['predicted']} | not run | | | | | |")
        else:
            L.append(f"| {r['id']} | {r['test']} | {r['predicted']} | {r['estimate']:+.1f} | {parts} | "
                     f"[{r['ci'][0]:+.1f}, {r['ci'][1]:+.1f}] | {fmt_p(r['p'], r['reps'])} | {fmt_p(r['p_holm'], r['reps'], r['p'] == 0)} | "
                     f"{r['verdict']} |")
    L.append("")
    carried = [r for r in rows if "parts" in r and not r.get("not_run")]
    if carried:
        L.append("Which world carries each DiD (a world's share = |its difference| / (|exclusive| + |control|)). "
                 "A positive DiD shows that negatives help where only they teach the rare skill only when the "
                 "exclusive-world difference is itself positive. When the control world carries it, the method "
                 "loses less in exclusive than in control, which is not a gain:\n")
        for r in carried:
            ex, co = r["parts"]
            tot = abs(ex) + abs(co)
            share = f"{abs(co) / tot:.0%} from the control world" if tot else "both differences are 0"
            L.append(f"- {r['test']}: exclusive {ex:+.1f}, control {co:+.1f}; {share}.")
        L.append("")
    if any(not r.get("not_run") for r in rows):
        plot_did(rows, out_dir / "did.png")
        L.append("![pre-registered estimates](did.png)\n")
    sec = secondary(data, reps)
    if sec:
        L.append("## 4. Controls and secondary comparisons (not in the family; raw p)\n")
        L.append("Source `compare`: `negkd compare` over the greedy test predictions (each seed a run; CI from its "
                 "hierarchical bootstrap over seeds then problems, p from its paired sign-flip test over problems; "
                 "`work/study/w*/TAG/WORLD/compare/compare.json`). Source `bootstrap`: `studystats.hier_bootstrap` "
                 "(ASC − SC rows, or where compare did not run).\n")
        L.append("| comparison | world | subject | estimate | 95% CI | p | source |")
        L.append("|---|---|---|---|---|---|---|")
        for r in sec:
            L.append(f"| {r['test']} | {r['world']} | {r['subject']} | {r['estimate']:+.1f} | "
                     f"[{r['ci'][0]:+.1f}, {r['ci'][1]:+.1f}] | {fmt_p(r['p'], r['reps'])} | {r.get('source', 'bootstrap')} |")
        L.append("")
    ov = overlap(data)
    cov = [(w, c) for w, cmp in data.get("compare", {}).items() for c in cmp.get("comparisons", [])
           if {c["a"], c["b"]} == {"cotkd", "neg"} and "greedy" in c.get("overlap", {})]
    if cov:
        L.append("## 5. Do CoT-KD and neg-only solve different problems?\n")
        L.append("All 300 test problems, from `negkd compare` (averaged over seed pairs; expected shared solves "
                 "= P x pA x pB under independence):\n")
        L.append("| world | seed pairs | both | CoT-KD only | neg-only only | neither | kappa | observed / expected both |")
        L.append("|---|---|---|---|---|---|---|---|")
        for w, c in cov:
            o = c["overlap"]["greedy"]
            only = {c["a"]: o["only_a"], c["b"]: o["only_b"]}
            L.append(f"| {w} | {o['seed_pairs']} | {o['shared']:.1f} | {only['cotkd']:.1f} | {only['neg']:.1f} | "
                     f"{o['neither']:.1f} | {o['kappa']:.2f} | {o['observed_over_expected']:.2f} |")
        L.append("\nBy subject and level, pooled over seeds (`studystats`), with P(neg-only solves | CoT-KD fails):\n")
    if ov:
        if not cov:
            L.append("## 5. Do CoT-KD and neg-only solve different problems? (pooled over seeds)\n")
        L.append("| world | subject | level | (seed, problem) pairs | CoT-KD | neg-only | both | kappa | "
                 "observed / expected both | P(neg-only solves | CoT-KD fails) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in ov:
            L.append(f"| {r['world']} | {r['subject']} | {r['level']} | {r['n']} | {r['cotkd']} | {r['neg']} | {r['both']} | "
                     f"{r['kappa']:.2f} | {r['obs_exp']:.2f} | {r['p_neg_given_cotkd_fails']:.2f} |")
        L.append("")
    if data["votes"]:
        L.append("## 6. SC vs ASC (ranker trained on the NAT student's own samples)\n")
        import run

        L.append(f"Rows as `negkd eval` names them, N = {run.VOTE_N} samples per problem at temperature 0.7 (`sc@N` "
                 f"is `sc@{run.VOTE_N}`); accuracy % on every test problem, mean ± std over seeds.\n")
        keys = sorted({k for w in data["votes"] for m in data["votes"][w] for row in data["votes"][w][m] for k in row})
        keys = [k for k in keys if k.startswith(("sc@", "asc@", "maj@", "pass@N", "first"))]
        L.append("| world | student | " + " | ".join(f"`{k}`" for k in keys) + " |")
        L.append("|---|---|" + "---|" * len(keys))
        for w, per in data["votes"].items():
            for m, rows_ in per.items():
                L.append(f"| {w} | {NAMES[m]} | " + " | ".join(_ms([100 * r[k] for r in rows_ if k in r]) for k in keys) + " |")
        L.append("")
        L += ranker_table(data.get("rankers", {}))
        L += vote_change_table(data.get("vote_changes", {}))
    if data["curves"]:
        plot_curves(data["curves"], out_dir / "curves.png")
        L.append("## 7. Learning curves (val, seed 0)\n")
        L.append("![learning curves](curves.png)\n")
        for w, per in data["curves"].items():
            for m, pts in per.items():
                L.append(f"- {w}, {NAMES[m]}: " + ", ".join(f"{s}: {a:.0f}%" for s, a in sorted(pts)))
        L.append("")
    return "\n".join(L) + "\n"


def ranker_table(rankers: dict) -> list[str]:
    """Markdown lines: each ASC ranker's quality on its own held-out questions (``train-ranker``'s val split),
    before and after training, and its mean score of right and of wrong samples."""
    if not rankers:
        return []
    L = ["The rankers on their held-out questions (`negkd train-ranker`'s val split of the NAT samples; "
         "pairwise accuracy over (right, wrong) pairs of one question, AUC over all samples pooled; "
         "before → after training):\n",
         "| world | seed | train questions | val questions | val right / wrong | pairwise accuracy | AUC | "
         "mean score right / wrong |",
         "|---|---|---|---|---|---|---|---|"]
    for w, rows in rankers.items():
        for r in rows:
            b = r.get("before_training", {})
            L.append(f"| {w} | {r['seed']} | {r.get('train_questions', '-')} | {r['questions']} | "
                     f"{r['positives']} / {r['negatives']} | {b.get('pairwise_accuracy', float('nan')):.2f} → "
                     f"{r['pairwise_accuracy']:.2f} | {b.get('auc', float('nan')):.2f} → {r['auc']:.2f} | "
                     f"{r['mean_score_pos']:.3f} / {r['mean_score_neg']:.3f} |")
    L.append("")
    return L


def vote_change_table(changes: dict) -> list[str]:
    """Markdown lines: per student, the problems where ASC (w = 1 + s) and SC disagree, summed over seeds."""
    if not changes:
        return []
    L = ["Where ASC (`asc:1+s`) picks a different answer than SC, summed over seeds (a tie: SC's two most "
         "frequent answers had the same count, so the ranker only broke the tie):\n",
         "| world | student | problems x seeds | ASC answer ≠ SC answer | of them ties | SC right there | ASC right there |",
         "|---|---|---|---|---|---|---|"]
    for w, per in changes.items():
        for m, rows in per.items():
            t = {k: sum(r[k] for r in rows) for k in rows[0]}
            L.append(f"| {w} | {NAMES[m]} | {t['problems']} | {t['changed']} | {t['tied']} | {t['sc_right']} | "
                     f"{t['asc_right']} |")
    L.append("")
    return L


def _versions() -> str:
    import report

    return report._versions()


def write(P: dict, tag: str, seeds: list[int], S: int, methods: list[str], missing: dict, wall: float, log: list[str],
          argv: list[str], out: Path | None = None) -> Path:
    import study

    data = collect(P, tag, seeds, methods)
    busy, sittings = busy_time(P["root"] / tag)
    header = [f"# Worlds study — results ({tag}: world seed {P['root'].name[1:]}, {len(seeds)} seed(s))\n",
              f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `python study.py "
              f"{' '.join(argv)}`; compute time {busy / 60:.0f} min in {sittings} sitting(s) (the union of every step's "
              f"run interval, from the manifests), {wall / 60:.0f} min from the first start of this tag to this report; "
              f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[1]:.1f}). Versions: {_versions()}.\n",
              f"Budget: S = {S} optimizer steps x batch {study.TRAIN['batch']} per method (CoT-KD-long 2S; NAT and "
              f"NAT-null after an S-step Neg-LoRA; NAT+NCE after NAT), lr {study.LR:g}, LoRA r={study.TRAIN['lora_r']} "
              f"all-linear, d_g = {study.GATE_DIM}; teacher {study.TEACHER_N} samples per training problem. "
              "Pre-registration: README.md (committed before any result).\n"]
    # only the study itself (tag full) writes the committed RESULTS.md; a quick smoke stays in work/
    out = out or (HERE / "RESULTS.md" if tag == "full" else P["root"] / tag / "RESULTS.md")
    import report

    return report.save(out, build(data, out.parent, header, missing), log)


def main(argv=None) -> None:
    import study

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", default="quick")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--world-seed", type=int, default=int(os.environ.get("WORLD_SEED", 0)))
    ap.add_argument("--steps", type=int, default=400, help="S of the runs (for the header)")
    args = ap.parse_args(argv)
    methods, missing = study.available_methods(study.METHODS)
    P = study.paths(args.world_seed)
    wall = since_started(P["root"] / args.tag)
    write(P, args.tag, [int(s) for s in args.seeds.split(",")], args.steps, methods, missing, wall, [], argv or [])


if __name__ == "__main__":
    main()
