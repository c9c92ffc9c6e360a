"""``negkd calibrate``: Negative Calibrated Enhancement (NCE, method.md §4).

Distil the NAT model (frozen Neg-LoRA + Pos-LoRA + integration unit) into a *fresh standard
PEFT LoRA* on the same base, each sequence re-weighted by how much the NAT model disagrees
with the Neg-LoRA-only model (``negkd/nce.py`` has the equations).

One copy of the base model is in memory. Per micro-batch::

    teacher (no grad, eval mode, student adapter disabled):
        NAT unit "nat"      -> z_nat   -> p_nat = softmax(z_nat / T)      (kept, float32)
        NAT unit "neg-only" -> z_neg   -> beta_seq = tanh(mean_t KL(p_neg || p_nat))
        del z_nat, z_neg
    student (grad, train mode, NAT unit "off", student adapter on):
        z_stu -> L = (1 - lam) CE + lam (c + beta_seq) T^2 softCE(p_nat -> student)

The NAT unit stays in mode "off" outside the teacher passes, so a backward pass that
recomputes activations (``--gradient-checkpointing``) sees the student model. All three passes
skip the logits of leading positions no row trains on (the shortest prompt of the batch) when
the model's forward takes ``logits_to_keep``. At T = 1 the CE and KD terms are one soft-target
cross-entropy built in ``p_nat``'s memory, so the student pass holds one extra vocabulary-sized
tensor compared with plain SFT.

setup -> read NAT checkpoint -> read data -> load base -> student LoRA + NAT -> fit -> save
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from negkd import train_options as T
from negkd.errors import UsageError, UserError

CALIBRATION = "calibration.jsonl"
PART = ".calibration.part-{rank}.jsonl"  # per-process append-only records while training


# ---------------------------------------------------------------------------- the objective


def _peers():
    """``torch.distributed`` when this process has peers (an initialized group of 2 or more), else None."""
    import torch

    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


class NCEObjective:
    """``loss_fn(model, batch)`` for ``training.fit`` plus ``metrics(model)`` for its ``metrics_fn``.

    ``peft_model`` is the unwrapped PeftModel (student LoRA) whose base linears carry NAT
    layers; ``fit`` passes the (possibly DDP-wrapped) same model as ``model`` for the student pass.
    ``record`` (a path) appends one JSON line per example seen: ``idx, id, k, beta, kl, tokens``.

    Both teachers are frozen and run in eval mode, so ``beta_seq`` is a fixed function of the
    example: it is kept per example index once computed, and a micro-batch whose rows all have
    one skips the Neg-LoRA-only pass (from the second epoch on; ``seed_cache`` fills it from the
    records of an interrupted run). The NAT pass, which gives the soft targets, runs every step.
    """

    def __init__(self, peft_model, kd_weight: float = 0.5, temperature: float = 1.0, beta_offset: float = 0.5,
                 calibrate: bool = True, record: Path | None = None, sources: list[str] | None = None):
        self.model = peft_model
        self.kd_weight, self.temperature, self.beta_offset = kd_weight, temperature, beta_offset
        self.calibrate = calibrate
        self.record = Path(record) if record is not None else None
        self.sources = sources
        self._betas: list = []  # (B,) tensors since the last metrics() call
        self._kls: list = []
        self._keep_ok: bool | None = None  # does the model's forward take logits_to_keep?
        self._cache: dict[int, tuple[float, float]] = {}  # example idx -> (beta, kl), exact float32 values
        self.neg_passes = self.cached_batches = 0
        from negkd import nat

        self._nat_layers = list(nat.nat_layers(peft_model).values())  # found once, not per pass

    # -- which logits are needed -------------------------------------------------
    def _skip(self, labels) -> int:
        """Leading positions no row of the batch trains on (the shortest prompt): their logits are
        never computed, in any of the three passes, when the model supports ``logits_to_keep``."""
        from negkd.training import first_target, keeps_logits

        if self._keep_ok is None:
            self._keep_ok = keeps_logits(self.model)
        return first_target(labels) if self._keep_ok else 0

    def _forward(self, model, input_ids, attention_mask, skip: int):
        kw = {"logits_to_keep": input_ids.shape[1] - skip} if skip else {}
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits

    # -- beta per example ----------------------------------------------------------
    def seed_cache(self, records: list[dict]) -> None:
        """Known ``(beta, kl)`` per example index, from calibration records (``merge_records``)."""
        for r in records:
            self._cache[int(r["idx"])] = (float(r["beta"]), float(r["kl"]))

    def _cached(self, idx, device):
        """(beta (B,), kl (B,)) float32 when every row of the micro-batch has them, else None. Under
        several processes only when every process's rows have them: each process must run the same
        forwards (FSDP gathers parameters inside each one), so all skip the Neg-LoRA pass or none."""
        import torch

        rows = None if idx is None else [self._cache.get(int(i)) for i in idx.tolist()]
        hit = rows is not None and all(r is not None for r in rows)
        dist = _peers()
        if dist is not None:
            flag = torch.tensor([0 if hit else 1], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            hit = hit and int(flag.item()) == 0
        if not hit:
            return None
        t = torch.tensor(rows, dtype=torch.float32, device=device)  # (B, 2)
        return t[:, 0].contiguous(), t[:, 1].contiguous()

    def _remember(self, idx, beta, kl) -> None:
        """Keep each row's (beta, kl); under several processes every process keeps every process's rows,
        so an example seen by another process in epoch 1 is a hit here in epoch 2."""
        import torch

        rows = torch.stack([idx.to(beta.device, torch.float64), beta.double(), kl.double()], 1)  # (B, 3)
        dist = _peers()
        if dist is not None:
            n = torch.tensor([rows.shape[0]], device=rows.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            pad = torch.full((int(n.item()), 3), -1.0, dtype=torch.float64, device=rows.device)
            pad[: rows.shape[0]] = rows  # idx -1: padding
            parts = [torch.empty_like(pad) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, pad)
            rows = torch.cat(parts)
        for i, b_, k_ in rows.tolist():
            if i >= 0:
                self._cache[int(i)] = (b_, k_)

    # -- teacher -----------------------------------------------------------------
    def teacher(self, input_ids, attention_mask, labels, skip: int = 0, idx=None):
        """(p_nat (B, L-1-skip, V) float32, beta (B,), kl (B,), mask (B, L-1-skip)) without gradients.

        Aligned like ``nce.shift``: position t predicts ``labels[:, skip + t + 1]``. ``idx`` (B,):
        the rows' example indices, for the per-example beta cache (None: always compute)."""
        import torch

        from negkd import nat, nce

        m = self.model
        if not self._nat_layers:
            raise ValueError("the student model carries no NAT layers; build it with build_student()")
        mask = labels[:, skip + 1:] != nce.IGNORE_INDEX  # (B, L-1-skip)
        was_training = m.training
        m.eval()  # no dropout: the teacher and beta are deterministic per example
        try:
            with torch.no_grad(), m.disable_adapter():
                with nat.using_mode(m, "nat", self._nat_layers):
                    z_nat = self._forward(m, input_ids, attention_mask, skip)[:, :-1]  # (B, L-1-skip, V)
                known = self._cached(idx, z_nat.device) if self.calibrate else None
                if known is not None:
                    beta, kl = known
                    self.cached_batches += 1
                elif self.calibrate:
                    with nat.using_mode(m, "neg-only", self._nat_layers):
                        z_neg = self._forward(m, input_ids, attention_mask, skip)[:, :-1]
                    kl = nce.sequence_kl(z_nat, z_neg, mask, self.temperature)  # (B,) mean KL(p_neg || p_nat)
                    del z_neg
                    beta = torch.tanh(kl)  # eq. (1); 0 for a row without targets
                    self.neg_passes += 1
                    if idx is not None:
                        self._remember(idx, beta, kl)
                else:
                    kl = beta = torch.zeros(input_ids.shape[0], device=z_nat.device)
                p_nat = nce.teacher_probs(z_nat, self.temperature)  # (B, L-1, V) float32
                del z_nat  # free the teacher logits before the student pass and its backward
        finally:
            if was_training:
                m.train()
        return p_nat, beta, kl, mask

    # -- fit callbacks -----------------------------------------------------------
    def __call__(self, model, batch) -> tuple[Any, dict]:
        from negkd import nce

        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        skip = self._skip(labels)
        p_nat, beta, kl, mask = self.teacher(ids, am, labels, skip, batch.get("idx"))
        z = self._forward(model, ids, am, skip)  # NAT unit is "off": the student; (B, L-skip, V)
        z_stu, y = nce.shift(z, labels[:, skip:])  # (B, L-1-skip, V), (B, L-1-skip)
        loss, parts = nce.nce_loss(z_stu, y, p_nat, beta, mask, kd_weight=self.kd_weight,
                                   temperature=self.temperature, beta_offset=self.beta_offset,
                                   consume_teacher=True)  # p_nat's memory becomes the soft target
        del p_nat
        self._betas.append(beta.detach())
        self._kls.append(kl.detach())
        if self.record is not None and self.calibrate:
            self._write(batch, beta, kl, mask)
        return loss, {"ce": parts["ce"], "kd": parts["kd"]}

    def _write(self, batch, beta, kl, mask) -> None:
        from negkd.io import dumps

        idx = batch["idx"].tolist()
        bs, ks, toks = beta.tolist(), kl.tolist(), mask.sum(-1).tolist()
        lines = []
        for i, j in enumerate(idx):
            src = self.sources[j] if self.sources is not None else "sample"
            lines.append(dumps({"idx": j, "id": batch["id"][i], "k": batch["k"][i], "source": src,
                                "beta": bs[i], "kl": ks[i], "tokens": int(toks[i])}))  # exact: a resume reuses them
        with open(self.record, "a", encoding="utf-8") as fh:
            fh.write("".join(x + "\n" for x in lines))

    def metrics(self, _model=None) -> dict[str, float]:
        """Distribution of beta over the examples since the last call (exact across processes)."""
        import torch

        if not self._betas:
            return {}
        b, k = torch.cat(self._betas).double(), torch.cat(self._kls).double()
        self._betas, self._kls = [], []
        vec = torch.stack([b.sum(), k.sum(), torch.tensor(float(b.numel()), dtype=b.dtype, device=b.device)])
        lo, hi = b.min().clone(), b.max().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            dist = torch.distributed
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        n = max(vec[2].item(), 1.0)
        return {"beta_mean": vec[0].item() / n, "beta_min": lo.item(), "beta_max": hi.item(),
                "kl_mean": vec[1].item() / n}


