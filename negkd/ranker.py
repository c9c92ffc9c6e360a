"""The ASC ranker: f(question, rationale) in (0, 1), "how likely is this rationale right" (method.md §5).

Architecture: a Hugging Face backbone (any causal LM -- its decoder stack without the LM head --
or any encoder; for an encoder-decoder such as Flan-T5, the encoder, as the paper did) with a
LoRA adapter, mean-pooled over the *rationale* tokens, then a small MLP head::

    h      = backbone(prompt + rationale)               # (B, L, H)
    pooled = sum_t m_t h_t / sum_t m_t                   # (B, H), m = 1 on rationale tokens
    logit  = W2 tanh(W1 pooled + b1) + b2                # (B,)   W1: H -> d, W2: d -> 1
    f      = sigmoid(logit)                              # (B,)   in (0, 1)

Sequence layout: ``[specials] template(question) rationale [specials]`` where the question
and the rationale are tokenized separately (the boundary is exact, so pooling sees only
rationale tokens). Over ``max_length``: the rationale keeps its *last* tokens (its final
answer lives there) -- at least half the window -- and the question keeps its first tokens.

A ranker directory (written by ``negkd train-ranker``) is self-describing::

    ranker.json        backbone id, backbone kind, max length, template, head size, LoRA config
    adapter/           the backbone's LoRA (a standard PEFT adapter directory)
    head.safetensors   the MLP head (float32)
    tokenizer files    a copy of the backbone's tokenizer

``load(dir)`` returns a :class:`Ranker`; ``ranker.score(questions, rationales)`` gives the
scores. Losses live in ``negkd.losses`` (``ranker_pairwise_loss``: the paper's
``(1 - f(r+))^p + f(r-)^p``, p = 3; ``ranker_bce_loss``); metrics: :func:`pairwise_accuracy`
and :func:`auc`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from negkd.errors import UserError

FORMAT = "negkd-ranker"
CONFIG = "ranker.json"
HEAD = "head.safetensors"
ADAPTER = "adapter"
LOSSES = ("pairwise", "bce")


# --------------------------------------------------------------------------- pure functions


def ranker_loss(kind: str, logit_pos, logit_neg, p: float = 3.0):
    """``pairwise`` (default: ``negkd.losses.ranker_pairwise_loss`` on sigmoid scores) or
    ``bce`` (``negkd.losses.ranker_bce_loss`` on logits); logits (P,), (P,) -> scalar."""
    from negkd.losses import ranker_bce_loss, ranker_pairwise_loss

    if kind == "pairwise":
        return ranker_pairwise_loss(logit_pos.float().sigmoid(), logit_neg.float().sigmoid(), p)
    if kind == "bce":
        return ranker_bce_loss(logit_pos, logit_neg)
    raise ValueError(f"unknown ranker loss {kind!r}; choose one of {', '.join(LOSSES)}")


def pairwise_accuracy(groups: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[float, int]:
    """Share of (positive, negative) pairs *of the same question* ranked right (a tie counts 1/2).

    ``groups``: per question, (scores of its positives, scores of its negatives). Questions
    without both contribute no pair. Returns (accuracy, number of pairs); nan without pairs.
    """
    right, n = 0.0, 0
    for pos, neg in groups:
        for a in pos:
            for b in neg:
                right += 1.0 if a > b else 0.5 if a == b else 0.0
                n += 1
    return (right / n if n else float("nan")), n


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """ROC AUC of positives vs negatives over all questions (Mann-Whitney, ties 1/2); nan if a side is empty."""
    if not pos or not neg:
        return float("nan")
    allv = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    # average ranks with ties
    ranks = [0.0] * len(allv)
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1][0] == allv[i][0]:
            j += 1
        r = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[k] = r
        i = j + 1
    rank_pos = sum(r for r, (_, y) in zip(ranks, allv) if y == 1)
    n_p, n_n = len(pos), len(neg)
    return (rank_pos - n_p * (n_p + 1) / 2) / (n_p * n_n)


# --------------------------------------------------------------------------- tokenization


class Encoder:
    """Turns (question, rationale) into ``input_ids`` + a pooling mask over the rationale tokens."""

    def __init__(self, tokenizer, template: str, max_length: int, chat_template: bool = False):
        self.tok = tokenizer
        self.template = template
        self.max_length = int(max_length)
        self.chat_template = chat_template
        self.prefix, self.suffix = _special_layout(tokenizer)
        if self.max_length < len(self.prefix) + len(self.suffix) + 2:
            raise UserError(f"--max-length {max_length} is too short for this tokenizer")

    def encode_many(self, questions: Sequence[str], rationales: Sequence[str]) -> list[tuple[list[int], int, int]]:
        """Per row: (input_ids, start, end) with the rationale at ``input_ids[start:end]``."""
        from negkd.prompts import build_prompt

        prompts = [build_prompt({"question": q}, self.template, self.tok, self.chat_template) for q in questions]
        q_ids = self.tok(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        r_ids = self.tok(list(rationales), add_special_tokens=False)["input_ids"] if rationales else []
        budget = self.max_length - len(self.prefix) - len(self.suffix)
        out = []
        for q, r in zip(q_ids, r_ids):
            if not r:  # an empty rationale still gets one token to pool over
                r = [self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.pad_token_id]
            r_keep = min(len(r), max(budget - len(q), budget // 2))
            q_keep = min(len(q), budget - r_keep)
            r = r[len(r) - r_keep:]
            q = q[:q_keep]
            ids = self.prefix + q + r + self.suffix
            start = len(self.prefix) + len(q)
            out.append((ids, start, start + len(r)))
        return out


def _special_layout(tok) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before / after a text (e.g. [BOS] / [], [] / [EOS])."""
    probe = "hello"
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i: i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain):])
    return [], []


