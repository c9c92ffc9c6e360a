"""Answer extraction and equivalence (negkd.grading): the single grader of split, eval and voting."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from negkd import grading
from negkd.grading import equivalent, equivalent_symmetric, extract_answer, grade_many, judge_many, last_boxed

# (pred, gold, equivalent?) -- pred first, gold second, as equivalent() takes them
EQUIV_CASES = [
    # LaTeX fractions, roots, constants
    ("\\frac{1}{2}", "\\frac12", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\tfrac34", "0.75", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("\\frac{1}{3}", "0.333", False),
    ("0.333333", "\\frac{1}{3}", True),  # math-verify's convention: a bare decimal, rounded to 6 places
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\sqrt{5}", "\\sqrt{6}", False),
    ("\\frac{4\\sqrt{35}}{15}", "\\frac{4\\sqrt{35}}{35}", False),
    ("2\\pi", "\\pi \\cdot 2", True),
    ("3.14", "\\pi", False),
    ("2^{10}", "1024", True),
    ("2^{2005}-1", "2^{2005}", False),  # exact integers: no float collapse
    ("10!", "3628800", True),
    ("\\binom{5}{2}", "10", True),
    ("\\sqrt[3]{8}", "2", True),
    ("-\\frac{3}{10}", "-0.3", True),
    ("\\frac{1998^2}{1997^2}", "\\frac{3992004}{3988009}", True),
    ("-\\frac{5}{3}", "-\\frac{5}{3}.", True),  # a gold answer with a stray period
    # plain numbers, GSM8K forms, money, thousands separators
    ("1,000", "1000", True),
    ("20,000,000", "20,\\!000,\\!000", True),
    ("9{,}996", "9996", True),
    ("1000.0", "1000", True),
    ("\\$5.00", "5", True),
    ("$18", "18", True),
    ("72.00", "72", True),
    ("5", "-5", False),
    ("007", "7", True),
    ("3 \\times 10^5", "300,\\!000", True),
    # percent, degrees, units
    ("25\\%", "25", True),
    ("0.25", "25\\%", True),
    ("30\\%", "0.25", False),
    ("30^\\circ", "30", True),
    ("90^{\\circ}", "90", True),
    ("5\\text{ cm}", "5", True),
    ("12 \\text{ inches}^2", "12", True),
    ("3\\text{ km/hr}", "3", True),
    ("2400", "2400 \\mbox{ cm}^2", True),
    ("5 apples", "5", True),
    ("\\frac{1}{3} \\textbf{meters}", "1/3", True),
    ("918.5", "918\\frac{1}{2}", True),  # a mixed number
    ("-2\\frac{1}{4}", "-\\frac{9}{4}", True),
    ("6 \\text{ or } 10", "6", False),  # the classic rule strips "\text{ " and calls this right
    # assignments and equations
    ("x=5", "5", True),
    ("5", "x = 5", True),
    ("y = 2x + 3", "2x+3", True),
    ("y = \\frac{3}{2}", "x = \\frac{3}{2}", False),  # a directrix x = 3/2 is not y = 3/2
    ("(b,c)=(-10,21)", "(-10,21)", True),
    ("f(x) = 0", "3^x - 2^x", False),
    ("102 - 52 = 50", "100", False),  # math-verify reads an equation answer as its last side
    ("10", "2x - y + 3z + 8 = 0", False),
    ("2x - y + 3z - 4 = 0", "2x - y + 3z + 8 = 0", False),
    ("y = 2x + 3", "-2x + y - 3 = 0", True),
    # lists and sets (order-free), tuples and intervals (ordered, brackets matter)
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("2, 1", "1,2", True),
    ("1, 2, 3", "1, 2", False),
    ("0,\\frac{1}{2},-5", "-5, 0, \\frac12", True),
    ("81,256", "81, 256", True),  # against a list, 81,256 is the list
    ("(1,2)", "(2,1)", False),
    ("(1, -2)", "\\left(1,-2\\right)", True),
    ("(27,31)", "-4", False),
    ("(2,-18);(4,14)", "(8,38)", False),
    ("2, 3, 4", "2, 3, \\text{ and } 4", True),
    ("\\frac12", "1 : 2", True),  # a ratio
    ("\\frac{12345}{100000}", "\\dfrac{2469}{20,\\!000}", True),
    ("5\\pm2\\sqrt{5}", "4, 6", False),
    ("-1 \\pm \\sqrt{2}", "-1+\\sqrt2, -1-\\sqrt2", True),
    ("\\varnothing", "(1,2)\\cup(3,4)", False),
    ("(-\\infty, -1]", "(-\\infty, -27) \\cup [-8, -1]", False),
    ("[1,2]", "(1,2)", False),
    ("[2, 5)", "[2,5]", False),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(-\\infty,1)\\cup(2,\\infty)", "(2,\\infty)\\cup(-\\infty,1)", True),
    # matrices and vectors
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{pmatrix} 1 & 0 \\\\ 0 & 2 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 0.5 \\\\ -1 \\end{pmatrix}", "\\begin{pmatrix} \\frac12 \\\\ -1 \\end{pmatrix}", True),
    # text answers and multiple choice
    ("\\text{Monday}", "Monday", True),
    ("\\text{odd}", "\\text{even}", False),
    ("C", "\\text{(C)}", True),
    ("\\text{(B)}", "\\text{(C)}", False),
    ("\\text{(B) circle}", "\\text{(B)}", True),  # the label decides
    ("\\textbf{(C) } 340", "340", True),  # the value decides
    ("\\textbf{(E) }36", "13", False),
    ("the zero matrix:", "\\begin{pmatrix} 0 & 0 \\\\ 0 & 0 \\end{pmatrix}", False),
    ("\\frac{24}{13}", "\\begin{pmatrix} -20/13 \\\\ -4/13 \\end{pmatrix}", False),
    ("\\text{undefined}", "-1", False),
    # algebra, trigonometry, complex numbers
    ("3+2x", "2x+3", True),
    ("(x+2)(x+5)", "x^2+7x+10", True),
    ("x^2+7x+9", "x^2+7x+10", False),
    ("2y - 11", "11", False),
    ("\\frac{\\sin x}{\\cos x}", "\\tan x", True),
    ("3 \\sec \\frac{\\theta}{2}", "3 \\sec \\frac{1}{2} \\theta", True),
    ("5+15i", "5 + 45i", False),
    ("i^2", "-1", True),
    ("\\sqrt{-4}", "2i", True),
    ("\\frac{1}{2} - \\frac{11}{2}i", "0.5-5.5i", True),
    # bases
    ("10100_2", "110001_2", False),
    ("1011_{2}", "1011_2", True),
    ("1011", "1011_2", True),  # "express eleven in base 2": the digits are the answer
    ("\\text{A5}_{11}", "A5", True),
    ("x_1 + y_0", "y_0 + x_1", True),  # subscripted variables are variables, not bases
    ("x_1", "y_0", False),
    # math-verify reads only part of these; they must not pass
    ("14 - 12ab", "2", False),
    ("2^{\\aleph_0+1}", "2", False),
    ("2 \\cdot 3 \\cdot 4 \\dotsm 2016 \\cdot 2017", "2017", False),
    ("12_{6}10_{6}", "22_6", False),
    # left to math-verify (the fast path cannot tell)
    ("\\boxed{5}", "5", True),
    ("\\frac{1}{4}", "1:4", True),
    ("5! = 120", "120", True),
    ("|2 \\pi - 7|", "7-2\\pi", True),
    # garbage
    (None, "5", False),
    ("", "5", False),
    ("5", "", False),
    ("\\frac{", "5", False),
    ("}{}{", "1", False),
    ("lorem ipsum dolor", "5", False),
    ("$$", "1", False),
]


@pytest.mark.parametrize("pred,gold,expected", EQUIV_CASES)
def test_equivalent(pred, gold, expected):
    assert equivalent(pred, gold) is expected


def test_case_table_is_big_enough():
    assert len(EQUIV_CASES) >= 60


def test_fast_path_settles_the_common_forms_without_math_verify():
    for pred, gold in [("0.5", "\\frac12"), ("1,000", "1000"), ("\\{1,2\\}", "\\{2,1\\}"),
                       ("(x+2)(x+5)", "x^2+7x+10"), ("17", "18"), ("\\frac{3}{5}", "\\frac{2}{3}")]:
        assert grading.fast_equivalent(pred, gold) is not None, (pred, gold)


def test_different_real_sets_are_settled_and_equal_ones_left_to_math_verify():
    # unions of intervals and inequalities in one variable: different sets are not equal without
    # math-verify (it agrees on every such pair of the GPT-3.5 teacher file); equal sets in other
    # forms are still its call
    for pred, gold in [("(-\\infty,-6) \\cup (-6,1)", "(-6, 1)"), ("0\\leq g(x)\\leq 43", "-80\\leq g(x)\\leq 82"),
                       ("\\left[\\frac{125}{81},\\frac{127}{81}\\right]", "-80\\leq g(x)\\leq 82"),
                       ("x > 3", "[3, \\infty)"), ("(-\\infty, 1] \\cup [2, \\infty)", "(-\\infty, 1] \\cup (2, \\infty)")]:
        assert grading.fast_equivalent(pred, gold) is False, (pred, gold)
        assert grading.mv_equivalent(pred, gold) is False, (pred, gold)
    for pred, gold in [("(1,2]\\cup[2,3)", "(1,3)"), ("x > 3", "(3, \\infty)"), ("1 \\le x < 2", "[1, 2)")]:
        assert grading.fast_equivalent(pred, gold) is None, (pred, gold)


def test_trig_in_degrees_with_different_values_is_settled():
    # math-verify agrees on these; equal values (cos 40 cos 32 - sin 40 sin 32 is (sqrt 5 - 1)/4,
    # which math-verify does not see) are left to it, so the fast path never adds a positive here
    for pred, gold in [("2 \\cos 85^\\circ \\cos 75^\\circ", "4 \\sqrt{2}"), ("\\sin^2 20^{\\circ} + 1", "1")]:
        assert grading.fast_equivalent(pred, gold) is False, (pred, gold)
        assert grading.mv_equivalent(pred, gold) is False, (pred, gold)
    for pred, gold in [("\\cos 40^\\circ \\cos 32^\\circ - \\sin 40^\\circ \\sin 32^\\circ", "\\frac{-1 + \\sqrt{5}}{4}"),
                       ("\\sin 30^\\circ", "\\frac{1}{2}")]:
        assert grading.fast_equivalent(pred, gold) is None, (pred, gold)


EXTRACT_CASES = [
    ("so the answer is \\boxed{5}.", "5"),
    ("first \\boxed{1}, finally \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}} then \\fbox{3}", "3"),
    ("$\\boxed 2$", "2"),
    ("\\boxed{\\left\\{1,2\\right\\}}", "\\left\\{1,2\\right\\}"),
    ("\\boxed{x^{2}}", "x^{2}"),
    ("\\boxed{unclosed", None),
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("The answer is -\\frac{3}{10}", "-\\frac{3}{10}"),
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
    ("The answer is 12. Because 3 * 4 = 12.", "12"),
    ("The answer is: 3.5", "3.5"),
    ("**Answer:** 7", "7"),
    ("Therefore, the correct answer is B, D, E.", "B, D, E"),
    ("\\boxed{} The answer is 4", "4"),
    ("Natalia sold 48 clips.\n#### 1,234", "1,234"),
    ("no final answer here", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_forms():
    assert last_boxed("\\boxed{}") == ""  # MATH has two solutions like this
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{a}{b}") == "a"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{\\text{\\{}}") == "\\text{\\{}"  # escaped braces do not count


def test_pathological_inputs_are_guarded_and_fast():
    t0 = time.monotonic()
    assert equivalent("10^{10^{10^{10}}}", "1") is False
    assert grading.mv_equivalent("10^{10^{10^{10}}}", "10^{10^{10^{10}}}+1") is False
    assert grading.mv_equivalent("9^{9^{9}}", "1") is False
    assert grading.mv_equivalent("(10^{100})!", "1") is False
    deep = "\\frac{1}{" * 60 + "2" + "}" * 60
    assert equivalent(deep, "1") is False
    assert equivalent("x" * 5000, "1") is False
    assert time.monotonic() - t0 < 5


def test_grade_many_dedups_and_matches_equivalent():
    pairs = [("so \\boxed{\\frac12}", "0.5"), ("so \\boxed{\\frac12}", "0.5"), ("nothing", "1"),
             ("The answer is 3.", "4"), ("\\boxed{5!}", "120")]
    stats: dict = {}
    got = grade_many(pairs, workers=1, stats=stats)
    assert got == [("\\frac12", True), ("\\frac12", True), (None, False), ("3", False), ("5!", True)]
    assert stats["pairs"] == 5 and stats["unique"] == 4


def test_worker_pool_grades_like_in_process():
    pairs = [(p, g) for p, g, _ in EQUIV_CASES if p is not None][:24]
    want = [equivalent(p, g) for p, g in pairs]
    assert grading._pool(pairs, workers=2) == [grading.mv_equivalent(p, g) for p, g in pairs]
    assert judge_many(pairs, workers=2) == want


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork to patch the worker")
def test_a_hung_worker_is_killed_and_its_pair_is_false(monkeypatch):
    real = grading.mv_equivalent

    def maybe_hang(p, g):
        if p == "HANG":
            time.sleep(60)  # stands in for sympy stuck in C code, where signal.alarm cannot reach
        return real(p, g)

    monkeypatch.setattr(grading, "mv_equivalent", maybe_hang)
    pairs = [("\\frac{1}{4}", "1:4"), ("HANG", "1"), ("5! = 120", "120")] + [("\\frac{1}{4}", "1:4")] * 8
    stats: dict = {}
    t0 = time.monotonic()
    got = grading._pool(pairs, workers=2, chunk=4, hard_timeout=1.0, stats=stats,
                        ctx=multiprocessing.get_context("fork"))  # forked: the workers see the patch
    assert got[1] is False and got[0] and got[2] and all(got[3:])
    assert stats["killed"] == 1
    assert time.monotonic() - t0 < 15


def test_default_pool_kills_a_worker_past_its_deadline():
    """The default workers (forked from the forkserver, math-verify preloaded) are killed too: with a
    deadline far below one cold math-verify check, pairs are cut off, counted not equal, and the
    pool still finishes with no worker left behind."""
    pairs = [("x \\in \\left( -\\infty, \\frac{7 - 2 \\sqrt{11}}{2} \\right)", "(-\\infty,3] \\cup [4,\\infty)"),
             ("9+\\log_23", "\\frac{5}{2}"), ("|2 \\pi - 7|", "7-2\\pi")]
    stats: dict = {}
    before = set(multiprocessing.active_children())
    got = grading._pool(pairs, workers=2, chunk=1, hard_timeout=0.01, stats=stats)
    assert stats["killed"] >= 1 and got.count(False) >= stats["killed"]
    assert not set(multiprocessing.active_children()) - before
    assert grading._pool(pairs, workers=2) == [False, False, True]  # the same pool, no deadline hit


def test_symmetric_equivalence():
    assert equivalent_symmetric("\\frac12", "0.5")
    assert judge_many([("5", "x=5"), ("x=5", "5")], symmetric=True) == [True, True]


def test_peer_suite_agreement(shared_data):
    """The external peer suite (Math-Verify, lighteval, hendrycks/math, NeMo-Skills test cases).

    Labels follow each peer's conventions, which conflict with one another (Hendrycks: "4, 10"
    differs from "10, 4"; Math-Verify: sets), so 100% is neither possible nor the goal; plain
    math-verify parse/verify agrees on 89.8%. The floor is what this grader measured, minus slack.
    """
    cases = [json.loads(line) for line in open(shared_data / "equiv" / "peer_cases.jsonl", encoding="utf-8")]

    def answer(s: str) -> str:  # some peers pass whole responses: read their final answer first
        return extract_answer(s) or s

    got = judge_many([(answer(c["pred"]), answer(c["gold"])) for c in cases], workers=2)
    agree = sum(g == c["equal"] for g, c in zip(got, cases)) / len(cases)
    assert agree >= PEER_FLOOR, f"peer-suite agreement {agree:.3f} < {PEER_FLOOR}"


PEER_FLOOR = 0.89  # measured 311/342 = 0.909


@pytest.mark.parametrize("pred, gold, want", [
    # S \setminus T and R - {..}: compared as sets; equal sets stay math-verify's call (None)
    ("(-\\infty,\\infty)\\setminus\\{1\\}", "[0,3)", False),
    ("(-3,\\infty) \\setminus [-1,0)", "(-\\infty, 1)\\cup(1, \\infty)", False),
    ("\\mathbb{R} - \\{2\\}", "(-\\infty,-20) \\cup (-20,\\infty)", False),
    ("\\mathbb{R} \\setminus \\{2\\}", "(-\\infty,2) \\cup (2,\\infty)", None),
    ("[0, 2] \\setminus (0, 2)", "\\{0, 2\\}", None),  # two points left: not a union of intervals
    # x \in S reads as S
    ("x \\in (-\\infty, -1) \\cup (-1, 5]", "(-1, 1) \\cup [3, \\infty)", False),
    ("k \\in (2,3)", "(-3,5)", False),
    ("x \\in (-3, 5)", "(-3,5)", None),
    # a reversed piece of a union is empty (sympy's reading)
    ("(-1,-\\frac{7}{3}) \\cup (1,\\infty)", "(-2, 0)", False),
    ("(5, 1) \\cup (1,\\infty)", "(1, \\infty)", None),
    # a finite list of real numbers is no interval
    ("\\pm \\frac{3}{4}", "(-\\infty,-1] \\cup [1,\\infty)", False),
    ("(-\\infty,-3] \\cup [7,\\infty)", "11", False),
    ("\\frac{27}{16}, -\\frac{27}{16}", "(-\\infty,-1] \\cup [1,\\infty)", False),
    # a union with a non-real end is not a real set
    ("(-\\infty,-8)\\cup(-8,-2)\\cup(-2,1+\\sqrt{3}i)\\cup(1-\\sqrt{3}i,\\infty)",
     "(-\\infty,-8)\\cup (-8,-2)\\cup (-2,\\infty)", False),
])
def test_fast_path_real_set_rules(pred, gold, want):
    """Not-equal rules for real sets; every False here is also math-verify's verdict (checked on the
    pairs of the TDG file that reach it: bench/split_cli.py)."""
    assert grading.fast_equivalent(pred, gold) is want
    if want is False:
        assert grading.mv_equivalent(pred, gold) is False


@pytest.mark.parametrize("pred, gold, want", [
    ("0 < b \\le 1", "8.8", False),  # an inequality chain is an interval, not a number
    ("(1, 2)", "1, 2", None),  # a lone pair may be a point: math-verify's call
    ("9+\\log_23", "\\frac{5}{2}", False),  # \log_23 is \log_2 3, as latex2sympy reads it
    ("\\log_28", "3", True),
    ("\\cfrac{29}{19}", "\\frac{29}{19}", True),
    ("8.18", "\\approx 8.24 \\text{ mph}", False),
    ("8.24", "\\approx 8.24 \\text{ mph}", True),
    ("(2\\cos 60^\\circ, 1)", "(3,-1)", False),  # degrees inside a tuple's entry: 1 vs 3
])
def test_fast_path_agrees_with_math_verify_on_more_forms(pred, gold, want):
    assert grading.fast_equivalent(pred, gold) is want
    if want is not None:
        assert grading.mv_equivalent(pred, gold) is want
