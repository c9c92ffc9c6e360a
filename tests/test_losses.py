"""negkd.losses: masked NLL against a loop reference; all-masked batches; float32 math."""

import math

import pytest
import torch

from negkd.losses import IGNORE_INDEX, masked_nll, n_targets, sequence_nll, token_nll


def _reference(logits, labels):
    """Per-row lists of -log p(label[t+1] | logits[t]) over labelled positions, by explicit loops."""
    rows = []
    for b in range(logits.shape[0]):
        row = []
        for t in range(logits.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            z = logits[b, t].double()
            row.append(float(torch.logsumexp(z, 0) - z[y]))
        rows.append(row)
    return rows


def _batch(seed=0, B=3, L=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * 3
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX  # a row with no targets at all
    return logits, labels


def test_masked_nll_matches_loop_reference():
    logits, labels = _batch()
    ref = _reference(logits, labels)
    flat = [x for r in ref for x in r]
    assert math.isclose(float(masked_nll(logits, labels)), sum(flat) / len(flat), rel_tol=1e-5)
    assert int(n_targets(labels)) == len(flat)
    per_seq = sequence_nll(logits, labels)
    for b, r in enumerate(ref):
        expect = sum(r) / len(r) if r else 0.0
        assert math.isclose(float(per_seq[b]), expect, rel_tol=1e-5, abs_tol=1e-7)
    tok = token_nll(logits, labels)
    assert tok.shape == (3, 6)
    assert float(tok[2].abs().sum()) == 0.0  # masked positions contribute exactly 0


def test_all_masked_batch_is_zero_with_zero_grad():
    logits = torch.randn(2, 5, 9, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss = masked_nll(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) == 0.0


def test_low_precision_logits_computed_in_float32():
    logits, labels = _batch(1)
    lo = masked_nll(logits.to(torch.bfloat16), labels)
    assert lo.dtype == torch.float32
    # same as the float32 result on the bf16-rounded logits, i.e. no bf16 log-softmax
    ref = masked_nll(logits.to(torch.bfloat16).float(), labels)
    assert float(lo) == float(ref)


# --------------------------------------------------------------------------- NT / UL (method.md §6)

from negkd.losses import negative_nll, nt_loss, token_unlikelihood, ul_loss, unlikelihood  # noqa: E402

LN2, LN3 = math.log(2), math.log(3)


def _hand():
    """One row, V = 3, both positions softmax (1/4, 1/4, 1/2); labels pick p = 1/2 then p = 1/4."""
    logits = torch.tensor([[[0.0, 0.0, LN2], [0.0, 0.0, LN2], [5.0, -1.0, 2.0]]])  # (1, 3, 3)
    labels = torch.tensor([[IGNORE_INDEX, 2, 0]])  # predicted from positions 0 and 1
    return logits, labels


def test_nt_and_ul_terms_against_hand_computed_values():
    logits, labels = _hand()
    # token NLLs: ln 2 and ln 4; NT caps each at ln V = ln 3
    assert math.isclose(float(masked_nll(logits, labels)), (LN2 + 2 * LN2) / 2, rel_tol=1e-6)
    assert math.isclose(float(negative_nll(logits, labels)), (LN2 + LN3) / 2, rel_tol=1e-6)
    assert math.isclose(float(negative_nll(logits, labels, cap=10.0)), (LN2 + 2 * LN2) / 2, rel_tol=1e-6)
    # unlikelihood: -log(1 - 1/2) = ln 2 and -log(1 - 1/4) = ln(4/3)
    tul = token_unlikelihood(logits, labels)
    assert tul.shape == (1, 2)
    torch.testing.assert_close(tul, torch.tensor([[LN2, math.log(4 / 3)]]))
    assert math.isclose(float(unlikelihood(logits, labels)), (LN2 + math.log(4 / 3)) / 2, rel_tol=1e-6)
    pos_labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX]])  # NLL(pos) = ln 2
    assert math.isclose(float(nt_loss(logits, pos_labels, logits, labels, weight=0.05)),
                        LN2 - 0.05 * (LN2 + LN3) / 2, rel_tol=1e-6)
    assert math.isclose(float(ul_loss(logits, pos_labels, logits, labels, weight=0.05)),
                        LN2 + 0.05 * (LN2 + math.log(4 / 3)) / 2, rel_tol=1e-6)


