"""Typer option aliases shared by every training command (train-neg, train-pos, calibrate,
train-ranker), so they declare identical flags with identical help and defaults.

Use::

    from negkd import train_options as T

    def command(..., lr: T.Lr = 3e-4, batch_size: T.BatchSize = T.BATCH_SIZE, ...):
        cfg = T.train_config(batch_size=batch_size, ...)

Each alias is ``Annotated[type, typer.Option(...)]``; the default lives in the command's
signature (a constant from this module, so commands cannot drift). ``train_config``
turns the flags into a ``negkd.training.TrainConfig`` and validates them (exit 1 with the
flag's name on a bad value). ``lora_args`` does the same for the LoRA flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from negkd.errors import UsageError

# ---------------------------------------------------------------- defaults (one place)
DEVICE = "auto"
DTYPE = "auto"
BATCH_SIZE = 4
GRAD_ACCUM = 4
EPOCHS = 1.0
LR_LORA = 3e-4
WARMUP = 0.03
SCHEDULE = "cosine"
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0
SEED = 0
MAX_LENGTH = 1024
SAVE_EVERY = 200
LOG_EVERY = 10
LORA_R = 8
LORA_ALPHA = 16.0
LORA_DROPOUT = 0.05
DEFAULT_TARGETS = "q_proj,v_proj"
SCHEDULES = ("cosine", "linear", "constant")

_MODEL = "Model"
_DATA = "Data"
_OPT = "Optimisation"
_RUN = "Run"
_LORA = "LoRA"

# ---------------------------------------------------------------- run / output
Output = Annotated[Path, typer.Option("-o", "--output", help="Output directory (created; manifest.json is written last).",
                                      rich_help_panel=_RUN)]
Overwrite = Annotated[bool, typer.Option(help="Redo the run even if DIR holds a finished or unfinished one "
                                              "(deletes its checkpoints).", rich_help_panel=_RUN)]
Resume = Annotated[bool, typer.Option(help="Continue an interrupted run from the last checkpoint in DIR "
                                           "(optimizer, scheduler, RNG and data position restored). Refuses if "
                                           "the data or any training setting changed, except --max-steps/--epochs, "
                                           "which may be raised to extend a finished run.", rich_help_panel=_RUN)]
SaveEvery = Annotated[int, typer.Option(help="Save a resumable checkpoint every N optimizer steps (0: only at the end). "
                                             "Only the latest checkpoint is kept.", rich_help_panel=_RUN)]
LogEvery = Annotated[int, typer.Option(help="Write a metrics.jsonl record (loss, lr, tokens/s, ...) every N optimizer "
                                            "steps.", rich_help_panel=_RUN)]
Seed = Annotated[int, typer.Option(help="Seed for adapter initialisation, data order and dropout.",
                                   rich_help_panel=_RUN)]

# ---------------------------------------------------------------- model loading
BaseModel = Annotated[str, typer.Option("--base-model", help="Base causal LM: a local Hugging Face model directory or a "
                                                              "hub id (LLaMA, Qwen2, Mistral, GPT-NeoX, ...).",
                                        rich_help_panel=_MODEL)]
OptBaseModel = Annotated[Optional[str], typer.Option("--base-model", help="Base causal LM (local directory or hub id). "
                                                                          "Default: the base the --neg adapter was trained on.",
                                                     rich_help_panel=_MODEL)]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. auto = CUDA if available, else CPU; under "
                                          "`accelerate launch` each process uses its own device.",
                                     rich_help_panel=_MODEL)]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16 for the base weights. auto = bfloat16 on "
                                         "CUDA that supports it, else float32. Adapter weights train in float32.",
                                    rich_help_panel=_MODEL)]
LoadIn4bit = Annotated[bool, typer.Option("--load-in-4bit", help="Quantize the base to 4-bit NF4 with bitsandbytes "
                                                                 "(QLoRA). Works on CPU and CUDA.",
                                          rich_help_panel=_MODEL)]
LoadIn8bit = Annotated[bool, typer.Option("--load-in-8bit", help="Quantize the base to 8-bit with bitsandbytes.",
                                          rich_help_panel=_MODEL)]
GradientCheckpointing = Annotated[bool, typer.Option(help="Recompute activations in the backward pass: less memory, "
                                                          "~30% slower.", rich_help_panel=_MODEL)]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow model code shipped with the checkpoint to run "
                                                    "(only for models you trust).", rich_help_panel=_MODEL)]

# ---------------------------------------------------------------- data / sequence format
Template = Annotated[Optional[str], typer.Option(help="Prompt template: a built-in name (default, plain), a text file, "
                                                      "or a string with {question}. Default: "
                                                      "'Problem:\\n{question}\\nSolution:\\n'.",
                                                 rich_help_panel=_DATA)]
ChatTemplate = Annotated[bool, typer.Option(help="Wrap each prompt in the tokenizer's chat template as a user turn "
                                                 "(instruct models); the rationale is the assistant turn.",
                                            rich_help_panel=_DATA)]
LossOnPrompt = Annotated[bool, typer.Option(help="Also train on the prompt tokens (as the paper's reference code did). "
                                                 "Default: loss on the completion (rationale + EOS) only.",
                                            rich_help_panel=_DATA)]
MaxLength = Annotated[int, typer.Option(help="Maximum tokens per sequence. Longer rows are truncated (prompt from the "
                                             "left, completion from the right; the completion keeps at least half the "
                                             "window) and counted in the log and manifest.",
                                        rich_help_panel=_DATA)]

# ---------------------------------------------------------------- optimisation
BatchSize = Annotated[int, typer.Option(help="Sequences per micro-batch per process (batches are grouped by length "
                                             "and padded dynamically).", rich_help_panel=_OPT)]
GradAccum = Annotated[int, typer.Option(help="Micro-batches accumulated per optimizer step. Effective batch = "
                                             "batch-size x grad-accum x processes.", rich_help_panel=_OPT)]
MaxBatchTokens = Annotated[Optional[int], typer.Option(
    help="Token budget per forward pass: each optimizer step still covers the same batch-size x grad-accum "
         "sequences, but they run as length-sorted micro-batches of at most N padded tokens (rows x longest row), "
         "gradients averaged over tokens as without it, so peak memory is bounded by N whatever the data. A sequence "
         "longer than N runs alone. Default: no budget (batch-size sequences per pass).", rich_help_panel=_OPT)]
Epochs = Annotated[float, typer.Option(help="Passes over the data (fractions allowed). Ignored when --max-steps is set.",
                                       rich_help_panel=_OPT)]
MaxSteps = Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps (overrides --epochs; the data "
                                                      "repeats if needed). The LR schedule spans N steps.",
                                                 rich_help_panel=_OPT)]
Lr = Annotated[float, typer.Option(help="Peak learning rate (AdamW).", rich_help_panel=_OPT)]
Warmup = Annotated[float, typer.Option(help="Linear warmup: a fraction of the total steps if < 1, else a number of steps.",
                                       rich_help_panel=_OPT)]
Schedule = Annotated[str, typer.Option(help="LR decay after warmup: cosine (to 0), linear (to 0) or constant.",
                                       rich_help_panel=_OPT)]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.", rich_help_panel=_OPT)]
MaxGradNorm = Annotated[float, typer.Option(help="Clip the gradient norm to this value (0: no clipping).",
                                            rich_help_panel=_OPT)]

# ---------------------------------------------------------------- LoRA
LoraR = Annotated[int, typer.Option(help="LoRA rank r.", rich_help_panel=_LORA)]
LoraAlpha = Annotated[float, typer.Option(help="LoRA alpha; the update is scaled by alpha / r.", rich_help_panel=_LORA)]
LoraDropout = Annotated[float, typer.Option(help="Dropout on the LoRA input.", rich_help_panel=_LORA)]
TargetModules = Annotated[Optional[str], typer.Option(
    help="Comma-separated module names (suffixes) to adapt, e.g. q_proj,v_proj, or all-linear (every linear layer but "
         "the output head). Default: q_proj,v_proj.", rich_help_panel=_LORA)]


# ---------------------------------------------------------------- converters
def train_config(*, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None, lr: float,
                 warmup: float, schedule: str, weight_decay: float, max_grad_norm: float, seed: int,
                 save_every: int, log_every: int, max_batch_tokens: int | None = None):
    """Validate the optimisation flags and return a ``negkd.training.TrainConfig``."""
    from negkd.training import TrainConfig

    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    if grad_accum < 1:
        raise UsageError(f"--grad-accum {grad_accum}: must be >= 1")
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max-steps {max_steps}: must be >= 1")
    if max_steps is None and not epochs > 0:
        raise UsageError(f"--epochs {epochs}: must be > 0")
    if not lr > 0:
        raise UsageError(f"--lr {lr}: must be > 0")
    if warmup < 0:
        raise UsageError(f"--warmup {warmup}: must be >= 0 (a fraction < 1 or a number of steps)")
    if schedule not in SCHEDULES:
        raise UsageError(f"--schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if weight_decay < 0:
        raise UsageError(f"--weight-decay {weight_decay}: must be >= 0")
    if max_grad_norm < 0:
        raise UsageError(f"--max-grad-norm {max_grad_norm}: must be >= 0 (0 disables clipping)")
    if save_every < 0:
        raise UsageError(f"--save-every {save_every}: must be >= 0 (0: only at the end)")
    if log_every < 1:
        raise UsageError(f"--log-every {log_every}: must be >= 1")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise UsageError(f"--max-batch-tokens {max_batch_tokens}: must be >= 1 (padded tokens per micro-batch)")
    return TrainConfig(batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, lr=lr,
                       warmup=warmup, schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                       seed=seed, save_every=save_every, log_every=log_every, max_batch_tokens=max_batch_tokens)


def parse_targets(spec: str | None, default: str = DEFAULT_TARGETS) -> list[str] | str:
    """``'q_proj, v_proj'`` -> ``['q_proj', 'v_proj']``; ``'all-linear'`` stays a string (PEFT's keyword)."""
    spec = default if spec is None else spec
    if spec.strip() == "all-linear":
        return "all-linear"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UsageError(f"--target-modules {spec!r}: expected comma-separated module names or all-linear")
    return names


def lora_args(*, lora_r: int, lora_alpha: float, lora_dropout: float, target_modules: str | None) -> dict:
    if lora_r < 1:
        raise UsageError(f"--lora-r {lora_r}: must be >= 1")
    if not lora_alpha > 0:
        raise UsageError(f"--lora-alpha {lora_alpha}: must be > 0")
    if not 0 <= lora_dropout < 1:
        raise UsageError(f"--lora-dropout {lora_dropout}: must be in [0, 1)")
    return dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=parse_targets(target_modules))


def check_max_length(max_length: int) -> int:
    if max_length < 8:
        raise UsageError(f"--max-length {max_length}: must be >= 8 tokens")
    return max_length
