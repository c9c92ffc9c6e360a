"""Voting over a question's candidate answers: self-consistency (SC) and adaptive SC (ASC).

Method spec §5: ``V(a) = sum of w(s) over the candidates whose answer is equivalent to a``;
the answer is ``argmax V``. Candidates are grouped by mathematical equivalence (the reference
code grouped raw strings, which under-counts agreeing answers), using ``negkd.grading`` only:
the cheap fast path first, math-verify only when the fast path cannot tell.

Rules: unparseable candidates (``pred is None``) never vote; each group is represented by its
first member's answer string; **a tie goes to the group whose first member came first** (the
first candidate is the greedy / first sample, so a tie goes to the answer the model gave first,
as ``collections.Counter.most_common`` does). This one rule is used everywhere a vote is
counted: ``negkd infer`` writes its ``votes`` with ``vote``, and ``negkd eval`` / ``negkd
compare`` score maj@N with ``winner`` on the same groups, so maj@N is always 0 or 1 per
question and equals the accuracy of infer's ``sc`` vote (no fractional credit for ties).
Everything here is pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from negkd.grading import equivalent, equivalent_symmetric, fast_equivalent, judge_many

Equiv = Callable[[str, str], bool]

# w(s) for a candidate whose rationale the ranker scored s in (0, 1); "1" is plain SC.
ASC_WEIGHTS: dict[str, Callable[[float], float]] = {
    "1": lambda s: 1.0,
    "1+2s": lambda s: 1.0 + 2.0 * s,
    "1+s": lambda s: 1.0 + s,
    "s": lambda s: s,
}
DEFAULT_ASC = "1+s"


def asc_weights(scores: Sequence[float], rule: str = DEFAULT_ASC) -> list[float]:
    """Vote weights for ranker scores under one of ``ASC_WEIGHTS``."""
    if rule not in ASC_WEIGHTS:
        raise ValueError(f"unknown ASC weighting {rule!r}; choose one of {', '.join(ASC_WEIGHTS)}")
    w = ASC_WEIGHTS[rule]
    return [w(float(s)) for s in scores]


def _key(p: str | None) -> str | None:
    if p is None:
        return None
    p = str(p).strip()
    return p or None


def group_answers(preds: Sequence[str | None], equiv: Equiv | None = None) -> list[list[int]]:
    """Candidate indices grouped into equivalence classes, in order of first occurrence.

    A new answer joins the first group whose representative (first member) it is equivalent to
    (``equivalent_symmetric`` by default: there is no gold to be asymmetric about).
    Unparseable candidates are left out.
    """
    equiv = equiv or equivalent_symmetric
    groups: list[list[int]] = []
    reps: list[str] = []
    seen: dict[str, int] = {}  # identical strings join without a comparison
    for i, p in enumerate(preds):
        k = _key(p)
        if k is None:
            continue
        g = seen.get(k)
        if g is None:
            g = next((j for j, rep in enumerate(reps) if equiv(k, rep)), None)
        if g is None:
            g = len(groups)
            groups.append([])
            reps.append(k)
        seen[k] = g
        groups[g].append(i)
    return groups


def tally(
    preds: Sequence[str | None], weights: Sequence[float] | None = None, equiv: Equiv | None = None
) -> list[tuple[str, float, list[int]]]:
    """``(representative answer, total weight, member indices)`` per group, first occurrence first."""
    if weights is not None and len(weights) != len(preds):
        raise ValueError(f"{len(weights)} weights for {len(preds)} candidates")
    w = [1.0] * len(preds) if weights is None else [float(x) for x in weights]
    return [(_key(preds[g[0]]), sum(w[i] for i in g), g) for g in group_answers(preds, equiv)]  # type: ignore[misc]


def winner(totals: Sequence[float]) -> int | None:
    """Index of the winning group given each group's total vote (groups in order of first
    occurrence): the first of the groups tied for the most votes (totals within 1e-12 count as
    tied, so float sums of ASC weights do not decide a tie by rounding); None when there is no
    group. The one tie rule of negkd: ``vote`` (infer's votes) and maj@N (eval, compare) use it."""
    if not totals:
        return None
    best = max(totals)
    return next(i for i, t in enumerate(totals) if math.isclose(t, best, rel_tol=1e-12, abs_tol=1e-12))


def vote(
    preds: Sequence[str | None], weights: Sequence[float] | None = None, equiv: Equiv | None = None
) -> str | None:
    """The winning answer (its group's first member), or None when no candidate is parseable.
    Ties go to the group that occurred first (``winner``)."""
    t = tally(preds, weights, equiv)
    i = winner([x[1] for x in t])
    return None if i is None else t[i][0]


def vote_accuracy(
    preds: Sequence[str | None],
    gold: str,
    weights: Sequence[float] | None = None,
    equiv: Equiv | None = None,
    correct: Callable[[str], bool] | None = None,
) -> float:
    """1.0 when the vote's winner (``vote``: ties to the first occurrence) is correct, else 0.0
    (also when no candidate is parseable)."""
    ans = vote(preds, weights, equiv)
    if ans is None:
        return 0.0
    correct = correct or (lambda a: equivalent(a, gold))
    return float(correct(ans))


class BatchEquiv:
    """A symmetric equivalence callable for grouping many questions' answers at once.

    Pairs the fast path settles are answered at once. In ``defer`` mode an undecided pair is
    answered False for now and remembered; ``resolve()`` then settles all of them through
    math-verify in worker processes, and the caller groups again (``group_all``)."""

    def __init__(self, workers: int | None = None):
        self.workers = workers
        self.cache: dict[tuple[str, str], bool] = {}
        self.missing: set[tuple[str, str]] = set()
        self.defer = True

    def __call__(self, a: str, b: str) -> bool:
        key = (a, b) if a <= b else (b, a)
        v = self.cache.get(key)
        if v is not None:
            return v
        v = fast_equivalent(a, b)
        if v is None:
            if self.defer:
                self.missing.add(key)
                return False
            v = equivalent_symmetric(a, b)
        self.cache[key] = v
        return v

    def resolve(self) -> int:
        todo = sorted(self.missing)
        self.missing.clear()
        for key, v in zip(todo, judge_many(todo, self.workers, symmetric=True)):
            self.cache[key] = v
        return len(todo)

    def settle(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Decide these pairs now (in batch), so later calls are answered from the cache."""
        for a, b in pairs:
            self(a, b)
        if self.missing:
            self.resolve()

    def group_all(self, pred_lists: Iterable[Sequence[str | None]], rounds: int = 5) -> list[list[list[int]]]:
        """``group_answers`` for every list, with undecided pairs settled in batches."""
        pred_lists = list(pred_lists)
        for _ in range(rounds):
            groups = [group_answers(p, self) for p in pred_lists]
            if not self.missing:
                return groups
            self.resolve()
        self.defer = False  # a last round settles any stragglers one by one
        try:
            return [group_answers(p, self) for p in pred_lists]
        finally:
            self.defer = True
