"""Pure tensor loss functions (no I/O). float32 inside log-softmax; labels masked with -100;
an all-masked batch gives exactly 0 (still differentiable, zero gradients), never NaN.

Shapes: B = batch, L = sequence length, V = vocabulary. ``logits`` are a causal LM's raw
output ``(B, L, V)``; position t predicts token t+1, so each function shifts by one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``(B, L-1)``, float32, 0 where ``labels[:, 1:] == -100``.

    logits (B, L, V), labels (B, L).
    """
    # The labels are shifted, not the logits: logits[:, :-1] is a strided view whose reshape would copy
    # all B x (L-1) x V of them (and again in backward); the last position gets target -100 instead.
    z = logits.float()  # (B, L, V): no copy when already float32
    y = torch.cat((labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)), 1)  # (B, L)
    nll = F.cross_entropy(z.reshape(-1, z.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(y.shape)[:, :-1]  # (B, L-1); cross_entropy already gives 0 at ignored positions


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, L-1)``: which shifted positions carry a target."""
    return labels[:, 1:] != IGNORE_INDEX


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all target tokens of the batch: scalar float32 (0 if there are none)."""
    nll = token_nll(logits, labels)  # (B, L-1)
    n = target_mask(labels).sum()
    return nll.sum() / n.clamp_min(1)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL per sequence ``(B,)`` float32 (0 for a row without targets)."""
    nll = token_nll(logits, labels)  # (B, L-1)
    n = target_mask(labels).sum(-1)  # (B,)
    return nll.sum(-1) / n.clamp_min(1)


def n_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of target tokens in the batch (scalar long)."""
    return target_mask(labels).sum()


# --------------------------------------------------------------------------- ranker (ASC, method.md §5)
# Section owned by the ranker (`negkd train-ranker`); appended, nothing above is changed.


def ranker_pairwise_loss(f_pos: torch.Tensor, f_neg: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Mean over pairs of ``(1 - f(r+))^p + f(r-)^p``: f_pos, f_neg ``(P,)`` scores in (0, 1) -> scalar.

    The paper's ranker loss (p = 3): bounded, so a pair already ordered well contributes
    little and a confident mistake costs at most 1 per side. 0 (differentiable) without pairs.
    """
    f_pos, f_neg = f_pos.float(), f_neg.float()
    if f_pos.numel() == 0:
        return f_pos.sum() * 0.0
    return ((1.0 - f_pos).pow(p) + f_neg.pow(p)).mean()


def ranker_bce_loss(logit_pos: torch.Tensor, logit_neg: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits ``(P,)``, ``(P,)``: positives labelled 1, negatives 0 -> scalar."""
    logit_pos, logit_neg = logit_pos.float(), logit_neg.float()
    if logit_pos.numel() == 0:
        return logit_pos.sum() * 0.0
    return 0.5 * (F.softplus(-logit_pos).mean() + F.softplus(logit_neg).mean())


# --------------------------------------------------------------------------- NT / UL baselines (method.md §6)
# Section owned by the NT/UL baselines (`negkd train-pos --nt/--ul`); appended, nothing above is changed.


def negative_nll(logits: torch.Tensor, labels: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """NT's negative term: mean over target tokens of ``min(nll_t, cap)``, scalar float32 (0 without targets).

    logits (B, L, V), labels (B, L). ``cap`` defaults to ``ln V``, the NLL of a uniform guess: a
    token the model already finds less likely than uniform (p(y_t) < 1/V) contributes the
    constant ``cap`` and no gradient, so ``NLL(pos) - w * negative_nll(neg)`` is bounded below by
    ``-w * cap`` instead of running to minus infinity as p(y_t) -> 0.
    """
    cap = math.log(logits.size(-1)) if cap is None else float(cap)
    nll = token_nll(logits, labels).clamp(max=cap)  # (B, L-1); masked positions stay 0
    n = target_mask(labels).sum()
    return nll.sum() / n.clamp_min(1)


def token_unlikelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token unlikelihood ``-log(1 - p(y_t))`` ``(B, L-1)``, float32, 0 where masked.

    logits (B, L, V), labels (B, L). Computed as ``logsumexp(z) - logsumexp(z without y_t)``
    (log(1 - p) = log sum_{v != y} e^{z_v} - log sum_v e^{z_v}), which stays finite as p -> 1:
    its gradient w.r.t. the logits is a difference of two softmaxes, bounded by 1 everywhere.
    """
    z = logits[:, :-1, :].float()  # (B, L-1, V)
    y = labels[:, 1:]  # (B, L-1)
    mask = y != IGNORE_INDEX
    idx = y.clamp_min(0).unsqueeze(-1)  # (B, L-1, 1); masked positions point at token 0, zeroed below
    others = z.scatter(-1, idx, float("-inf"))  # (B, L-1, V): the target removed
    ul = (torch.logsumexp(z, -1) - torch.logsumexp(others, -1)).clamp_min(0.0)  # (B, L-1) >= 0
    return torch.where(mask, ul, torch.zeros_like(ul))


def unlikelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """UL's negative term: mean ``-log(1 - p(y_t))`` over target tokens, scalar float32 (0 without targets)."""
    ul = token_unlikelihood(logits, labels)  # (B, L-1)
    n = target_mask(labels).sum()
    return ul.sum() / n.clamp_min(1)


def nt_loss(pos_logits: torch.Tensor, pos_labels: torch.Tensor, neg_logits: torch.Tensor,
            neg_labels: torch.Tensor, weight: float = 0.05, cap: float | None = None) -> torch.Tensor:
    """NT (negative training): ``NLL(pos) - weight * min(NLL, cap)(neg)``, scalar float32.

    pos_logits (B+, L+, V), pos_labels (B+, L+); neg_logits (B-, L-, V), neg_labels (B-, L-). Each
    term is a mean over its own target tokens; see :func:`negative_nll` for the cap.
    """
    return masked_nll(pos_logits, pos_labels) - weight * negative_nll(neg_logits, neg_labels, cap)


def ul_loss(pos_logits: torch.Tensor, pos_labels: torch.Tensor, neg_logits: torch.Tensor,
            neg_labels: torch.Tensor, weight: float = 0.05) -> torch.Tensor:
    """UL (unlikelihood training): ``NLL(pos) + weight * mean_t -log(1 - p(y_t))(neg)``, scalar float32.

    Shapes as :func:`nt_loss`; each term is a mean over its own target tokens.
    """
    return masked_nll(pos_logits, pos_labels) + weight * unlikelihood(neg_logits, neg_labels)
