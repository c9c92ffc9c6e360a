"""The fast path: compare normalised answers (scalars, lists, sets, tuples, intervals, unions,
matrices, equations) with the evaluator; True / False when it can tell, None for math-verify."""

from __future__ import annotations

import math
import re
from functools import lru_cache

from negkd.grading.evaluator import _DECIMAL, _Bail, _inexact, _same_values, _to_float, _value
from negkd.grading.mathverify import MAX_LEN
from negkd.grading.normalise import _ASSIGN, _LABEL, _THOUSANDS, _clean, _squash

_BASE = re.compile(r"([0-9A-Za-z]+)_\{?(\d+)\}?")


def _base_number(s: str) -> re.Match | None:
    """``1011_2`` / ``A5_{11}``: digits valid in their base (2..36); not ``x_1``."""
    m = _BASE.fullmatch(_squash(s))
    if m is None:
        return None
    try:
        int(m.group(1), int(m.group(2)))
    except ValueError:
        return None
    return m


_UNITS2 = {"cm", "mm", "km", "ft", "in", "mi", "yd", "kg", "mg", "lb", "oz", "hr", "ml", "am", "pm"}


def _has_word(s: str) -> bool:
    """Letters that read as a word or a unit ("cm", "apples"), not a product of variables ("xy")."""
    runs = re.findall(r"[A-Za-z]{2,}", re.sub(r"\\[a-zA-Z]+", " ", s))
    return any(len(r) > 2 or r.lower() in _UNITS2 for r in runs)


_WORDS = re.compile(r"[A-Za-z][A-Za-z \-']*")
_CHOICE = re.compile(r"\(?\s*([A-Ea-e])\s*\)?")


def _scalar(p: str, ppct: bool, g: str, gpct: bool, depth: int = 0) -> bool | None:
    """Compare two cleaned scalar answers: True / False / None (cannot tell)."""
    if _squash(p) == _squash(g):
        return True
    pm, gm = _ASSIGN.match(p), _ASSIGN.match(g)
    if pm or gm:  # "x = 5" vs "5": compare the right-hand sides
        if pm and gm and _squash(pm.group(1)) != _squash(gm.group(1)):
            return None
        p = pm.group(2).strip() if pm else p
        g = gm.group(2).strip() if gm else g
        if _squash(p) == _squash(g):
            return True
        if pm or gm:
            return _structured(p, ppct, g, gpct, depth + 1)
    pl, gl = _LABEL.match(p), _LABEL.match(g)
    if bool(pl) != bool(gl):  # "(C) 340" vs "340", or vs "(C)": the label or the value decides
        lab, other = (pl, g) if pl else (gl, p)
        choice = _CHOICE.fullmatch(other)
        if choice:
            return choice.group(1).upper() == lab.group(1).upper()
        return _structured(lab.group(2), ppct, other, gpct, depth + 1) if pl else _structured(p, ppct, lab.group(2), gpct, depth + 1)
    if _has_word(p) or _has_word(g):
        w = _words(p, g)
        if w is not None:
            return w
    if "=" in p and "=" not in g and not re.search(r"[<>]|\\[lg]e", p):
        # math-verify follows the gold's form: "102 - 52 = 50" is read as its last side, 50
        return _structured(p.rsplit("=", 1)[1].strip(), ppct, g, gpct, depth + 1)
    if "=" in g and "=" not in p and not re.search(r"[<>]|\\[lg]e", g):
        lhs, rhs = (x.strip() for x in g.split("=")[-2:])
        if not re.search(r"[\d+\-]", re.sub(r"_\{[^{}]*\}|_\w", "", lhs)):  # |AB| = 1, V_1 : V_2 = 11 : 21: the gold names its value
            return _structured(p, ppct, rhs, gpct, depth + 1)
        if _value(p) is not None and _value(p)[1] == frozenset():
            return False  # an equation (x + 2y = 8) is not a number
    if "=" in p or "=" in g:
        return _equations(p, g)
    pb, gb = _base_number(p), _base_number(g)
    if pb or gb:  # numbers in base b: 1011_2, 1011_{2}; "1011" against "1011_2" is in base 2 too
        pd, gd = (pb.group(1) if pb else _squash(p)), (gb.group(1) if gb else _squash(g))
        if (pb and gb and pb.group(2) != gb.group(2)) or not (pd.isalnum() and gd.isalnum()):
            return None
        return pd.lstrip("0").upper() == gd.lstrip("0").upper()
    pv, gv = _value(p), _value(g)
    if pv is None or gv is None:
        w = _words(p, g)
        # a tuple's entry like "\\cos^2 10^\\circ": degrees next to a trig function (top level: fast_equivalent)
        return _degrees_differ(p, g) if w is None and depth and not (ppct or gpct) else w
    (pvals, pvars), (gvals, gvars) = pv, gv
    if pvars != gvars and (_has_word(p) or _has_word(g)):
        return None  # "5 cm" is not 5*c*m
    rounded = bool(_DECIMAL.fullmatch(_squash(p)) or _DECIMAL.fullmatch(_squash(g)))
    pcands = (pvals, tuple(None if v is None else v / 100 for v in pvals)) if ppct else (pvals,)
    gcands = (gvals, tuple(None if v is None else v / 100 for v in gvals)) if gpct else (gvals,)
    try:
        verdicts = [_same_values(pc, gc, rounded) for pc in pcands for gc in gcands]
    except _Bail:
        return None
    if any(verdicts):
        return True
    return None if None in verdicts else False


