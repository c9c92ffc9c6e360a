"""negkd export: the split as TRL datasets (SFT / KTO / DPO), or an adapter merged into a plain model."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated, Optional

import typer

from negkd import train_options as T
from negkd.errors import UsageError, UserError, choice

FORMATS = ("trl-sft", "trl-kto", "trl-dpo", "merged")
TRAIN = "train.jsonl"  # the dataset: exactly the columns TRL documents
SOURCE = "source.jsonl"  # line i: where line i of train.jsonl came from ({id, k} or {id, chosen_k, rejected_k})


def command(
    source: Annotated[Path, typer.Argument(
        help="trl-*: the output directory of `negkd split` (pos.jsonl + neg.jsonl) or one graded-samples file "
             "(rows with 'correct'). merged: a PEFT adapter directory (`train-neg`, `train-pos --no-neg`, "
             "`calibrate` output).", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory (created; manifest.json is written "
                                                                "last).", show_default=False)],
    format: Annotated[str, typer.Option("--format", callback=choice(FORMATS), show_default=False,
                                        help="trl-sft: prompt/completion of the positives. trl-kto: prompt/completion/"
                                             "label, every row (positives true, negatives false; unpaired). trl-dpo: "
                                             "prompt/chosen/rejected pairs of a positive and a negative of the same "
                                             "question (see --pairs-per-question). merged: the adapter merged into "
                                             "its base, saved as a plain Hugging Face model dir.")],
    template: T.Template = None,
    chat_template: Annotated[bool, typer.Option(
        "--chat-template", help="Write TRL's conversational form: prompt = [{role: user, content: template(question)}], "
                                "completion / chosen / rejected = [{role: assistant, content: rationale}]; TRL applies "
                                "the tokenizer's chat template itself.")] = False,
    pairs_per_question: Annotated[int, typer.Option(
        "--pairs-per-question", min=1,
        help="trl-dpo: at most this many pairs per question. Per question (its own RNG, seeded by --seed and the "
             "question id, so the draw does not depend on file order): the positives are shuffled and used "
             "round-robin, the negatives are sampled without replacement, so a question gives min(this, #negatives) "
             "pairs; a question without a positive or without a negative gives none (counted).")] = 4,
    seed: Annotated[int, typer.Option(help="trl-dpo: seed of the pair draw (same seed, same pairs).")] = 0,
    base_model: Annotated[Optional[str], typer.Option(
        help="merged: the unquantized base to merge onto (default: the base recorded in the adapter).")] = None,
    dtype: Annotated[str, typer.Option(help="merged: dtype of the saved weights: auto (the base's own), float32, "
                                            "bfloat16 or float16.")] = "auto",
    trust_remote_code: T.TrustRemoteCode = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo the step even if OUTPUT holds a finished run.")] = False,
) -> None:
    """Export negkd data or students to the wider ecosystem.

    trl-sft / trl-kto / trl-dpo write DIR/train.jsonl with exactly the columns TRL's SFTTrainer,
    KTOTrainer and DPOTrainer read (load it with datasets.load_dataset("json",
    data_files="DIR/train.jsonl", split="train")), and DIR/source.jsonl, whose line i names the
    sample(s) line i came from (id, k). The prompt is negkd's prompt: the same --template that
    training uses (default 'Problem:\\n{question}\\nSolution:\\n'); the completion is the rationale
    as is, without EOS: TRL appends the tokenizer's EOS to standard-form completions itself (and a
    chat template closes the assistant turn), so the file stays tokenizer-independent. Rows with an
    empty rationale are dropped and counted, as in training.

    merged loads the adapter onto its base (refusing a quantized base and a NAT checkpoint, whose
    integration unit is not a LoRA: distill it with `negkd calibrate` first), merges the LoRA into
    the weights and saves a plain model directory (config, safetensors, tokenizer) for servers and
    converters that take no LoRA, plus negkd.json recording the template to prompt it with.

    Examples: negkd export runs/split -o runs/dpo --format trl-dpo --pairs-per-question 4;
    negkd export runs/nce -o runs/nce-merged --format merged
    """
    if format == "merged":
        _merged(source, output, base_model, dtype, trust_remote_code, overwrite)
    else:
        _trl(source, output, format, template, chat_template, pairs_per_question, seed, overwrite)


# --------------------------------------------------------------------------- TRL datasets

def _read(source: Path) -> tuple[list[Path], list[dict], list[dict]]:
    """(input files, positives, negatives) from a split dir or one graded file."""
    from negkd.io import check_file
    from negkd.schemas import read_graded

    source = Path(source)
    if not source.exists():
        raise UserError(f"{source}: no such file or directory")
    if source.is_dir():
        files = [f for name in ("pos.jsonl", "neg.jsonl") for f in (source / name, source / f"{name}.gz") if f.exists()]
        if not files:
            raise UserError(f"{source}: holds no pos.jsonl / neg.jsonl; pass the output directory of `negkd split` "
                            "or a graded-samples file")
    else:
        files = [check_file(source)]
    rows = [r for f in files for r in read_graded(f)]  # file:line errors for any bad row
    seen: set = set()
    for r in rows:
        key = (r["id"], r["k"])
        if key in seen:
            raise UserError(f"{files[-1]}: sample (id, k) = {key!r} appears twice across {', '.join(map(str, files))}")
        seen.add(key)
    return files, [r for r in rows if r["correct"]], [r for r in rows if not r["correct"]]


def dpo_pairs(pos: list[dict], neg: list[dict], per_question: int, seed: int) -> tuple[list[tuple[dict, dict]], dict]:
    """(chosen, rejected) pairs, both of the same question, and counts.

    Per question, with ``random.Random(f"{seed}:{id}")``: positives shuffled and used round-robin,
    negatives sampled without replacement; min(per_question, #negatives) pairs. Questions in
    order of first appearance among the positives.
    """
    by_q_pos: dict[str, list[dict]] = {}
    by_q_neg: dict[str, list[dict]] = {}
    for r in pos:
        by_q_pos.setdefault(r["id"], []).append(r)
    for r in neg:
        by_q_neg.setdefault(r["id"], []).append(r)
    pairs: list[tuple[dict, dict]] = []
    for qid, ps in by_q_pos.items():
        ns = by_q_neg.get(qid, [])
        if not ns:
            continue
        rng = random.Random(f"{seed}:{qid}")
        ps = sorted(ps, key=lambda r: r["k"])
        rng.shuffle(ps)
        chosen_neg = rng.sample(sorted(ns, key=lambda r: r["k"]), min(per_question, len(ns)))
        pairs += [(ps[i % len(ps)], n) for i, n in enumerate(chosen_neg)]
    questions = set(by_q_pos) | set(by_q_neg)
    counts = {"questions": len(questions), "questions_with_pairs": len({c["id"] for c, _ in pairs}),
              "questions_without_positive": len(questions - set(by_q_pos)),
              "questions_without_negative": len(questions - set(by_q_neg))}
    return pairs, counts


def _trl(source: Path, output: Path, fmt: str, template: str | None, chat: bool, per_q: int, seed: int,
         overwrite: bool) -> None:
    from negkd.console import log
    from negkd.io import RunDir
    from negkd.prompts import load_template, render

    tmpl = load_template(template)
    files, pos, neg = _read(source)
    args = {"format": fmt, "template": tmpl, "chat_template": chat}
    if fmt == "trl-dpo":
        args.update(pairs_per_question=per_q, seed=seed)
    run = RunDir(output, "export", args, inputs=files, overwrite=overwrite)
    if run.up_to_date():
        return
    empty = [r for r in pos + neg if not r["rationale"].strip()]
    pos = [r for r in pos if r["rationale"].strip()]
    neg = [r for r in neg if r["rationale"].strip()]

    def prompt(r: dict):
        text = render(tmpl, r)
        return [{"role": "user", "content": text}] if chat else text

    def answer(r: dict):
        return [{"role": "assistant", "content": r["rationale"]}] if chat else r["rationale"]

    stats: dict = {"positives": len(pos), "negatives": len(neg), "dropped_empty": len(empty)}
    if fmt == "trl-sft":
        rows = [{"prompt": prompt(r), "completion": answer(r)} for r in pos]
        src = [{"id": r["id"], "k": r["k"]} for r in pos]
    elif fmt == "trl-kto":
        both = pos + neg
        rows = [{"prompt": prompt(r), "completion": answer(r), "label": bool(r["correct"])} for r in both]
        src = [{"id": r["id"], "k": r["k"]} for r in both]
    else:
        pairs, counts = dpo_pairs(pos, neg, per_q, seed)
        stats.update(counts)
        rows = [{"prompt": prompt(c), "chosen": answer(c), "rejected": answer(r)} for c, r in pairs]
        src = [{"id": c["id"], "chosen_k": c["k"], "rejected_k": r["k"]} for c, r in pairs]
    if not rows:
        what = "positives" if fmt == "trl-sft" else "(positive, negative) pairs of one question" \
            if fmt == "trl-dpo" else "rows"
        raise UserError(f"{source}: no {what} to export; check that it is the output of `negkd split`")
    stats["rows"] = len(rows)
    run.start()
    try:
        run.write_jsonl(TRAIN, rows)
        run.write_jsonl(SOURCE, src)
        run.finish(**stats)
    except BaseException:
        run.cleanup()
        raise
    extra = f" from {stats['questions_with_pairs']:,} of {stats['questions']:,} questions" if fmt == "trl-dpo" else ""
    log(f"wrote {len(rows):,} {fmt} rows{extra} to {output / TRAIN}"
        + (f" (dropped {len(empty):,} empty rationales)" if empty else ""))


# --------------------------------------------------------------------------- merged model

def _merged(adapter: Path, output: Path, base_model: str | None, dtype: str, trust_remote_code: bool,
            overwrite: bool) -> None:
    import json
    import os
    import shutil

    from negkd.console import log
    from negkd.generation import model_kind, read_meta, recorded_base
    from negkd.io import RunDir, atomic_write_text, read_json
    from negkd.modeling import DTYPES

    if dtype not in DTYPES:  # a bad flag value is a usage error, found before any input is read
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise UserError(f"{adapter}: no such adapter directory; --format merged takes a PEFT adapter dir "
                        "(`train-neg`, `train-pos --no-neg`, `calibrate` output)")
    kind = model_kind(adapter)
    if kind == "nat":
        raise UserError(f"{adapter}: is a NAT checkpoint; its integration unit is not a LoRA and cannot be merged "
                        "into the base weights. Distill it into a plain LoRA with `negkd calibrate` and export that")
    if kind != "adapter":
        raise UserError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    base = base_model or recorded_base(adapter)
    cfg = Path(base) / "config.json"
    if cfg.is_file():
        qc = read_json(cfg, dict, fix="the base model directory is damaged").get("quantization_config")
        if qc:
            raise UserError(f"{base}: is a quantized checkpoint ({qc.get('quant_method', 'quantized')}); merging a "
                            "LoRA into quantized weights loses the adapter's precision. Pass the unquantized base "
                            "with --base-model")
    run = RunDir(output, "export", {"format": "merged", "base_model": base, "dtype": dtype},
                 inputs=[adapter], overwrite=overwrite)
    if run.up_to_date():
        return

    from negkd.modeling import load_model, load_tokenizer
    from negkd.steps.infer import _has_tokenizer, load_adapter

    meta = read_meta(adapter)
    want = _saved_dtype(base, dtype)  # loaded, merged (W + s*B@A, by PEFT) and saved in this dtype, on CPU
    model = load_model(base, device="cpu", dtype=want, trust_remote_code=trust_remote_code)
    from negkd.lora import is_quantized

    if is_quantized(model):
        raise UserError(f"{base}: loads as a quantized model; merging a LoRA into quantized weights loses the "
                        "adapter's precision. Pass the unquantized base with --base-model")
    model = load_adapter(model, str(adapter), merge=True)
    tok = load_tokenizer(str(adapter) if _has_tokenizer(adapter) else base, trust_remote_code=trust_remote_code)
    run.start()
    scratch = Path(output) / f".merged.tmp-{os.getpid()}"
    try:
        if scratch.exists():
            shutil.rmtree(scratch)
        model.save_pretrained(str(scratch), safe_serialization=True)
        tok.save_pretrained(str(scratch))
        doc = {"kind": "merged", "merged_from": str(adapter.resolve()), "adapter_kind": meta.get("kind"),
               "base_model": base, "template": meta.get("template"), "chat_template": meta.get("chat_template", False)}
        atomic_write_text(scratch / "negkd.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        for f in sorted(scratch.iterdir()):
            os.replace(f, run.tmp(f.name))
            run.record_output(f.name)
        scratch.rmdir()
        run.finish(base_model=base, parameters=sum(p.numel() for p in model.parameters()))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        run.cleanup()
        raise
    log(f"merged {adapter} into {base} -> {output} (a plain Hugging Face model directory)")


def _saved_dtype(base: str, dtype: str) -> str:
    """The dtype name to merge and save in: --dtype, or with auto the base checkpoint's own (else float32)."""
    from negkd.io import read_json
    from negkd.modeling import DTYPES

    if dtype != "auto":
        return dtype
    cfg = Path(base) / "config.json"
    name = None
    if cfg.is_file():
        doc = read_json(cfg, dict, fix="the base model directory is damaged")
        name = doc.get("dtype") or doc.get("torch_dtype")
    return name if name in DTYPES[1:] else "float32"
