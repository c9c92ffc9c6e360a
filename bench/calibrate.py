"""Benchmark: one `negkd calibrate` (NCE) training step vs. a plain LoRA SFT step vs. the two-copy design.

    .venv/bin/python bench/calibrate.py                       # tiny model + ~110M LLaMA, 4 x 128 tokens
    .venv/bin/python bench/calibrate.py --models tiny --steps 5
    .venv/bin/python bench/calibrate.py --layers 6            # a shallower "100M" if 12 layers is too slow
    .venv/bin/python bench/calibrate.py --threads 1 --rounds 2  # on a CPU shared with other jobs

Measured on a 2-core CPU shared with other jobs, `--threads 1 --rounds 2 --steps 4` (110M model):
sft 2.13 s/step, 1838 MB peak RSS; calibrate 4.27 s (2.00x), 1863 MB (1.01x); two-copy 4.44 s
(2.09x), 2299 MB (1.25x): the shared base saves 436 MB (19%). With 2 threads per worker on that
busy machine, OpenMP spin-waits made single steps up to 10x slower at random; --threads 1 is stable.

Variants, each measured in its own fresh subprocess so the memory peaks are comparable:

- sft:       base + fresh PEFT LoRA (q_proj, v_proj, r 8), masked NLL (negkd.training.lm_loss): the
             step every LoRA fine-tune does, and the baseline of the ratios;
- calibrate: what `negkd calibrate` runs: ONE base with the student LoRA and the NAT checkpoint
             attached inside it (steps.calibrate.build_student), two no-grad teacher passes
             (NAT, Neg-LoRA-only) + the student pass (steps.calibrate.NCEObjective);
- two-copy:  the reference design: a second full copy of the base carrying NAT for the teacher
             passes, the student LoRA on the first copy; same loss (negkd.nce).

All three train on the same batches (random token ids; 25% of each row is prompt, masked out)
with AdamW on the student's LoRA, float32 on CPU. calibrate and two-copy skip the logits of the
leading prompt positions no row trains on (``logits_to_keep``, as the command does); sft is
negkd's stock LM loss (train-neg/train-pos), which computes them. Weights are copied out of the
safetensors memory map after loading (as on a GPU), so each copy counts once in RSS. Reported per model: median step time over
the measured steps (after warm-up steps) and the best step (least disturbed by other load on
a shared machine), median CPU time per step, the process's peak RSS (VmHWM: interpreter + torch +
weights + step), and the peak above the RSS right after `import torch` (what the model and the
step add). Targets: calibrate step time <= 2.5x SFT, peak memory <= 1.3x SFT.

The ~110M model is a random LLaMA: hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000,
tied embeddings (--hidden/--layers/--vocab change it). Weights are built once in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("sft", "calibrate", "two-copy")
LA = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


# ---------------------------------------------------------------------------- memory


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _mb(kb: int) -> float:
    return kb / 1024


# ---------------------------------------------------------------------------- building models


def build_model(out: Path, hidden: int, layers: int, vocab: int, seed: int = 0) -> Path:
    """A random LLaMA (tiny BPE tokenizer padded to ``vocab``: the bench feeds token ids only)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=3)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def build_nat(base: Path, out: Path, seed: int = 0) -> Path:
    """A NAT checkpoint with random (non-zero) Neg-LoRA, Pos-LoRA and unit weights on ``base``."""
    import torch

    from negkd import lora, nat
    from negkd.modeling import load_model
    from negkd.recipe import base_identity

    if (out / nat.CONFIG_NAME).exists():
        return out
    torch.manual_seed(seed)
    m = load_model(str(base), device="cpu", dtype="float32")
    pm = lora.attach_lora(m, 8, 16.0, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    lora.save_adapter(pm, out.parent / (out.name + "-neg"))
    del m, pm
    m = load_model(str(base), device="cpu", dtype="float32")
    cfg = nat.attach_new(m, out.parent / (out.name + "-neg"), gate_dim=128)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B_pos" in n or "lora_gate_w2" in n:
                p.normal_(0, 0.02)
    nat.save(m, out, cfg, meta={**base_identity(str(base)), "template": "{question}\n", "chat_template": False})
    return out


# ---------------------------------------------------------------------------- worker (one variant)


def batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    n_prompt = seq // 4
    for i in range(n):
        ids = torch.randint(4, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "idx": torch.arange(i * batch, (i + 1) * batch)})  # distinct examples (the beta cache keys)
    return out