def _equations(p: str, g: str) -> bool | None:
    """``L1 = R1`` vs ``L2 = R2``: the same equation when L1 - R1 = +-(L2 - R2) everywhere; not
    when the two differences are not proportional (different solution sets). A proportional
    pair (x + y = 5 vs 2x + 2y = 10) is left to math-verify."""
    sides = [x.split("=") for x in (p, g)]
    if any(len(x) != 2 or not all(t.strip() for t in x) or re.search(r"[<>]|\\[lg]e", "".join(x)) for x in sides):
        return None
    pv, gv = (_value(f"({a})-({b})") for a, b in sides)
    if pv is None or gv is None or not pv[1] or pv[1] != gv[1]:
        return None
    try:
        if _same_values(pv[0], gv[0], False) or _same_values(pv[0], gv[0], False, sign=-1):
            return True
        both = [(a, b) for a, b in zip(pv[0], gv[0]) if a is not None and b is not None]
        if len(both) < 3 or any(b == 0 for _, b in both):
            return None
        ratios = [complex(_inexact(a)) / complex(_inexact(b)) for a, b in both]
        if all(abs(r - ratios[0]) <= 1e-9 * max(1.0, abs(ratios[0])) for r in ratios):
            return None
        return False
    except _Bail:
        return None


def _is_text(s: str) -> bool:
    """A worded answer such as "undefined" or "no real solutions"."""
    return _WORDS.fullmatch(s) is not None and re.search(r"[A-Za-z]{3,}", s) is not None


def _words(p: str, g: str) -> bool | None:
    """Text answers ("Monday", "(C)", "even"): equal when equal ignoring case and spaces;
    a worded answer never equals a number ("undefined" vs "-1")."""
    if (_is_text(p) and _value(g) is not None) or (_is_text(g) and _value(p) is not None):
        return False
    pc, gc = _CHOICE.fullmatch(p), _CHOICE.fullmatch(g)
    if pc and gc and ("(" in p or "(" in g or (p + g).isupper()):
        return pc.group(1).upper() == gc.group(1).upper()
    if _WORDS.fullmatch(p) and _WORDS.fullmatch(g) and len(p) > 1 and len(g) > 1:
        if p.lower().replace(" ", "") == g.lower().replace(" ", ""):
            return True
        # two words ("odd" vs "even") differ; a product of variables ("ab" vs "ba") is math-verify's call
        if " " in p or " " in g or (len(p) > 3 and len(g) > 3):
            return False
    return None


_OPEN = {"(": ")", "[": "]", "{": "}"}


def _split_top(s: str, sep: str = ",") -> list[str]:
    return list(_split_top_cached(s, sep))


@lru_cache(maxsize=1 << 16)
def _split_top_cached(s: str, sep: str) -> tuple[str, ...]:
    """Split on ``sep`` outside (), [], {} and \\{ \\}."""
    parts, depth, start, i, n = [], 0, 0, 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n:
            if s[i + 1] in "{}":
                depth += 1 if s[i + 1] == "{" else -1
            if s.startswith(sep, i) and depth == 0:
                parts.append(s[start:i])
                i += len(sep)
                start = i
                continue
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return tuple(x.strip() for x in parts)


