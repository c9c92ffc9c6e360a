"""NCE loss math (negkd/nce.py) against values computed by hand with the math module."""

from __future__ import annotations

import math

import pytest
import torch

from negkd import nce


def _log_softmax(z, T=1.0):
    z = [x / T for x in z]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def _softmax(z, T=1.0):
    return [math.exp(x) for x in _log_softmax(z, T)]


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def _sce(p, logq):
    return -sum(a * b for a, b in zip(p, logq))


# ----------------------------------------------------------------------------- KL and beta


def test_token_kl_matches_hand_value():
    p = torch.log(torch.tensor([0.5, 0.5]))
    q = torch.log(torch.tensor([0.25, 0.75]))
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert nce.token_kl(p, q).item() == pytest.approx(want, rel=1e-6)
    # KL is asymmetric: KL(P||Q) != KL(Q||P)
    assert nce.token_kl(q, p).item() != pytest.approx(want, rel=1e-3)


def test_beta_is_zero_for_equal_distributions():
    torch.manual_seed(0)
    z = torch.randn(3, 5, 11) * 4
    mask = torch.ones(3, 5, dtype=torch.bool)
    beta = nce.calibration_weight(z, z.clone(), mask)
    assert beta.shape == (3,)
    assert torch.all(beta == 0)
    # logits shifted by a per-token constant are the same distribution
    beta = nce.calibration_weight(z, z + 7.0, mask)
    assert torch.allclose(beta, torch.zeros(3), atol=1e-5)


def test_beta_hand_value_direction_and_masking():
    # one sequence, two counted tokens and one masked token with a huge divergence
    nat = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [50.0, -50.0]]])
    neg = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-50.0, 50.0]]])
    mask = torch.tensor([[True, True, False]])
    kl0 = _kl(_softmax([2.0, 0.0]), _softmax([0.0, 0.0]))  # KL(p_neg || p_nat) at t=0
    want = math.tanh((kl0 + 0.0) / 2)
    beta = nce.calibration_weight(nat, neg, mask)
    assert beta.item() == pytest.approx(want, rel=1e-5)
    # direction: KL(p_neg || p_nat), not KL(p_nat || p_neg)
    wrong = math.tanh(_kl(_softmax([0.0, 0.0]), _softmax([2.0, 0.0])) / 2)
    assert abs(want - wrong) > 1e-3 and beta.item() != pytest.approx(wrong, rel=1e-4)


def test_beta_grows_with_divergence_and_stays_below_one():
    torch.manual_seed(1)
    nat = torch.randn(1, 6, 17)
    d = torch.randn(1, 6, 17)
    mask = torch.ones(1, 6, dtype=torch.bool)
    betas = [nce.calibration_weight(nat, nat + s * d, mask).item() for s in (0.0, 0.1, 0.5, 1.0, 3.0, 30.0)]
    assert betas[0] == pytest.approx(0.0, abs=1e-6)
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:])), betas
    assert betas[-1] < 1.0 and betas[-1] > 0.9


def test_beta_temperature_and_empty_row():
    nat = torch.tensor([[[0.0, 0.0, 0.0]], [[1.0, 2.0, 3.0]]])
    neg = torch.tensor([[[3.0, 0.0, -1.0]], [[0.0, 0.0, 5.0]]])
    mask = torch.tensor([[True], [False]])
    T = 2.0
    want = math.tanh(_kl(_softmax([3.0, 0.0, -1.0], T), _softmax([0.0, 0.0, 0.0], T)))
    beta = nce.calibration_weight(nat, neg, mask, temperature=T)
    assert beta[0].item() == pytest.approx(want, rel=1e-5)
    assert beta[1].item() == 0.0  # a row with no counted token


def test_beta_is_float32_for_half_inputs_and_has_no_grad():
    nat = torch.randn(2, 4, 9, dtype=torch.bfloat16, requires_grad=True)
    neg = torch.randn(2, 4, 9, dtype=torch.bfloat16)
    beta = nce.calibration_weight(nat, neg, torch.ones(2, 4, dtype=torch.bool))
    assert beta.dtype == torch.float32 and not beta.requires_grad
    assert torch.all((beta >= 0) & (beta < 1))


# ----------------------------------------------------------------------------- KD / combined loss