def build_student(model, nat_dir: Path, la: dict, gradient_checkpointing: bool = False):
    """A fresh trainable PEFT LoRA on ``model`` with the frozen NAT checkpoint attached inside it.

    The student comes first so its tensors keep stock PEFT names; NAT then wraps the base
    linears inside the PEFT layers (nat.py). The NAT unit is left in mode "off" (the student's
    view); ``NCEObjective.teacher`` switches it per pass.
    """
    from negkd import lora, nat

    student = lora.attach_lora(model, la["r"], la["alpha"], la["dropout"], la["target_modules"],
                               gradient_checkpointing=gradient_checkpointing)
    nat.attach(student, nat_dir)  # all NAT tensors frozen
    nat.set_mode(student, "off")
    return student


def merge_records(out: Path, existing: Path | None = None) -> list[dict]:
    """Union of the per-process part files (and an earlier calibration.jsonl), one record per
    example (by idx), in example order. Torn last lines from a kill are skipped."""
    seen: dict[int, dict] = {}
    files = sorted(Path(out).glob(PART.format(rank="*")))
    if existing is not None and existing.exists():
        files = [existing] + files
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            seen.setdefault(int(rec["idx"]), rec)
    return [seen[i] for i in sorted(seen)]


# ---------------------------------------------------------------------------- inputs


