"""Negative Calibrated Enhancement (NCE) math: pure tensor functions, no I/O (method.md §4).

The NAT model (frozen Neg-LoRA + Pos-LoRA + integration unit) is distilled into a fresh
student LoRA. Each training sequence is re-weighted by how much the NAT model disagrees
with the Neg-LoRA-only model::

    p_nat = softmax(z_nat / T),  p_neg = softmax(z_neg / T),  log p_stu = log_softmax(z_stu / T)
    beta_seq = tanh( mean_t KL(p_neg,t || p_nat,t) )                  # (1) in [0, 1)
    L_kd  = -T^2 * mean_t sum_v p_nat,t(v) log p_stu,t(v) * (c + beta_seq)   # (2) c = 0.5
    L     = (1 - lam) * L_ce + lam * L_kd                                # (3)

Conventions (torchtune-style):

- logits ``(B, L, V)`` are *already aligned* with their targets: position ``t`` predicts
  ``labels[t]``. ``shift`` turns a causal LM's ``(logits, labels)`` into that form.
- ``mask`` is a bool ``(B, L)``: True on tokens that count (completion tokens; prompt tokens
  too with ``--loss-on-prompt``); derived from ``labels != -100``.
- softmax / log-softmax / KL are computed in float32 whatever the model dtype.
- Means over tokens are taken over *all counted tokens of the batch* (the same reduction as
  the CE term, so ``lam`` mixes two terms on the same scale); the per-sequence factor
  ``(c + beta_seq)`` multiplies each token of its sequence. A row with no counted token gets
  ``beta = 0``; an all-masked batch gives a loss of exactly 0 that still back-propagates
  (zero gradients) instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM alignment: logits ``(B, L, V)``, labels ``(B, L)`` -> ``(B, L-1, V)``, ``(B, L-1)``.

    Returns views (no copy): ``logits[:, :-1]`` predicts ``labels[:, 1:]``.
    """
    return logits[:, :-1, :], labels[:, 1:]


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 ``log_softmax(logits / T)`` over the last (vocabulary) axis; shape kept."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return F.log_softmax(z, dim=-1)


def _masked_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values, mask ``(B, L)`` -> ``(B,)`` mean over True entries per row (0 for an empty row)."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1.0)


# Teacher-side quantities are computed in row chunks under no_grad so that their float32
# temporaries stay small: the only full-vocabulary tensors alive are the logits and the result.
CHUNK_ELEMS = 1 << 22  # elements per temporary (16 MB in float32)