def collate(rows: Sequence[tuple[list[int], int, int]], pad_id: int):
    """Right-pad rows: input_ids (B, L) long, attention_mask (B, L) long, pool_mask (B, L) float."""
    import torch

    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    pool = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, (ids, s, e) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attn[b, : len(ids)] = 1
        pool[b, s:e] = 1.0
    return {"input_ids": input_ids, "attention_mask": attn, "pool_mask": pool}


# --------------------------------------------------------------------------- the model


@functools.lru_cache(maxsize=None)
def _torch_module():
    """The RankerModel class (defined lazily: torch is imported only when a ranker is built)."""
    import torch

    class RankerModel(torch.nn.Module):
        """backbone (+LoRA) -> masked mean pool -> MLP -> logit. ``forward`` returns logits (B,)."""

        def __init__(self, backbone, hidden: int, head_dim: int, dropout: float = 0.0):
            super().__init__()
            self.backbone = backbone
            self.head = torch.nn.Sequential(
                torch.nn.Dropout(dropout),
                torch.nn.Linear(hidden, head_dim),
                torch.nn.Tanh(),
                torch.nn.Linear(head_dim, 1),
            )

        def forward(self, input_ids, attention_mask, pool_mask):
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            h = out.last_hidden_state.float()  # (B, L, H), pooled in float32
            m = pool_mask.to(h.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H)
            head_dtype = self.head[1].weight.dtype
            return self.head(pooled.to(head_dtype)).squeeze(-1).float()  # (B,)

    return RankerModel


def backbone_kind(name: str, trust_remote_code: bool = False) -> str:
    """``encoder-decoder`` (use its encoder), ``causal`` or ``encoder``."""
    from transformers import AutoConfig

    _check_model_dir(name)
    try:
        cfg = AutoConfig.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: cannot load model config ({str(e).strip().splitlines()[0]})") from None
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder"
    if getattr(cfg, "is_decoder", False) or cfg.model_type in _causal_types():
        return "causal"
    return "encoder"


def _causal_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _check_model_dir(name: str) -> None:
    p = Path(str(name))
    looks_local = str(name).startswith((".", "/", "~")) or p.exists() or str(name).count("/") > 1
    if looks_local and not p.is_dir():
        raise UserError(f"{name}: no such model directory")