def read_nat(nat_dir: Path) -> dict:
    """The NAT checkpoint's metadata (nat_config.json, plus negkd.json when present)."""
    from negkd import recipe

    nat_dir = Path(nat_dir)
    if not nat_dir.exists():
        raise UserError(f"--nat {nat_dir}: no such directory; pass the output directory of `negkd train-pos`")
    if not nat_dir.is_dir():
        raise UserError(f"--nat {nat_dir}: is a file; pass the output directory of `negkd train-pos`")
    if not (nat_dir / "nat_config.json").exists():
        hint = ""
        if (nat_dir / "adapter_config.json").exists():
            hint = " (it holds a plain LoRA adapter: the output of train-neg or calibrate, not train-pos)"
        raise UserError(f"--nat {nat_dir}: not a NAT checkpoint, no nat_config.json{hint}; create one with "
                        "`negkd train-pos POS -o DIR --neg NEGDIR`")
    from negkd import nat
    from negkd.validate import check_model_dir

    check_model_dir(nat_dir, "--nat")
    try:
        doc = nat.read_config(nat_dir)
    except json.JSONDecodeError as e:
        raise UserError(f"--nat {nat_dir}: nat_config.json is not valid JSON ({e}); rerun `negkd train-pos`") from None
    if not (nat_dir / nat.WEIGHTS_NAME).exists():
        raise UserError(f"--nat {nat_dir}: {nat.WEIGHTS_NAME} is missing (an unfinished `negkd train-pos`?)")
    meta = {**doc, **recipe.read_meta(nat_dir)}
    if not meta.get("base_model"):
        raise UserError(f"--nat {nat_dir}: the checkpoint does not record its base model; rerun `negkd train-pos`")
    return meta


