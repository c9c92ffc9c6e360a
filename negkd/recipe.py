"""The causal-LM training recipe shared by train-neg and train-pos (and usable by calibrate):
read graded samples -> tokenize -> load base -> attach adapter -> fit() -> save a
self-describing checkpoint folder through RunDir.

    setup -> load data -> load model -> attach -> fit -> save (main process) -> manifest
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from negkd.errors import UserError

META_NAME = "negkd.json"


@dataclass
class ModelOpts:
    base_model: str
    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class DataOpts:
    template: str | None = None
    chat_template: bool = False
    loss_on_prompt: bool = False
    max_length: int = 1024


@dataclass
class DataSource:
    """One input file and which rows of it to train on (correct = True/False/None for all)."""
    path: Path
    names: tuple[str, ...]
    correct: bool | None
    role: str  # "negatives" | "positives"
    flag: str = ""  # the CLI argument, for messages


@dataclass
class Recipe:
    """What differs between commands: how to wrap the base and how to save the result."""
    command: str
    kind: str  # recorded in negkd.json: neg-lora | pos-lora | mix-lora | nt-lora | ul-lora | nat
    attach: Callable[[Any], Any]  # model -> model to train (its requires_grad params train)
    save_final: Callable[[Any, Path, dict], None]  # (unwrapped model, dir, negkd meta) -> writes the payload
    save_ckpt: Callable[[Any, Path, dict], None] | None = None  # payload inside each checkpoint
    loss_fn: Callable | None = None
    metrics_fn: Callable | None = None
    before_fit: Callable[[Any], None] | None = None
    after_fit: Callable[[Any], None] | None = None
    meta: dict = field(default_factory=dict)  # extra negkd.json fields
    fingerprint: dict = field(default_factory=dict)
    weight_fn: Callable | None = None  # fit()'s weight_fn (default: the batch's target tokens)
    param_counts: Callable[[Any], dict] | None = None  # model -> {component: trainable parameters}


def trainable_counts(model) -> dict:
    """``{"lora": n, "total": n}``: the trainable parameters of a plain (PEFT) LoRA model."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"lora": n, "total": n}


