"""``negkd train-neg``: NAT step 1.1 — a standard PEFT LoRA on the teacher's wrong rationales."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from negkd import train_options as T


def command(
    neg: Annotated[Path, typer.Argument(help="Negative rationales: the neg.jsonl of `negkd split` (graded samples; rows "
                                             "with correct=false are used) or its output directory.")],
    output: T.Output,
    base_model: T.BaseModel,
    template: T.Template = None,
    chat_template: T.ChatTemplate = False,
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
    """Train the Neg-LoRA (NAT step 1.1): an ordinary LoRA on the teacher's *incorrect* rationales
    with the masked NLL loss (prompt = template(question), completion = rationale + EOS).

    DIR becomes a stock PEFT adapter (adapter_config.json, adapter_model.safetensors; loads with
    peft.PeftModel.from_pretrained) plus the tokenizer, negkd.json (base model, template, data
    hashes), metrics.jsonl, checkpoints/ and manifest.json. Runs under `accelerate launch` unchanged.

    Example: negkd train-neg runs/split -o runs/neg --base-model Qwen/Qwen2.5-0.5B
    """
    from negkd import recipe

    cfg = T.train_config(batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, lr=lr,
                         warmup=warmup, schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                         seed=seed, save_every=save_every, log_every=log_every,
                         max_batch_tokens=max_batch_tokens)
    la = T.lora_args(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules)
    mopts = recipe.ModelOpts(base_model=base_model, device=device, dtype=dtype, load_in_4bit=load_in_4bit,
                             load_in_8bit=load_in_8bit, gradient_checkpointing=gradient_checkpointing,
                             trust_remote_code=trust_remote_code)
    dopts = recipe.DataOpts(template=template, chat_template=chat_template, loss_on_prompt=loss_on_prompt,
                            max_length=T.check_max_length(max_length))
    recipe.train(lora_recipe("train-neg", "neg-lora", la, gradient_checkpointing),
                 [recipe.DataSource(neg, ("neg.jsonl",), False, "negatives", "NEG")],
                 output, mopts, dopts, cfg, run_extra={"lora": la}, resume=resume, overwrite=overwrite)


def lora_recipe(command: str, kind: str, la: dict, gradient_checkpointing: bool = False):
    """A Recipe that trains a fresh standard PEFT LoRA and saves a stock adapter."""
    from negkd import lora, recipe

    def attach(model):
        return lora.attach_lora(model, la["r"], la["alpha"], la["dropout"], la["target_modules"],
                                gradient_checkpointing=gradient_checkpointing)

    def save(model, d: Path, meta: dict) -> None:
        lora.save_adapter(model, d)

    return recipe.Recipe(command=command, kind=kind, attach=attach, save_final=save, save_ckpt=save,
                         meta={"lora": la})
