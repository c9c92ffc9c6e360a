"""``negkd train-ranker``: the ASC ranker f(question, rationale) in (0,1) (method.md §5).

Pairs a positive and a negative rationale of the same question and trains a backbone + LoRA +
MLP head (``negkd.ranker``) with the paper's pairwise loss ``(1 - f(r+))^3 + f(r-)^3`` (or
BCE) on the shared training loop (``negkd.training.fit``: accelerate, checkpoints, --resume).
Held-out *questions* measure pairwise accuracy and AUC (``val_metrics.json``).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from negkd import train_options as T
from negkd.errors import UsageError, UserError

VAL_METRICS = "val_metrics.json"
_RANK = "Ranker"


def command(
    graded: Annotated[list[Path], typer.Argument(
        help="Graded samples: a `negkd split` output directory (pos.jsonl + neg.jsonl are read) or graded JSONL "
             "files (rows with correct=true/false), e.g. pos.jsonl neg.jsonl.", show_default=False)],
    output: T.Output,
    base_model: Annotated[str, typer.Option("--base-model", help="Ranker backbone: any Hugging Face causal LM (its "
                                            "decoder stack, no LM head) or encoder (for an encoder-decoder such as "
                                            "Flan-T5, its encoder). Usually the student's base; an adapter / NAT "
                                            "directory stands for the base it was trained on.",
                                            rich_help_panel="Model", show_default=False)],
    loss: Annotated[str, typer.Option(help="pairwise: the paper's (1 - f(r+))^p + f(r-)^p on (pos, neg) pairs of one "
                                           "question; bce: binary cross-entropy on the same pairs.",
                                      rich_help_panel=_RANK)] = "pairwise",
    loss_power: Annotated[float, typer.Option(help="p of the pairwise loss.", rich_help_panel=_RANK)] = 3.0,
    pairs_per_question: Annotated[int, typer.Option(help="Most (positive, negative) pairs drawn per training question "
                                                         "(all P x N pairs when fewer).", rich_help_panel=_RANK)] = 8,
    val_fraction: Annotated[float, typer.Option(help="Share of questions (with both a positive and a negative) held "
                                                     "out for pairwise accuracy / AUC; 0 = none.",
                                                rich_help_panel=_RANK)] = 0.1,
    with_gold: Annotated[bool, typer.Option(help="Add each question's gold 'solution' (when present) as one more "
                                                 "positive.", rich_help_panel=_RANK)] = False,
    head_dim: Annotated[int, typer.Option(help="Hidden size of the MLP head.", rich_help_panel=_RANK)] = 256,
    head_dropout: Annotated[float, typer.Option(help="Dropout on the pooled features before the head.",
                                                rich_help_panel=_RANK)] = 0.1,
    score_batch_size: Annotated[int, typer.Option(help="Rationales per forward pass when scoring the held-out set.",
                                                  rich_help_panel=_RANK)] = 32,
    template: T.Template = None,
    chat_template: T.ChatTemplate = False,
    max_length: Annotated[int, typer.Option(help="Most tokens per (question, rationale) row; longer rows keep the "
                                                 "rationale's last tokens (at least half) and the question's first.",
                                            rich_help_panel="Data")] = 512,
    lora_r: T.LoraR = T.LORA_R,
    lora_alpha: T.LoraAlpha = T.LORA_ALPHA,
    lora_dropout: T.LoraDropout = T.LORA_DROPOUT,
    target_modules: T.TargetModules = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per micro-batch per process (each pair is two rows).",
                                            rich_help_panel="Optimisation")] = T.BATCH_SIZE,
    max_batch_tokens: T.MaxBatchTokens = None,
    grad_accum: T.GradAccum = 1,
    epochs: T.Epochs = 2.0,
    max_steps: T.MaxSteps = None,
    lr: T.Lr = 1e-4,
    warmup: T.Warmup = T.WARMUP,
    schedule: T.Schedule = T.SCHEDULE,
    weight_decay: T.WeightDecay = T.WEIGHT_DECAY,
    max_grad_norm: T.MaxGradNorm = T.MAX_GRAD_NORM,
    seed: T.Seed = T.SEED,
    save_every: T.SaveEvery = T.SAVE_EVERY,
    log_every: T.LogEvery = T.LOG_EVERY,
    resume: T.Resume = False,
    overwrite: T.Overwrite = False,
    device: T.Device = T.DEVICE,
    dtype: T.Dtype = T.DTYPE,
    trust_remote_code: T.TrustRemoteCode = False,
) -> None:
    """Train the ASC ranker: scores a rationale of a question in (0,1), trained on pairs of a
    correct and an incorrect rationale of the same question (questions lacking either give
    no pair). Reports pairwise accuracy and AUC on held-out questions (val_metrics.json; the
    paper saw ~60% pairwise accuracy).

    Recipe (what the paper did: the *student's own* samples on training problems):
    negkd infer train.jsonl -o runs/train-pred --model runs/nce --n 16;
    negkd split runs/train-pred/predictions.jsonl -o runs/ranker-split (one graded sample per
    candidate); negkd train-ranker runs/ranker-split -o runs/ranker --base-model BASE.
    DIR holds ranker.json (backbone, max length, template, head), adapter/ (PEFT LoRA),
    head.safetensors and the tokenizer; negkd infer --ranker DIR uses it.

    Example: negkd train-ranker runs/split -o runs/ranker --base-model Qwen/Qwen2.5-0.5B
    """
    from negkd.console import log
    from negkd.prompts import load_template

    if loss not in ("pairwise", "bce"):
        raise UsageError(f"--loss {loss!r}: expected pairwise or bce")
    if not loss_power > 0:
        raise UsageError(f"--loss-power {loss_power}: must be > 0")
    if pairs_per_question < 1:
        raise UsageError(f"--pairs-per-question {pairs_per_question}: must be >= 1")
    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if head_dim < 1:
        raise UsageError(f"--head-dim {head_dim}: must be >= 1")
    if not 0 <= head_dropout < 1:
        raise UsageError(f"--head-dropout {head_dropout}: must be in [0, 1)")
    if score_batch_size < 1:
        raise UsageError(f"--score-batch-size {score_batch_size}: must be >= 1")
    cfg = T.train_config(batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, lr=lr,
                         warmup=warmup, schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                         seed=seed, save_every=save_every, log_every=log_every,
                         max_batch_tokens=max_batch_tokens)
    la = T.lora_args(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules)
    T.check_max_length(max_length)
    tmpl = load_template(template)

    # ---- data and backbone directory (validated before anything is loaded or written)
    backbone = _resolve_backbone(base_model)
    paths, rows = read_graded_inputs(graded)
    questions = group_by_question(rows, with_gold)
    usable = [q for q in questions.values() if q["pos"] and q["neg"]]
    if not usable:
        raise UserError(f"{', '.join(map(str, paths))}: no question has both a correct and an incorrect rationale, so "
                        "there are no (positive, negative) pairs to train on; sample more candidates per problem")
    train_qs, val_qs = split_questions(usable, val_fraction, seed)
    pairs = make_pairs(train_qs, pairs_per_question, seed)
    log(f"ranker data: {len(rows):,} rationales, {len(questions):,} questions ({len(usable):,} with both a positive "
        f"and a negative); {len(train_qs):,} train questions -> {len(pairs):,} pairs; {len(val_qs):,} held out")

    from negkd.training import check_resume, fit, make_accelerator, model_device, open_run

    acc = make_accelerator(device)
    main = acc.is_main_process
    args = dict(base_model=backbone, loss=loss, loss_power=loss_power, pairs_per_question=pairs_per_question,
                val_fraction=val_fraction, with_gold=with_gold, head_dim=head_dim, head_dropout=head_dropout,
                template=tmpl, chat_template=chat_template, max_length=max_length, lora=la, dtype=dtype,
                **{k: v for k, v in asdict(cfg).items() if k not in ("save_every", "log_every")})
    run = open_run(output, "train-ranker", args, paths, overwrite=overwrite, resume=resume, main=main)
    acc.wait_for_everyone()
    if run is None:
        return

    from accelerate.utils import set_seed

    from negkd import ranker as R
    from negkd.modeling import load_tokenizer

    tok = load_tokenizer(backbone, trust_remote_code=trust_remote_code, padding_side="right")
    enc = R.Encoder(tok, tmpl, max_length, chat_template)
    items = encode_pairs(enc, pairs)
    set_seed(seed)
    dev = model_device(acc, device)
    model, kind = R.build(backbone, lora=la, head_dim=head_dim, dropout=head_dropout, device=dev, dtype=dtype,
                          trust_remote_code=trust_remote_code, seed=seed)
    hidden = R._hidden_size(model.backbone)
    rcfg = dict(backbone=backbone, backbone_path=str(Path(backbone).resolve()) if Path(backbone).is_dir() else None,
                backbone_kind=kind, hidden=hidden, head_dim=head_dim, pooling="mean over rationale tokens",
                max_length=max_length, template=tmpl, chat_template=chat_template, lora=la, loss=loss,
                loss_power=loss_power)
    pad_id = tok.pad_token_id
    before = None
    if main and val_qs and not resume:  # the untrained ranker on the same held-out set: the baseline
        before = evaluate(R.Ranker(model, tok, rcfg, dev), val_qs, score_batch_size)

    def collate_fn(batch):
        b = R.collate([x["pos"] for x in batch] + [x["neg"] for x in batch], pad_id)
        return b

    def loss_fn(m, batch):
        z = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pool_mask=batch["pool_mask"])
        half = z.shape[0] // 2
        zp, zn = z[:half], z[half:]  # (P,), (P,)
        return R.ranker_loss(loss, zp, zn, loss_power), {"pair_acc": (zp > zn).float().mean()}

    def save_fn(m, d: Path) -> None:
        R.save(m, d, tok, rcfg)

    fp = {"args": {k: v for k, v in run.args.items() if k not in ("epochs", "max_steps")},
          "inputs": [i["sha256"] for i in run.inputs]}
    lengths = [max(len(x["pos"][0]), len(x["neg"][0])) for x in items]
    check_resume(model, lengths, config=cfg, out_dir=Path(output), fingerprint=fp, resume=resume,
                 world_size=acc.num_processes)
    if main:  # the backbone loaded and every check passed: only now touch DIR
        run.start()
    res = fit(model, items, config=cfg, out_dir=output, collate_fn=collate_fn,
              lengths=lengths, loss_fn=loss_fn,
              weight_fn=lambda b: b["input_ids"].shape[0] // 2, save_fn=save_fn, fingerprint=fp, resume=resume,
              accelerator=acc, desc="train-ranker", rows_per_item=2)
    acc.wait_for_everyone()
    if not main:
        return

    model = res.model
    model.eval()
    scorer = R.Ranker(model, tok, rcfg, dev)
    metrics = evaluate(scorer, val_qs, score_batch_size)
    metrics["train_pairs"] = len(pairs)
    metrics["train_questions"] = len(train_qs)
    metrics["final_train_loss"] = res.history[-1]["loss"] if res.history else None
    if before is not None:
        metrics["before_training"] = {k: before[k] for k in ("pairwise_accuracy", "auc", "mean_score_pos",
                                                             "mean_score_neg")}

    import os
    import shutil

    # stage the payload, then hand each file to the run dir (renamed into place by finish())
    scratch = Path(output) / f".ranker.tmp-{os.getpid()}"
    if scratch.exists():
        shutil.rmtree(scratch)
    rcfg["train"] = {"steps": res.step, **asdict(cfg)}
    rcfg["data"] = [{"path": str(p), "sha256": i["sha256"]} for p, i in zip(paths, run.inputs)]
    from negkd import __version__

    rcfg["negkd_version"] = __version__
    R.save(model, scratch, tok, rcfg)
    for f in sorted(scratch.iterdir()):
        os.replace(f, run.tmp(f.name))
        run.record_output(f.name)
    scratch.rmdir()
    run.write_json(VAL_METRICS, metrics)
    run.record_output("metrics.jsonl")
    run.finish(steps=res.step, val=metrics, resumed_from=res.resumed_from)
    _report(output, metrics, res)


# --------------------------------------------------------------------------- data


def read_graded_inputs(paths: list[Path]) -> tuple[list[Path], list[dict]]:
    """Graded rows from `split` output dirs (pos.jsonl + neg.jsonl) and/or graded JSONL files."""
    from negkd.schemas import read_graded

    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = []
            for name in ("pos.jsonl", "neg.jsonl"):
                for cand in (p / name, p / f"{name}.gz"):
                    if cand.is_file():
                        found.append(cand)
                        break
            if not found:
                raise UserError(f"{p}: holds neither pos.jsonl nor neg.jsonl; pass the output directory of "
                                "`negkd split` or graded JSONL files")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    rows: list[dict] = []
    seen: dict[tuple, str] = {}
    for f in files:
        if f.stat().st_size == 0:  # `split` writes an empty neg.jsonl when every sample was right
            continue
        for r in read_graded(f):
            key = (r["id"], r["k"], bool(r["correct"]))
            if key in seen:
                raise UserError(f"{f}: sample (id={r['id']!r}, k={r['k']}) also appears in {seen[key]}; pass each "
                                "graded file once")
            seen[key] = str(f)
            rows.append(r)
    return files, rows


def group_by_question(rows: list[dict], with_gold: bool = False) -> dict[str, dict]:
    """{id: {id, question, pos: [rationale], neg: [rationale]}} in first-seen order."""
    out: dict[str, dict] = {}
    for r in rows:
        q = out.setdefault(r["id"], {"id": r["id"], "question": r["question"], "pos": [], "neg": []})
        (q["pos"] if r["correct"] else q["neg"]).append(r["rationale"])
        if with_gold and isinstance(r.get("solution"), str) and r["solution"].strip() and not q.get("gold"):
            q["gold"] = True
            q["pos"].append(r["solution"])
    return out


def split_questions(qs: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out ``val_fraction`` of the questions (at least 1 when > 0 and >= 2 questions), by a seeded shuffle."""
    if val_fraction <= 0 or len(qs) < 2:
        return list(qs), []
    order = sorted(range(len(qs)), key=lambda i: qs[i]["id"])
    random.Random(seed).shuffle(order)
    n_val = min(len(qs) - 1, max(1, round(val_fraction * len(qs))))
    val = set(order[:n_val])
    return [q for i, q in enumerate(qs) if i not in val], [q for i, q in enumerate(qs) if i in val]


def make_pairs(qs: list[dict], per_question: int, seed: int) -> list[tuple[str, str, str]]:
    """(question, positive, negative) triples: up to ``per_question`` of each question's P x N pairs."""
    rng = random.Random(seed)
    out = []
    for q in qs:
        allp = [(a, b) for a in range(len(q["pos"])) for b in range(len(q["neg"]))]
        if len(allp) > per_question:
            allp = rng.sample(allp, per_question)
        out.extend((q["question"], q["pos"][a], q["neg"][b]) for a, b in allp)
    return out


def encode_pairs(enc, pairs: list[tuple[str, str, str]]) -> list[dict]:
    qs = [q for q, _, _ in pairs]
    pos = enc.encode_many(qs, [p for _, p, _ in pairs])
    neg = enc.encode_many(qs, [n for _, _, n in pairs])
    return [{"pos": a, "neg": b} for a, b in zip(pos, neg)]


def evaluate(scorer, val_qs: list[dict], batch_size: int = 32) -> dict:
    """Pairwise accuracy (within question) and AUC (over all held-out rationales)."""
    from negkd.ranker import auc, pairwise_accuracy

    if not val_qs:
        return {"questions": 0, "pairs": 0, "pairwise_accuracy": None, "auc": None}
    qs, rs, spans = [], [], []
    for q in val_qs:
        start = len(rs)
        for r in q["pos"] + q["neg"]:
            qs.append(q["question"])
            rs.append(r)
        spans.append((start, len(q["pos"]), len(q["neg"])))
    s = scorer.score(qs, rs, batch_size=batch_size)
    groups = [(s[a: a + p], s[a + p: a + p + n]) for a, p, n in spans]
    acc, n_pairs = pairwise_accuracy(groups)
    all_pos = [x for g in groups for x in g[0]]
    all_neg = [x for g in groups for x in g[1]]
    a = auc(all_pos, all_neg)
    return {"questions": len(val_qs), "pairs": n_pairs, "positives": len(all_pos), "negatives": len(all_neg),
            "pairwise_accuracy": None if math.isnan(acc) else round(acc, 6),
            "auc": None if math.isnan(a) else round(a, 6),
            "mean_score_pos": round(sum(all_pos) / len(all_pos), 6),
            "mean_score_neg": round(sum(all_neg) / len(all_neg), 6)}


def _resolve_backbone(name: str) -> str:
    from negkd.generation import model_kind, recorded_base
    from negkd.validate import check_model_dir

    check_model_dir(name, "--base-model")  # damaged or unfinished: refused before anything loads
    if model_kind(name) in ("adapter", "nat"):
        return recorded_base(name)
    from negkd.modeling import check_model_path

    check_model_path(name)
    return name


def _report(output: Path, m: dict, res) -> None:
    from negkd.console import log, out

    if m["pairs"]:
        b = m.get("before_training")
        was = f" (untrained: {100 * b['pairwise_accuracy']:.1f}%, AUC {b['auc']:.3f})" if b else ""
        out.print(f"held-out: {m['questions']} questions, {m['pairs']} pairs: pairwise accuracy "
                  f"{100 * m['pairwise_accuracy']:.1f}%, AUC {m['auc']:.3f}{was}; mean score pos "
                  f"{m['mean_score_pos']:.3f} vs neg {m['mean_score_neg']:.3f}")
    else:
        out.print("held-out: no pairs (pass --val-fraction > 0 with enough questions to measure the ranker)")
    log(f"train-ranker: {res.step} steps -> {output}; next: negkd infer PROBLEMS -o DIR --model STUDENT "
        f"--ranker {output}")