def _enclosed(s: str) -> tuple[str, str, str] | None:
    """``(a,b]`` -> ("(", "a,b", "]") when one bracket pair encloses the whole string."""
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
        return "{", inner, "}"
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    depth = 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0 and i != len(s) - 1:
                return None
    if depth != 0:
        return None
    return s[0], s[1:-1], s[-1]


_MATRIX = re.compile(r"^\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}$", re.S)


def _matrix(s: str) -> list[list[str]] | None:
    m = _MATRIX.match(s.strip())
    if not m:
        return None
    rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
    return [[c.strip() for c in r.split("&")] for r in rows]


def _all(results: list[bool | None]) -> bool | None:
    if any(r is False for r in results):
        return False
    if any(r is None for r in results):
        return None
    return True


def _same_set(ps: list[str], gs: list[str], cmp) -> bool | None:
    table = [[cmp(p, g) for g in gs] for p in ps]
    if any(r is None for row in table for r in row):
        return None
    return all(any(row) for row in table) and all(any(table[i][j] for i in range(len(ps))) for j in range(len(gs)))


def _expand_pm(items: list[str]) -> list[str]:
    """``3 \\pm \\sqrt{2}`` is the two answers ``3 + \\sqrt{2}`` and ``3 - \\sqrt{2}``."""
    out = []
    for it in items:
        if it.count("\\pm") == 1 and "\\mp" not in it:
            out += [it.replace("\\pm", "+"), it.replace("\\pm", "-")]
        else:
            out.append(it)
    return out


def _interval(s: str) -> tuple[float, float] | None:
    e = _enclosed(s)
    if e is None or e[0] == "{":
        return None
    items = _split_top(e[1])
    vals = [_value(x) for x in items]
    if len(items) != 2 or any(v is None or v[1] or isinstance(v[0][0], complex) for v in vals):
        return None
    lo, hi = (_to_float(v[0][0]) for v in vals)  # type: ignore[index,arg-type]
    return (lo, hi) if lo < hi else None


_Piece = tuple[float, bool, float, bool]  # (lo, lo closed, hi, hi closed) of a real interval
_CHAIN = re.compile(r"^(.+?)(<|\\leq?(?![a-zA-Z]))(.+?)(<|\\leq?(?![a-zA-Z]))(.+)$")
_ONE_SIDED = re.compile(r"^\s*[A-Za-z]\s*(<|>|\\[lg]eq?(?![a-zA-Z]))(.+)$")


def _real_number(s: str) -> float | None:
    v = _value(s)
    if v is None or v[1] or isinstance(v[0][0], complex):
        return None
    return _to_float(v[0][0])  # type: ignore[arg-type]


def _real_set(s: str) -> list[_Piece] | None:
    """A union of real intervals with constant ends (``(-\\infty, 2) \\cup [3, 5]``, ``a \\le x < b``,
    ``x > 3``) as sorted, merged pieces; None for anything else (tuples of non-numbers, complex ends)."""
    m = _CHAIN.match(s)
    if m and "\\cup" not in s and "," not in s and re.fullmatch(r"\s*[A-Za-z](?:\([A-Za-z]\))?\s*", m.group(3)):
        lo, hi = _real_number(m.group(1)), _real_number(m.group(5))
        pieces = None if lo is None or hi is None else [(lo, m.group(2) != "<", hi, m.group(4) != "<")]
    elif (m := _ONE_SIDED.match(s)) and "\\cup" not in s and "," not in s:
        b = _real_number(m.group(2))
        if b is None:
            return None
        op, closed = m.group(1), m.group(1).startswith("\\")
        pieces = [(b, closed, math.inf, False)] if op in (">", "\\ge", "\\geq") else [(-math.inf, False, b, closed)]
    else:
        pieces = []
        for part in _split_top(s, "\\cup"):
            e = _enclosed(part)
            if e is None or e[0] == "{":
                return None
            ends = _split_top(e[1])
            if len(ends) != 2:
                return None
            lo, hi = _real_number(ends[0]), _real_number(ends[1])
            if lo is None or hi is None:
                return None
            pieces.append((lo, e[0] == "[", hi, e[2] == "]"))
    if pieces is None or any(lo >= hi or math.isnan(lo) or math.isnan(hi) for lo, _, hi, _ in pieces):
        return None
    return _merge(pieces)