def test_kd_loss_matches_hand_value_with_temperature():
    T = 2.0
    t_logits = [[1.0, 0.0, -1.0], [0.0, 3.0, 0.0]]
    s_logits = [[0.0, math.log(2.0), 0.0], [0.5, 0.0, -0.5]]
    w = 0.5 + 0.25
    want = T * T * w * sum(_sce(_softmax(t, T), _log_softmax(s, T)) for t, s in zip(t_logits, s_logits)) / 2
    p = nce.teacher_probs(torch.tensor([t_logits]), T)
    got = nce.kd_loss(p, torch.tensor([s_logits]), torch.ones(1, 2, dtype=torch.bool),
                      seq_weight=torch.tensor([0.25]) + 0.5, temperature=T)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_nce_loss_combined_hand_value():
    """Two sequences, different betas, a masked position, lam = 0.3, T = 1."""
    lam, c = 0.3, 0.5
    s = [[[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [9.0, 9.0, 9.0]],
         [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, -1.0, 1.0]]]
    t = [[[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
         [[0.0, 0.0, 4.0], [1.0, 2.0, 3.0], [2.0, 0.0, 0.0]]]
    labels = [[2, 0, -100], [1, 2, 0]]
    beta = [0.2, 0.7]
    ce_terms, kd_terms = [], []
    for b in range(2):
        for i in range(3):
            if labels[b][i] == -100:
                continue
            ls = _log_softmax(s[b][i])
            ce_terms.append(-ls[labels[b][i]])
            kd_terms.append((c + beta[b]) * _sce(_softmax(t[b][i]), ls))
    ce = sum(ce_terms) / 5
    kd = sum(kd_terms) / 5
    want = (1 - lam) * ce + lam * kd

    S = torch.tensor(s, requires_grad=True)
    loss, parts = nce.nce_loss(S, torch.tensor(labels), nce.teacher_probs(torch.tensor(t)),
                               torch.tensor(beta), kd_weight=lam, beta_offset=c)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert parts["n_tokens"].item() == 5
    loss.backward()
    # the masked position gets no gradient at all
    assert torch.all(S.grad[0, 2] == 0)
    assert S.grad[0, :2].abs().sum() > 0


def test_nce_loss_ignores_values_at_masked_positions():
    torch.manual_seed(2)
    S = torch.randn(2, 4, 7)
    Tz = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, -100, -100], [-100, 3, 4, 5]])
    beta = torch.tensor([0.1, 0.4])
    a, _ = nce.nce_loss(S, labels, nce.teacher_probs(Tz), beta)
    S2, T2 = S.clone(), Tz.clone()
    S2[labels == -100] = torch.randn(3, 7) * 100
    T2[labels == -100] = float("nan")  # even garbage teacher values are never read
    b, _ = nce.nce_loss(S2, labels, nce.teacher_probs(T2), beta)
    assert torch.isfinite(b) and b.item() == pytest.approx(a.item(), rel=1e-6)


def test_all_masked_batch_is_zero_and_backpropagates():
    S = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), -100)
    loss, parts = nce.nce_loss(S, labels, nce.teacher_probs(torch.randn(2, 3, 5)), torch.zeros(2))
    assert loss.item() == 0.0 and parts["n_tokens"].item() == 0
    loss.backward()
    assert S.grad is not None and torch.all(S.grad == 0)
    kd = nce.kd_loss(nce.teacher_probs(torch.randn(2, 3, 5)), S, labels != -100)
    assert kd.item() == 0.0