def resolve_base(meta: dict, given: str | None, nat_dir: Path) -> str:
    """The base to load: NATDIR's (recorded path if it still exists); a --base-model must be the same model."""
    from negkd import nat, recipe

    if given is None:
        path = meta.get("base_model_path")
        if path and Path(path).is_absolute() and not Path(path).exists() and not Path(meta["base_model"]).is_dir():
            raise UserError(f"--nat {nat_dir}: its base model {path} no longer exists; pass --base-model with the "
                            "model's new location")
        return nat.resolve_base(meta)
    recorded = {k: meta.get(k) for k in ("base_model", "base_model_path", "base_config_sha256")}
    if given == meta.get("base_model") or recipe.same_base(recipe.base_identity(given), recorded):
        return given
    raise UserError(f"--base-model {given}: the NAT checkpoint {nat_dir} was trained on {meta.get('base_model')} "
                    f"({meta.get('base_model_path')}); NCE distils into a LoRA on the same base. Drop --base-model "
                    "to use the recorded one")


def gold_rows(rows: list[dict]) -> list[dict]:
    """One extra example per problem whose record carries a gold ``solution`` (``k = None``)."""
    from negkd.schemas import problem_fields

    out, seen = [], set()
    for r in rows:
        sol = r.get("solution")
        if r["id"] in seen or not isinstance(sol, str) or not sol.strip():
            continue
        seen.add(r["id"])
        out.append({**problem_fields(r), "k": None, "rationale": sol})
    return out


# ---------------------------------------------------------------------------- the command


TemplateOpt = Annotated[Optional[str], typer.Option(
    help="Prompt template: a built-in name (default, plain), a text file, or a string with {question}. "
         "Default: the NAT checkpoint's template (the student must see the prompts the teacher saw).",
    rich_help_panel="Data")]
ChatTemplateOpt = Annotated[Optional[bool], typer.Option(
    "--chat-template/--no-chat-template",
    help="Wrap each prompt in the tokenizer's chat template as a user turn (instruct models). "
         "Default: as the NAT checkpoint was trained.", rich_help_panel="Data")]


