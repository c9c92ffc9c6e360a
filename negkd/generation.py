"""Batched Hugging Face generation: many candidates per prompt, memory bounded by a batch size.

Shared by ``negkd infer`` and ``negkd sample --backend hf``. The API::

    from negkd.generation import generate, iter_generate, Generation

    outs = generate(model, tokenizer, prompts, n=16, temperature=0.7, top_p=0.95,
                    max_new_tokens=512, batch_size=64, seed=0)
    outs[i][j].text       # the j-th completion of prompts[i] (EOS and padding stripped)
    outs[i][j].n_tokens   # generated tokens, the EOS included when one was produced
    outs[i][j].finished   # True: stopped at EOS; False: cut at max_new_tokens

    for i, gens in iter_generate(...same arguments...):   # streams each prompt's n candidates
        ...                                               # as soon as they are all done

How it works (and why):

- *Left padding*: a decoder-only model continues from the last position of each row, so
  prompts are padded on the left and masked (the tokenizer's own padding side is untouched).
- *Batches*: one ``model.generate`` call holds at most ``batch_size`` sequences
  (prompts x ``num_return_sequences``), so memory is bounded by ``batch_size`` and
  ``max_new_tokens``, not by the number of prompts or ``n``. When ``n > batch_size`` one
  prompt is split over several calls. Prompts are sorted by token length (longest first, so
  an out-of-memory shows up at once) to minimise padding; results come back in input order
  from ``generate`` and in completion order (with their index) from ``iter_generate``.
- *Stop at EOS*: every id in the model's ``generation_config.eos_token_id`` plus the
  tokenizer's EOS (chat models often end turns with a token other than ``</s>``); a finished
  row is padded by ``generate`` and the padding is never counted or decoded.
- *Seeding*: each ``model.generate`` call first seeds torch's RNG from ``(seed, call index)``,
  so a call sequence is reproducible for the same prompts, ``batch_size``, ``seed`` and device.
  Sampled outputs depend on how prompts are grouped into calls; greedy outputs do not.
- *Greedy*: ``greedy=True`` decodes one deterministic candidate per prompt (``n`` must be 1).
- *Stop strings*: ``stop=["\\n\\nProblem:"]`` ends a row as soon as one appears (few-shot
  prompts), so no compute is spent past it; the text is cut before it.

Works with any model that has ``.generate`` (a plain ``PreTrainedModel``, a ``PeftModel``,
merged or not, or a NAT model from ``negkd.nat.load``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

__all__ = ["Generation", "generate", "iter_generate", "eos_token_ids"]


@dataclass(frozen=True)
class Generation:
    """One completion: its text, how many tokens were generated, and whether it hit EOS."""

    text: str
    n_tokens: int
    finished: bool


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the model's generation-config EOS ids + the tokenizer's."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    cfg_eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(cfg_eos, int):
        ids.append(cfg_eos)
    elif isinstance(cfg_eos, (list, tuple)):
        ids.extend(int(i) for i in cfg_eos)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def _plan(lengths: Sequence[int], n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Group (prompt index, copies) into calls of at most ``batch_size`` sequences.

    Prompts are taken longest first. A prompt with ``n > batch_size`` gets calls of its own
    (``batch_size`` copies each, the last one the remainder); otherwise ``batch_size // n``
    prompts share a call, each with ``n`` copies (``num_return_sequences`` must be uniform).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    calls: list[list[tuple[int, int]]] = []
    if n > batch_size:
        for i in order:
            left = n
            while left > 0:
                k = min(batch_size, left)
                calls.append([(i, k)])
                left -= k
        return calls
    per_call = max(1, batch_size // n)
    for s in range(0, len(order), per_call):
        calls.append([(i, n) for i in order[s: s + per_call]])
    return calls


def iter_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    batch_size: int = 32,
    seed: int = 0,
    greedy: bool = False,
    add_special_tokens: bool = True,
    on_tokens: Callable[[int, int], None] | None = None,
    stop: Sequence[str] | None = None,
) -> Iterator[tuple[int, list[Generation]]]:
    """Yield ``(prompt index, n generations)`` as each prompt's candidates are all done.

    ``on_tokens(sequences, tokens)`` is called after every ``model.generate`` call (for
    progress bars / throughput). ``add_special_tokens=False`` for prompts that already hold
    the BOS token (e.g. rendered with a chat template). ``stop``: strings that end a
    completion (transformers' ``stop_strings``, checked on the generated text, so a row stops
    as soon as one appears); the text is cut *before* the stop string and ``finished`` is True.
    """
    import torch

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if greedy and n != 1:
        raise ValueError("greedy decoding gives one deterministic candidate: use n=1")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling (use greedy=True for argmax), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        return

    eos = eos_token_ids(model, tokenizer)
    if not eos:
        raise ValueError("the tokenizer has no EOS token; generation could not stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device

    # Tokenize every prompt once (no padding), then pad each call's rows on the left ourselves.
    enc = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    for i, ids in enumerate(enc):
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization")
    gen_kwargs: dict = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos)
    stops = [x for x in (stop or []) if x]
    if stops:
        gen_kwargs.update(stop_strings=list(stops), tokenizer=tokenizer)
    if greedy:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        # top_k=0 disables the default top-k=50 filter that generation configs often carry:
        # the sampling distribution is exactly temperature + nucleus, as on vLLM / OpenAI.
        gen_kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)

    done: dict[int, list[Generation]] = {}
    was_training = model.training
    model.eval()
    try:
        for call_idx, call in enumerate(_plan([len(x) for x in enc], n, batch_size)):
            rows = [enc[i] for i, _ in call]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            for r, ids in enumerate(rows):
                input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attn[r, width - len(ids):] = 1
            k = call[0][1]  # copies per prompt in this call (uniform within a call)
            torch.manual_seed(_call_seed(seed, call_idx))
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                                     num_return_sequences=k, **gen_kwargs)
            # out: [len(rows) * k, width + T]; rows are grouped prompt-major (k copies per prompt)
            new = out[:, width:].cpu()
            gens = _decode(tokenizer, new, set(eos), pad_id, stops)
            if on_tokens is not None:
                on_tokens(len(gens), sum(g.n_tokens for g in gens))
            for r, (i, _) in enumerate(call):
                done.setdefault(i, []).extend(gens[r * k: (r + 1) * k])
                if len(done[i]) == n:
                    yield i, done.pop(i)
    finally:
        if was_training:
            model.train()


def generate(model, tokenizer, prompts: Sequence[str], n: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 512, batch_size: int = 32, seed: int = 0,
             greedy: bool = False, add_special_tokens: bool = True,
             on_tokens: Callable[[int, int], None] | None = None,
             stop: Sequence[str] | None = None) -> list[list[Generation]]:
    """``n`` completions for each prompt, in input order (see the module docstring)."""
    res: list[list[Generation] | None] = [None] * len(prompts)
    for i, gens in iter_generate(model, tokenizer, prompts, n=n, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                 greedy=greedy, add_special_tokens=add_special_tokens, on_tokens=on_tokens,
                                 stop=stop):
        res[i] = gens
    return res  # type: ignore[return-value]


def _call_seed(seed: int, call_idx: int) -> int:
    # a fixed odd multiplier spreads consecutive calls apart; kept within torch's 64-bit range
    return (int(seed) * 1_000_003 + call_idx * 0x9E3779B1) % (2**63 - 1)


def _decode(tokenizer, new, eos: set[int], pad_id: int | None = None,
            stops: Sequence[str] = ()) -> list[Generation]:
    """new: [rows, T] generated ids, padded after a row finished. Cut each row at its first EOS;
    with stop strings, a row that ended on one (then padded) is cut before the stop string."""
    out = []
    for row in new.tolist():
        cut = next((t for t, tok in enumerate(row) if tok in eos), None)
        if cut is not None:
            ids, n_tok, finished = row[:cut], cut + 1, True
        else:
            n_tok = len(row)
            if stops and pad_id is not None:
                while n_tok and row[n_tok - 1] == pad_id:  # padding after a stop-string stop
                    n_tok -= 1
            ids, finished = row[:n_tok], False
        text = tokenizer.decode(ids, skip_special_tokens=True)
        hit = [i for i in (text.find(x) for x in stops) if i >= 0]
        if hit:
            text, finished = text[: min(hit)], True
        out.append(Generation(text=text, n_tokens=n_tok, finished=finished))
    return out


# --------------------------------------------------------------------------- what a model dir is

#: negkd's metadata next to a PEFT adapter / NAT checkpoint (written by the training steps),
#: then the NAT checkpoint's own config, which carries the same fields
META_FILES = ("negkd.json", "nat_config.json")


def read_meta(path) -> dict:
    """negkd's metadata of an adapter / NAT checkpoint directory ({} when there is none)."""
    import json
    from pathlib import Path

    from negkd.errors import UserError

    p = Path(path)
    for name in META_FILES:
        f = p / name
        if f.is_file():
            try:
                meta = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{f}: not a valid JSON metadata file ({e})") from None
            return meta if isinstance(meta, dict) else {}
    return {}


