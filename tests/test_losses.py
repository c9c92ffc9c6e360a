"""negkd.losses: masked NLL against a loop reference; all-masked batches; float32 math."""

import math

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
