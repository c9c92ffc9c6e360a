"""Training-loop throughput: negkd's length-grouped dynamic padding vs. the paper's padding scheme,
and the step-time overhead of NAT over a plain LoRA — side by side, one run, tiny model, CPU.

Data: N rationales sampled from the paper's released teacher data (question + rationale,
tokenized with the tiny model's tokenizer, so the lengths follow the real distribution).

- ``negkd``:     ``fit()`` as the training commands run it: length-grouped batches, each padded
                 to its own longest member.
- ``reference``: the paper's code's scheme: random batches, every sequence padded to the
                 longest in the dataset (labels still masked: only the padding scheme differs).

Both go through the same ``fit()`` over the same examples for one epoch (every sequence seen
once), so tokens/s counts real (non-padding) tokens and compares like with like.

    python bench/train.py                       # N=256, batch 8
    python bench/train.py --n 512 --json out.json

Targets (issue 4): negkd >= 3x the reference's tokens/s, < 10% padding.

negkd against TRL's SFTTrainer + PEFT (fed negkd's exact batches, with a loss-parity check) and
negkd with vs without --max-batch-tokens, at 512 real rationales and a hidden-512 LLaMA, each row
in its own process for an honest peak RSS: ``bench/train_peer.py`` (needs ``pip install -e '.[trl]'``).

Whole model at a 1B shape (issue 15), ``--whole-model``: a random LLaMA with hidden 2048
(32 heads, MLP 5440; ``--wm-layers`` layers, vocab ``--wm-vocab``), LoRA / NAT on q_proj, v_proj
(r 8, NAT d_g 128), one optimizer step per batch of random token ids (a quarter of each row
is prompt, masked) for four variants, each in its own fresh subprocess so that its peak RSS
(VmHWM) is its own:

- ``cot-kd``: a plain LoRA SFT step (``lm_loss``): what CoT-KD and every LoRA fine-tune run;
- ``nat``:    a ``train-pos`` step: the NAT unit (fresh Pos-LoRA + gate, frozen random Neg-LoRA),
              gate statistics on, ``lm_loss``;
- ``nce``:    a ``calibrate`` step: student LoRA + the NAT checkpoint on ONE base, two no-grad
              teacher passes (NAT, Neg-LoRA only) and the student pass (``NCEObjective``);
- ``nce-e2``: the same from the second epoch on: every example's beta is known (both teachers are
              frozen), so only the NAT pass (the soft targets) runs beside the student pass.

    python bench/train.py --whole-model                       # 2 layers, batch 2 x 256, CPU fp32
    python bench/train.py --whole-model --device cuda --dtype bfloat16 --wm-layers 4   # bench/gpu_smoke.sh

Targets (issue 15): NAT step <= 1.25x CoT-KD; NCE step <= 1.5x the SFT (CoT-KD) step at <= 1.1x
its peak memory (RSS on CPU; on CUDA peak allocated GPU memory). Peak RSS is reset after the
model is loaded (``/proc/self/clear_refs``), so it is the step's peak with the weights resident.

Measured (2-core CPU, idle, 1 thread, 2 layers, vocab 8000, batch 2 x 256, 3 steps): CoT-KD
3.28 s / 1231 MB, NAT 0.90x / 1.00x, NCE 1.96x / 1.05x in its first epoch, 1.21x / 1.03x from the
second on (nce-e2). NCE's two no-grad teacher passes take 3.35 s, as long as the student's whole step
(3.07 s): one forward costs about half a LoRA step, so two teacher forwards cannot fit in 0.5x of
one; once beta is known per example only the NAT pass remains (1.38 s). Loaded (2 training processes
beside it), 4 steps x 2 rounds: CoT-KD 2.90 s, NAT 1.20x, NCE 2.01x, nce-e2 1.45x, memory <= 1.04x.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tdg" / "gpt35_math_train_8.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TDG teacher data (.jsonl.gz)")
    ap.add_argument("--n", type=int, default=256, help="rationales to sample")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=4096, help="truncation (the tiny model is built for 4096)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    ap.add_argument("--gate-dim", type=int, default=128, help="NAT unit width d_g for the overhead figure")
    ap.add_argument("--overhead-batches", type=int, default=12, help="batches for the paired NAT/LoRA timing")
    ap.add_argument("--overhead-only", action="store_true", help="only the paired NAT/LoRA timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--whole-model", action="store_true", help="only the 1B-shaped whole-model row (see above)")
    ap.add_argument("--wm-layers", type=int, default=2, help="whole model: decoder layers (hidden 2048)")
    ap.add_argument("--wm-vocab", type=int, default=8000, help="whole model: vocabulary size")
    ap.add_argument("--wm-batch", type=int, default=2, help="whole model: rows per batch")
    ap.add_argument("--wm-seq", type=int, default=256, help="whole model: tokens per row")
    ap.add_argument("--wm-steps", type=int, default=3, help="whole model: measured steps per variant")
    ap.add_argument("--wm-rounds", type=int, default=1, help="whole model: rounds of the three variants (interleaved)")
    ap.add_argument("--device", default="cpu", help="whole model: cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="whole model: float32 or bfloat16")
    ap.add_argument("--wm-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--wm-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.wm_worker:
        print(json.dumps(wm_worker(args)))
        return
    if args.whole_model:
        whole_model(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    from rich.console import Console

    out = Console(width=150, highlight=False)
    from negkd.data import Collator, build_examples, lengths
    from negkd.modeling import load_model, load_tokenizer
    from negkd.prompts import DEFAULT_TEMPLATE
    from negkd.schemas import iter_samples
    from negkd.tiny import build_tiny_model
    from negkd.training import TrainConfig, fit, make_accelerator

    if not args.data.exists():
        sys.exit(f"{args.data}: not found (the bench needs the paper's teacher data; pass --data)")
    rows = [s for _, s in iter_samples(args.data)]
    rows = random.Random(args.seed).sample(rows, min(args.n, len(rows)))

    tmp = Path(tempfile.mkdtemp(prefix="negkd-bench-"))
    model_dir = build_tiny_model(tmp / "tiny", max_positions=args.max_length)
    tok = load_tokenizer(str(model_dir))
    exs, stats = build_examples(rows, tok, DEFAULT_TEMPLATE, max_length=args.max_length)
    lens = lengths(exs)
    lmax = max(lens)
    acc = make_accelerator("cpu")

    def lora_model(targets=("q_proj", "v_proj")):
        from negkd.lora import attach_lora

        torch.manual_seed(0)
        return attach_lora(load_model(str(model_dir), device="cpu", dtype="float32"), 8, 16, 0.05, list(targets))

    def nat_model():
        from peft import LoraConfig, get_peft_model

        from negkd import nat

        torch.manual_seed(0)
        neg = get_peft_model(load_model(str(model_dir), device="cpu", dtype="float32"),
                             LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        neg.save_pretrained(str(tmp / "neg"))
        m = load_model(str(model_dir), device="cpu", dtype="float32")
        nat.attach_new(m, tmp / "neg", gate_dim=args.gate_dim)
        return m

    def run(name, model, group, collate, items=exs, steps=None):
        cfg = TrainConfig(batch_size=args.batch_size, grad_accum=1, epochs=1, max_steps=steps, lr=1e-4, warmup=0,
                          log_every=10 ** 9, save_every=0, group_by_length=group)
        d = tmp / name
        t0 = time.perf_counter()
        res = fit(model, items, config=cfg, out_dir=d, collate_fn=collate, lengths=[len(e["input_ids"]) for e in items],
                  accelerator=acc, desc=name)
        wall = time.perf_counter() - t0
        return {"scheme": name, "steps": res.step, "real_tokens": res.tokens, "positions": res.padded_tokens,
                "padding": res.padding_share, "seconds": wall, "tokens_per_s": res.tokens / wall,
                "step_s": wall / res.step}

    dyn = Collator(tok.pad_token_id)
    to_max = Collator(tok.pad_token_id, pad_to_multiple_of=lmax)  # every batch padded to the dataset's longest
    run("warmup", lora_model(), True, dyn, items=exs[:2 * args.batch_size])  # first-call costs out of the timings

    over = nat_overhead(lora_model(), nat_model(), exs, dyn, args)
    if args.overhead_only:
        print(json.dumps(over))
        return
    ours = run("negkd", lora_model(), True, dyn)
    ref = run("reference", lora_model(), False, to_max)
    ratio = ours["tokens_per_s"] / ref["tokens_per_s"]
    from rich.table import Table

    tab = Table(title=f"fit() throughput, tiny LLaMA (CPU, {args.threads} thread), {len(exs)} MATH rationales "
                      f"(tokens: mean {sum(lens) / len(lens):.0f}, max {lmax}), batch {args.batch_size}")
    for c in ("scheme", "steps", "real tokens", "computed positions", "padding", "seconds", "tokens/s", "s/step"):
        tab.add_column(c, justify="right" if c != "scheme" else "left")
    for r in (ours, ref):
        label = {"negkd": "negkd (length-grouped, dynamic)", "reference": "paper (pad to dataset max)"}[r["scheme"]]
        tab.add_row(label, str(r["steps"]), f"{r['real_tokens']:,}", f"{r['positions']:,}", f"{100 * r['padding']:.1f}%",
                    f"{r['seconds']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.3f}")
    out.print(tab)
    out.print(f"negkd / paper tokens/s: {ratio:.2f}x (target >= 3x); negkd padding {100 * ours['padding']:.1f}% "
              f"(target < 10%), paper padding {100 * ref['padding']:.1f}%")
    out.print(f"NAT step time over plain LoRA (q_proj,v_proj, r=8, d_g={args.gate_dim}; hidden size 96), paired on "
              f"the same {over['batches']} batches: total {100 * over['total']:+.1f}%, median per batch "
              f"{100 * over['median']:+.1f}% (LoRA {over['lora_s']:.1f}s vs NAT {over['nat_s']:.1f}s)")
    out.print(f"truncated rows: {stats.truncated} (max_length {args.max_length})")
    if args.json:
        args.json.write_text(json.dumps({"negkd": ours, "reference": ref, "ratio": ratio,
                                         "nat_overhead": over, "n": len(exs), "threads": args.threads,
                                         "batch_size": args.batch_size}, indent=2) + "\n")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def nat_overhead(lora, natm, exs, collate, args) -> dict:
    """Paired timing: one optimizer step of plain LoRA then of NAT on the same batch, for
    batches spread over an epoch's plan (pairing cancels drift in a shared machine's load)."""
    import statistics

    import torch

    from negkd import nat
    from negkd.training import Plan, lm_loss

    plan = Plan([len(e["input_ids"]) for e in exs], args.batch_size, 1, 1, 0, args.seed)
    steps = [plan.step(i)[1][0] for i in range(plan.steps_per_epoch)]
    k = max(1, len(steps) // args.overhead_batches)
    batches = [collate([exs[i] for i in mb]) for mb in steps[::k][:args.overhead_batches]]
    nat.track_gates(natm, True)  # as train-pos runs it

    def make_step(model):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(b):
            t = time.perf_counter()
            with nat.gate_mask(model, b["attention_mask"]) if nat.nat_layers(model) else _null():
                loss, _ = lm_loss(model, b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            nat.gate_means(model) if nat.nat_layers(model) else None
            return time.perf_counter() - t

        return step

    s_lora, s_nat = make_step(lora), make_step(natm)
    s_lora(batches[-1]), s_nat(batches[-1])  # warm-up
    tl, tn = [], []
    for b in batches:
        tl.append(s_lora(b))
        tn.append(s_nat(b))
    return {"batches": len(batches), "lora_s": sum(tl), "nat_s": sum(tn), "total": sum(tn) / sum(tl) - 1,
            "median": statistics.median(n / l_ for n, l_ in zip(tn, tl)) - 1}


# ---------------------------------------------------------------- whole model, 1B shape (issue 15)

WM_VARIANTS = ("cot-kd", "nat", "nce", "nce-e2")  # nce-e2: an NCE step once every example's beta is known


def wm_worker(a) -> dict:
    """One variant's steps in this (fresh) process: median step seconds and the peak memory."""
    import statistics

    import torch

    sys.path.insert(0, str(REPO / "bench"))
    # bench/calibrate.py (stdlib imports only): random ids with the prompt quarter masked, the LoRA, RSS reader
    from calibrate import LA, _status_kb, batches  # noqa: E402

    rss_import = _status_kb("VmRSS")
    torch.set_num_threads(a.threads)

    from negkd import lora, nat
    from negkd.modeling import load_model
    from negkd.steps.calibrate import NCEObjective, build_student
    from negkd.training import lm_loss

    base, nat_dir = a.wm_dir / "base", a.wm_dir / "nat"
    cuda = a.device.startswith("cuda")
    torch.manual_seed(0)
    model = load_model(str(base), device=a.device, dtype=a.dtype)
    with torch.no_grad():  # out of the safetensors memory map: each process counts its weights once
        for prm in model.parameters():
            prm.data = prm.data.clone()
    la = LA
    gates = False
    if a.wm_worker == "cot-kd":
        student, loss_fn = lora.attach_lora(model, la["r"], la["alpha"], la["dropout"], la["target_modules"]), lm_loss
    elif a.wm_worker == "nat":
        nat.attach_new(model, a.wm_dir / "nat-neg", gate_dim=128)
        nat.track_gates(model, True)  # as train-pos runs it
        student, loss_fn, gates = model, lm_loss, True
    else:
        student = build_student(model, nat_dir, la)
        loss_fn = NCEObjective(student)
        teacher = loss_fn.teacher
        if a.wm_worker == "nce-e2":  # epoch 1 (untimed) leaves each example's beta behind
            for b in batches(model.config.vocab_size, a.wm_batch, a.wm_seq, 1 + a.wm_steps):
                teacher(b["input_ids"].to(a.device), b["attention_mask"].to(a.device), b["labels"].to(a.device),
                        0, b["idx"])

        def timed_teacher(*args, **kw):  # where NCE's step goes: the two no-grad teacher passes
            t = time.perf_counter()
            try:
                return teacher(*args, **kw)
            finally:
                teacher_s.append(time.perf_counter() - t)

        loss_fn.teacher = timed_teacher
    teacher_s: list[float] = []
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = batches(model.config.vocab_size, a.wm_batch, a.wm_seq, 1 + a.wm_steps)
    if cuda:
        data = [{k: v.to(a.device) for k, v in b.items()} for b in data]
        torch.cuda.reset_peak_memory_stats()
    import gc

    gc.collect()
    rss_setup = _status_kb("VmRSS")
    try:  # restart the peak here: loading (file map + in-memory copy) must not set it
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    times = []
    for i, b in enumerate(data):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with nat.gate_mask(student, b["attention_mask"]) if gates else _null():
            loss, _ = loss_fn(student, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gates:
            nat.gate_means(student)
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return {"variant": a.wm_worker, "step_s": statistics.median(times), "step_times": times,
            "peak_rss_mb": _status_kb("VmHWM") / 1024, "rss_import_mb": rss_import / 1024,
            "rss_setup_mb": rss_setup / 1024, "rss_file_mb": _status_kb("RssFile") / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None,
            "params": sum(p.numel() for p in model.parameters()), "loss": float(loss),
            "teacher_s": statistics.median(teacher_s[1:]) if len(teacher_s) > 1 else None,
            "neg_passes": getattr(loss_fn, "neg_passes", None), "cached_batches": getattr(loss_fn, "cached_batches", None)}


def whole_model(a) -> None:
    import os
    import shutil
    import statistics
    import subprocess

    sys.path.insert(0, str(REPO / "bench"))
    from calibrate import build_model, build_nat  # noqa: E402

    work = Path(tempfile.mkdtemp(prefix="negkd-bench-wm-"))
    try:
        t0 = time.perf_counter()
        build_model(work / "base", 2048, a.wm_layers, a.wm_vocab)
        build_nat(work / "base", work / "nat")  # random non-zero Neg-LoRA, Pos-LoRA, unit; also work/nat-neg
        print(f"[whole model] built in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
        runs: dict[str, list[dict]] = {v: [] for v in WM_VARIANTS}
        for _ in range(a.wm_rounds):
            for v in WM_VARIANTS:
                cmd = [sys.executable, __file__, "--wm-worker", v, "--wm-dir", str(work), "--wm-batch", str(a.wm_batch),
                       "--wm-seq", str(a.wm_seq), "--wm-steps", str(a.wm_steps), "--threads", str(a.threads),
                       "--device", a.device, "--dtype", a.dtype]
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    sys.exit(f"whole-model worker {v} failed:\n{p.stderr[-3000:]}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                runs[v].append(r)
                print(f"[whole model] {v:7s} step {r['step_s']:.2f}s peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = lambda v, k: statistics.median(r[k] for r in runs[v])  # noqa: E731
    cuda = a.device.startswith("cuda")
    mem_key = "peak_gpu_mb" if cuda else "peak_rss_mb"
    mem_name = "peak GPU MB" if cuda else "peak RSS MB"
    t_ref, m_ref = med("cot-kd", "step_s"), med("cot-kd", mem_key)
    d_ref = m_ref - (0 if cuda else med("cot-kd", "rss_import_mb"))
    print(f"\nwhole model, 1B shape: random LLaMA hidden 2048, {a.wm_layers} layers, vocab {a.wm_vocab} "
          f"({runs['cot-kd'][0]['params'] / 1e6:.0f}M params), {a.device} {a.dtype}, batch {a.wm_batch} x {a.wm_seq} "
          f"tokens, {a.threads} thread(s), median of {a.wm_steps} steps x {a.wm_rounds} round(s), each variant in its "
          f"own process")
    print(f"{'variant':8s} {'step s':>7s} {'x CoT-KD':>8s} {mem_name:>12s} {'x CoT-KD':>8s}"
          + ("" if cuda else f" {'above import':>12s} {'x CoT-KD':>8s}"))
    out = {}
    for v in WM_VARIANTS:
        t, m = med(v, "step_s"), med(v, mem_key)
        row = f"{v:8s} {t:7.2f} {t / t_ref:8.2f} {m:12.0f} {m / m_ref:8.2f}"
        if not cuda:
            d = m - med(v, "rss_import_mb")
            row += f" {d:12.0f} {d / d_ref:8.2f}"
        print(row)
        out[v] = {"step_s": t, "mem_mb": m, "x_step": t / t_ref, "x_mem": m / m_ref}
    tt = med("nce", "teacher_s")
    print(f"NCE step = teacher passes (NAT + Neg-LoRA only, no grad) {tt:.2f}s + student step "
          f"{med('nce', 'step_s') - tt:.2f}s; from epoch 2 (beta known, NAT pass only) the teacher takes "
          f"{med('nce-e2', 'teacher_s'):.2f}s")
    ok = lambda c: "met" if c else "MISSED"  # noqa: E731
    print(f"targets: NAT step <= 1.25x CoT-KD {ok(out['nat']['x_step'] <= 1.25)}; NCE step <= 1.5x SFT: "
          f"epoch 1 {ok(out['nce']['x_step'] <= 1.5)}, later epochs {ok(out['nce-e2']['x_step'] <= 1.5)}; "
          f"NCE memory <= 1.1x SFT {ok(out['nce']['x_mem'] <= 1.1)}")
    if a.json:
        a.json.write_text(json.dumps({"whole_model": out, "runs": runs}, indent=1) + "\n")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