def _merge(pieces: list[_Piece]) -> list[_Piece]:
    """Sorted pieces with overlapping or touching ones joined (each piece has lo < hi)."""
    pieces = sorted(pieces)
    merged = [pieces[0]]
    for lo, lc, hi, hc in pieces[1:]:
        plo, plc, phi, phc = merged[-1]
        if lo < phi or (lo == phi and (lc or phc)):
            merged[-1] = (plo, plc, hi, hc) if hi > phi else (plo, plc, phi, phc if hi < phi else phc or hc)
        else:
            merged.append((lo, lc, hi, hc))
    return merged


_IN = re.compile(r"^\s*(?:[A-Za-z]|\\[a-zA-Z]+)\s*\\in\s*(\S.*)$", re.S)  # x \in S, \theta \in S
_REALS = ("\\mathbb{R}", "\\mathbb R", "\\R", "(-\\infty,\\infty)")


def _minus(piece: _Piece, cut: _Piece) -> list[_Piece] | None:
    """``piece`` without ``cut`` (both (lo, lo closed, hi, hi closed); ``cut`` may be one point,
    lo == hi, closed): 0-2 pieces, or None when a single point would remain (not representable)."""
    lo, lc, hi, hc = piece
    a, ac, b, bc = cut
    out: list[_Piece] = []
    if lo < a:  # the part of piece below the cut
        if hi < a:
            return [piece]
        out.append((lo, lc, a, hc and not ac) if hi == a else (lo, lc, a, not ac))
    elif lo == a and lc and not ac:
        return None
    if hi > b:  # the part above it
        if lo > b:
            return [piece]
        out.append((b, lc and not bc, hi, hc) if lo == b else (b, not bc, hi, hc))
    elif hi == b and hc and not bc:
        return None
    return out


def _drop_empty(s: str) -> str:
    """A union without its reversed pieces: in "(-1, -\\frac{7}{3}) \\cup (1, \\infty)" the first interval is
    empty, as sympy (math-verify) reads it. Only inside a union: a lone "(2, 1)" may be a point."""
    parts = _split_top(s, "\\cup")
    if len(parts) < 2:
        return s
    keep = []
    for part in parts:
        e = _enclosed(part)
        ends = _split_top(e[1]) if e is not None and e[0] != "{" else ()
        lo, hi = (_real_number(x) for x in ends) if len(ends) == 2 else (None, None)
        if lo is not None and hi is not None and (lo > hi or (lo == hi and (e[0], e[2]) != ("[", "]"))):
            continue  # empty: reversed, or (a, a), [a, a), (a, a]
        keep.append(part)
    return " \\cup ".join(keep) if keep else s


def _set_expr(s: str) -> list[_Piece] | None:
    """A real set as merged pieces: what ``_real_set`` reads, also written ``x \\in S``, ``S \\setminus T``
    or ``\\mathbb{R} - T`` (T a real set or a finite set of real numbers); None for anything else."""
    m = _IN.match(s)
    if m:
        s = m.group(1).strip()
    parts = _split_top(s, "\\setminus")
    if len(parts) == 1:
        for r in _REALS:
            if _squash(s).startswith(_squash(r) + "-") and _squash(s) != _squash(r):
                rest = s.strip()[len(r):].lstrip() if s.strip().startswith(r) else ""
                parts = (r, rest[1:].strip()) if rest.startswith("-") else (s,)
                break
    if len(parts) > 2:
        return None
    if len(parts) == 1:
        if _squash(s) in map(_squash, _REALS):
            return [(-math.inf, False, math.inf, False)]
        return _real_set(_drop_empty(s))
    left, right = parts
    pieces = [(-math.inf, False, math.inf, False)] if _squash(left) in map(_squash, _REALS) else _real_set(left)
    if pieces is None:
        return None
    e = _enclosed(right)
    if e is not None and e[0] == "{":
        points = [_real_number(x) for x in _split_top(e[1])]
        if not points or any(x is None or math.isinf(x) or math.isnan(x) for x in points):
            return None
        cuts: list[_Piece] = [(x, True, x, True) for x in points]  # type: ignore[misc]
    else:
        cuts = _real_set(right)  # type: ignore[assignment]
        if cuts is None:
            return None
    for cut in cuts:
        nxt: list[_Piece] = []
        for piece in pieces:
            rest = _minus(piece, cut)
            if rest is None:
                return None
            nxt += rest
        pieces = nxt
    return _merge(pieces) if pieces else None