def model_kind(path) -> str:
    """``"nat"`` (a NAT checkpoint: nat_config.json), ``"adapter"`` (a PEFT adapter dir) or ``"base"``."""
    from pathlib import Path

    p = Path(str(path))
    if not p.is_dir():
        return "base"
    if (p / "nat_config.json").is_file() or str(read_meta(p).get("kind", "")).lower() == "nat":
        return "nat"
    if (p / "adapter_config.json").is_file():
        return "adapter"
    return "base"


def recorded_base(path) -> str:
    """The base model an adapter / NAT checkpoint was trained on: the recorded absolute path if it
    still exists, else the name as given; PEFT's ``base_model_name_or_path`` as a last resort."""
    import json
    from pathlib import Path

    from negkd.errors import UserError

    p = Path(path)
    meta = read_meta(p)
    local = meta.get("base_model_path")
    if isinstance(local, str) and Path(local).is_dir():
        return local
    if isinstance(meta.get("base_model"), str) and meta["base_model"]:
        return meta["base_model"]
    cfg = p / "adapter_config.json"
    if cfg.is_file():
        try:
            base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{cfg}: not valid JSON ({e})") from None
        if base:
            return str(base)
    raise UserError(f"{p}: does not record its base model; pass --model BASE --adapter {p}")
