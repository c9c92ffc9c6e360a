"""``negkd train-pos``: NAT step 1.2 — Pos-LoRA through the integration unit, beside the frozen
Neg-LoRA (or the CoT-KD / MIX baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from negkd import train_options as T


NEG_WEIGHT = 0.05  # method.md §6: NLL_pos - 0.05 NLL_neg (NT), unlikelihood weight 0.05 (UL)


def _check_neg_weight(value: float | None) -> float | None:
    """--neg-weight: finite and >= 0, else a usage error (exit 2)."""
    import math

    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"{value}: must be a finite number >= 0 (default {NEG_WEIGHT})")
    return value


def command(
    pos: Annotated[Path, typer.Argument(help="Positive rationales: the pos.jsonl of `negkd split` (rows with "
                                             "correct=true are used) or its output directory.")],
    output: T.Output,
    neg: Annotated[Optional[Path], typer.Option(
        "--neg", help="The Neg-LoRA directory written by `negkd train-neg` (frozen inside every NAT layer).",
        rich_help_panel="NAT")] = None,
    no_neg: Annotated[bool, typer.Option(
        "--no-neg", help="Baseline CoT-KD: train a plain LoRA on the positives (a stock PEFT adapter; no --neg).",
        rich_help_panel="NAT")] = False,
    mix: Annotated[Optional[Path], typer.Option(
        "--mix", help="Baseline MIX: train one plain LoRA on the positives plus these negatives (neg.jsonl or a "
                      "`negkd split` directory) as if all were correct.", rich_help_panel="NAT")] = None,
    nt: Annotated[Optional[Path], typer.Option(
        "--nt", help="Baseline NT (negative training): a plain LoRA on the positives plus these negatives (neg.jsonl "
                     "or a `negkd split` directory) with L = NLL(pos) - w * NLL(neg). The negative term is kept "
                     "finite by clamping each token's NLL at ln V (V = vocabulary size, the NLL of a uniform guess): "
                     "a token already less likely than 1/V stops pushing, so L >= -w ln V.",
        rich_help_panel="NAT")] = None,
    ul: Annotated[Optional[Path], typer.Option(
        "--ul", help="Baseline UL (unlikelihood): like --nt but L = NLL(pos) + w * mean_t -log(1 - p(y_t)) over the "
                     "negatives' completion tokens (float32, stable as p -> 1).", rich_help_panel="NAT")] = None,
    neg_weight: Annotated[Optional[float], typer.Option(
        "--neg-weight", help="w of --nt/--ul (default 0.05, the paper's; finite, >= 0). Batches are mixed: positives "
                             "and negatives are shuffled together (an epoch is one pass over both), and in every "
                             "optimizer step NLL(pos) is the mean over that step's positive completion tokens and "
                             "the negative term the mean over its negative ones (across gradient accumulation and "
                             "processes). metrics.jsonl logs both terms as loss_pos / loss_neg.",
        callback=_check_neg_weight, rich_help_panel="NAT")] = None,
    base_model: T.OptBaseModel = None,
    gate_dim: Annotated[int, typer.Option(help="Integration unit width d_g (W_Q, W_K, W_1: -> d_g; W_2: d_g ->). "
                                               "The unit has about 4 x d_g x hidden parameters per layer, 2 d_g / r "
                                               "times the Pos-LoRA's; negkd warns (and keeps your value) when d_g > "
                                               "hidden size / 4. The counts per component are logged at start and "
                                               "recorded in negkd.json and manifest.json (trainable_params).",
                                          rich_help_panel="NAT")] = 128,
    gate_beta: Annotated[float, typer.Option(help="Bound beta of the gate: g_neg in [-beta, beta], "
                                                  "g_pos = 1 - g_neg.", rich_help_panel="NAT")] = 0.5,
    template: T.Template = None,
    chat_template: T.ChatTemplate = False,
    loss_on_prompt: T.LossOnPrompt = False,
    max_length: T.MaxLength = T.MAX_LENGTH,
    lora_r: T.LoraR = T.LORA_R,
    lora_alpha: T.LoraAlpha = T.LORA_ALPHA,
    lora_dropout: T.LoraDropout = T.LORA_DROPOUT,
    target_modules: Annotated[Optional[str], typer.Option(
        help="Modules to adapt for --no-neg/--mix/--nt/--ul (default q_proj,v_proj; all-linear allowed). With --neg, NAT "
             "wraps exactly the Neg-LoRA's modules and this must be left out or equal them.",
        rich_help_panel="LoRA")] = None,
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
    """Train the Pos-LoRA through the integration unit (NAT step 1.2, method.md §3): every linear
    the Neg-LoRA adapted gets the frozen Neg-LoRA, a trainable Pos-LoRA and the gate
    g_neg in [-beta, beta] that adds or subtracts negative knowledge token by token. Only
    A_pos, B_pos, W_Q, W_K, W_1, W_2 train; B_pos and W_2 start at zero (a fresh unit is a no-op).
    The mean g_neg per layer is logged to metrics.jsonl.

    DIR becomes a NAT checkpoint (nat_config.json, nat_model.safetensors, tokenizer, negkd.json,
    manifest.json): load it with negkd.nat.load(DIR). The baselines of method.md §6 train stock
    PEFT adapters instead: --no-neg (CoT-KD), --mix NEG (MIX), --nt NEG (NT) and --ul NEG (UL,
    both weighted by --neg-weight). Exactly one of --neg/--no-neg/--mix/--nt/--ul.

    Example: negkd train-pos runs/split -o runs/nat --neg runs/neg
    """
    from negkd import recipe
    from negkd.errors import UsageError, UserError

    chosen = [x for x, on in (("--neg", neg is not None), ("--no-neg", no_neg), ("--mix", mix is not None),
                              ("--nt", nt is not None), ("--ul", ul is not None)) if on]
    if len(chosen) != 1:
        raise typer.BadParameter(
            "pass exactly one of --neg NEGDIR (NAT), --no-neg (CoT-KD baseline), --mix NEG (MIX), --nt NEG (NT) or "
            f"--ul NEG (UL){'; got ' + ' and '.join(chosen) if chosen else ''}", param_hint="mode")
    if neg_weight is not None and nt is None and ul is None:
        raise typer.BadParameter(f"applies to --nt/--ul only, not {chosen[0]}", param_hint="'--neg-weight'")
    cfg = T.train_config(batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, lr=lr,
                         warmup=warmup, schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                         seed=seed, save_every=save_every, log_every=log_every,
                         max_batch_tokens=max_batch_tokens)
    la = T.lora_args(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules)
    dopts = recipe.DataOpts(template=template, chat_template=chat_template, loss_on_prompt=loss_on_prompt,
                            max_length=T.check_max_length(max_length))
    pos_src = recipe.DataSource(pos, ("pos.jsonl",), True, "positives", "POS")

    def mopts(base: str):
        return recipe.ModelOpts(base_model=base, device=device, dtype=dtype, load_in_4bit=load_in_4bit,
                                load_in_8bit=load_in_8bit, gradient_checkpointing=gradient_checkpointing,
                                trust_remote_code=trust_remote_code)

    if neg is None:
        from negkd.steps.train_neg import lora_recipe

        if base_model is None:
            raise UserError(f"{chosen[0]} needs --base-model (a local model directory or hub id)")
        sources = [pos_src]
        kind = "pos-lora"
        extra: dict = {}
        for flag, path, k in (("--mix", mix, "mix-lora"), ("--nt", nt, "nt-lora"), ("--ul", ul, "ul-lora")):
            if path is not None:
                sources.append(recipe.DataSource(path, ("neg.jsonl",), False, "negatives", flag))
                kind = k
        r = lora_recipe("train-pos", kind, la, gradient_checkpointing)
        if kind in ("nt-lora", "ul-lora"):
            w = NEG_WEIGHT if neg_weight is None else neg_weight
            extra = {"neg_loss": kind[:2], "neg_weight": w, **({"nt_cap": "ln V"} if kind == "nt-lora" else {})}
            r.loss_fn, r.weight_fn = neg_loss(kind[:2], w), neg_weight_fn
            r.meta.update(extra)
        recipe.train(r, sources, output, mopts(base_model), dopts, cfg, run_extra={"mode": kind, "lora": la, **extra},
                     resume=resume, overwrite=overwrite)
        return

    if gate_dim < 1:
        raise UsageError(f"--gate-dim {gate_dim}: must be >= 1")
    if not 0 < gate_beta <= 1:
        raise UsageError(f"--gate-beta {gate_beta}: must be in (0, 1]")
    base = _check_neg(neg, base_model, target_modules)
    r = nat_recipe(neg, la, gate_dim, gate_beta)
    recipe.train(r, [pos_src], output, mopts(base), dopts, cfg,
                 run_extra={"mode": "nat", "neg": str(neg), "neg_sha256": _neg_hash(neg),
                            "pos_lora": {k: la[k] for k in ("r", "alpha", "dropout")},
                            "gate_dim": gate_dim, "gate_beta": gate_beta},
                 resume=resume, overwrite=overwrite)


def _split_labels(batch):
    """(pos_labels, neg_labels) ``(B, L)``: the batch's labels with the other role's rows masked to -100."""
    import torch

    from negkd.losses import IGNORE_INDEX

    labels = batch["labels"]  # (B, L)
    neg = torch.as_tensor(batch["neg"], dtype=torch.bool, device=labels.device).unsqueeze(1)  # (B, 1)
    return labels.masked_fill(neg, IGNORE_INDEX), labels.masked_fill(~neg, IGNORE_INDEX)


def neg_loss(which: str, weight: float):
    """fit()'s loss for NT ("nt") / UL ("ul") on mixed batches: two components ``(2,)``, the positives'
    mean NLL and the signed, weighted negative term, each a mean over its own completion tokens
    (``neg_weight_fn`` gives their token counts, so fit() averages each over the whole step)."""
    import torch

    from negkd import losses

    def loss(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        pos_labels, neg_labels = _split_labels(batch)
        pos = losses.masked_nll(out.logits, pos_labels)
        if which == "nt":
            neg = -weight * losses.negative_nll(out.logits, neg_labels)
        else:
            neg = weight * losses.unlikelihood(out.logits, neg_labels)
        return torch.stack([pos, neg]), {}

    loss.parts = ("loss_pos", "loss_neg")
    return loss


def neg_weight_fn(batch):
    """(positive completion tokens, negative completion tokens) of a micro-batch ``(2,)``."""
    import torch

    from negkd.losses import n_targets

    pos_labels, neg_labels = _split_labels(batch)
    return torch.stack([n_targets(pos_labels), n_targets(neg_labels)])


def completion_mask(batch):
    """``(B, L)`` bool: the completion tokens (rationale + EOS) of a right-padded batch -- the label mask,
    without the prompt even under --loss-on-prompt. What NAT's gate statistics average over."""
    import torch

    from negkd.losses import IGNORE_INDEX

    labels = batch["labels"]  # (B, L)
    mask = labels != IGNORE_INDEX
    if "n_prompt" in batch:
        pos = torch.arange(labels.size(1), device=labels.device).unsqueeze(0)  # (1, L)
        mask &= pos >= torch.as_tensor(batch["n_prompt"], device=labels.device).unsqueeze(1)
    return mask


