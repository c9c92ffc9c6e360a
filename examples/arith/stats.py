"""Statistics for the arithmetic reproduction (pure Python, no scipy).

- :func:`mean_std`: mean and sample standard deviation (ddof=1; 0 for one value).
- :func:`mcnemar_exact`: two-sided exact McNemar test on paired per-problem outcomes (binomial
  test on the discordant pairs), for one seed.
- :func:`paired_bootstrap`: a percentile CI for the accuracy difference, resampling problems with
  replacement (one draw of problems for all seeds: they share the test problems).
- :func:`problem_sign_test`: exact sign test with the problem as the unit (McNemar for one seed).
- :func:`paired_t`: paired t-test over per-seed accuracies (needs >= 2 seeds).
- :func:`overlap`: Table-1 analysis — problems solved by A, by B, by both, and their IoU.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """(#a right & b wrong, #a wrong & b right, two-sided exact p)."""
    if len(a) != len(b):
        raise ValueError("paired outcomes must have equal length")
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n01 = sum(1 for x, y in zip(a, b) if y and not x)
    n = n10 + n01
    if n == 0:
        return n10, n01, 1.0
    k = min(n10, n01)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return n10, n01, min(1.0, 2 * tail)


def _aligned(groups) -> bool:
    """Every group (seed) scores the same problems in the same order."""
    return len({len(a) for a, _ in groups}) == 1


def paired_bootstrap(groups: Sequence[tuple[Sequence[bool], Sequence[bool]]], reps: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Accuracy difference (a - b, in points) pooled over groups (one per seed), with a 95% percentile
    CI. The seeds share their test problems, so problems are the unit resampled: one draw of problem
    indices serves every seed (a cluster bootstrap). Groups of different problems fall back to
    resampling within each group."""
    rng = random.Random(seed)
    diffs = [[int(x) - int(y) for x, y in zip(a, b)] for a, b in groups]
    total = sum(len(d) for d in diffs)
    if total == 0:
        return float("nan"), float("nan"), float("nan")
    point = 100 * sum(sum(d) for d in diffs) / total
    stats = []
    if _aligned(groups):
        per_problem = [sum(col) for col in zip(*diffs)]  # (problems,) summed over seeds
        n = len(per_problem)
        for _ in range(reps):
            stats.append(100 * sum(per_problem[rng.randrange(n)] for _ in range(n)) / total)
    else:
        for _ in range(reps):
            s = 0
            for d in diffs:
                n = len(d)
                s += sum(d[rng.randrange(n)] for _ in range(n))
            stats.append(100 * s / total)
    stats.sort()
    return point, stats[int(0.025 * reps)], stats[min(reps - 1, int(0.975 * reps))]


def problem_sign_test(groups: Sequence[tuple[Sequence[bool], Sequence[bool]]]) -> tuple[int, int, float]:
    """Exact two-sided sign test with the problem as the unit: per problem, the number of seeds A got
    right minus the number B got right; (#problems favouring A, #favouring B, p). With one seed it is
    exactly McNemar's test. Unlike McNemar on (seed, problem) pairs pooled over seeds, it does not count
    one problem's shared difficulty as independent evidence once per seed."""
    if not _aligned(groups):
        a = [x for g in groups for x in g[0]]
        b = [x for g in groups for x in g[1]]
        return mcnemar_exact(a, b)
    per_problem = [sum(int(x) - int(y) for x, y in zip(col_a, col_b))
                   for col_a, col_b in zip(zip(*[g[0] for g in groups]), zip(*[g[1] for g in groups]))]
    return mcnemar_exact([d > 0 for d in per_problem], [d < 0 for d in per_problem])


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the regularized incomplete beta (Numerical Recipes 6.4)."""
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1 + aa / c if abs(1 + aa / c) > 1e-300 else 1e-300
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1 + aa / c if abs(1 + aa / c) > 1e-300 else 1e-300
        de = d * c
        h *= de
        if abs(de - 1) < 1e-12:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1 - math.exp(lbeta) * _betacf(b, a, 1 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    return betainc(df / 2, 0.5, df / (df + t * t))


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """(t, two-sided p) of the paired t-test on a - b; None with fewer than 2 pairs."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return None
    m, s = mean_std(d)
    if s == 0:
        return (math.inf if m else 0.0), (0.0 if m else 1.0)
    t = m / (s / math.sqrt(n))
    return t, t_two_sided_p(t, n - 1)


def overlap(a: set, b: set) -> dict:
    both = a & b
    union = a | b
    return {"a": len(a), "b": len(b), "both": len(both), "iou": len(both) / len(union) if union else float("nan")}
