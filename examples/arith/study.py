"""Drive the worlds study (README: "The worlds study") through the real ``negkd`` CLI, one step each.

    python study.py --tag quick --seeds 0 --steps 100 --methods cotkd,neg,nat,natnull,mix   # make quick
    python study.py --tag full --seeds 0,1,2,3,4                                            # make full
    python study.py --tag full --seeds 0,1,2,3,4 --world-seed 1                             # replicate

Everything goes to ``work/study/w<WORLD_SEED>/``: ``data/`` (both worlds' splits, from
``worlds.py``), ``base/`` (the pretrained base, shared by both worlds), and
``<tag>/<world>/seed<s>/`` per world and experiment seed:

    teacher (teacher_server.py --teacher study) --negkd sample (4 per problem)--> samples --negkd split--> split
    gold        negkd train-pos gold-<world>.jsonl --no-neg                   S steps
    cotkd       negkd train-pos split --no-neg                                S
    cotkd_long  negkd train-pos split --no-neg                                2S (compute control = Neg-LoRA + NAT)
    mix         negkd train-pos split --mix split                             S
    nt / ul     negkd train-pos split --nt split --neg-weight 0.05 / --ul split   S   (when this negkd has them)
    neg         negkd train-neg split                                         S
    nat         negkd train-pos split --neg neg --gate-dim 16                 S
    natnull     negkd train-pos split --neg neg-zero --gate-dim 16            S   (neg-zero = neg with lora_B = 0)
    nce         negkd calibrate split --nat nat                               S
    each        negkd infer --greedy on val+test+ood; negkd eval per split
    seed 0      learning curves: checkpoints every S/4 steps, each scored on val (infer + eval)
    ASC         negkd infer --n 16 on ASC_TRAIN training problems with the NAT student --> negkd split
                --> negkd train-ranker; negkd infer --n 8 --ranker on every test problem with nce and cotkd;
                negkd eval (rows sc@N, asc@N[...])
    premise     premise_nll.py: NLL of correct rare-skill steps under cotkd vs neg

A step whose output directory holds a finished run of the same command is skipped (``run.sh``), so
an interrupted run resumes by rerunning the same command. ``report_study.py`` writes RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (sh, eval_splits, the shared budget and paths)
import worlds  # noqa: E402

PY = sys.executable


def _negkd() -> str:
    """$NEGKD, else the repo's .venv/bin/negkd, else the negkd script beside this Python."""
    if os.environ.get("NEGKD") or Path(run.NEGKD).is_file():
        return run.NEGKD
    beside = Path(sys.executable).parent / "negkd"
    return str(beside) if beside.is_file() else run.NEGKD


NEGKD = _negkd()
STUDY = run.WORK / "study"

METHODS = ["gold", "cotkd", "cotkd_long", "mix", "nt", "ul", "neg", "nat", "natnull", "nce"]
NEEDS_NEG_LOSS = {"nt": "--nt", "ul": "--ul"}  # flags of the product issue's baselines (issue 11)
# Two chains run side by side (one torch thread each); a method waits for the ones it needs.
# Balanced by measured per-step cost (LoRA 0.34 s, NAT 0.9 s, NCE 0.75 s): ~2.6 S each in make full.
CHAINS = (["neg", "nat", "nce", "ul", "gold"], ["cotkd", "mix", "natnull", "cotkd_long", "nt"])
LR = 3e-3
GATE_DIM = 16  # d_g, scaled to hidden 128 (method.md's 128 was for 4k-wide models)
NEG_WEIGHT = 0.05
TEACHER_N = 4
# Share of the base's pretraining documents that are number-free sentences with the rare skill's words
# (worlds.vocab_text). Added after the pilot (README): with 0, no student could emit "trades"/"market".
MARKET_WORDS = 0.05
CURVE_POINTS = 4  # learning curve: val accuracy every S / CURVE_POINTS steps (seed 0)
ASC_TRAIN = 100  # training problems the NAT student samples 16 rationales for (the ranker's data)
ASC_SAMPLES = 16
VOTE_N = 8
TRAIN = dict(batch=16, lora_r=16, lora_alpha=32, targets="all-linear", max_length=256)


