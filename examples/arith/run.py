"""Drive the arithmetic reproduction through the real ``negkd`` CLI, one invocation per step.

    python run.py --tag quick --seeds 0            # make quick
    python run.py --tag full --seeds 0,1,2 --tune  # make full (LR grid on the val split first)

Per seed ``s`` (data split and base model are shared by all seeds):

    teacher server (127.0.0.1) --negkd sample--> samples --negkd split--> pos / neg
    gold  = negkd train-pos --no-neg  on the gold solutions          (fine-tune on gold)
    cotkd = negkd train-pos --no-neg  on pos                         (CoT-KD)
    mix   = negkd train-pos SPLIT --mix SPLIT                        (MIX: one LoRA on pos + neg as if all right)
    neg   = negkd train-neg  on neg                                  (negative-only model)
    nat   = negkd train-pos --neg <neg>  on pos                      (NAT)
    nce   = negkd calibrate --nat <nat>  on pos                      (NAT+NCE)
    each: negkd infer --greedy on val+test+ood, negkd eval per split
    ranker = negkd train-ranker on the teacher's graded samples; SC@N vs ASC@N on the best student

Every variant trains for the same number of optimizer steps with the same batch size. Each
method's learning rate comes from ``tuned_lr.json`` (written by ``--tune``: a grid on the val
split, seed 0, same budget for every method). A step whose output directory holds a finished run
with the same command is skipped, so an interrupted run resumes by rerunning the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import arithgen  # noqa: E402

# One torch thread per process: on a small shared CPU, two threads spin-wait on each other
# (measured: pretraining ran at 3.9k tok/s with 1 thread vs <1k tok/s with 2 under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
NEGKD = os.environ.get("NEGKD", str(REPO / ".venv" / "bin" / "negkd"))
PY = sys.executable
WORK = HERE / "work"
DATA = WORK / "data"
BASE = WORK / "base"
TUNED = HERE / "tuned_lr.json"

VARIANTS = ["gold", "cotkd", "mix", "neg", "nat", "nce"]
LR_GRID = [1e-3, 3e-3, 1e-2]
DEFAULT_LR = 3e-3

# The shared training budget (every variant): optimizer steps x batch.
TRAIN = dict(steps=200, batch=16, lora_r=16, lora_alpha=32, targets="all-linear", max_length=256)
TEACHER_N = 4  # teacher samples per training problem
VOTE_N = 8  # candidates per problem for SC / ASC
JOBS = int(os.environ.get("ARITH_JOBS", "2"))  # negkd processes at once (independent steps only)
VOTE_EVERY = 3  # SC / ASC on every 3rd test problem (100 of 300, 20 per level): CPU budget
PRETRAIN_STEPS = 2000
RANKER_STEPS = 150  # pairs of 8 per step

TEACHER_PROMPT = {
    "instruction": "Solve the word problem step by step, showing the arithmetic of each step. "
                   "End with \"The answer is $\\boxed{N}$.\"",
    "examples": [],  # filled from two generated problems outside every split
    "template": "Problem:\n{question}\n",
    "answer_prefix": "Solution:\n",
}

LOG: list[str] = []  # every negkd command run, for RESULTS.md


def sh(cmd: list[str], out: Path | None = None, env: dict | None = None, key: str | None = None) -> None:
    """Run one command; skip it when ``out`` holds a finished run of the same command (or of the same
    ``key``, for commands with a part that changes on every run, like a server's port)."""
    line = " ".join(shlex.quote(str(c)) for c in cmd)
    key = key or line
    stamp = out / ".arith-cmd" if out else None
    if out and (out / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == key:
        print(f"[skip] {out.relative_to(HERE)} is up to date", flush=True)
        LOG.append(line)
        return
    print(f"$ {line}", flush=True)
    t0 = time.time()
    r = subprocess.run([str(c) for c in cmd], env={**os.environ, **(env or {})})
    if r.returncode != 0:
        sys.exit(f"command failed (exit {r.returncode}): {line}")
    print(f"  ({time.time() - t0:.0f}s)", flush=True)
    LOG.append(line)
    if out:
        stamp.write_text(key)


def rel(p: Path) -> str:
    return os.path.relpath(p, HERE)


# ----------------------------------------------------------------------------- shared inputs


def prepare_data() -> None:
    if not (DATA / "ood.jsonl").is_file():
        subprocess.run([PY, str(HERE / "arithgen.py"), "--out", str(DATA)], check=True)
    gold = DATA / "gold.jsonl"
    if not gold.is_file():
        # the gold solutions as graded samples, so train-pos reads them like split's pos.jsonl
        with (DATA / "train.jsonl").open() as f, gold.open("w") as g:
            for line in f:
                p = json.loads(line)
                g.write(json.dumps({**p, "k": 0, "rationale": p["solution"], "pred": p["answer"], "correct": True}) + "\n")
    evalset = DATA / "evalset.jsonl"
    if not evalset.is_file():
        with evalset.open("w") as g:
            for split in ("val", "test", "ood"):
                g.write((DATA / f"{split}.jsonl").read_text())
    vote = DATA / "vote_test.jsonl"
    if not vote.is_file():
        # SC/ASC sample VOTE_N candidates per problem: on every VOTE_EVERY-th test problem (all levels alike)
        rows = (DATA / "test.jsonl").read_text().splitlines(keepends=True)
        vote.write_text("".join(rows[::VOTE_EVERY]))
    prompt = DATA / "teacher_prompt.json"
    if not prompt.is_file():
        import random

        rng = random.Random(4321)
        exs = []
        for level in (2, 3):
            p = arithgen.make_problem(rng, level, "demo")
            exs.append({"question": p["question"], "rationale": p["solution"]})
        prompt.write_text(json.dumps({**TEACHER_PROMPT, "examples": exs}, indent=1))
    subprocess.run([PY, str(HERE / "pretrain.py"), "--splits", str(DATA), "--out", str(BASE),
                    "--steps", str(PRETRAIN_STEPS), "--threads", os.environ["OMP_NUM_THREADS"]], check=True)
    probe = BASE / "probe.json"
    if not probe.is_file() or probe.stat().st_mtime < (BASE / "pretrain.json").stat().st_mtime:
        subprocess.run([PY, str(HERE / "probe_base.py"), "--base", str(BASE), "--data", str(DATA)], check=True)


@contextlib.contextmanager
def teacher_url(sdir: Path, teacher: str = "v1", wait_s: float = 20.0):
    """Serve the arithmetic teacher (``teacher_server.py --teacher``) on 127.0.0.1 for the block;
    yields its base URL. Shared by this v1 driver and the worlds study (study.py)."""
    url_file = sdir / ".teacher-url"
    url_file.unlink(missing_ok=True)
    srv = subprocess.Popen([PY, str(HERE / "teacher_server.py"), "--url-file", str(url_file), "--teacher", teacher],
                           stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + wait_s
        while not url_file.is_file():
            if time.monotonic() > deadline:
                sys.exit("teacher server did not start")
            time.sleep(0.1)
        yield url_file.read_text().strip()
    finally:
        srv.terminate()
        srv.wait()


def teacher_samples(seed: int, sdir: Path) -> Path:
    out = sdir / "teacher"
    with teacher_url(sdir) as url:
        cmd = [NEGKD, "sample", DATA / "train.jsonl", "-o", out, "--base-url", url, "--model", "arith-teacher",
               "--prompt", DATA / "teacher_prompt.json", "--n", TEACHER_N, "--temperature", 0.7,
               "--seed", seed, "--concurrency", 8]
        # the URL (a random port) is not part of the skip key
        key = " ".join(str(c) for c in cmd).replace(url, "URL")
        sh(cmd, out, env={"OPENAI_API_KEY": "none"}, key=key)
    return out


# ----------------------------------------------------------------------------- training


def common(seed: int, lr: float) -> list:
    t = TRAIN
    return ["--base-model", BASE, "--lr", lr, "--max-steps", t["steps"], "--batch-size", t["batch"],
            "--grad-accum", 1, "--seed", seed, "--max-length", t["max_length"], "--save-every", 0,
            "--log-every", 25, "--device", "cpu"]


def lora_flags() -> list:
    t = TRAIN
    return ["--lora-r", t["lora_r"], "--lora-alpha", t["lora_alpha"], "--target-modules", t["targets"]]


def train(variant: str, seed: int, lr: float, sdir: Path, split: Path, neg_dir: Path | None = None,
          nat_dir: Path | None = None) -> Path:
    out = sdir / f"{variant}-lr{lr:g}"
    c = common(seed, lr)
    if variant == "gold":
        cmd = [NEGKD, "train-pos", DATA / "gold.jsonl", "-o", out, "--no-neg", *lora_flags(), *c]
    elif variant == "cotkd":
        cmd = [NEGKD, "train-pos", split, "-o", out, "--no-neg", *lora_flags(), *c]
    elif variant == "mix":
        cmd = [NEGKD, "train-pos", split, "-o", out, "--mix", split, *lora_flags(), *c]
    elif variant == "neg":
        cmd = [NEGKD, "train-neg", split, "-o", out, *lora_flags(), *c]
    elif variant == "nat":
        cmd = [NEGKD, "train-pos", split, "-o", out, "--neg", neg_dir, "--lora-r", TRAIN["lora_r"],
               "--lora-alpha", TRAIN["lora_alpha"], *c]
    elif variant == "nce":
        cmd = [NEGKD, "calibrate", split, "-o", out, "--nat", nat_dir, *lora_flags(), *c]
    else:
        raise ValueError(variant)
    sh(cmd, out)
    return out


def greedy_eval(model_dir: Path) -> dict[str, dict]:
    """Greedy predictions on val+test+ood (one infer), then negkd eval per split."""
    pred = model_dir.parent / f"{model_dir.name}-pred"  # beside, not inside: infer hashes the model dir
    sh([NEGKD, "infer", DATA / "evalset.jsonl", "-o", pred, "--model", model_dir, "--greedy",
        "--max-new-tokens", 256, "--batch-size", 64, "--device", "cpu"], pred)
    return eval_splits(pred)


def eval_splits(pred: Path, splits=("val", "test", "ood")) -> dict[str, dict]:
    rows = [json.loads(l) for l in (pred / "predictions.jsonl").open()]
    res = {}
    for split in splits:
        d = pred / f"eval-{split}"
        d.mkdir(exist_ok=True)
        part = d / "predictions.jsonl"
        mine = [r for r in rows if r["id"].startswith(split + "-")]
        if not mine:
            continue
        text = "".join(json.dumps(r) + "\n" for r in mine)
        if not part.is_file() or part.read_text() != text:
            part.write_text(text)
        out = d / "metrics"
        sh([NEGKD, "eval", part, "-o", out, "--workers", 1], out)
        res[split] = json.loads((out / "metrics.json").read_text())
    return res


def accuracy(metrics: dict, key: str = "greedy") -> float:
    """Overall accuracy (%) for one rule from negkd eval's metrics.json (one predictions file per
    eval run here; eval stores fractions)."""
    (m,) = metrics["files"].values()
    return 100 * float(m["overall"][key])


# ----------------------------------------------------------------------------- main


def run_seed(seed: int, lrs: dict, tag: str, variants=VARIANTS) -> dict:
    sdir = WORK / tag / f"seed{seed}"
    sdir.mkdir(parents=True, exist_ok=True)
    teacher = teacher_samples(seed, sdir)
    split = sdir / "split"
    sh([NEGKD, "split", teacher, "-o", split, "--workers", 1], split)
    dirs: dict[str, Path] = {}

    def chain(vs):
        for v in vs:
            dirs[v] = train(v, seed, lrs[v], sdir, split, neg_dir=dirs.get("neg"), nat_dir=dirs.get("nat"))
            greedy_eval(dirs[v])

    # two independent chains side by side (one torch thread each): neg -> NAT -> NCE, and the baselines
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(JOBS) as ex:
        futs = [ex.submit(chain, [v for v in ("neg", "nat", "nce") if v in variants]),
                ex.submit(chain, [v for v in ("gold", "cotkd", "mix") if v in variants])]
        for f in futs:
            f.result()
    return dirs


def train_ranker(sdir: Path, seed: int) -> Path:
    """The ASC ranker on the teacher's graded rationales (+ gold solutions), backbone = the base."""
    ranker = sdir / "ranker"
    sh([NEGKD, "train-ranker", sdir / "split", "-o", ranker, "--base-model", BASE, "--seed", seed,
        "--with-gold", "--max-steps", RANKER_STEPS, "--batch-size", 8, "--lr", 1e-3, "--lora-r", 16,
        "--lora-alpha", 32, "--target-modules", "all-linear", "--max-length", 256, "--save-every", 0,
        "--device", "cpu"], ranker)
    return ranker


def vote(sdir: Path, seed: int, variant: str, model: Path, ranker: Path) -> Path:
    """VOTE_N sampled candidates per vote_test problem, SC and ASC votes, negkd eval."""
    pred = sdir / f"vote-{variant}"
    sh([NEGKD, "infer", DATA / "vote_test.jsonl", "-o", pred, "--model", model, "--n", VOTE_N,
        "--temperature", 0.7, "--ranker", ranker, "--seed", seed, "--max-new-tokens", 256, "--batch-size", 64,
        "--device", "cpu"], pred)
    eval_splits(pred, splits=("test",))
    return pred


def tune(tag: str, seed: int = 0) -> dict:
    """LR grid on the val split (seed 0), same budget per method; NAT uses the tuned neg adapter and
    NCE the tuned NAT checkpoint. The grid runs in ``work/TAG/seed0``, so the seed-0 runs at the chosen
    learning rates are the experiment's seed-0 runs (not trained twice); the LRs of one method train
    side by side."""
    from concurrent.futures import ThreadPoolExecutor

    sdir = WORK / tag / f"seed{seed}"
    sdir.mkdir(parents=True, exist_ok=True)
    teacher = teacher_samples(seed, sdir)
    split = sdir / "split"
    sh([NEGKD, "split", teacher, "-o", split, "--workers", 1], split)
    best: dict[str, float] = {}
    table: dict[str, dict] = {}
    dirs: dict[str, Path] = {}

    def one(v: str, lr: float) -> float:
        d = train(v, seed, lr, sdir, split, neg_dir=dirs.get("neg"), nat_dir=dirs.get("nat"))
        return accuracy(greedy_eval(d)["val"])

    with ThreadPoolExecutor(JOBS) as ex:
        for v in VARIANTS:
            scores = dict(zip(LR_GRID, ex.map(lambda lr: one(v, lr), LR_GRID)))
            best[v] = max(LR_GRID, key=lambda lr: (scores[lr], -lr))
            dirs[v] = sdir / f"{v}-lr{best[v]:g}"
            table[v] = {f"{lr:g}": sc for lr, sc in scores.items()}
            print(f"tune {v}: val greedy {table[v]} -> lr {best[v]:g}", flush=True)
    TUNED.write_text(json.dumps({"lr": best, "val_greedy": table, "grid": LR_GRID, "seed": seed,
                                 "budget": TRAIN}, indent=1) + "\n")
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", default="quick", help="results go to work/TAG")
    ap.add_argument("--seeds", default="0", help="comma-separated experiment seeds (teacher sampling + training)")
    ap.add_argument("--tune", action="store_true", help="tune each method's LR on val (seed 0) first")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of " + ",".join(VARIANTS) + " (RESULTS.md marks the others not run)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    started = WORK / args.tag / ".started"
    if not started.is_file():
        started.parent.mkdir(parents=True, exist_ok=True)
        started.write_text(str(t0))
    prepare_data()
    if args.tune:
        lrs, lr_source = tune(args.tag), "tuned now on val (seed 0)"
    elif TUNED.is_file():
        lrs, lr_source = json.loads(TUNED.read_text())["lr"], f"fixed, from {TUNED.name} (the full run's val tuning)"
    else:
        lrs, lr_source = {v: DEFAULT_LR for v in VARIANTS}, f"fixed at {DEFAULT_LR:g} for every method (not tuned)"
    runs = {}
    for s in seeds:
        runs[s] = run_seed(s, lrs, args.tag, variants=args.variants.split(","))
    # SC vs ASC on the best student (highest mean val greedy accuracy over seeds)
    import report

    best = report.best_variant(args.tag, seeds, lrs)
    for s in seeds:
        sdir = WORK / args.tag / f"seed{s}"
        ranker = train_ranker(sdir, s)
        vote(sdir, s, best, runs[s][best], ranker)
    # wall time from this tag's first start (a resumed run counts the interrupted attempts too)
    started = WORK / args.tag / ".started"
    wall = time.time() - float(started.read_text()) if started.is_file() else time.time() - t0
    report.write(args.tag, seeds, lrs, lr_source, best, wall, LOG, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
