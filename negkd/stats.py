"""Statistics for comparing students: pure numpy functions, no I/O.

Data layout everywhere: one method's scores on one metric are an array ``(S, P)`` of per-problem
values in [0, 1] for S seeds (independent runs: training or sampling seeds) and P problems, or
``(S, P, M)`` for M metrics at once. Two methods are compared on the *same* P problems (paired by
problem); when both have the same number of seeds the seeds are paired by index too.

- ``hierarchical_bootstrap``: CI of ``mean(x) - mean(y)``, resampling seeds, then problems.
- ``sign_flip_test``: paired permutation test on per-problem differences (seed-averaged).
- ``holm``: Holm-Bonferroni step-down adjustment of a family of p-values.
- ``overlap`` / ``cohen_kappa``: how two methods' solved sets overlap, beyond chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import numpy as np

# elements of one (replicates x problems x metrics) block; bounds memory at ~400 MB of float64
_BLOCK = 50_000_000


def mean_std(per_seed: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and sample std (ddof=1) over axis 0 of per-seed values ``(S, ...)``; std None when S = 1."""
    per_seed = np.asarray(per_seed, dtype=np.float64)
    m = per_seed.mean(axis=0)
    return m, (per_seed.std(axis=0, ddof=1) if per_seed.shape[0] > 1 else None)


def _as3(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"expected (S, P) or (S, P, M) scores, got shape {x.shape}")
    return x


def _counts(rng: np.random.Generator, n_rep: int, n: int) -> np.ndarray:
    """``(n_rep, n)`` multiplicities of a bootstrap resample of n items (each row sums to n)."""
    idx = rng.integers(0, n, size=(n_rep, n)) + (np.arange(n_rep) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=n_rep * n).reshape(n_rep, n).astype(np.float64)


