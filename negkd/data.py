"""Training examples for causal-LM steps: tokenized (prompt, completion) pairs, dynamic-padding
collate, and length-grouped batching (method.md §2).

An *example* is a dict::

    {"input_ids": [int], "labels": [int], "idx": int, "id": str, "k": int, "n_prompt": int}

``input_ids = prompt_ids + completion_ids`` where the prompt is ``template(question)``
(optionally wrapped in the chat template) tokenized *with* the tokenizer's special tokens
(BOS) and the completion is ``rationale`` tokenized *without* them, followed by EOS. The two
are tokenized separately and concatenated, so the prompt/completion boundary is exact.
``labels`` equal ``input_ids`` with the prompt set to -100 (unless ``loss_on_prompt``);
padding gets -100 in ``collate``. ``idx`` is the example's position in the list (so a loss
callback can record per-example statistics); ``id``/``k`` come from the sample record.

Truncation to ``max_length`` (counted, never silent): the completion keeps
``min(len, max(max_length - len(prompt), max_length // 2))`` tokens, cut from the right; the
prompt is cut *inside the question*, from the question's left, to fill the rest: its special
tokens (BOS), the chat template's header, the template's text around ``{question}`` and the
end of the question stay (``_cut_prompt``). Only when even the question's removal is not
enough (or a slow tokenizer gives no offsets) is the rest cut from the left after the leading
special tokens; such rows are counted as ``prompt_frame_cut``. A row whose completion would be
empty (an empty rationale) is dropped and counted.

``neg`` is True for a row graded incorrect (``correct: false``): NT/UL tell the two apart.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

IGNORE_INDEX = -100


@dataclass
class TokenizeStats:
    rows: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    prompt_frame_cut: int = 0  # truncated prompts that also lost template text (see _cut_prompt)
    completion_truncated: int = 0
    dropped_empty: int = 0
    tokens: int = 0  # total tokens of the kept examples
    target_tokens: int = 0  # tokens with a label
    max_len: int = 0
    dropped_ids: list = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return self.prompt_truncated + self.completion_truncated

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dropped_ids"] = d["dropped_ids"][:20]
        return d

    def summary(self) -> str:
        s = f"{self.kept:,} examples, {self.tokens:,} tokens ({self.target_tokens:,} trained), longest {self.max_len}"
        if self.truncated:
            s += (f"; truncated {self.truncated:,} rows to --max-length ({self.prompt_truncated:,} prompts from the left, "
                  f"{self.completion_truncated:,} completions from the right)")
        if self.prompt_frame_cut:
            s += (f"; {self.prompt_frame_cut:,} prompts did not fit even without their question and lost template "
                  "text too: raise --max-length")
        if self.dropped_empty:
            s += f"; dropped {self.dropped_empty:,} rows with an empty rationale"
        return s


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def build_examples(records: Sequence[dict], tokenizer, template: str, chat_template: bool = False,
                   max_length: int = 1024, loss_on_prompt: bool = False,
                   batch: int = 1024) -> tuple[list[dict], TokenizeStats]:
    """Tokenize graded samples (``question`` + ``rationale``) into training examples."""
    from negkd.prompts import build_prompt

    eos = tokenizer.eos_token_id
    stats = TokenizeStats(rows=len(records))
    examples: list[dict] = []
    # a chat template renders its own special tokens as text: don't add BOS twice
    prompt_specials = not chat_template
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        prompts = [build_prompt(r, template, tokenizer, chat_template) for r in chunk]
        rationales = [r.get("rationale") or "" for r in chunk]
        p_ids = _encode(tokenizer, prompts, prompt_specials)
        c_ids = _encode(tokenizer, rationales, False)
        for rec, prompt, p, c, text in zip(chunk, prompts, p_ids, c_ids, rationales):
            if not text.strip():
                stats.dropped_empty += 1
                stats.dropped_ids.append([rec.get("id"), rec.get("k")])
                continue
            p, c = list(p), list(c) + [eos]
            if len(p) + len(c) > max_length:
                keep_c = min(len(c), max(max_length - len(p), max_length // 2))
                keep_p = max_length - keep_c
                if keep_c < len(c):
                    c = c[:keep_c]
                    stats.completion_truncated += 1
                if keep_p < len(p):
                    p, whole_frame = _cut_prompt(tokenizer, rec, template, chat_template, prompt, p, keep_p,
                                                 prompt_specials)
                    stats.prompt_truncated += 1
                    stats.prompt_frame_cut += not whole_frame
            ids = p + c
            labels = ids.copy() if loss_on_prompt else [IGNORE_INDEX] * len(p) + c
            examples.append({"input_ids": ids, "labels": labels, "idx": len(examples),
                             "id": rec.get("id"), "k": rec.get("k"), "n_prompt": len(p),
                             "neg": rec.get("correct") is False})
            stats.tokens += len(ids)
            stats.target_tokens += sum(1 for x in labels[1:] if x != IGNORE_INDEX)
            stats.max_len = max(stats.max_len, len(ids))
    stats.kept = len(examples)
    return examples, stats


_SENTINEL = "\ue000negkd-question\ue001"  # private-use characters: never in a real question


def _cut_prompt(tokenizer, rec: dict, template: str, chat_template: bool, prompt: str, ids: list[int],
                keep: int, specials: bool) -> tuple[list[int], bool]:
    """``ids`` (the tokens of ``prompt``) cut to ``keep`` tokens inside the question: the question's
    first tokens go, everything around it stays (BOS, chat header, template text, the question's
    end). Returns (ids, whether all the non-question text was kept).

    The question's place is found by rendering the prompt with a sentinel question and mapping
    its character span to tokens through the tokenizer's offsets, so the kept tokens are exactly
    those of the full prompt (no re-tokenization at the cut). Falls back to keeping the leading
    special tokens and cutting the rest from the left.
    """
    drop = len(ids) - keep
    span = _question_span(tokenizer, rec, template, chat_template, prompt, ids, specials)
    if span is not None:
        a, b = span  # ids[a:b] are the question's tokens
        if drop <= b - a:
            return ids[:a] + ids[a + drop:], True
        ids, drop = ids[:a] + ids[b:], drop - (b - a)  # no question left; cut the frame below
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lead = 0
    while lead < len(ids) and ids[lead] in special and lead < keep:
        lead += 1
    return ids[:lead] + ids[lead + drop:], False


def _question_span(tokenizer, rec: dict, template: str, chat_template: bool, prompt: str, ids: list[int],
                   specials: bool) -> tuple[int, int] | None:
    """Token indices [a, b) of the question inside ``ids``, or None when they cannot be found."""
    from negkd.prompts import build_prompt

    frame = build_prompt({**rec, "question": _SENTINEL}, template, tokenizer, chat_template)
    if frame.count(_SENTINEL) != 1:
        return None
    head, tail = frame.split(_SENTINEL)
    if not (prompt.startswith(head) and prompt.endswith(tail) and len(head) + len(tail) <= len(prompt)):
        return None
    qs, qe = len(head), len(prompt) - len(tail)  # the question's characters in the prompt
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(prompt, add_special_tokens=specials, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        return None
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s >= qs and e <= qe]
    if not inside or inside[-1] + 1 - inside[0] != len(inside):
        return None
    return inside[0], inside[-1] + 1


def lengths(examples: Sequence[dict]) -> list[int]:
    return [len(e["input_ids"]) for e in examples]


# ---------------------------------------------------------------- collate


class Collator:
    """Pad a list of examples to the longest in the batch (dynamic padding).

    Returns ``input_ids``/``attention_mask``/``labels`` as ``(B, L)`` long tensors, ``idx`` as a
    ``(B,)`` long tensor, and every other per-example key (``id``, ``k``, ...) as a list.
    ``pad_to_multiple_of`` rounds L up (tensor-core friendly on GPU).
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None, padding_side: str = "right"):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of
        self.left = padding_side == "left"

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        import torch

        L = max(len(e["input_ids"]) for e in examples)
        if self.multiple:
            L = -(-L // self.multiple) * self.multiple
        B = len(examples)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            sl = slice(L - n, L) if self.left else slice(0, n)
            ids[i, sl] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[i, sl] = torch.tensor(e["labels"], dtype=torch.long)
            mask[i, sl] = 1
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for key in examples[0]:
            if key in out or key in ("input_ids", "labels"):
                continue
            vals = [e.get(key) for e in examples]
            out[key] = torch.tensor(vals, dtype=torch.long) if key == "idx" else vals
        return out


# ---------------------------------------------------------------- batching


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0,
                           mega: int = 64) -> list[list[int]]:
    """Indices grouped into batches of similar length, in a random order.

    Like HF's LengthGroupedSampler: shuffle (seeded by ``seed`` and ``epoch``), cut into
    mega-batches of ``mega * batch_size``, sort each by length (longest first), cut into
    batches, then shuffle the batch order (keeping the very longest batch first so an
    out-of-memory shows on step 1). Deterministic for a given (seed, epoch).
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = max(1, mega * batch_size)
    batches: list[list[int]] = []
    for s in range(0, len(order), size):
        chunk = sorted(order[s:s + size], key=lambda i: -lengths[i])
        batches.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    if len(batches) > 1:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        first = batches.pop(longest)
        rng.shuffle(batches)
        batches.insert(0, first)
    return batches


def random_batches(n: int, batch_size: int, seed: int, epoch: int = 0) -> list[list[int]]:
    """Plain shuffled batches (no length grouping)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    return [order[j:j + batch_size] for j in range(0, n, batch_size)]