def steps_of(method: str, S: int) -> int:
    """Optimizer steps of a method's own training step (CoT-KD-long = Neg-LoRA + NAT)."""
    return 2 * S if method == "cotkd_long" else S


def available_methods(methods: list[str]) -> tuple[list[str], dict[str, str]]:
    """(methods this negkd can run, {method: why not}). NT/UL need `train-pos --nt/--ul` (issue 11)."""
    help_text = subprocess.run([NEGKD, "train-pos", "--help"], capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": "200"}).stdout
    missing = {m: f"this negkd's train-pos has no {flag} (the baselines of issue 11)"
               for m, flag in NEEDS_NEG_LOSS.items() if m in methods and flag not in help_text}
    return [m for m in methods if m not in missing], missing


# ----------------------------------------------------------------------------- data and base


def paths(world_seed: int) -> dict[str, Path]:
    root = STUDY / f"w{world_seed}"
    return {"root": root, "data": root / "data", "base": root / "base"}


def prepare(world_seed: int, pretrain_steps: int) -> dict[str, Path]:
    P = paths(world_seed)
    data = P["data"]
    if not (data / "train-control.jsonl").is_file():
        subprocess.run([PY, str(HERE / "worlds.py"), "--out", str(data), "--world-seed", str(world_seed)], check=True)
    for w in worlds.WORLDS:
        gold = data / f"gold-{w}.jsonl"
        if not gold.is_file():
            rows = [json.loads(l) for l in (data / f"train-{w}.jsonl").open()]
            run_text = "".join(json.dumps({**p, "k": 0, "rationale": p["solution"], "pred": p["answer"],
                                           "correct": True}) + "\n" for p in rows)
            gold.write_text(run_text)
    derived = {
        "evalset.jsonl": "".join((data / f"{s}.jsonl").read_text() for s in ("val", "test", "ood")),
        # pretrain.py reads train.jsonl for its tokenizer corpus (rare-skill problems are filtered out there)
        "train.jsonl": (data / "train-control.jsonl").read_text(),
    }
    for name, text in derived.items():
        if not (data / name).is_file():
            (data / name).write_text(text)
    for w in worlds.WORLDS:  # the ASC ranker's training problems: a fixed, level-balanced subset
        sub = data / f"asc-train{ASC_TRAIN}-{w}.jsonl"
        if not sub.is_file():
            rows = (data / f"train-{w}.jsonl").read_text().splitlines(keepends=True)
            step = max(1, len(rows) // ASC_TRAIN)
            sub.write_text("".join(rows[::step][:ASC_TRAIN]))
    prompt = data / "teacher_prompt.json"
    if not prompt.is_file():
        import random

        rng = random.Random(4321)  # two common-skill demos outside every split (the rare rule is never shown)
        exs = [{"question": (p := worlds.make_problem(rng, lv, "demo", rare=False))["question"], "rationale": p["solution"]}
               for lv in (2, 3)]
        prompt.write_text(json.dumps({**run.TEACHER_PROMPT, "examples": exs}, indent=1))
    subprocess.run([PY, str(HERE / "pretrain.py"), "--splits", str(data), "--out", str(P["base"]),
                    "--steps", str(pretrain_steps), "--threads", os.environ["OMP_NUM_THREADS"],
                    "--market-words", str(MARKET_WORDS)], check=True)
    return P


def teacher_samples(data: Path, world: str, seed: int, sdir: Path) -> Path:
    out = sdir / "teacher"
    with run.teacher_url(sdir, teacher="study") as url:
        cmd = [NEGKD, "sample", data / f"train-{world}.jsonl", "-o", out, "--base-url", url, "--model", "arith-teacher",
               "--prompt", data / "teacher_prompt.json", "--n", TEACHER_N, "--temperature", 0.7, "--seed", seed,
               "--concurrency", 8]
        run.sh(cmd, out, env={"OPENAI_API_KEY": "none"}, key=" ".join(str(c) for c in cmd).replace(url, "URL"))
    return out


# ----------------------------------------------------------------------------- the controls


def zero_neg(neg: Path, out: Path) -> Path:
    """NAT-null's neg branch: a copy of the Neg-LoRA directory ``neg`` with every ``lora_B`` tensor set to
    exactly 0 (so the branch outputs B·A·x = 0), everything else (config, A, metadata) unchanged.
    ``train-pos --neg OUT`` then builds the same integration unit (gate, Pos-LoRA) as NAT, with nothing
    to integrate. Written atomically; reused when it is newer than ``neg``'s adapter."""
    import torch
    from safetensors.torch import load_file, save_file

    src = neg / "adapter_model.safetensors"
    if (out / "adapter_model.safetensors").is_file() and (out / ".from").is_file() \
            and (out / ".from").read_text() == run_sha(src):
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in neg.iterdir():
        if f.is_file() and f.name not in ("manifest.json", "adapter_model.safetensors", ".arith-cmd", "metrics.jsonl"):
            shutil.copy2(f, tmp / f.name)
    tensors = load_file(str(src))
    n_b = 0
    for k in tensors:
        if "lora_B" in k:
            tensors[k] = torch.zeros_like(tensors[k])
            n_b += 1
    if n_b == 0:
        raise RuntimeError(f"{src}: no lora_B tensor to zero")
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / ".from").write_text(run_sha(src))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def run_sha(p: Path) -> str:
    from negkd.io import sha256_file

    return sha256_file(p)


def trainable_params(model_dir: Path) -> int:
    """Trainable parameters of a finished run, counted from its saved tensors: every tensor of a PEFT
    adapter (adapter_model.safetensors); for a NAT checkpoint every ``lora_*`` tensor except the frozen
    Neg-LoRA's (``lora_A_neg``/``lora_B_neg``)."""
    from safetensors import safe_open

    for name, skip in (("adapter_model.safetensors", ()), ("nat_model.safetensors", ("lora_A_neg", "lora_B_neg"))):
        f = model_dir / name
        if f.is_file():
            n = 0
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    if not any(s in k for s in skip):
                        shape = fh.get_slice(k).get_shape()
                        size = 1
                        for d in shape:
                            size *= d
                        n += size
            return n
    raise FileNotFoundError(f"{model_dir}: no adapter_model.safetensors or nat_model.safetensors")


# ----------------------------------------------------------------------------- training


class CurveWatcher:
    """Copies each checkpoint's usable payload (adapter or NAT tensors, negkd.json) out of
    ``RUN/checkpoints/step-N`` into ``RUN-curve/step-N`` as it appears: negkd keeps only the newest
    checkpoint, and the learning curve needs them all. Polls every 0.5 s; a checkpoint lives for
    S/CURVE_POINTS optimizer steps (many seconds), so none is missed in practice; a missed one is
    a missing point on the curve, never a wrong one."""

    PAYLOAD = ("adapter_model.safetensors", "adapter_config.json", "nat_model.safetensors", "nat_config.json",
               "negkd.json")

    def __init__(self, run_dir: Path, curve_dir: Path):
        self.src, self.dst = run_dir / "checkpoints", curve_dir
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._copy()  # the last one

    def _loop(self):
        while not self.stop.wait(0.5):
            self._copy()

    def _copy(self):
        if not self.src.is_dir():
            return
        for ck in sorted(self.src.glob("step-*")):
            dst = self.dst / ck.name
            if dst.is_dir() or not (ck / "trainer_state.json").is_file():
                continue
            tmp = self.dst / f".{ck.name}.tmp"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for name in self.PAYLOAD:
                    if (ck / name).is_file():
                        shutil.copy2(ck / name, tmp / name)
                os.replace(tmp, dst)
            except FileNotFoundError:  # deleted under us by the next checkpoint: a missing point
                shutil.rmtree(tmp, ignore_errors=True)


def train(method: str, seed: int, S: int, sdir: Path, P: dict, world: str, curve: bool) -> Path:
    out = sdir / method
    split = sdir / "split"
    t = TRAIN
    n = steps_of(method, S)
    every = max(1, S // CURVE_POINTS) if curve else 0
    c = ["--base-model", P["base"], "--lr", LR, "--max-steps", n, "--batch-size", t["batch"], "--grad-accum", 1,
         "--seed", seed, "--max-length", t["max_length"], "--save-every", every, "--log-every", 25, "--device", "cpu",
         "--resume"]  # an interrupted step continues from its last checkpoint (or restarts when it has none)
    lora = ["--lora-r", t["lora_r"], "--lora-alpha", t["lora_alpha"]]
    lin = [*lora, "--target-modules", t["targets"]]
    if method == "gold":
        cmd = [NEGKD, "train-pos", P["data"] / f"gold-{world}.jsonl", "-o", out, "--no-neg", *lin, *c]
    elif method in ("cotkd", "cotkd_long"):
        cmd = [NEGKD, "train-pos", split, "-o", out, "--no-neg", *lin, *c]
    elif method == "mix":
        cmd = [NEGKD, "train-pos", split, "-o", out, "--mix", split, *lin, *c]
    elif method == "nt":
        cmd = [NEGKD, "train-pos", split, "-o", out, "--nt", split, "--neg-weight", NEG_WEIGHT, *lin, *c]
    elif method == "ul":
        cmd = [NEGKD, "train-pos", split, "-o", out, "--ul", split, *lin, *c]
    elif method == "neg":
        cmd = [NEGKD, "train-neg", split, "-o", out, *lin, *c]
    elif method == "nat":
        cmd = [NEGKD, "train-pos", split, "-o", out, "--neg", sdir / "neg", "--gate-dim", GATE_DIM, *lora, *c]
    elif method == "natnull":
        zero = zero_neg(sdir / "neg", sdir / "neg-zero")
        cmd = [NEGKD, "train-pos", split, "-o", out, "--neg", zero, "--gate-dim", GATE_DIM, *lora, *c]
    elif method == "nce":
        cmd = [NEGKD, "calibrate", split, "-o", out, "--nat", sdir / "nat", *lin, *c]
    else:
        raise ValueError(method)
    if curve:
        with CurveWatcher(out, sdir / f"{method}-curve"):
            run.sh(cmd, out)
    else:
        run.sh(cmd, out)
    return out


def greedy(model: Path, data: Path) -> None:
    pred = model.parent / f"{model.name}-pred"
    run.sh([NEGKD, "infer", data / "evalset.jsonl", "-o", pred, "--model", model, "--greedy",
            "--max-new-tokens", 256, "--batch-size", 64, "--device", "cpu"], pred)
    run.eval_splits(pred)


def curve_evals(method: str, sdir: Path, data: Path) -> None:
    """Val accuracy of every saved checkpoint (the final one is the run itself)."""
    cdir = sdir / f"{method}-curve"
    if not cdir.is_dir():
        return
    for ck in sorted(cdir.glob("step-*")):
        if not ((ck / "adapter_model.safetensors").is_file() or (ck / "nat_model.safetensors").is_file()):
            continue  # a checkpoint without a usable payload
        pred = cdir / f"{ck.name}-pred"
        run.sh([NEGKD, "infer", data / "val.jsonl", "-o", pred, "--model", ck, "--greedy", "--max-new-tokens", 256,
                "--batch-size", 64, "--device", "cpu"], pred)
        run.eval_splits(pred, splits=("val",))


def run_world_seed(world: str, seed: int, S: int, P: dict, tag: str, methods: list[str], curves: bool) -> Path:
    sdir = P["root"] / tag / world / f"seed{seed}"
    sdir.mkdir(parents=True, exist_ok=True)
    teacher = teacher_samples(P["data"], world, seed, sdir)
    run.sh([NEGKD, "split", teacher, "-o", sdir / "split", "--workers", 1], sdir / "split")
    done: dict[str, threading.Event] = {m: threading.Event() for m in METHODS}
    needs = {"nat": ["neg"], "natnull": ["neg"], "nce": ["nat"]}

    def chain(ms):
        for m in ms:
            if m not in methods:
                continue
            for d in needs.get(m, []):
                if d in methods:
                    done[d].wait()
                elif not (sdir / d / "manifest.json").is_file():
                    raise SystemExit(f"{m} needs {d}; add it to --methods")
            curve = curves and seed == 0
            d = train(m, seed, S, sdir, P, world, curve)
            done[m].set()
            greedy(d, P["data"])
            if curve:
                curve_evals(m, sdir, P["data"])

    with ThreadPoolExecutor(run.JOBS) as ex:
        futs = [ex.submit(chain, c) for c in CHAINS] if run.JOBS > 1 else [ex.submit(chain, CHAINS[0] + CHAINS[1])]
        for f in futs:
            f.result()
    # the premise's model side: NLL of correct rare-skill steps under cotkd vs neg
    if "cotkd" in methods and "neg" in methods:
        out = sdir / "premise_nll.json"
        if not out.is_file():
            subprocess.run([PY, str(HERE / "premise_nll.py"), "--base", str(P["base"]), "--problems",
                            str(P["data"] / "val.jsonl"), "--out", str(out), "--student", f"cotkd={sdir / 'cotkd'}",
                            "--student", f"neg={sdir / 'neg'}"], check=True)
    return sdir


def asc(world: str, seed: int, P: dict, tag: str, methods: list[str]) -> None:
    """The paper's ASC: a ranker on the NAT student's own graded samples; SC vs ASC with NCE and CoT-KD."""
    sdir = P["root"] / tag / world / f"seed{seed}"
    if "nat" not in methods:
        return
    own = sdir / "nat-samples"
    run.sh([NEGKD, "infer", P["data"] / f"asc-train{ASC_TRAIN}-{world}.jsonl", "-o", own, "--model", sdir / "nat", "--n", ASC_SAMPLES,
            "--temperature", 0.7, "--seed", seed, "--max-new-tokens", 256, "--batch-size", 64, "--device", "cpu"], own)
    run.sh([NEGKD, "split", own, "-o", sdir / "nat-samples-split", "--workers", 1], sdir / "nat-samples-split")
    ranker = sdir / "ranker"
    run.sh([NEGKD, "train-ranker", sdir / "nat-samples-split", "-o", ranker, "--base-model", P["base"], "--seed", seed,
            "--max-steps", run.RANKER_STEPS, "--batch-size", 8, "--lr", 1e-3, "--lora-r", 16, "--lora-alpha", 32,
            "--target-modules", "all-linear", "--max-length", 256, "--save-every", 0, "--device", "cpu"], ranker)
    for m in ("nce", "cotkd"):
        if m not in methods:
            continue
        pred = sdir / f"vote-{m}"
        run.sh([NEGKD, "infer", P["data"] / "test.jsonl", "-o", pred, "--model", sdir / m, "--n", VOTE_N,
                "--temperature", 0.7, "--ranker", ranker, "--seed", seed, "--max-new-tokens", 256,
                "--batch-size", 64, "--device", "cpu"], pred)
        run.eval_splits(pred, splits=("test",))


def compare_world(world: str, seeds: list[int], P: dict, tag: str, methods: list[str]) -> Path | None:
    """``negkd compare`` over every method's greedy test predictions in one world, each seed a run, CoT-KD
    first (``--pairs all``): the per-method differences and the overlap statistics of RESULTS.md. The
    runs are linked as ``compare-sets/METHOD/seedS.jsonl`` so that exactly ``seeds`` are compared."""
    root = P["root"] / tag / world
    have = [m for m in methods
            if all((root / f"seed{s}" / f"{m}-pred" / "eval-test" / "predictions.jsonl").is_file() for s in seeds)]
    if "cotkd" not in have or len(have) < 2:
        return None
    sets = root / "compare-sets"
    for m in have:
        (sets / m).mkdir(parents=True, exist_ok=True)
        for old in (sets / m).glob("seed*.jsonl"):
            old.unlink()  # links of another seed list
        for s in seeds:
            (sets / m / f"seed{s}.jsonl").symlink_to(root / f"seed{s}" / f"{m}-pred" / "eval-test" / "predictions.jsonl")
    out = root / "compare"
    order = ["cotkd"] + [m for m in have if m != "cotkd"]
    run.sh([NEGKD, "compare", *[f"{m}={sets / m}/seed*.jsonl" for m in order], "-o", out, "--pairs", "all",
            "--workers", 1], out, key=f"compare seeds={seeds} methods={order}")
    return out / "compare.json"


def main(argv=None) -> None:
    global ASC_TRAIN
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", default="quick", help="results go to work/study/w<WORLD_SEED>/TAG")
    ap.add_argument("--seeds", default="0", help="comma-separated experiment seeds (teacher sampling + training)")
    ap.add_argument("--world-seed", type=int, default=int(os.environ.get("WORLD_SEED", 0)),
                    help="seed of both worlds' splits (default: $WORLD_SEED or 0)")
    ap.add_argument("--worlds", default=",".join(worlds.WORLDS))
    ap.add_argument("--steps", type=int, default=400, help="S: optimizer steps per method (CoT-KD-long: 2S); 400: at 150 the rare skill stays at the floor (README, pilots)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--no-curves", action="store_true", help="skip the learning curves (seed 0)")
    ap.add_argument("--no-asc", action="store_true", help="skip SC vs ASC")
    ap.add_argument("--asc-worlds", default="exclusive", help="worlds in which SC vs ASC runs (every seed)")
    ap.add_argument("--asc-train", type=int, default=ASC_TRAIN,
                    help="training problems the NAT student samples 16 rationales for (the ranker's data)")
    ap.add_argument("--pretrain-steps", type=int, default=run.PRETRAIN_STEPS)
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    ASC_TRAIN = args.asc_train
    wanted = args.methods.split(",")
    bad = [m for m in wanted if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")
    methods, missing = available_methods(wanted)
    for m, why in missing.items():
        print(f"[not run] {m}: {why}", flush=True)
    P = prepare(args.world_seed, args.pretrain_steps)
    t0 = time.time()
    started = P["root"] / args.tag / ".started"
    started.parent.mkdir(parents=True, exist_ok=True)
    if not started.is_file():
        started.write_text(str(t0))
    for s in seeds:
        for w in args.worlds.split(","):
            run_world_seed(w, s, args.steps, P, args.tag, methods, curves=not args.no_curves)
    for w in args.worlds.split(","):
        compare_world(w, seeds, P, args.tag, methods)
    if not args.no_asc:  # one chain per seed, JOBS side by side
        jobs = [(w, s) for s in seeds for w in args.asc_worlds.split(",")]
        with ThreadPoolExecutor(run.JOBS) as ex:
            for f in [ex.submit(asc, w, s, P, args.tag, methods) for w, s in jobs]:
                f.result()
    if not args.no_report:
        import report_study
        import study_runs

        report_study.write(P, args.tag, seeds, args.steps, methods, missing,
                           study_runs.since_started(P["root"] / args.tag), run.LOG,
                           argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
