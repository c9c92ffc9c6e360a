"""Reading the worlds study's finished runs (work/study/w<WORLD_SEED>/<tag>) into plain data.

``collect`` gathers what RESULTS.md needs (per-problem correctness, parameter counts, premise counts,
learning curves, vote accuracies, the ASC rankers' held-out quality); ``vote_changes``, ``busy_time``
and ``since_started`` are pure helpers over run outputs. ``report_study`` turns the data into the report.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from worlds import WORLDS  # noqa: E402
RARE_DEMO = re.compile(r"at the market: (\d+) \* (-?\d+) - (\d+) = (-?\d+)")


def correct_map(pred_file: Path, prefix: str) -> dict[str, bool]:
    import report

    return report.correctness(pred_file, prefix=prefix)


def correct_map_rule(pred_file: Path, rule: str) -> dict[str, bool]:
    import report

    return report.correctness(pred_file, rule=rule)


def count_rare_demos(text: str) -> int:
    """Lines of a rationale that apply the rare rule correctly to the number they show (3 * x - 2)."""
    return sum(m.group(1) == "3" and m.group(3) == "2" and int(m.group(4)) == 3 * int(m.group(2)) - 2
               for m in RARE_DEMO.finditer(text))


def collect(P: dict, tag: str, seeds: list[int], methods: list[str]) -> dict:
    import study

    root = P["root"] / tag
    test = [json.loads(l) for l in (P["data"] / "test.jsonl").open()]
    data: dict = {"problems": {p["id"]: {"subject": p["subject"], "level": p["level"]} for p in test},
                  "acc": {}, "params": {}, "premise": {}, "nll": {}, "curves": {}, "votes": {}, "seeds": seeds}
    for w in WORLDS:
        for m in methods:
            per = []
            for s in seeds:
                pred = root / w / f"seed{s}" / f"{m}-pred" / "predictions.jsonl"
                if not (pred.parent / "manifest.json").is_file():
                    break
                per.append(correct_map(pred, "test"))
            if len(per) == len(seeds):
                data["acc"].setdefault(w, {})[m] = per
            d = root / w / f"seed{seeds[0]}" / m
            if m not in data["params"] and (d / "manifest.json").is_file():
                data["params"][m] = study.trainable_params(d)
        pos = neg = 0
        for s in seeds:
            split = root / w / f"seed{s}" / "split"
            for name in ("pos.jsonl", "neg.jsonl"):
                f = split / name
                if f.is_file():
                    n = sum(count_rare_demos(json.loads(l).get("rationale") or "") for l in f.open())
                    pos, neg = (pos + n, neg) if name == "pos.jsonl" else (pos, neg + n)
            nll = root / w / f"seed{s}" / "premise_nll.json"
            if nll.is_file():
                for k, v in json.loads(nll.read_text()).items():
                    data["nll"].setdefault(w, {}).setdefault(k, []).append(v["nll_per_token"])
        data["premise"][w] = {"pos": pos, "neg": neg}
        for m in methods:  # learning curves: seed 0 (the first seed)
            cdir = root / w / f"seed{seeds[0]}" / f"{m}-curve"
            pts = []
            for ck in sorted(cdir.glob("step-*-pred")) if cdir.is_dir() else []:
                c = correct_map(ck / "predictions.jsonl", "val")
                if c:
                    pts.append((int(ck.name.split("-")[1]), 100 * sum(c.values()) / len(c)))
            if pts:
                data["curves"].setdefault(w, {})[m] = pts
        cmp_file = root / w / "compare" / "compare.json"
        if cmp_file.is_file():
            data.setdefault("compare", {})[w] = json.loads(cmp_file.read_text())
        for s in seeds:  # the ASC ranker's held-out quality, as train-ranker measured it
            rm = root / w / f"seed{s}" / "ranker" / "manifest.json"
            if rm.is_file() and "val" in (man := json.loads(rm.read_text())):
                data.setdefault("rankers", {}).setdefault(w, []).append({"seed": s, **man["val"]})
        for m in ("nce", "cotkd"):
            for s in seeds:
                mf = root / w / f"seed{s}" / f"vote-{m}" / "eval-test" / "metrics" / "metrics.json"
                if mf.is_file():
                    (res,) = json.loads(mf.read_text())["files"].values()
                    rows = {k: v for k, v in res["overall"].items() if isinstance(v, float)}
                    data["votes"].setdefault(w, {}).setdefault(m, []).append(rows)
                    pred = mf.parents[2] / "predictions.jsonl"
                    records = [json.loads(line) for line in pred.open()]
                    rules = sorted({k for r in records for k in (r.get("votes") or {})})
                    per = data.setdefault("vote_correct", {}).setdefault(w, {}).setdefault(m, {})
                    for rule in rules:
                        per.setdefault(rule, []).append(correct_map_rule(pred, rule))
                    if "asc:1+s" in rules:
                        data.setdefault("vote_changes", {}).setdefault(w, {}).setdefault(m, []).append(
                            vote_changes(records, per["sc"][-1], per["asc:1+s"][-1], "asc:1+s"))
    return data


def vote_changes(records: list[dict], sc_right: dict[str, bool], asc_right: dict[str, bool], rule: str) -> dict:
    """Where ASC (``rule``) picks a different answer than SC: how many problems, how many of them had a tie
    at the top of SC's count (so the ranker only broke the tie), and how often each vote was right there.

    ``records``: ``negkd infer --ranker`` rows (``votes`` per rule, ``candidates`` with ``pred``);
    ``sc_right`` / ``asc_right``: problem id -> the vote's answer is correct (graded as the report grades).
    SC's count is ``negkd.voting.tally``'s, the grouping of equivalent answers that infer's vote uses."""
    from negkd.voting import tally

    out = {"problems": len(records), "changed": 0, "tied": 0, "sc_right": 0, "asc_right": 0}
    for r in records:
        votes = r.get("votes") or {}
        if votes.get(rule) == votes.get("sc"):
            continue
        out["changed"] += 1
        top = sorted((n for _, n, _ in tally([c.get("pred") for c in r.get("candidates") or []])), reverse=True)[:2]
        out["tied"] += len(top) == 2 and top[0] == top[1]
        out["sc_right"] += sc_right[r["id"]]
        out["asc_right"] += asc_right[r["id"]]
    return out