def test_no_calibration_is_plain_kd_and_lam_zero_is_ce():
    torch.manual_seed(3)
    S = torch.randn(1, 4, 6)
    labels = torch.tensor([[0, 1, 2, 3]])
    p = nce.teacher_probs(torch.randn(1, 4, 6))
    # beta = 0 and offset 1 -> plain KD weight 1: equals the unweighted kd_loss
    _, parts = nce.nce_loss(S, labels, p, torch.zeros(1), beta_offset=1.0)
    assert parts["kd"].item() == pytest.approx(nce.kd_loss(p, S, labels != -100).item(), rel=1e-6)
    # lam = 0 -> the loss is the usual token-mean cross-entropy
    loss, _ = nce.nce_loss(S, labels, p, torch.ones(1) * 0.9, kd_weight=0.0)
    ref = torch.nn.functional.cross_entropy(S.view(-1, 6), labels.view(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # KD towards the student's own distribution at its minimum: soft CE = entropy
    own = nce.teacher_probs(S)
    ent = -(own * own.log()).sum(-1).mean()
    assert nce.kd_loss(own, S, labels != -100).item() == pytest.approx(ent.item(), rel=1e-5)


def test_half_precision_student_logits_computed_in_float32():
    S = (torch.randn(1, 3, 50) * 30).to(torch.bfloat16).requires_grad_()
    labels = torch.tensor([[1, 2, 3]])
    loss, _ = nce.nce_loss(S, labels, nce.teacher_probs(torch.randn(1, 3, 50)), torch.tensor([0.5]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert S.grad.dtype == torch.bfloat16


def test_shift_aligns_causal_lm_logits():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    lg, lb = nce.shift(logits, labels)
    assert lg.shape == (2, 3, 3) and lb.tolist() == [[-100, 5, 6], [7, 8, -100]]
    assert torch.equal(lg[0, 1], logits[0, 1])  # position 1 predicts token 2


def test_row_chunked_teacher_quantities_match_unchunked(monkeypatch):
    torch.manual_seed(4)
    a, b = torch.randn(3, 7, 13) * 3, torch.randn(3, 7, 13) * 3
    full_kl = (torch.softmax(a / 2, -1) * (torch.log_softmax(a / 2, -1) - torch.log_softmax(b / 2, -1))).sum(-1)
    full_p = torch.softmax(b / 2, -1)
    monkeypatch.setattr(nce, "CHUNK_ELEMS", 13 * 2)  # 2 rows per chunk, uneven split of 7
    assert torch.allclose(nce.token_kl(a, b, 2.0), full_kl, atol=1e-6)
    assert torch.allclose(nce.teacher_probs(b, 2.0), full_p, atol=1e-7)
    # shifted (non-contiguous) views work too, and 2-D / 1-D inputs
    assert torch.allclose(nce.token_kl(a[:, :-1], b[:, :-1], 2.0), full_kl[:, :-1], atol=1e-6)
    assert torch.allclose(nce.teacher_probs(b[0], 2.0), full_p[0], atol=1e-7)
    assert torch.allclose(nce.token_kl(a[0, 0], b[0, 0], 2.0), full_kl[0, 0], atol=1e-6)


def test_soft_cross_entropy_with_minus_inf_student_logprob():
    p = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    lp = torch.log_softmax(torch.tensor([[float("-inf"), 0.0, 1.0], [0.0, 1.0, 2.0]]), -1)
    got = nce.soft_cross_entropy(p, lp)
    want0 = -(0.5 * lp[0, 1] + 0.5 * lp[0, 2])
    assert torch.isfinite(got).all() and got[0].item() == pytest.approx(want0.item(), rel=1e-6)
    assert got[1].item() == pytest.approx(-(p[1] * lp[1]).sum().item(), rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_nce_loss_value_and_gradient_match_reference_formula(T):
    """The fused T = 1 path (one soft target) and the general path equal eq. (3) written out."""
    torch.manual_seed(5)
    S = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    labels[2, 4] = -100
    p = nce.teacher_probs(torch.randn(3, 5, 11), T)
    beta = torch.tensor([0.1, 0.6, 0.3])
    lam, c = 0.4, 0.5
    mask = labels != -100
    n = mask.sum()
    lp1 = torch.log_softmax(S, -1)
    lpT = torch.log_softmax(S / T, -1)
    ce_ref = -(lp1.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * mask).sum() / n
    kd_ref = T * T * (-(p * lpT).sum(-1) * (c + beta)[:, None] * mask).sum() / n
    ref = (1 - lam) * ce_ref + lam * kd_ref
    g_ref, = torch.autograd.grad(ref, S)

    p_in = p.clone()
    loss, parts = nce.nce_loss(S, labels, p_in, beta, kd_weight=lam, temperature=T, beta_offset=c)
    assert torch.equal(p_in, p)  # not consumed unless asked
    g, = torch.autograd.grad(loss, S)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert parts["ce"].item() == pytest.approx(ce_ref.item(), rel=1e-6)
    assert parts["kd"].item() == pytest.approx(kd_ref.item(), rel=1e-6)
    assert torch.allclose(g, g_ref, atol=1e-7)
    loss2, _ = nce.nce_loss(S, labels, p.clone(), beta, kd_weight=lam, temperature=T, beta_offset=c,
                            consume_teacher=True)
    assert loss2.item() == pytest.approx(ref.item(), rel=1e-6)