def hierarchical_bootstrap(x: np.ndarray, y: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                           paired_seeds: bool | None = None, level: float = 0.95) -> dict:
    """Percentile bootstrap CI of ``mean(x) - mean(y)`` with seeds, then problems, resampled.

    x: ``(Sx, P[, M])``, y: ``(Sy, P[, M])`` per-problem scores. One replicate draws Sx seeds of x
    with replacement (and, when ``paired_seeds`` -- default: Sx == Sy -- the *same* seed indices
    of y, else Sy seeds of y independently), averages each problem over the drawn seeds, then
    draws P problems with replacement (the same problems for x and y: paired by problem) and
    takes the mean difference. With one seed this is the ordinary paired bootstrap over problems.

    Returns ``diff`` (M,) observed, ``lo``/``hi`` (M,) the ``level`` percentile interval and
    ``boot`` (n_boot, M) the replicates. Deterministic for a given ``seed``.
    """
    x, y = _as3(x), _as3(y)
    (sx, p, m), sy = x.shape, y.shape[0]  # x[s]: (P, M)
    if y.shape[1:] != (p, m):
        raise ValueError(f"x {x.shape} and y {y.shape} must hold the same problems and metrics")
    paired = (sx == sy) if paired_seeds is None else paired_seeds
    if paired and sx != sy:
        raise ValueError(f"seeds paired by index need equal seed counts, got {sx} and {sy}")
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, m))
    chunk = max(1, min(n_boot, _BLOCK // max(1, p)))
    for start in range(0, n_boot, chunk):
        r = min(chunk, n_boot - start)
        wx = _counts(rng, r, sx) / sx  # (r, Sx) seed weights
        wy = wx if paired else _counts(rng, r, sy) / sy  # (r, Sy)
        c = _counts(rng, r, p) / p  # (r, P) problem weights
        # mean over drawn seeds and problems = sum_s w[s] * (c @ x[s]): S matmuls, no (r, P, M) temporary
        stat = sum(wx[:, s, None] * (c @ x[s]) for s in range(sx))  # (r, M)
        stat = stat - sum(wy[:, s, None] * (c @ y[s]) for s in range(sy))
        boot[start:start + r] = stat
    diff = x.mean(axis=(0, 1)) - y.mean(axis=(0, 1))
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [a, 1.0 - a], axis=0)
    return {"diff": diff, "lo": lo, "hi": hi, "boot": boot}


def sign_flip_test(d: np.ndarray, n_perm: int = 10_000, seed: int = 0, exact_max: int = 16) -> np.ndarray:
    """Two-sided paired permutation (sign-flip) test of ``mean(d) = 0``.

    d: ``(P[, M])`` per-problem differences (each problem's score under one method minus the
    other, averaged over seeds). Under the null the two methods are exchangeable on each
    problem, so each difference's sign is a coin flip. The statistic is ``|sum(d)|``; problems
    with d = 0 do not change it and are left out. With k <= ``exact_max`` nonzero differences
    all 2^k sign patterns are enumerated (exact p); otherwise ``n_perm`` random flips give
    ``p = (1 + #{|T*| >= |T|}) / (1 + n_perm)``. No nonzero difference gives p = 1.
    Returns p-values ``(M,)`` (a float array even for 1-D input).
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    rng = np.random.default_rng(seed)
    out = np.ones(d.shape[1])
    mc = []  # metrics left to the Monte Carlo test
    for j in range(d.shape[1]):
        nz = d[:, j][np.abs(d[:, j]) > 1e-12]
        if nz.size == 0:
            continue
        if nz.size > exact_max:
            mc.append(j)
            continue
        signs = np.array(list(product((1.0, -1.0), repeat=nz.size)))  # (2^k, k)
        out[j] = float(np.mean(np.abs(signs @ nz) >= _threshold(nz)))
    if mc:
        dm = np.where(np.abs(d[:, mc]) > 1e-12, d[:, mc], 0.0)  # (P, M'); zero rows flip to zero
        t = np.array([_threshold(dm[:, i]) for i in range(len(mc))])
        hits = np.zeros(len(mc))
        chunk = max(1, min(n_perm, _BLOCK // max(1, d.shape[0])))
        for start in range(0, n_perm, chunk):
            r = min(chunk, n_perm - start)
            signs = rng.integers(0, 2, size=(r, d.shape[0]), dtype=np.int8).astype(np.float64) * 2.0 - 1.0
            hits += np.sum(np.abs(signs @ dm) >= t, axis=0)  # (r, M') -> (M',)
        out[mc] = (1 + hits) / (1 + n_perm)
    return out


def _threshold(d: np.ndarray) -> float:
    """|sum(d)| less a rounding tolerance, so a resample equal to the observed statistic counts."""
    return abs(float(d.sum())) - 1e-9 * max(1.0, float(np.abs(d).sum()))


def holm(pvals: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in the input order; None entries are not in the family.

    Sorted ascending p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    """
    idx = [i for i, p in enumerate(pvals) if p is not None and not np.isnan(p)]
    m = len(idx)
    out: list[float | None] = [None] * len(pvals)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvals[i])):
        running = max(running, min(1.0, (m - rank) * float(pvals[i])))
        out[i] = running
    return out


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's kappa of two boolean vectors ``(P,)``: (p_o - p_e) / (1 - p_e), with p_o the share of
    problems both solved or both missed and p_e = pA pB + (1 - pA)(1 - pB) its value under
    independence. None when p_e = 1 (one method solved all or none and so did the other)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    pa, pb = a.mean(), b.mean()
    po = np.mean(a == b)
    pe = pa * pb + (1 - pa) * (1 - pb)
    if np.isclose(pe, 1.0):
        return None
    return float((po - pe) / (1 - pe))


def overlap(a: np.ndarray, b: np.ndarray) -> dict:
    """Solved-set overlap of two boolean vectors ``(P,)`` (solved by method A / by B).

    shared / only_a / only_b / neither are counts; expected_shared = P pA pB is the shared count
    if the two methods solved problems independently at their own accuracies, so
    observed_over_expected > 1 means they solve the same problems more often than chance
    (comparable across accuracy levels, unlike the raw shared count); kappa is Cohen's kappa.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = a.size
    shared = int(np.sum(a & b))
    exp = float(n * a.mean() * b.mean()) if n else 0.0
    return {"n": n, "shared": shared, "only_a": int(np.sum(a & ~b)), "only_b": int(np.sum(~a & b)),
            "neither": int(np.sum(~a & ~b)), "kappa": cohen_kappa(a, b) if n else None,
            "expected_shared": exp, "observed_over_expected": shared / exp if exp > 0 else None}