def padding_share(batches: Iterable[Sequence[int]], lengths: Sequence[int]) -> float:
    """Fraction of padded positions when each batch is padded to its longest member."""
    real = padded = 0
    for b in batches:
        ls = [lengths[i] for i in b]
        real += sum(ls)
        padded += max(ls) * len(ls)
    return 1.0 - real / padded if padded else 0.0


def budget_split(rows: Sequence[int], lengths: Sequence[int], max_tokens: int, rows_per_item: int = 1,
                 min_parts: int = 1) -> list[list[int]]:
    """Cut the items ``rows`` of one optimizer step into micro-batches under a token budget.

    The cost of a micro-batch is what ``Collator`` allocates: ``items x rows_per_item x longest``
    padded tokens (``rows_per_item`` = 2 for the ranker's (positive, negative) pairs). Items are
    sorted longest first and packed greedily while the cost stays ``<= max_tokens``; an item whose
    own cost exceeds the budget becomes a micro-batch of its own (it cannot be split). Then, while
    there are fewer than ``min_parts`` micro-batches (so every process runs the same number of
    forward passes), the micro-batch with the most items is halved. Deterministic; every item
    appears exactly once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(rows, key=lambda i: -lengths[i])  # stable: ties keep the plan's order
    parts: list[list[int]] = []
    for i in order:
        # longest first: the current part's longest is its first item
        if parts and (len(parts[-1]) + 1) * rows_per_item * lengths[parts[-1][0]] <= max_tokens:
            parts[-1].append(i)
        else:
            parts.append([i])
    while len(parts) < min_parts:
        j = max(range(len(parts)), key=lambda k: len(parts[k]))
        if len(parts[j]) < 2:
            break  # fewer items than parts: the caller pads with zero-weight repeats
        half = (len(parts[j]) + 1) // 2
        parts[j:j + 1] = [parts[j][:half], parts[j][half:]]
    return parts