def base_identity(name: str) -> dict:
    """How a checkpoint records its base: as given, resolved absolute path (local dirs), config hash."""
    p = Path(name).expanduser()
    ident = {"base_model": name, "base_model_path": str(p.resolve()) if p.is_dir() else name}
    cfg = p / "config.json"
    if cfg.is_file():
        ident["base_config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
    return ident


def same_base(a: dict, b: dict) -> bool:
    if a.get("base_model_path") == b.get("base_model_path"):
        return True
    ha, hb = a.get("base_config_sha256"), b.get("base_config_sha256")
    return bool(ha and hb and ha == hb and Path(a.get("base_model_path", "")).name == Path(b.get("base_model_path", "")).name)


def read_meta(d: Path) -> dict:
    p = Path(d) / META_NAME
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{p}: not valid JSON; the directory is damaged, rerun the step that wrote it") from None


def load_rows(src: DataSource) -> tuple[Path, list[dict]]:
    from negkd.console import log
    from negkd.io import resolve_input
    from negkd.schemas import read_graded

    path = resolve_input(src.path, src.names, "split")
    rows = read_graded(path)
    if src.correct is None:
        return path, rows
    keep = [r for r in rows if r["correct"] is src.correct]
    if not keep:
        want = "correct=false" if src.correct is False else "correct=true"
        other = "pos.jsonl" if src.correct is False else "neg.jsonl"
        raise UserError(f"{path}: holds no {src.role} ({want} rows) among {len(rows):,}; is it {other}? "
                        f"Pass the {src.names[0]} written by `negkd split`")
    if len(keep) < len(rows):
        log(f"{path}: training on the {len(keep):,} {src.role} of {len(rows):,} rows")
    return path, keep


def run_args(mopts: ModelOpts, dopts: DataOpts, cfg, extra: dict) -> dict:
    """The arguments that determine a training run's output (recorded in the manifest)."""
    from negkd.training import TrainConfig

    t = asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    for k in ("save_every", "log_every"):
        t.pop(k, None)
    return {"base_model": mopts.base_model, "dtype": mopts.dtype, "load_in_4bit": mopts.load_in_4bit,
            "load_in_8bit": mopts.load_in_8bit, **asdict(dopts), **t, **extra}


def train(recipe: Recipe, sources: list[DataSource], out: Path, mopts: ModelOpts, dopts: DataOpts, cfg,
          run_extra: dict, resume: bool, overwrite: bool) -> dict | None:
    """Run the whole step; returns the manifest (main process) or None when up to date."""
    from negkd.console import log
    from negkd.data import Collator, build_examples, lengths
    from negkd.io import atomic_write_text
    from negkd.modeling import check_causal_lm, load_model, load_tokenizer, quantization_config
    from negkd.prompts import load_template
    from negkd.training import check_resume, fit, lm_loss, lm_weight, make_accelerator, model_device, open_run

    from negkd.modeling import quiet_libraries

    quiet_libraries()
    template = load_template(dopts.template)
    # cheap checks first: inputs readable and non-empty before any model is loaded
    loaded = [load_rows(s) for s in sources]
    paths = [p for p, _ in loaded]
    rows = [r for _, rs in loaded for r in rs]

    acc = make_accelerator(mopts.device)
    main = acc.is_main_process
    args = run_args(mopts, dopts, cfg, run_extra)
    run = open_run(out, recipe.command, args, paths, overwrite=overwrite, resume=resume, main=main)
    acc.wait_for_everyone()
    if run is None:
        return None

    check_causal_lm(mopts.base_model, mopts.trust_remote_code)
    if mopts.load_in_4bit or mopts.load_in_8bit:
        quantization_config(mopts.load_in_4bit, mopts.load_in_8bit, None)  # bitsandbytes present?
    tok = load_tokenizer(mopts.base_model, trust_remote_code=mopts.trust_remote_code)
    examples, stats = build_examples(rows, tok, template, dopts.chat_template, dopts.max_length, dopts.loss_on_prompt)
    if main:
        log(f"data: {stats.summary()}")
    if not examples:
        raise UserError(f"no training examples left after tokenization ({stats.dropped_empty} empty rationales)")

    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # identical adapter initialisation on every process
    model = load_model(mopts.base_model, device=model_device(acc, mopts.device), dtype=mopts.dtype,
                       load_in_4bit=mopts.load_in_4bit, load_in_8bit=mopts.load_in_8bit,
                       trust_remote_code=mopts.trust_remote_code, gradient_checkpointing=mopts.gradient_checkpointing)
    model = recipe.attach(model)
    counts = (recipe.param_counts or trainable_counts)(model)
    if main:
        log("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if recipe.before_fit:
        recipe.before_fit(model)
    ident = base_identity(mopts.base_model)
    fingerprint = {"args": {k: v for k, v in run.args.items() if k not in ("epochs", "max_steps")},
                   "inputs": [i["sha256"] for i in run.inputs], "base": ident, **recipe.fingerprint}
    check_resume(model, lengths(examples), config=cfg, out_dir=out, fingerprint=fingerprint, resume=resume,
                 world_size=acc.num_processes)
    if main:  # every check passed: only now touch DIR
        run.start()

    meta = {"kind": recipe.kind, **ident, "template": template, "chat_template": dopts.chat_template,
            "loss_on_prompt": dopts.loss_on_prompt, "max_length": dopts.max_length,
            "data": [{"path": str(p), "sha256": i["sha256"]} for p, i in zip(paths, run.inputs)],
            "data_stats": stats.as_dict(), "trainable_params": counts, **recipe.meta}
    from negkd import __version__

    meta["negkd_version"] = __version__

    def save_ckpt(m, d: Path) -> None:
        if recipe.save_ckpt is not None:
            recipe.save_ckpt(m, d, meta)
            (Path(d) / META_NAME).write_text(json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")

    res = fit(model, examples, config=cfg, out_dir=out, collate_fn=Collator(tok.pad_token_id),
              lengths=lengths(examples), loss_fn=recipe.loss_fn or lm_loss, weight_fn=recipe.weight_fn or lm_weight, save_fn=save_ckpt, metrics_fn=recipe.metrics_fn,
              fingerprint=fingerprint, resume=resume, accelerator=acc, desc=recipe.command)
    if recipe.after_fit:
        recipe.after_fit(res.model)
    acc.wait_for_everyone()
    if not main:
        return None

    # stage the payload next to the final names; finish() renames them and writes the manifest last
    scratch = Path(out) / f".final.tmp-{os.getpid()}"
    if scratch.exists():
        shutil.rmtree(scratch)
    meta["train"] = {"steps": res.step, "total_steps": res.total_steps, "world_size": acc.num_processes,
                     "final_loss": res.history[-1]["loss"] if res.history else None, **asdict(cfg)}
    recipe.save_final(res.model, scratch, meta)
    tok.save_pretrained(str(scratch))
    atomic_write_text(scratch / META_NAME, json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    for f in sorted(scratch.iterdir()):
        os.replace(f, run.tmp(f.name))
        run.record_output(f.name)
    scratch.rmdir()
    run.record_output("metrics.jsonl")
    manifest = run.finish(steps=res.step, world_size=acc.num_processes, data_stats=stats.as_dict(),
                          resumed_from=res.resumed_from, trainable_params=counts,
                          tokens_per_s=round(res.tokens_per_s, 1), padding_share=round(res.padding_share, 4),
                          peak_gpu_memory_gb=round(res.peak_memory_gb, 3) if res.peak_memory_gb is not None else None)
    last = res.history[-1] if res.history else {}
    log(f"{recipe.command}: {res.step} steps, final loss {last.get('loss', float('nan')):.4f}, "
        f"{res.tokens_per_s:,.0f} tokens/s, {100 * res.padding_share:.1f}% padding -> {out}")
    return manifest


def make_lm_loss(extra_ctx: Callable | None = None):
    """The masked NLL loss, optionally run inside a context built from the batch (NAT's gate mask)."""
    from negkd.training import lm_loss

    if extra_ctx is None:
        return lm_loss

    def loss(model, batch):
        with extra_ctx(model, batch):
            return lm_loss(model, batch)

    return loss