def nat_param_counts(model) -> dict:
    """Trainable parameters of the NAT unit per component: Pos-LoRA, gate W_Q/W_K, values W_1/W_2."""
    from negkd import nat

    groups = {"pos_lora": nat.POS_PARAMS, "gate_qk": ("lora_gate_q", "lora_gate_k"),
              "gate_w1w2": ("lora_gate_w1", "lora_gate_w2")}
    out = {k: 0 for k in groups}
    for m in nat.nat_layers(model).values():
        for k, attrs in groups.items():
            out[k] += sum(getattr(m, a).weight.numel() for a in attrs)
    out["total"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def check_gate_dim(model, gate_dim: int, counts: dict) -> str | None:
    """A warning when d_g is not much smaller than the hidden size (> hidden / 4), else None."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not hidden or 4 * gate_dim <= hidden:
        return None
    unit = counts["gate_qk"] + counts["gate_w1w2"]
    ratio = unit / max(1, counts["pos_lora"])
    return (f"--gate-dim {gate_dim} is not much smaller than the model's hidden size {hidden}: the integration unit "
            f"has {unit:,} trainable parameters, {ratio:.0f}x the Pos-LoRA's {counts['pos_lora']:,}; consider "
            f"--gate-dim {max(1, hidden // 8)}")


def _neg_hash(neg: Path) -> str:
    from negkd.io import sha256_file

    return sha256_file(Path(neg) / "adapter_model.safetensors")


def _check_neg(neg: Path, base_model: str | None, target_modules: str | None) -> str:
    """Validate NEGDIR; return the base model to use (NEGDIR's unless overridden by an equal one)."""
    from negkd import nat, recipe
    from negkd.errors import UserError

    meta = recipe.read_meta(neg)  # before the adapter files: a NAT/NCE directory gets the kind-specific message
    if meta.get("kind") not in (None, "neg-lora"):
        raise UserError(f"--neg {neg}: is a {meta.get('kind')} adapter, not a Neg-LoRA; train one with "
                        "`negkd train-neg NEG -o DIR --base-model M`")
    acfg, mods = nat.read_neg_adapter(neg)
    recorded = meta or {"base_model": acfg.get("base_model_name_or_path"),
                        "base_model_path": acfg.get("base_model_name_or_path")}
    if base_model is None:
        base = nat.resolve_base(recorded)
        if not base:
            raise UserError(f"--neg {neg}: does not record its base model; pass --base-model")
        if Path(base).is_absolute() and not Path(base).exists():
            raise UserError(f"--neg {neg}: its base model {base} no longer exists (a moved run directory?); pass "
                            "--base-model with the model's new location")
    else:
        base = base_model
        if recorded.get("base_model") and not recipe.same_base(recipe.base_identity(base_model), recorded):
            raise UserError(f"--base-model {base_model} differs from the base the Neg-LoRA in {neg} was trained on "
                            f"({recorded.get('base_model')}); drop --base-model or retrain it with `negkd train-neg`")
    if target_modules is not None:
        want = T.parse_targets(target_modules)
        have = sorted({m.rsplit('.', 1)[-1] for m in mods})
        if want == "all-linear" or sorted(want) != have:
            raise UserError(f"--target-modules {target_modules}: NAT wraps the Neg-LoRA's modules ({','.join(have)}); "
                            "leave --target-modules out (it applies to --no-neg/--mix)")
    return base


def nat_recipe(neg: Path, la: dict, gate_dim: int, gate_beta: float):
    from negkd import nat, recipe

    holder: dict = {}

    def attach(model):
        cfg = nat.attach_new(model, neg, pos_r=la["r"], pos_alpha=la["alpha"], dropout=la["dropout"],
                             gate_dim=gate_dim, beta=gate_beta)
        holder["cfg"] = cfg
        holder["neg_before"] = nat.neg_state(model)
        nat.track_gates(model, True)
        msg = check_gate_dim(model, gate_dim, nat_param_counts(model))
        if msg:
            from negkd.console import warn

            warn(msg)
        return model

    def after_fit(model):
        after = nat.neg_state(model)
        before = holder["neg_before"]
        changed = [k for k in before if not bool((before[k] == after[k]).all())]
        if changed:  # a bug, not a user error: the spec requires the neg branch to stay frozen
            raise RuntimeError(f"the frozen Neg-LoRA changed during train-pos: {changed[:3]}")
        nat.track_gates(model, False)

    def save(model, d: Path, meta: dict):
        nat.save(model, d, holder["cfg"], meta=meta)

    def gate_ctx(model, batch):  # g_neg averaged over completion tokens only, not the prompt or padding
        return nat.gate_mask(model, completion_mask(batch))

    r = recipe.Recipe(command="train-pos", kind="nat", attach=attach, save_final=save, save_ckpt=save,
                      loss_fn=recipe.make_lm_loss(gate_ctx), metrics_fn=nat.gate_means, after_fit=after_fit,
                      param_counts=nat_param_counts,
                      meta={"neg": str(neg), "gate_dim": gate_dim, "gate_beta": gate_beta,
                            "pos_lora": {k: la[k] for k in ("r", "alpha", "dropout")}})
    return r