def command(
    pos: Annotated[Path, typer.Argument(help="Positive rationales: the pos.jsonl of `negkd split` (graded samples; "
                                             "rows with correct=true are used) or its output directory.")],
    output: T.Output,
    nat_dir: Annotated[Path, typer.Option("--nat", help="The NAT checkpoint: the output directory of `negkd train-pos` "
                                                        "(the teacher; its base model, template and tokenizer are "
                                                        "used).", rich_help_panel="Model")],
    base_model: Annotated[Optional[str], typer.Option(
        "--base-model", help="Base model to load, only to point at a moved copy: must be the base the NAT checkpoint "
                             "was trained on (checked). Default: the one recorded in --nat.",
        rich_help_panel="Model")] = None,
    kd_weight: Annotated[float, typer.Option(
        help="lam in L = (1 - lam) CE + lam (c + beta) T^2 softCE(p_nat -> student); 0 = plain SFT on the "
             "positives, 1 = pure distillation.", rich_help_panel="NCE")] = 0.5,
    temperature: Annotated[float, typer.Option(
        help="Softmax temperature T of the teacher and student distributions (and of beta's KL); the KD term "
             "is scaled by T^2.", rich_help_panel="NCE")] = 1.0,
    beta_offset: Annotated[float, typer.Option(
        help="c in the per-sequence KD weight (c + beta), beta = tanh(mean-token KL(p_neg || p_nat)) in [0, 1).",
        rich_help_panel="NCE")] = 0.5,
    no_calibration: Annotated[bool, typer.Option(
        "--no-calibration", help="Ablation: beta = 0 for every sequence (plain KD from the NAT model, weight c); "
                                 "skips the Neg-LoRA-only teacher pass.", rich_help_panel="NCE")] = False,
    with_gold: Annotated[bool, typer.Option(
        "--with-gold", help="Add each problem's gold `solution` (when the records carry one) as an extra example "
                            "with the solution as completion: the problems of POS, and with a `negkd split` "
                            "directory also those of its neg.jsonl (problems the teacher never solved).",
        rich_help_panel="Data")] = False,
    template: TemplateOpt = None,
    chat_template: ChatTemplateOpt = None,
    loss_on_prompt: T.LossOnPrompt = False,
    max_length: T.MaxLength = T.MAX_LENGTH,
    lora_r: T.LoraR = T.LORA_R,
    lora_alpha: T.LoraAlpha = T.LORA_ALPHA,
    lora_dropout: T.LoraDropout = T.LORA_DROPOUT,
    target_modules: T.TargetModules = None,
    batch_size: T.BatchSize = T.BATCH_SIZE,
    max_batch_tokens: T.MaxBatchTokens = None,
    grad_accum: T.GradAccum = T.GRAD_ACCUM,
    epochs: T.Epochs = T.EPOCHS,
    max_steps: T.MaxSteps = None,
    lr: T.Lr = T.LR_LORA,
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
    load_in_4bit: T.LoadIn4bit = False,
    load_in_8bit: T.LoadIn8bit = False,
    gradient_checkpointing: T.GradientCheckpointing = False,
    trust_remote_code: T.TrustRemoteCode = False,
) -> None:
    """Distil the NAT model into a fresh, deployable LoRA (NCE): each positive rationale is learned
    from the gold tokens (CE) and from the NAT model's distributions (KD), the KD term weighted per
    sequence by c + beta, beta = tanh(mean-token KL(p_neg || p_nat)): how far the Neg-LoRA-only
    model is from the NAT model on that rationale. Only one copy of the base model is loaded.

    DIR becomes a stock PEFT adapter on the NAT checkpoint's base:
    peft.PeftModel.from_pretrained(base, DIR), merge_and_unload(), vLLM.
    Also in DIR: the tokenizer, negkd.json (base, template, data hashes),
    metrics.jsonl (loss, ce, kd, beta_mean/min/max per log step),
    calibration.jsonl (beta of each training example, by id and k),
    checkpoints/ and manifest.json (written last).
    Runs under `accelerate launch` unchanged.

    Example: negkd calibrate runs/split -o runs/nce --nat runs/nat
    """
    _run(**locals())