def two_copy_objective(student, teacher_model):
    """The reference design: the same objective, teacher passes on a second full copy of the
    base carrying NAT (``teacher_model``), the student LoRA on the first copy."""
    from negkd.steps.calibrate import NCEObjective

    class TwoCopy(NCEObjective):
        def teacher(self, input_ids, attention_mask, labels, skip=0, idx=None):
            import torch

            from negkd import nat, nce

            mask = labels[:, skip + 1:] != -100
            with torch.no_grad():
                z_nat = self._forward(teacher_model, input_ids, attention_mask, skip)[:, :-1]
                with nat.using_mode(teacher_model, "neg-only"):
                    z_neg = self._forward(teacher_model, input_ids, attention_mask, skip)[:, :-1]
                kl = nce.sequence_kl(z_nat, z_neg, mask, self.temperature)
                del z_neg
                p_nat = nce.teacher_probs(z_nat, self.temperature)
                del z_nat
            return p_nat, torch.tanh(kl), kl, mask

    return TwoCopy(student)


def worker(a) -> dict:
    import torch

    rss_import = _status_kb("VmRSS")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    from negkd import lora, nat
    from negkd.modeling import load_model
    from negkd.steps.calibrate import NCEObjective, build_student
    from negkd.training import lm_loss

    def load():
        m = load_model(a.model, device="cpu", dtype="float32")
        # transformers maps safetensors weights from the file (page cache, shared between copies);
        # copy them into process memory, as on a GPU, so every variant's RSS counts its weights once
        with torch.no_grad():
            for prm in m.parameters():  # tied weights are one Parameter: the tie is kept
                prm.data = prm.data.clone()
        return m

    torch.manual_seed(0)
    model = load()
    vocab = model.config.vocab_size
    if a.variant == "sft":
        student = lora.attach_lora(model, LA["r"], LA["alpha"], LA["dropout"], LA["target_modules"])
        loss_fn = lm_loss
    elif a.variant == "calibrate":
        student = build_student(model, Path(a.nat), LA)
        loss_fn = NCEObjective(student)
    else:
        student = lora.attach_lora(model, LA["r"], LA["alpha"], LA["dropout"], LA["target_modules"])
        teacher = load()
        nat.attach(teacher, Path(a.nat))
        teacher.eval()
        loss_fn = two_copy_objective(student, teacher)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = batches(vocab, a.batch, a.seq, a.warmup + a.steps)
    rss_setup = _status_kb("VmRSS")
    rss_file_setup = _status_kb("RssFile")
    times, cpu = [], []
    for i, b in enumerate(data):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _ = loss_fn(student, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= a.warmup:
            times.append(dt)
            cpu.append(dc)
    return {"variant": a.variant, "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params), "step_s": statistics.median(times), "step_times": times,
            "cpu_s": statistics.median(cpu), "rss_file_setup_mb": _mb(rss_file_setup),
            "rss_import_mb": _mb(rss_import), "rss_setup_mb": _mb(rss_setup), "peak_rss_mb": _mb(_status_kb("VmHWM")),
            "threads": torch.get_num_threads(), "loss": float(loss)}


# ---------------------------------------------------------------------------- driver


def run_variant(variant: str, model: Path, nat_dir: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--model", str(model), "--nat", str(nat_dir),
           "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if a.threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"worker {variant} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,100m", help="comma list of: tiny, 100m")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the three variants (interleaved); medians reported")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per worker (0: torch's default, one per core). On a machine shared with "
                         "other jobs, 1 avoids OpenMP threads spinning while their peer is descheduled")
    ap.add_argument("--work", type=Path, default=None, help="where models are built (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    # worker mode (internal)
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--nat", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.variant = a.worker
        print(json.dumps(worker(a)))
        return

    sys.path.insert(0, str(ROOT))
    from negkd.tiny import build_tiny_model

    work = a.work or Path(tempfile.mkdtemp(prefix="negkd-bench-calibrate-"))
    results = {}
    for name in a.models.split(","):
        t0 = time.perf_counter()
        if name == "tiny":
            base = work / "tiny"
            if not (base / "config.json").exists():
                build_tiny_model(base)
            desc = "tiny (hidden 96, 2 layers, vocab 384)"
        elif name == "100m":
            base = build_model(work / f"llama-h{a.hidden}-l{a.layers}-v{a.vocab}", a.hidden, a.layers, a.vocab)
            desc = f"random LLaMA (hidden {a.hidden}, {a.layers} layers, vocab {a.vocab})"
        else:
            sys.exit(f"unknown model {name!r}; expected tiny or 100m")
        nat_dir = build_nat(base, base.parent / f"{base.name}-nat")
        print(f"[{name}] built in {time.perf_counter() - t0:.1f}s: {desc}", file=sys.stderr)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(a.rounds):
            for v in VARIANTS:
                res = run_variant(v, base, nat_dir, a)
                runs[v].append(res)
                print(f"[{name}] round {r + 1} {v:10s} step {res['step_s']:.3f}s  peak RSS {res['peak_rss_mb']:.0f} MB",
                      file=sys.stderr)
        results[name] = {"desc": desc, "runs": runs}
        _table(name, desc, runs, a)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


def _table(name: str, desc: str, runs: dict, a) -> None:
    med = lambda v, k: statistics.median(r[k] for r in runs[v])  # noqa: E731
    best = lambda v: min(t for r in runs[v] for t in r["step_times"])  # noqa: E731
    sft_t, sft_b, sft_c, sft_m = med("sft", "step_s"), best("sft"), med("sft", "cpu_s"), med("sft", "peak_rss_mb")
    sft_d = sft_m - med("sft", "rss_import_mb")
    p = runs["sft"][0]["params"]
    print(f"\n{name}: {desc}, {p / 1e6:.1f}M params, batch {a.batch} x {a.seq} tokens, "
          f"{runs['sft'][0]['threads']} threads, {a.steps} steps x {a.rounds} round(s) per variant")
    print(f"{'variant':10s} {'median s':>8s} {'x SFT':>6s} {'best s':>7s} {'x SFT':>6s} {'CPU s':>7s} {'x SFT':>6s} "
          f"{'peak RSS MB':>11s} {'x SFT':>6s} {'above import':>12s} {'x SFT':>6s}")
    for v in VARIANTS:
        t, b, c, m = med(v, "step_s"), best(v), med(v, "cpu_s"), med(v, "peak_rss_mb")
        d = m - med(v, "rss_import_mb")
        print(f"{v:10s} {t:8.3f} {t / sft_t:6.2f} {b:7.3f} {b / sft_b:6.2f} {c:7.3f} {c / sft_c:6.2f} "
              f"{m:11.0f} {m / sft_m:6.2f} {d:12.0f} {d / sft_d:6.2f}")
    cal_m, two_m = med("calibrate", "peak_rss_mb"), med("two-copy", "peak_rss_mb")
    t_ok = med("calibrate", "step_s") / sft_t <= 2.5
    m_ok = cal_m / sft_m <= 1.3
    print(f"shared base saves {two_m - cal_m:.0f} MB peak RSS vs two copies ({100 * (1 - cal_m / two_m):.0f}%); "
          f"targets (medians): step <= 2.5x SFT {'met' if t_ok else 'MISSED'}, peak memory <= 1.3x SFT "
          f"{'met' if m_ok else 'MISSED'}")


if __name__ == "__main__":
    main()