def _complex_ends(s: str) -> bool:
    """A union of intervals with a non-real end: "(-\\infty, -2i\\sqrt{2}) \\cup ..." (never a real set)."""
    for part in _split_top(s, "\\cup"):
        e = _enclosed(part)
        if e is None or e[0] == "{":
            continue
        for end in _split_top(e[1]):
            v = _value(end)
            if v is not None and not v[1] and isinstance(v[0][0], complex) and abs(v[0][0].imag) > 1e-12:
                return True
    return False


def _finite_reals(s: str) -> bool:
    """A finite list of real numbers: "2", "\\pm \\frac{3}{4}", "\\frac{27}{16}, -\\frac{27}{16}"."""
    items = _expand_pm(list(_split_top(s)))
    return bool(items) and all(_enclosed(x) is None and _real_number(x) is not None for x in items)


def _real_sets_differ(p: str, g: str) -> bool | None:
    """False when both answers are real sets (unions of intervals, inequalities in one variable,
    ``x \\in S``, ``S \\setminus T``) and the sets differ by more than rounding; when one is a real set
    (not a lone bracket pair without an infinite end, which may be a point) and the other a finite list
    of real numbers (a finite set is no interval); or when one is a real set and the other a union with
    a non-real end. None otherwise: equal sets are left to math-verify."""
    marks = [bool(re.search(r"[(\[<>]|\\[lg]e|\\setminus|\\mathbb", x)) for x in (p, g)]
    if not any(marks):
        return None
    ps, gs = _set_expr(p) if marks[0] else None, _set_expr(g) if marks[1] else None
    if (ps is None) != (gs is None):
        src, other = (p, g) if ps is not None else (g, p)
        lone = _enclosed(src.strip()) is not None and not re.search(r"\\cup|\\infty", src)  # "(1, 2)": a point too
        if not lone and _finite_reals(other):
            return False
        if _complex_ends(other):
            return False
        return None
    if ps is None or gs is None:
        return None

    def close(a: float, b: float) -> bool:
        return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)

    def far(a: float, b: float) -> bool:
        return not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)

    if len(ps) == len(gs) and all(close(a[0], b[0]) and close(a[2], b[2]) and a[1] == b[1] and a[3] == b[3]
                                  for a, b in zip(ps, gs)):
        return None  # the same set: math-verify's call (it may still tell the forms apart)
    ends = [x for piece in ps for x in (piece[0], piece[2])] + [x for piece in gs for x in (piece[0], piece[2])]
    if any(not close(a, b) and not far(a, b) for a in ends for b in ends):
        return None  # ends that agree only to rounding
    return False


_DEG = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ")


def _degrees_differ(p: str, g: str) -> bool | None:
    """False when both answers are real constants that differ beyond rounding once degrees (left in
    place by normalisation next to a trig function: ``\\cos 10^\\circ``) are read as pi/180; else
    None: equal values stay math-verify's call."""
    if not (_DEG.search(p) or _DEG.search(g)):
        return None
    a, b = (_real_number(_DEG.sub(lambda _: "\\frac{\\pi}{180}", x)) for x in (p, g))
    if a is None or b is None or math.isinf(a) or math.isinf(b):
        return None
    return None if math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) else False