def _run(*, pos, output, nat_dir, base_model, kd_weight, temperature, beta_offset, no_calibration, with_gold,
         template, chat_template, loss_on_prompt, max_length, lora_r, lora_alpha, lora_dropout, target_modules,
         batch_size, max_batch_tokens, grad_accum, epochs, max_steps, lr, warmup, schedule, weight_decay, max_grad_norm, seed,
         save_every, log_every, resume, overwrite, device, dtype, load_in_4bit, load_in_8bit,
         gradient_checkpointing, trust_remote_code) -> dict | None:
    from negkd import recipe
    from negkd.console import warn
    from negkd.prompts import load_template

    # ---- cheap checks first: flags, the NAT checkpoint and the data, before any model loads
    if not 0.0 <= kd_weight <= 1.0:
        raise UsageError(f"--kd-weight {kd_weight}: must be in [0, 1]")
    if not temperature > 0:
        raise UsageError(f"--temperature {temperature}: must be > 0")
    if beta_offset < 0:
        raise UsageError(f"--beta-offset {beta_offset}: must be >= 0")
    cfg = T.train_config(batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, lr=lr,
                         warmup=warmup, schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                         seed=seed, save_every=save_every, log_every=log_every,
                         max_batch_tokens=max_batch_tokens)
    la = T.lora_args(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules)
    max_length = T.check_max_length(max_length)
    nat_dir = Path(nat_dir)
    meta_nat = read_nat(nat_dir)
    base = resolve_base(meta_nat, base_model, nat_dir)
    tmpl = load_template(template if template is not None else meta_nat.get("template"))
    chat = bool(meta_nat.get("chat_template", False)) if chat_template is None else chat_template
    pos_path, rows = recipe.load_rows(recipe.DataSource(pos, ("pos.jsonl",), True, "positives", "POS"))
    inputs = [pos_path, nat_dir]
    golds: list[dict] = []
    if with_gold:
        problems = rows
        neg_path = Path(pos) / "neg.jsonl"
        if Path(pos).is_dir() and neg_path.exists():  # a split dir: also the problems with no positive
            from negkd.schemas import read_graded

            problems = rows + read_graded(neg_path)
            inputs.append(neg_path)
        golds = gold_rows(problems)
        if not golds:
            warn(f"--with-gold: no problem record in {pos} carries a gold 'solution'; training on the rationales only")

    from negkd.training import make_accelerator, open_run

    acc = make_accelerator(device)
    main = acc.is_main_process
    nce_args = {"kd_weight": kd_weight, "temperature": temperature, "beta_offset": beta_offset,
                "calibration": not no_calibration, "with_gold": with_gold, "nat": str(nat_dir), "lora": la}
    mopts = recipe.ModelOpts(base_model=base, device=device, dtype=dtype, load_in_4bit=load_in_4bit,
                             load_in_8bit=load_in_8bit, gradient_checkpointing=gradient_checkpointing,
                             trust_remote_code=trust_remote_code)
    dopts = recipe.DataOpts(template=tmpl, chat_template=chat, loss_on_prompt=loss_on_prompt, max_length=max_length)
    args = recipe.run_args(mopts, dopts, cfg, nce_args)
    run = open_run(output, "calibrate", args, inputs, overwrite=overwrite, resume=resume, main=main)
    acc.wait_for_everyone()
    if run is None:
        return None
    try:  # _train starts the run (touches DIR) once the student is built and every check passed
        return _train(run, acc, meta_nat, nat_dir, base, mopts, dopts, cfg, la, rows, golds, pos_path,
                      nce_args, resume, output)
    except BaseException:
        if main:
            run.cleanup()
        raise