def load_backbone(name: str, kind: str, device, torch_dtype, trust_remote_code: bool = False):
    """The backbone without any task head (decoder stack / encoder)."""
    from transformers import AutoModel, AutoModelForTextEncoding

    cls = AutoModelForTextEncoding if kind == "encoder-decoder" else AutoModel
    try:
        m = cls.from_pretrained(str(name), dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: cannot load the ranker backbone ({str(e).strip().splitlines()[0]})") from None
    if hasattr(m.config, "use_cache"):
        m.config.use_cache = False
    return m.to(device)


def build(backbone_name: str, *, lora: dict, head_dim: int = 256, dropout: float = 0.0, device="cpu",
          dtype: str = "auto", trust_remote_code: bool = False, seed: int = 0):
    """A fresh trainable ranker: (model, kind). Only ``lora_*`` and ``head.*`` parameters train."""
    import torch
    from peft import LoraConfig, get_peft_model

    from negkd.modeling import resolve_dtype

    kind = backbone_kind(backbone_name, trust_remote_code)
    torch_dtype = resolve_dtype(dtype, device)
    torch.manual_seed(seed)
    bb = load_backbone(backbone_name, kind, device, torch_dtype, trust_remote_code)
    targets = lora["target_modules"]
    cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                     target_modules=targets, bias="none")
    try:
        bb = get_peft_model(bb, cfg)
    except ValueError as e:
        raise UserError(f"--target-modules {targets}: {str(e).splitlines()[0]}") from None
    hidden = _hidden_size(bb)
    model = _torch_module()(bb, hidden, head_dim, dropout)
    model.head.to(device=device, dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad = ("lora_" in name) or name.startswith("head.")
    return model, kind


def _hidden_size(model) -> int:
    cfg = model.config
    for k in ("hidden_size", "d_model", "dim", "n_embd"):
        v = getattr(cfg, k, None)
        if isinstance(v, int):
            return v
    raise UserError("cannot tell the backbone's hidden size (no hidden_size / d_model in its config)")


def save(model, out: Path, tokenizer, config: dict) -> None:
    """Write adapter/, head.safetensors, the tokenizer and ranker.json into ``out`` (ranker.json last)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(str(out / ADAPTER))
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.head.state_dict().items()},
              str(out / HEAD))
    tokenizer.save_pretrained(str(out))
    (out / CONFIG).write_text(json.dumps({"format": FORMAT, "version": 1, **config}, indent=2, allow_nan=False) + "\n",
                              encoding="utf-8")


def check_dir(path: Path) -> dict:
    """Validate a ranker directory and return its ranker.json (UserError naming what is missing)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--ranker {p}: no such directory; train one with `negkd train-ranker`")
    cfg_path = p / CONFIG
    if not cfg_path.is_file():
        raise UserError(f"--ranker {p}: not a ranker directory (no {CONFIG}); train one with `negkd train-ranker`")
    from negkd.io import read_json

    cfg = read_json(cfg_path, dict, fix="train a ranker with `negkd train-ranker`")
    if cfg.get("format") != FORMAT:
        raise UserError(f"{cfg_path}: not a negkd ranker config (format {cfg.get('format')!r})")
    for need in (HEAD, f"{ADAPTER}/adapter_config.json"):
        if not (p / need).is_file():
            raise UserError(f"--ranker {p}: missing {need}; was `negkd train-ranker` interrupted? rerun it")
    from negkd.validate import check_model_dir

    check_model_dir(p, "--ranker")
    return cfg


class Ranker:
    """A loaded ranker: ``score(questions, rationales) -> list[float]`` in (0, 1)."""

    def __init__(self, model, tokenizer, config: dict, device):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.encoder = Encoder(tokenizer, config["template"], config["max_length"],
                               config.get("chat_template", False))

    def logits(self, questions: Sequence[str], rationales: Sequence[str], batch_size: int = 32) -> list[float]:
        import torch

        if len(questions) != len(rationales):
            raise ValueError(f"{len(questions)} questions for {len(rationales)} rationales")
        rows = self.encoder.encode_many(questions, rationales)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # batch similar lengths
        res = [0.0] * len(rows)
        was = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for s in range(0, len(order), batch_size):
                    idx = order[s: s + batch_size]
                    b = collate([rows[i] for i in idx], self.tokenizer.pad_token_id)
                    z = self.model(**{k: v.to(self.device) for k, v in b.items()})
                    for i, v in zip(idx, z.tolist()):
                        res[i] = v
        finally:
            self.model.train(was)
        return res

    def score(self, questions: Sequence[str], rationales: Sequence[str], batch_size: int = 32) -> list[float]:
        import math

        return [1.0 / (1.0 + math.exp(-z)) for z in self.logits(questions, rationales, batch_size)]

    def __call__(self, question: str, rationale: str) -> float:
        return self.score([question], [rationale])[0]


def load(path: Path, device: Any = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> Ranker:
    """Load a ``negkd train-ranker`` directory as a :class:`Ranker` (eval mode, no grad)."""
    import torch
    from peft import PeftModel

    from negkd.modeling import load_tokenizer, resolve_device, resolve_dtype

    p = Path(path)
    cfg = check_dir(p)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tok = load_tokenizer(str(p), trust_remote_code=trust_remote_code, padding_side="right")
    name = cfg["backbone"]
    if cfg.get("backbone_path") and Path(cfg["backbone_path"]).is_dir():
        name = cfg["backbone_path"]  # the local directory it was trained from, wherever we run now
    bb = load_backbone(name, cfg["backbone_kind"], dev, torch_dtype, trust_remote_code)
    try:
        bb = PeftModel.from_pretrained(bb, str(p / ADAPTER), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{p / ADAPTER}: cannot load the ranker's LoRA on {cfg['backbone']} "
                        f"({str(e).splitlines()[0]})") from None
    model = _torch_module()(bb, cfg["hidden"], cfg["head_dim"], 0.0)
    from negkd.validate import load_safetensors

    model.head.load_state_dict(load_safetensors(p / HEAD))
    model.head.to(device=dev, dtype=torch.float32)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return Ranker(model, tok, cfg, dev)