def _structured(p: str, ppct: bool, g: str, gpct: bool, depth: int = 0) -> bool | None:
    """Compare cleaned answers that may be lists, sets, tuples, intervals, unions or matrices."""
    if depth > 4:
        return None
    if _squash(p) == _squash(g):
        return True

    def rec(a: str, b: str) -> bool | None:
        return _structured(a, ppct, b, gpct, depth + 1)

    pm, gm = _matrix(p), _matrix(g)
    if pm is not None or gm is not None:
        if pm is None or gm is None:
            mat, other = (pm, g) if gm is None else (gm, p)
            if len(_split_top(other)) == 1 and _enclosed(other) is None and (
                    _value(other) is not None or _is_text(other.rstrip(":. "))):
                return False  # a number (or "the zero matrix") is not a matrix
            enc = _enclosed(other)
            cells = [c for row in mat for c in row]
            if enc is not None and (len(mat) == 1 or all(len(r) == 1 for r in mat)):
                items = _split_top(enc[1])  # a vector written as a tuple: differs if any entry differs
                if len(items) != len(cells) or any(rec(a, b) is False for a, b in zip(cells, items)):
                    return False
            return None
        if [len(r) for r in pm] != [len(r) for r in gm]:
            return False
        return _all([rec(a, b) for ra, rb in zip(pm, gm) for a, b in zip(ra, rb)])
    if _ASSIGN.match(p) or _ASSIGN.match(g):
        return _scalar(p, ppct, g, gpct, depth)
    pu, gu = _split_top(p, "\\cup"), _split_top(g, "\\cup")
    if len(pu) > 1 or len(gu) > 1:
        if len(pu) == 1 or len(gu) == 1:
            one, many = (pu[0], gu) if len(pu) == 1 else (gu[0], pu)
            if _squash(one) in ("\\emptyset", "\\varnothing", "\\{\\}"):
                return False
            spans = [_interval(x) for x in many]
            if _interval(one) is not None and all(spans):
                spans.sort()  # disjoint pieces with gaps between them never make one interval
                if all(a[1] < b[0] for a, b in zip(spans, spans[1:])):
                    return False
            return None
        return _same_set(pu, gu, rec)
    pe, ge = _enclosed(p), _enclosed(g)
    if pe is not None or ge is not None:
        if pe is None or ge is None:
            # a tuple or interval is never a number: "(27, 31)" vs "-4"
            e, other = (pe, g) if ge is None else (ge, p)
            if len(_split_top(e[1])) >= 2 and len(_split_top(other)) == 1 and _value(other) is not None:
                return False
            items = _split_top(other)  # several tuples are not one tuple: "(2,-18), (4,14)" vs "(8,38)"
            if len(items) >= 2 and all(_enclosed(x) is not None for x in items):
                return False
            # "(2, 3)" vs "2, 3": a tuple vs a set, math-verify's call; a bracketed scalar "(5)" is 5
            if pe is not None and len(_split_top(pe[1])) == 1 and pe[0] == "(":
                return rec(pe[1], g)
            if ge is not None and len(_split_top(ge[1])) == 1 and ge[0] == "(":
                return rec(p, ge[1])
            return None
        pi, gi = _split_top(pe[1]), _split_top(ge[1])
        if len(pi) == 1 and len(gi) == 1 and pe[0] == ge[0] == "(":
            return rec(pi[0], gi[0])
        if pe[0] == "{" and ge[0] == "{":
            return _same_set(pi, gi, rec)
        if (pe[0], pe[2]) != (ge[0], ge[2]):
            return False if len(pi) == len(gi) == 2 and "{" not in (pe[0], ge[0]) else None
        if len(pi) != len(gi):
            return False if min(len(pi), len(gi)) >= 2 else None
        return _all([rec(a, b) for a, b in zip(pi, gi)])
    pl, gl = _expand_pm(_split_top(p)), _expand_pm(_split_top(g))
    if len(pl) > 1 or len(gl) > 1:
        if "" in pl or "" in gl:
            return None
        if _is_text(p if len(pl) == 1 else g) and len(pl) != len(gl):
            return False  # "no real solutions" vs a list of roots
        return _same_set(pl, gl, rec)
    return _scalar(p, ppct, g, gpct, depth)


def fast_equivalent(pred: str | None, gold: str | None) -> bool | None:
    """The fast path alone: True / False when it can tell, None when math-verify must decide."""
    if pred is None or gold is None:
        return False
    p, g = pred.strip(), gold.strip()
    if not p or not g:
        return False
    if p == g:
        return True
    if len(p) > MAX_LEN or len(g) > MAX_LEN:
        return None
    try:
        cp, ppct = _clean(p)
        cg, gpct = _clean(g)
        if not cp or not cg:
            return None
        # "81,256" against the list "81, 256" is that list, not 81256
        if len(_split_top(cg)) > 1 and _THOUSANDS.fullmatch(p.replace("\\!", "")):
            cp, ppct = _clean(p, thousands=False)
        elif len(_split_top(cp)) > 1 and _THOUSANDS.fullmatch(g.replace("\\!", "")):
            cg, gpct = _clean(g, thousands=False)
        v = _structured(cp, ppct, cg, gpct)
        if v is None and not (ppct or gpct):
            v = _real_sets_differ(cp, cg)
            v = _degrees_differ(cp, cg) if v is None else v
        return v
    except Exception:  # anything the fast path trips on is math-verify's to decide
        return None
