"""Answer extraction and equivalence: the one grader behind ``split``, ``eval`` and voting.

Method spec §1. A rationale's final answer is the content of its last ``\\boxed{}`` /
``\\fbox{}`` (boxes that directly precede it, joined only by "and", commas or spaces, make it a
list: "\\boxed{1} and \\boxed{2}" is "1, 2", as math-verify reads it; a rationale that boxes two
different answers hedges and is graded as the list); else a trailing "The answer is X" /
"Final Answer: X"; else a GSM8K ``#### X`` line. ``None`` means *unparseable* (a negative,
counted apart).

``equivalent(pred, gold)`` decides mathematical equivalence in two stages:

1. a fast path in pure Python that settles ~98% of the distinct pairs of real teacher data:
   Hendrycks-style string normalisation (``\\dfrac``, ``\\left``, units, ``^\\circ``, ``\\%``,
   ``x=``, thousands separators), then a small LaTeX evaluator read the way latex2sympy reads
   LaTeX (exact ``Fraction`` arithmetic; floats or complex once ``\\sqrt``, ``\\pi``, ``i`` or a
   function make a value inexact; expressions in variables compared at four fixed points),
   applied element-wise to lists, sets, tuples, intervals, unions, matrices and equations. It
   follows math-verify's conventions (a bare decimal is compared rounded to 6 places, comma
   lists are sets, ``(a,b)`` is not ``[a,b]``, an equation answer is read as its last side)
   so that the two stages agree;
2. what the fast path cannot settle goes to math-verify, ``verify(parse(gold), parse(pred))``
   (gold first: it is asymmetric), with bare answers wrapped in ``$...$``. Answers holding
   constructs its parser silently drops (``\\dots``, ``\\aleph``, base subscripts) or that it
   only reads a prefix of ("14 - 12ab" as "14 - 12") are never judged equal by it.

math-verify bounds its work with ``signal.alarm``, which only works on a process's main
thread, so batches are graded in worker *processes* (``grade_many``/``judge_many``), each
watched by a hard deadline: a worker stuck in C code (a huge integer power) is killed and
the pair counts as not equal. Inputs that could blow up (towers of exponents, huge
factorials, deep nesting, very long strings) never reach math-verify at all.
"""

from __future__ import annotations

__all__ = [
    "MAX_LEN", "MV_TIMEOUT", "HARD_TIMEOUT", "SMALL_BATCH", "Progress",
    "last_boxed", "extract_answer", "fast_equivalent", "mv_safe", "mv_equivalent",
    "equivalent", "equivalent_symmetric", "default_workers", "judge_many", "grade_many", "prestart",
]

import time
from collections.abc import Sequence

from negkd.grading.evaluator import _value  # noqa: F401  (re-exported)
from negkd.grading.extract import _final_boxes, _match_brace, extract_answer, last_boxed  # noqa: F401
from negkd.grading.fastpath import _structured, fast_equivalent  # noqa: F401
from negkd.grading.mathverify import (  # noqa: F401
    MAX_LEN,
    MV_TIMEOUT,
    _mv_admissible,
    _mv_parse,
    _quiet_math_verify,
    mv_equivalent,
    mv_safe,
)
from negkd.grading.normalise import _clean  # noqa: F401
from negkd.grading.pool import (  # noqa: F401
    HARD_TIMEOUT,
    SMALL_BATCH,
    Progress,
    _context,
    _main_thread,
    _pool,
    _worker,
    default_workers,
    prestart,
)


def equivalent(pred: str | None, gold: str | None) -> bool:
    """Is ``pred`` mathematically equivalent to ``gold``? Fast path, then math-verify (gold first).

    ``None`` or empty answers are never equivalent. Off the main thread the math-verify stage
    runs in a worker process (its timeouts need the main thread).
    """
    v = fast_equivalent(pred, gold)
    if v is not None:
        return v
    if _main_thread():
        return mv_equivalent(pred, gold)  # type: ignore[arg-type]
    return _pool([(pred, gold)], workers=1)[0]  # type: ignore[list-item]


def equivalent_symmetric(a: str | None, b: str | None) -> bool:
    """Equivalence for grouping votes (no gold): either direction suffices."""
    v = fast_equivalent(a, b)
    if v is not None:
        return v
    if _main_thread():
        return mv_equivalent(a, b) or mv_equivalent(b, a)  # type: ignore[arg-type]
    return any(_pool([(a, b), (b, a)], workers=1))  # type: ignore[list-item]


def judge_many(
    pairs: Sequence[tuple[str | None, str | None]],
    workers: int | None = None,
    progress: Progress | None = None,
    symmetric: bool = False,
    stats: dict | None = None,
) -> list[bool]:
    """``equivalent(pred, gold)`` for many ``(pred, gold)`` pairs.

    Identical pairs are judged once; pairs the fast path cannot settle go through math-verify
    in ``workers`` processes (default: all cores). ``symmetric=True`` gives
    ``equivalent_symmetric`` instead. ``progress(done, total)`` follows the math-verify stage;
    ``stats`` (a dict) receives the counts and seconds per stage. The workers' forkserver starts
    at the first pair the fast path cannot settle, so math-verify loads while the fast path runs."""
    t0 = time.perf_counter()
    verdict: dict[tuple, bool] = {}
    slow: list[tuple[str, str]] = []
    unique = dict.fromkeys(pairs)
    guarded = 0
    for key in unique:
        v = fast_equivalent(*key)
        if v is None and not all(_mv_admissible(x) for x in key):
            v, guarded = False, guarded + 1  # math-verify would misread or choke on it
        if v is None:
            if not slow:
                prestart()
            slow.append(key)  # type: ignore[arg-type]
        else:
            verdict[key] = v
    jobs = slow + [(g, p) for p, g in slow] if symmetric else slow
    if stats is not None:
        stats.update(pairs=len(pairs), unique=len(unique), fast_path=len(unique) - len(slow) - guarded,
                     guarded=guarded,
                     math_verify=len(jobs), workers=min(workers or default_workers(), max(1, len(jobs))))
    if progress is not None:
        progress(0, len(jobs))
    t1 = time.perf_counter()
    if jobs:
        res = _pool(jobs, workers, progress, stats=stats)
        for i, key in enumerate(slow):
            verdict[key] = res[i] or (symmetric and res[i + len(slow)])
    if stats is not None:
        stats.update(fast_path_s=round(t1 - t0, 3), math_verify_s=round(time.perf_counter() - t1, 3))
    return [verdict[k] for k in pairs]


def grade_many(
    pairs: Sequence[tuple[str, str]],
    workers: int | None = None,
    progress: Progress | None = None,
    stats: dict | None = None,
) -> list[tuple[str | None, bool]]:
    """Grade ``(rationale, gold)`` pairs: ``(extracted answer or None, correct)`` for each.

    Small batches run in-process; large ones use worker processes for the math-verify stage
    (the whole 60,000-rationale TDG file takes well under a minute on 2 cores)."""
    t0 = time.perf_counter()
    preds = [extract_answer(r) for r, _ in pairs]
    t1 = time.perf_counter()
    oks = judge_many([(p, g) for p, (_, g) in zip(preds, pairs)], workers, progress, stats=stats)
    if stats is not None:
        stats["extract_s"] = round(t1 - t0, 3)
    return list(zip(preds, oks))