def test_unlikelihood_matches_a_float64_loop_reference():
    logits, labels = _batch(3)
    got = token_unlikelihood(logits, labels)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            y = int(labels[b, t + 1])
            want = 0.0 if y == IGNORE_INDEX else -math.log1p(-float(torch.softmax(logits[b, t].double(), 0)[y]))
            assert math.isclose(float(got[b, t]), want, rel_tol=1e-4, abs_tol=1e-6), (b, t)


def test_nt_ul_all_masked_give_zero_with_zero_grad():
    for fn in (negative_nll, unlikelihood, lambda z, y: nt_loss(z, y, z, y), lambda z, y: ul_loss(z, y, z, y)):
        logits = torch.randn(2, 5, 9, requires_grad=True)
        loss = fn(logits, torch.full((2, 5), IGNORE_INDEX))
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_logit", [1e4, 60.0, -60.0, -1e4])
def test_nt_ul_finite_values_and_grads_at_extreme_probabilities(dtype, target_logit):
    """p(y) -> 1 (UL's hard case: 1 - p underflows to 0 in float32) and p(y) -> 0 (NT's)."""
    V = 7
    logits = torch.zeros(2, 4, V)
    labels = torch.full((2, 4), 3)
    labels[:, 0] = IGNORE_INDEX
    logits[..., 3] = target_logit
    logits = logits.to(dtype).requires_grad_(True)
    for fn in (negative_nll, unlikelihood, lambda z, y: nt_loss(z, y, z, y, weight=0.5),
               lambda z, y: ul_loss(z, y, z, y, weight=0.5)):
        logits.grad = None
        loss = fn(logits, labels)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(logits.grad.float()).all()
    ul = float(unlikelihood(logits.detach(), labels))
    z_y = float(logits.detach()[0, 0, 3])  # as rounded to dtype
    if target_logit > 0:  # -log(1 - p) = log(1 + e^{z_y} / (V-1)) ~ z_y - ln(V-1)
        assert math.isclose(ul, z_y - math.log(V - 1), rel_tol=1e-3)
    else:
        assert 0.0 <= ul < 1e-20
    assert float(negative_nll(logits.detach(), labels)) <= math.log(V) + 1e-6


def test_nt_guard_keeps_the_loss_bounded_when_negatives_are_driven_to_p0():
    """Minimise NT over free logits: with the cap the negative term saturates at w ln V (p(y) < 1/V
    stops pushing, the loss stays >= NLL(pos) - w ln V); without it the loss runs off to -infinity."""
    V, w = 11, 0.5
    pos_labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    neg_labels = torch.tensor([[IGNORE_INDEX, 4, 5]])

    def run(cap):
        z = torch.zeros(1, 3, V, requires_grad=True)
        opt = torch.optim.SGD([z], lr=50.0)
        for _ in range(200):
            opt.zero_grad()
            loss = masked_nll(z, pos_labels) - w * negative_nll(z, neg_labels, cap)
            loss.backward()
            opt.step()
        return float(loss.detach()), z.detach()

    capped, z = run(None)
    assert math.isfinite(capped) and capped >= -w * math.log(V) - 1e-6
    p_neg = torch.softmax(z[0, :2], -1)[torch.arange(2), torch.tensor([4, 5])]
    assert (p_neg < 1 / V).all()  # the negatives were pushed below uniform, then left alone
    uncapped, _ = run(float("inf"))
    assert uncapped < -w * math.log(V) - 50  # what the guard prevents