def busy_time(root: Path, gap_s: float = 300.0) -> tuple[float, int]:
    """Seconds during which some step of the study was computing, and the number of sittings it took.

    Every negkd step writes ``started_at`` and ``wall_time_s`` into its ``manifest.json``; the union of
    those intervals over every manifest under ``root`` is the study's compute time, whatever pauses or
    sessions lay between (the time from the first start counts those too). A gap longer than ``gap_s``
    between intervals starts a new sitting."""
    spans = []
    for f in root.rglob("manifest.json"):
        try:
            m = json.loads(f.read_text())
            t0 = datetime.datetime.fromisoformat(m["started_at"]).timestamp()
            spans.append((t0, t0 + float(m["wall_time_s"])))
        except (ValueError, KeyError, TypeError):
            continue  # not a negkd step's manifest
    busy, sittings, end = 0.0, 0, None
    for a, b in sorted(spans):
        if end is None or a > end + gap_s:
            sittings += 1
        if end is None or a > end:
            busy += b - a
        elif b > end:
            busy += b - end
        end = b if end is None else max(end, b)
    return busy, sittings


def since_started(tag_root: Path) -> float:
    """Seconds from the first start of a tag (``study.py`` writes ``TAG/.started`` once) to now; nan if unknown."""
    started = tag_root / ".started"
    return datetime.datetime.now().timestamp() - float(started.read_text()) if started.is_file() else float("nan")
