"""``negkd tiny-model``: write a tiny random LLaMA model + tokenizer for smoke runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def command(
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write the model and tokenizer into.")],
    corpus: Annotated[Optional[Path], typer.Option(
        help="Text or JSONL file to train the tokenizer on (JSONL: its question/rationale/solution fields). "
             "Default: a small built-in corpus.")] = None,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 96,
    layers: Annotated[int, typer.Option(help="Number of transformer layers.")] = 2,
    heads: Annotated[int, typer.Option(help="Attention heads (hidden must be divisible by it). The default head "
                                            "size 96/3 = 32 is one vLLM's CPU and GPU kernels support.")] = 3,
    max_positions: Annotated[int, typer.Option(help="Context length (positions); 2048 fits the `math` few-shot "
                                                    "prompt of `negkd sample --backend hf`.")] = 2048,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size (BPE, digits split).")] = 384,
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Rebuild even if DIR already holds this model.")] = False,
) -> None:
    """Write a tiny randomly initialised LLaMA-architecture model (a few hundred thousand
    parameters) and a locally trained tokenizer, loadable offline with AutoModelForCausalLM /
    AutoTokenizer. For CI smoke runs of the whole pipeline on CPU.

    Example: negkd tiny-model -o runs/tiny
    """
    from negkd.console import log
    from negkd.errors import UsageError
    from negkd.io import RunDir, iter_jsonl

    if hidden % heads:
        raise UsageError(f"--hidden {hidden} is not divisible by --heads {heads}")
    args = dict(hidden=hidden, layers=layers, heads=heads, vocab_size=vocab_size, max_positions=max_positions,
                seed=seed)
    run = RunDir(output, "tiny-model", args, inputs=[corpus] if corpus else [], overwrite=overwrite)
    if run.up_to_date():
        return
    run.start()
    texts = None
    if corpus is not None:
        if corpus.suffix in (".jsonl", ".gz", ".json"):
            texts = [str(r.get(k)) for _, r in iter_jsonl(corpus)
                     for k in ("question", "rationale", "solution", "answer") if r.get(k)]
        else:
            texts = corpus.read_text(encoding="utf-8").splitlines()
    from negkd.tiny import build_tiny_model

    # model files live directly in DIR (so it loads with from_pretrained(DIR)); the manifest,
    # written last, marks the build complete.
    build_tiny_model(output, texts, hidden=hidden, intermediate=hidden * 8 // 3, layers=layers, heads=heads,
                     vocab_size=vocab_size, max_positions=max_positions, seed=seed)
    from transformers import AutoConfig

    n_params = _count_params(AutoConfig.from_pretrained(output))
    run.finish(parameters=n_params)
    log(f"wrote tiny model ({n_params:,} parameters) to {output}")
    if hidden // heads not in VLLM_HEAD_SIZES:
        log(f"note: head size {hidden // heads} is not one vLLM supports ({', '.join(map(str, VLLM_HEAD_SIZES))}); "
            "this model will not serve on vLLM")


VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)  # vLLM 0.32 CPU attention


def _count_params(cfg) -> int:
    h, i, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return v * h + n * per_layer + h + (0 if cfg.tie_word_embeddings else v * h)