def _row_chunks(x: torch.Tensor):
    """Index tuples that cut ``x (..., V)`` into blocks of whole rows, each a contiguous view
    when ``x`` is a slice along the sequence axis (e.g. ``logits[:, :-1]``)."""
    lead = x.shape[:-1]
    if len(lead) == 0:
        yield (Ellipsis,)
        return
    rows = max(1, CHUNK_ELEMS // max(1, x.shape[-1]))
    for outer in (torch.cartesian_prod(*[torch.arange(n) for n in lead[:-1]]).view(-1, len(lead) - 1).tolist()
                  if len(lead) > 1 else [[]]):
        for s in range(0, lead[-1], rows):
            yield (*outer, slice(s, s + rows))


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(P || Q)`` per position: ``(..., V), (..., V) -> (...)``, float32, >= 0, no gradient.

    ``P = softmax(p_logits / T)``, ``Q = softmax(q_logits / T)``;
    ``KL = sum_v P(v) (log P(v) - log Q(v))``. Computed in row chunks (small temporaries).
    """
    out = torch.empty(p_logits.shape[:-1], dtype=torch.float32, device=p_logits.device)
    with torch.no_grad():
        for ix in _row_chunks(p_logits):
            lp = log_probs(p_logits[ix], temperature)  # (rows, V)
            lq = log_probs(q_logits[ix], temperature)  # (rows, V)
            out[ix] = (lp.exp() * (lp - lq)).sum(-1)
    return out.clamp_min_(0.0)  # rounding can give -1e-9 for equal distributions


def calibration_weight(nat_logits: torch.Tensor, neg_logits: torch.Tensor, mask: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Eq. (1): ``beta_seq = tanh(mean_t KL(p_neg,t || p_nat,t))`` -> ``(B,)`` in ``[0, 1)``.

    nat_logits, neg_logits: ``(B, L, V)`` aligned logits of the NAT model and of the
    Neg-LoRA-only model (same weights, unit switched); mask: ``(B, L)`` bool.
    0 when the two distributions agree on every counted token; grows with their divergence.
    A row with no counted token gets 0. No gradient flows (teacher quantities).
    """
    return torch.tanh(sequence_kl(nat_logits, neg_logits, mask, temperature))


def sequence_kl(nat_logits: torch.Tensor, neg_logits: torch.Tensor, mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """``mean_t KL(p_neg,t || p_nat,t)`` over the counted tokens of each row -> ``(B,)`` (0 for an empty row)."""
    kl = token_kl(neg_logits, nat_logits, temperature)  # (B, L)
    return _masked_row_mean(kl, mask)


def teacher_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 ``softmax(logits / T)`` with no gradient: ``(..., V) -> (..., V)`` (row chunks)."""
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for ix in _row_chunks(logits):
            out[ix] = log_probs(logits[ix], temperature).exp_()
    return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_v a(v) b(v)`` per position, ``(..., V), (..., V) -> (...)``, as a batched matmul so no
    ``(..., V)`` product is materialised (its backward needs only ``a``, which is kept anyway)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]


def soft_cross_entropy(p_teacher: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """``-sum_v p_teacher(v) * log p_student(v)`` per position: ``(..., V), (..., V) -> (...)``.

    ``student_logp`` is a float32 log-softmax (``log_probs(z_stu, T)``). Positions where the
    teacher puts zero mass on a token contribute 0 even if the student's log-prob is -inf.
    """
    sce = -_dot(p_teacher, student_logp)
    if not bool(torch.isfinite(sce).all()):  # rare: -inf student log-probs (masked vocabulary)
        prod = torch.where(p_teacher > 0, p_teacher * student_logp, torch.zeros((), device=sce.device))
        sce = torch.where(torch.isfinite(sce), sce, -prod.sum(-1))
    return sce


def kd_loss(p_teacher: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
            seq_weight: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Eq. (2): ``T^2 * sum_{b,t} w_b * softCE_{b,t} / #counted tokens`` -> scalar.

    p_teacher: ``(B, L, V)`` float32 teacher probabilities at temperature T;
    student_logits: ``(B, L, V)``; mask: ``(B, L)``; seq_weight: ``(B,)`` (``c + beta_seq``;
    None = 1). Returns 0 (still attached to the graph) when no token is counted.
    """
    sce = soft_cross_entropy(p_teacher, log_probs(student_logits, temperature))  # (B, L)
    return _weighted_token_mean(sce, mask, seq_weight) * (temperature ** 2)


def _weighted_token_mean(values: torch.Tensor, mask: torch.Tensor, seq_weight: torch.Tensor | None) -> torch.Tensor:
    """values ``(B, L)`` float32; mask ``(B, L)``; seq_weight ``(B,)`` -> scalar."""
    m = mask.to(values.dtype)
    if seq_weight is not None:
        m = m * seq_weight.to(values.dtype)[:, None]  # (B, L)
    vals = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return (vals * m).sum() / mask.sum().clamp_min(1).to(values.dtype)


def nce_loss(student_logits: torch.Tensor, labels: torch.Tensor, p_nat: torch.Tensor, beta: torch.Tensor,
             mask: torch.Tensor | None = None, kd_weight: float = 0.5, temperature: float = 1.0,
             beta_offset: float = 0.5, consume_teacher: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (3): ``(1 - lam) * CE + lam * (c + beta_seq) * T^2 * softCE(p_nat -> student)``.

    student_logits: ``(B, L, V)`` aligned logits (with grad); labels: ``(B, L)`` aligned targets
    with -100 on ignored positions; p_nat: ``(B, L, V)`` float32 NAT probabilities at T (no
    grad); beta: ``(B,)`` from ``calibration_weight`` (zeros for ``--no-calibration``);
    mask: ``(B, L)`` bool, default ``labels != -100``.

    Returns ``(loss, parts)`` with detached ``parts = {"ce", "kd", "n_tokens"}``; ``kd`` is
    the weighted term of eq. (2). CE is the ordinary token-mean NLL at T = 1.

    At T = 1 both terms are linear in the same ``log p_stu``, so the loss is computed as ONE
    soft-target cross-entropy with the per-token target ``q = lam (c + beta) p_nat +
    (1 - lam) onehot(label)``: a single full-vocabulary gradient in the backward pass instead
    of two. ``consume_teacher=True`` builds ``q`` in ``p_nat``'s memory (it is overwritten).
    """
    if mask is None:
        mask = labels != IGNORE_INDEX
    n_tok = mask.sum()
    denom = n_tok.clamp_min(1).to(torch.float32)
    seq_w = beta_offset + beta.to(torch.float32)  # (B,)
    lp1 = log_probs(student_logits, 1.0)  # (B, L, V) float32
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)  # (B, L, 1)
    if temperature == 1.0:
        with torch.no_grad():  # the two terms, for the logs
            ce = _weighted_token_mean(-lp1.gather(-1, safe_labels).squeeze(-1), mask, None)
            kd = _weighted_token_mean(soft_cross_entropy(p_nat, lp1), mask, seq_w)
        m = mask.to(torch.float32)  # (B, L)
        q = p_nat if consume_teacher else p_nat.clone()  # (B, L, V)
        q.mul_((kd_weight * seq_w[:, None] * m).unsqueeze(-1))
        q.scatter_add_(-1, safe_labels, ((1.0 - kd_weight) * m).unsqueeze(-1))
        loss = soft_cross_entropy(q, lp1).sum() / denom  # 0 at uncounted positions: q = 0 there
        return loss, {"ce": ce, "kd": kd, "n_tokens": n_tok.detach()}
    nll = -lp1.gather(-1, safe_labels).squeeze(-1)  # (B, L)
    ce = _weighted_token_mean(nll, mask, None)
    sce = soft_cross_entropy(p_nat, log_probs(student_logits, temperature))  # (B, L)
    kd = _weighted_token_mean(sce, mask, seq_w) * (temperature ** 2)
    loss = (1.0 - kd_weight) * ce + kd_weight * kd
    return loss, {"ce": ce.detach(), "kd": kd.detach(), "n_tokens": n_tok.detach()}
