"""Statistics of the worlds study that `negkd compare` does not cover: the difference-in-differences
across the two worlds, with a hierarchical bootstrap (seeds, then problems), plus Holm and the
chance-corrected overlap used in its tables. numpy only; pure functions.

Data layout: one 0/1 matrix per (world, method), shape (seeds, problems), rows = experiment seeds in
the same order in every matrix, columns = the same test problems in the same order (the worlds
share their test split, and seed s of each world uses teacher/training seed s).

- :func:`hier_bootstrap`: any statistic of such matrices; each replicate draws seeds with replacement,
  then problems with replacement (one draw of problems for every drawn seed and matrix: problems are
  crossed with seeds and worlds, not nested in them). Returns the point estimate, a 95% percentile CI
  and a two-sided bootstrap p-value (twice the smaller tail mass at 0).
- :func:`diff` / :func:`did`: the statistics (accuracy points of A − B; (A − B in world 1) − (A − B in
  world 2)).
- :func:`holm`: Holm's step-down adjustment of a family of p-values.
- :func:`kappa`, :func:`shared_ratio`, :func:`p_b_given_not_a`: solved-set overlap made comparable
  across accuracy levels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def diff(a: np.ndarray, b: np.ndarray) -> float:
    """Accuracy of A minus accuracy of B in points; a, b: (seeds, problems) of 0/1."""
    return 100.0 * (float(np.mean(a)) - float(np.mean(b)))


def did(a1: np.ndarray, b1: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> float:
    """(A − B in world 1) − (A − B in world 2), in points; all (seeds, problems)."""
    return diff(a1, b1) - diff(a2, b2)


def hier_bootstrap(stat: Callable[..., float], mats: Sequence[np.ndarray], reps: int = 2000, seed: int = 0,
                   resample_seeds: bool = True) -> dict:
    """Point estimate, 95% percentile CI and two-sided p of ``stat(*mats)``.

    mats: (seeds, problems) matrices with the same shape. Each replicate draws S seed rows with
    replacement (unless ``resample_seeds`` is False, or there is one seed), then P problem columns with
    replacement, the same draw for every matrix. p = min(1, 2 * min(P*(t <= 0), P*(t >= 0))).
    """
    mats = [np.asarray(m, dtype=float) for m in mats]
    shape = mats[0].shape
    if any(m.shape != shape for m in mats) or len(shape) != 2:
        raise ValueError(f"every matrix must have the same (seeds, problems) shape; got {[m.shape for m in mats]}")
    S, P = shape
    rng = np.random.default_rng(seed)
    point = float(stat(*mats))
    boots = np.empty(reps)
    for r in range(reps):
        si = rng.integers(0, S, S) if (resample_seeds and S > 1) else np.arange(S)
        pi = rng.integers(0, P, P)
        boots[r] = stat(*[m[np.ix_(si, pi)] for m in mats])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    p = min(1.0, 2.0 * min(float(np.mean(boots <= 0)), float(np.mean(boots >= 0))))
    return {"estimate": point, "ci": [float(lo), float(hi)], "p": p, "reps": reps, "seeds": S, "problems": P}


def holm(pvals: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order (monotone, capped at 1)."""
    m = len(pvals)
    order = sorted(range(m), key=lambda i: pvals[i])
    adj = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvals[i]))
        adj[i] = running
    return adj


def kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two solved/unsolved vectors over the same problems (nan if chance agreement is 1)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    po = float(np.mean(a == b))
    pa, pb = float(a.mean()), float(b.mean())
    pe = pa * pb + (1 - pa) * (1 - pb)
    return float("nan") if pe == 1 else (po - pe) / (1 - pe)


def shared_ratio(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Observed / expected problems solved by both (expected under independence: n * pa * pb)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    exp = len(a) * a.mean() * b.mean()
    return float("nan") if exp == 0 else float((a & b).sum() / exp)


def p_b_given_not_a(a: Sequence[bool], b: Sequence[bool]) -> float:
    """P(B solves | A fails), e.g. P(neg-only solves | CoT-KD fails)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = int((~a).sum())
    return float("nan") if n == 0 else float((b & ~a).sum() / n)
