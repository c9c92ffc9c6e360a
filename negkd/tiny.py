"""A tiny randomly initialised LLaMA-architecture model + a locally trained BPE tokenizer.

For CI smoke runs and tests: builds in about a second, fully offline, and loads with
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(dir)``. Digits are split into
single tokens (as in LLaMA) so arithmetic is learnable. The tokenizer ships a small chat
template so ``--chat-template`` code paths can be tested too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def builtin_corpus() -> list[str]:
    """A small deterministic corpus in the shape of negkd's prompts and rationales."""
    import random

    rng = random.Random(0)
    names = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay"]
    things = ["apples", "books", "coins", "pens", "cards", "eggs"]
    lines = [
        "Problem:\nWhat is $\\frac{1}{2} + \\frac{1}{3}$?\nSolution:\nThe answer is $\\boxed{\\frac{5}{6}}$.",
        "Let's think step by step. The answer is 42. Final Answer: 42 #### 42",
        "<|user|>\n<|assistant|>\n<|system|>\n",
        "\\sqrt{2} \\pi x^2 + y^2 = z^2, \\{1,2\\}, (0, 1], 10\\%, \\dfrac12, \\cdot \\times \\div",
    ]
    for _ in range(400):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        n, t = rng.choice(names), rng.choice(things)
        op, res = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        lines.append(
            f"Problem:\n{n} has {a} {t} and gets {b} more. How many {t} now?\nSolution:\n"
            f"{n} has {a} {op} {b} = {res} {t}. The answer is $\\boxed{{{res}}}$."
        )
    return lines


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out: Path, corpus: Iterable[str] | None = None, hidden: int = 96, layers: int = 2,
                     heads: int = 3, intermediate: int = 256, vocab_size: int = 384, max_positions: int = 2048,
                     seed: int = 0) -> Path:
    """Write tokenizer + random LLaMA weights to ``out`` and return it.

    The defaults serve on vLLM too: head_dim 96 / 3 = 32 (vLLM's CPU attention takes 32, 64, 80,
    96, 112, 128, 256; not 24), and 2,048 positions hold the built-in ``math`` few-shot prompt
    (~1,400 tokens with this tokenizer) plus a rationale.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus if corpus is not None else builtin_corpus(), vocab_size)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