def _train(run, acc, meta_nat, nat_dir, base, mopts, dopts, cfg, la, rows, golds, pos_path, nce_args, resume,
           output) -> dict | None:
    from dataclasses import asdict

    from accelerate.utils import set_seed

    from negkd import __version__, lora, recipe
    from negkd.console import log
    from negkd.data import Collator, build_examples, lengths
    from negkd.io import atomic_write_text
    from negkd.modeling import load_model, load_tokenizer
    from negkd.training import check_resume, fit, latest_checkpoint, lm_weight, model_device

    main = acc.is_main_process
    out = Path(output)
    tok_src = nat_dir if (nat_dir / "tokenizer_config.json").exists() else base
    tok = load_tokenizer(str(tok_src), trust_remote_code=mopts.trust_remote_code)
    examples, stats = build_examples(rows + golds, tok, dopts.template, dopts.chat_template, dopts.max_length,
                                     dopts.loss_on_prompt)
    if not examples:
        raise UserError(f"no training examples left after tokenization ({stats.dropped_empty} empty rationales)")
    sources = ["gold" if e["k"] is None else "sample" for e in examples]
    if main:
        n_gold = sum(s == "gold" for s in sources)
        log(f"data: {stats.summary()}" + (f" (incl. {n_gold:,} gold solutions)" if golds else ""))

    set_seed(cfg.seed)  # identical student initialisation on every process
    model = load_model(base, device=model_device(acc, mopts.device), dtype=mopts.dtype,
                       load_in_4bit=mopts.load_in_4bit, load_in_8bit=mopts.load_in_8bit,
                       trust_remote_code=mopts.trust_remote_code, gradient_checkpointing=mopts.gradient_checkpointing)
    student = build_student(model, nat_dir, la, gradient_checkpointing=mopts.gradient_checkpointing)
    ident = recipe.base_identity(base)
    fingerprint = {"args": {k: v for k, v in run.args.items() if k not in ("epochs", "max_steps")},
                   "inputs": [i["sha256"] for i in run.inputs], "base": ident}
    check_resume(student, lengths(examples), config=cfg, out_dir=out, fingerprint=fingerprint, resume=resume,
                 world_size=acc.num_processes)
    if main:  # every check passed: only now touch DIR
        run.start()

    # per-example calibration records: append-only per process, merged at the end
    part = out / PART.format(rank=acc.process_index)
    if main and not resume and latest_checkpoint(out) is None:
        for f in out.glob(PART.format(rank="*")):
            f.unlink()  # stale records of an unrelated, never-checkpointed run
    acc.wait_for_everyone()
    objective = NCEObjective(student, kd_weight=nce_args["kd_weight"], temperature=nce_args["temperature"],
                             beta_offset=nce_args["beta_offset"], calibrate=nce_args["calibration"], record=part,
                             sources=sources)
    if resume and nce_args["calibration"]:  # betas of examples seen before the interruption
        objective.seed_cache(merge_records(out, out / CALIBRATION))

    meta = {"kind": "nce-lora", **ident, "template": dopts.template, "chat_template": dopts.chat_template,
            "loss_on_prompt": dopts.loss_on_prompt, "max_length": dopts.max_length,
            "data": [{"path": str(p), "sha256": i["sha256"]} for p, i in zip(run.input_paths, run.inputs)],
            "data_stats": stats.as_dict(), "lora": la,
            "nce": {k: nce_args[k] for k in ("kd_weight", "temperature", "beta_offset", "calibration", "with_gold")},
            "teacher": {"nat_dir": str(nat_dir.resolve()), "kind": meta_nat.get("kind", "nat"),
                        "nat": meta_nat.get("nat")},
            "negkd_version": __version__}

    def save_ckpt(m, d: Path) -> None:  # each checkpoint is a usable adapter too
        lora.save_adapter(m, d)
        (Path(d) / recipe.META_NAME).write_text(json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                                                encoding="utf-8")

    res = fit(student, examples, config=cfg, out_dir=out, collate_fn=Collator(tok.pad_token_id),
              lengths=lengths(examples), loss_fn=objective, weight_fn=lm_weight, save_fn=save_ckpt,
              metrics_fn=objective.metrics, fingerprint=fingerprint, resume=resume, accelerator=acc,
              desc="calibrate")
    acc.wait_for_everyone()
    if not main:
        return None

    scratch = out / f".final.tmp-{os.getpid()}"
    if scratch.exists():
        shutil.rmtree(scratch)
    meta["train"] = {"steps": res.step, "total_steps": res.total_steps, "world_size": acc.num_processes,
                     "final_loss": res.history[-1]["loss"] if res.history else None, **asdict(cfg)}
    lora.save_adapter(res.model, scratch)
    tok.save_pretrained(str(scratch))
    atomic_write_text(scratch / recipe.META_NAME, json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    for f in sorted(scratch.iterdir()):
        os.replace(f, run.tmp(f.name))
        run.record_output(f.name)
    scratch.rmdir()
    extra: dict[str, Any] = {}
    if nce_args["calibration"]:  # this process's micro-batches: Neg-LoRA pass run, or beta reused
        extra["neg_passes"] = {"run": objective.neg_passes, "beta_reused": objective.cached_batches}
        recs = merge_records(out, out / CALIBRATION if resume else None)
        run.write_jsonl(CALIBRATION, recs)
        if recs:
            bs = sorted(r["beta"] for r in recs)
            extra["beta"] = {"examples": len(recs), "mean": round(sum(bs) / len(bs), 6), "min": bs[0],
                             "median": bs[len(bs) // 2], "max": bs[-1]}
    run.record_output("metrics.jsonl")
    manifest = run.finish(steps=res.step, world_size=acc.num_processes, data_stats=stats.as_dict(),
                          resumed_from=res.resumed_from, tokens_per_s=round(res.tokens_per_s, 1),
                          padding_share=round(res.padding_share, 4), **extra)
    for f in out.glob(PART.format(rank="*")):
        f.unlink()
    last = res.history[-1] if res.history else {}
    b = extra.get("beta")
    log(f"calibrate: {res.step} steps, final loss {last.get('loss', float('nan')):.4f} "
        f"(ce {last.get('ce', float('nan')):.4f}, kd {last.get('kd', float('nan')):.4f})"
        + (f", beta over {b['examples']:,} examples: mean {b['mean']:.3f} [{b['min']:.3f}, {b['max']:.3f}]" if b else "")
        + f" -> {out}")
    return manifest
