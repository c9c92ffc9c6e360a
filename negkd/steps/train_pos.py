"""``negkd train-pos``: NAT step 1.2 — Pos-LoRA through the integration unit, beside the frozen
Neg-LoRA (or the CoT-KD / MIX baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from negkd import train_options as T


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
    base_model: T.OptBaseModel = None,
    gate_dim: Annotated[int, typer.Option(help="Integration unit width d_g (W_Q, W_K, W_1: -> d_g; W_2: d_g ->).",
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
        help="Modules to adapt for --no-neg/--mix (default q_proj,v_proj; all-linear allowed). With --neg, NAT wraps "
             "exactly the Neg-LoRA's modules and this must be left out or equal them.", rich_help_panel="LoRA")] = None,
    batch_size: T.BatchSize = T.BATCH_SIZE,
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
    manifest.json): load it with negkd.nat.load(DIR). --no-neg (CoT-KD) and --mix NEG (MIX)
    train stock PEFT adapters instead.

    Example: negkd train-pos runs/split -o runs/nat --neg runs/neg
    """
    from negkd import recipe
    from negkd.errors import UsageError, UserError

    chosen = [x for x, on in (("--neg", neg is not None), ("--no-neg", no_neg), ("--mix", mix is not None)) if on]
    if len(chosen) != 1:
        raise UserError("pass exactly one of --neg NEGDIR (NAT), --no-neg (CoT-KD baseline) or --mix NEG "
                        f"(MIX baseline){'; got ' + ' and '.join(chosen) if chosen else ''}")
    cfg = T.train_config(batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, lr=lr,
                         warmup=warmup, schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                         seed=seed, save_every=save_every, log_every=log_every)
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
        if mix is not None:
            sources.append(recipe.DataSource(mix, ("neg.jsonl",), False, "negatives", "--mix"))
            kind = "mix-lora"
        recipe.train(lora_recipe("train-pos", kind, la, gradient_checkpointing), sources, output, mopts(base_model),
                     dopts, cfg, run_extra={"mode": kind, "lora": la}, resume=resume, overwrite=overwrite)
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


def _neg_hash(neg: Path) -> str:
    from negkd.io import sha256_file

    return sha256_file(Path(neg) / "adapter_model.safetensors")


def _check_neg(neg: Path, base_model: str | None, target_modules: str | None) -> str:
    """Validate NEGDIR; return the base model to use (NEGDIR's unless overridden by an equal one)."""
    from negkd import nat, recipe
    from negkd.errors import UsageError, UserError

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

    def gate_ctx(model, batch):
        return nat.gate_mask(model, batch.get("attention_mask"))

    r = recipe.Recipe(command="train-pos", kind="nat", attach=attach, save_final=save, save_ckpt=save,
                      loss_fn=recipe.make_lm_loss(gate_ctx), metrics_fn=nat.gate_means, after_fit=after_fit,
                      meta={"neg": str(neg), "gate_dim": gate_dim, "gate_beta": gate_beta,
                            "pos_lora": {k: la[k] for k in ("r", "alpha", "dropout")}})
    return r
