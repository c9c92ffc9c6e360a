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

import cmath
import logging
import math
import os
import re
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import lru_cache

MV_TIMEOUT = 3  # seconds for each math-verify parse / verify call (signal.alarm: integer seconds)
HARD_TIMEOUT = 20.0  # seconds a worker may go without finishing a pair before it is killed
MAX_LEN = 1000  # longer answers are not sent to math-verify (they are not final answers)
SMALL_BATCH = 8  # fewer undecided pairs than this are graded in-process (main thread only)

Progress = Callable[[int, int], None]  # (done, total) of the math-verify stage

# --------------------------------------------------------------------------- extraction

_BOX_CMDS = ("\\boxed", "\\fbox")


def _match_brace(text: str, i: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``text[i]``; escaped ``\\{``/``\\}`` are skipped."""
    depth, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_box_cmd(text: str) -> int | None:
    """End index of the last ``\\boxed``/``\\fbox`` command (not e.g. ``\\boxedx``)."""
    best = None
    for cmd in _BOX_CMDS:
        j = len(text)
        while True:
            j = text.rfind(cmd, 0, j)
            if j < 0:
                break
            end = j + len(cmd)
            if end >= len(text) or not text[end].isalpha():
                if best is None or end > best:
                    best = end
                break
    return best


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` (balanced braces) or ``\\boxed 2``.

    ``None`` when there is none or when its braces never close (a truncated rationale); ``""``
    for an empty ``\\boxed{}`` (two MATH training solutions have one).
    """
    if not isinstance(text, str):
        return None
    end = _last_box_cmd(text)
    if end is None:
        return None
    j = end
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        close = _match_brace(text, j)
        if close is None:
            return None
        return text[j + 1 : close].strip()
    if j > end:  # the brace-less form "\boxed 2": up to "$" or the end of the line
        m = re.match(r"[^$\n]*", text[j:])
        content = m.group(0).strip().rstrip(".").strip() if m else ""
        return content or None
    return None


_BOX_SEP = re.compile(
    r"(?:\s|[,;$]|\\[()]|\\q?quad\b|\\text\s*\{\s*(?:and|or|,)?\s*\}|\band\b|\bor\b)*")


def _final_boxes(text: str) -> str | None:
    """The last boxed answer; several boxes in a row ("\\boxed{1} and \\boxed{2}") are one list."""
    last = last_boxed(text)
    if not last:
        return last
    parts = [last]
    end = _last_box_cmd(text)
    head = text[: end - (5 if text.startswith("\\fbox", end - 5) else 6)] if end else ""
    while len(parts) < 20:
        prev_end = _last_box_cmd(head)
        if prev_end is None:
            break
        j = prev_end
        while j < len(head) and head[j] in " \t":
            j += 1
        close = _match_brace(head, j) if j < len(head) and head[j] == "{" else None
        if close is None or not _BOX_SEP.fullmatch(head[close + 1 :]):
            break
        content = head[j + 1 : close].strip()
        if not content:
            break
        parts.append(content)
        head = head[: prev_end - (5 if head.startswith("\\fbox", prev_end - 5) else 6)]
    return ", ".join(reversed(parts))


_PHRASE = re.compile(
    r"the\s+(?:final\s+|correct\s+)?answer\s+is\b|final\s+answer\s*:|^[ \t*#>]*answer\s*:",
    re.IGNORECASE | re.MULTILINE,
)
_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _clean_tail(x: str) -> str | None:
    """The answer X out of the text that follows "The answer is"."""
    x = x.strip().lstrip(":").strip()
    x = re.sub(r"\s*I hope it is correct\.?\s*$", "", x, flags=re.IGNORECASE).strip()
    x = x.strip("*").strip()  # markdown bold
    for left, right in _DELIMS:
        if x.startswith(left):
            k = x.find(right, len(left))
            if k > len(left):
                x = x[len(left) : k]
                break
    else:
        x = re.split(r"\.\s", x, maxsplit=1)[0]  # first sentence; decimals ("3.5") survive
    x = x.strip().rstrip(".").strip()
    if x.startswith("$") and x.endswith("$"):
        x = x.strip("$").strip()
    return x or None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a rationale, or ``None`` (unparseable). See the module docstring."""
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = _final_boxes(text)
    if boxed:
        return boxed
    last = None
    for last in _PHRASE.finditer(text):
        pass
    if last is not None:
        rest = text[last.end() :]
        line = next((ln for ln in rest.split("\n") if ln.strip(" \t:*")), "")
        ans = _clean_tail(line)
        if ans is not None:
            return ans
    k = text.rfind("####")
    if k >= 0:
        ans = text[k + 4 :].split("\n", 1)[0].strip().rstrip(".").replace("$", "").strip()
        return ans or None
    return None


# --------------------------------------------------------------------------- normalisation

_THIN = re.compile(r"\s*(?<!\\)\\[,!]\s*")  # thin / negative space: 20,\!000 is 20,000
_SPACES = re.compile(r"(?<!\\)\\[;: ]|\\q?quad\b|~|\\(?:display|text)style\b|\\limits\b|\xa0")
_WORD_UNIT = re.compile(r"^(-?[\d.,]*\d)\s+(?!(?:or|and|to)\b)[A-Za-z]+(?:\s+[A-Za-z]+)?$")
_LEFTRIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])\s*\.?")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree\b")
_TRIG = re.compile(r"\\(?:arc)?(?:sin|cos|tan|sec|csc|cot)")
_UNIT = re.compile(
    r"^(.*?\S)\s*\\(?:text|textbf|mbox|mathrm|textnormal)\s*\{\s*[A-Za-z][A-Za-z .'/\-]*\}\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$",
    re.S,
)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox)\s*\{")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MIXED = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_ASSIGN = re.compile(  # x = 5, f(x) = 5, (b, c) = (-10, 21)
    r"^\s*([A-Za-z](?:_\{?\w+\}?)?(?:\([A-Za-z]\))?|\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])+\s*\))\s*=(?![=<>])\s*([^=]+)$",
    re.S)
_LABEL = re.compile(r"^\(([A-E])\)\s*(\S.*)$", re.S)  # "(C) 340": a choice with its value


def _unwrap_text(s: str) -> str:
    """``\\text{X}`` -> ``X`` (also textbf, mathrm, mbox ...), innermost first."""
    for _ in range(20):
        m = _TEXT_CMD.search(s)
        if not m:
            return s
        close = _match_brace(s, m.end() - 1)
        if close is None:
            return s
        s = s[: m.start()] + s[m.end() : close] + s[close + 1 :]
    return s


def _brace_args(s: str, cmd: str, nargs: int) -> str:
    """Give every ``\\cmd`` braced arguments: ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``."""
    out, i, n = [], 0, len(s)
    while True:
        j = s.find(cmd, i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        end = j + len(cmd)
        if end < n and s[end].isalpha():
            out.append(s[i:end])
            i = end
            continue
        out.append(s[i:end])
        k = end
        for _ in range(nargs):
            while k < n and s[k] == " ":
                k += 1
            if k >= n:
                break
            if s[k] == "[" and cmd == "\\sqrt":  # \sqrt[3]{x}: keep the index as is
                close = s.find("]", k)
                if close < 0:
                    break
                out.append(s[k : close + 1])
                k = close + 1
                while k < n and s[k] == " ":
                    k += 1
                if k >= n:
                    break
            if s[k] == "{":
                close = _match_brace(s, k)
                if close is None:
                    break
                out.append(s[k : close + 1])
                k = close + 1
            elif s[k] == "\\":
                m = re.match(r"\\[a-zA-Z]+", s[k:])
                tok = m.group(0) if m else s[k : k + 2]
                out.append("{" + tok + "}")
                k += len(tok)
            else:
                out.append("{" + s[k] + "}")
                k += 1
        i = k


@lru_cache(maxsize=1 << 16)
def _clean(s: str, thousands: bool = True) -> tuple[str, bool]:
    """Normalise an answer for comparison; returns (cleaned string keeping spaces, had a percent)."""
    s = s.strip().replace("\n", " ")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\dbinom", "\\binom").replace("\\tbinom", "\\binom")
    s = re.sub(r"(?<=\d)(?:\{,\}|,\\!)(?=\d{3})", "", s).replace("{,}", ",")  # 20{,}000, 20,\!000
    s = _THIN.sub("", s)
    s = _SPACES.sub(" ", s)
    s = _LEFTRIGHT.sub("", s)
    if not _TRIG.search(s):  # 30^\circ is 30, but sin 30^\circ is not sin 30
        s = _DEGREES.sub("", s)
    s = s.replace("\\$", "").replace("$", "")
    m = _UNIT.match(s)
    if m and re.search(r"\d|\\pi|\\sqrt", m.group(1)):
        s = m.group(1)
    pct = "%" in s
    if pct:
        s = s.replace("\\%", "").replace("%", "")
    s = _unwrap_text(s).strip()
    if s.startswith("{") and _match_brace(s, 0) == len(s) - 1:  # {1,2,3}
        s = s[1:-1].strip()
    if re.search(r"\d", s) and re.search(r"\b(?:and|or)\b", s):  # "2, 3, and 4", "6 or 10": a list
        s = re.sub(r"\s*,?\s*\b(?:and|or)\b\s*,?\s*", ", ", s).strip(", ")
    s = re.sub(r"\)\s*;\s*\(", "), (", s)  # (2,-18); (4,14)
    m = re.fullmatch(r"([^:]+?)\s*:\s*([^:]+)", s)
    if m and not re.search(r"[A-Za-z]", s.replace("\\frac", "").replace("\\sqrt", "")):
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"  # a ratio 1 : 2 is 1/2, as math-verify reads it
    m = _WORD_UNIT.match(s)  # "5 apples" is 5 (math-verify reads it so too)
    if m:
        s = m.group(1)
    if thousands and _THOUSANDS.fullmatch(s):  # 1,000 is a number; "81, 256" (with a space) is a list
        s = s.replace(",", "")
    s = _brace_args(s, "\\frac", 2) if "\\frac" in s else s
    s = _brace_args(s, "\\sqrt", 1) if "\\sqrt" in s else s
    s = s.strip().rstrip(".\\").strip()
    m = _MIXED.fullmatch(_squash(s))  # a mixed number: 2\frac{1}{2} is 5/2, not 2 * 1/2
    if m:
        whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
        s = f"{m.group(1)}\\frac{{{whole * den + num}}}{{{den}}}" if den else s
    if s.startswith("."):
        s = "0" + s
    return s, pct


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


# --------------------------------------------------------------------------- tiny evaluator


class _Bail(Exception):
    """The evaluator does not understand this input; leave the pair to math-verify."""


_TOKEN = re.compile(
    r"\s*(?:(\d+\.\d*|\.\d+|\d+)|(\\[a-zA-Z]+|\\.)|([A-Za-z](?:_\{[A-Za-z0-9]+\}|_[A-Za-z0-9])?)|(\S))")
_LETTERS = "abcdfghjklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # not e, i: constants
_GREEK = ("\\alpha", "\\beta", "\\gamma", "\\delta", "\\theta", "\\phi", "\\varphi", "\\lambda",
          "\\mu", "\\omega", "\\sigma", "\\tau", "\\rho", "\\psi")
# arbitrary points at which expressions in variables are compared: (offset, multiplier, span);
# a variable's value there is offset + (crc32(name) * multiplier) mod span (two points in (0, 1))
_VAR_VALUES = ((0.5, 0.6180339887, 1.3), (0.3, 0.4142135623, 1.1), (0.1, 0.7320508075, 0.8),
               (0.15, 0.2360679775, 0.7))


def _var_value(name: str, point: tuple[float, float, float]) -> float:
    off, mul, span = point
    return off + ((zlib.crc32(name.replace("{", "").replace("}", "").encode()) % 100_003) * mul) % span

Num = Fraction | float | complex


def _tokens(s: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    for m in _TOKEN.finditer(s):
        if m.start() != pos and s[pos : m.start()].strip():
            raise _Bail
        pos = m.end()
        num, cmd, var, ch = m.groups()
        if num is not None:
            out.append(("num", num))
        elif cmd is not None:
            out.append(("cmd", cmd))
        elif var is not None:
            out.append(("var", var))
        else:
            out.append(("ch", ch))
    if s[pos:].strip():
        raise _Bail
    return out


def _to_float(x: Num) -> float:
    try:
        f = float(x)  # type: ignore[arg-type]
    except (OverflowError, TypeError):
        raise _Bail from None
    if math.isnan(f):
        raise _Bail
    return f


def _inexact(x: Num) -> float | complex:
    """A finite float/complex for inexact arithmetic (infinities only exist standalone)."""
    if isinstance(x, complex):
        if cmath.isinf(x) or cmath.isnan(x):
            raise _Bail
        return x
    f = _to_float(x)
    if math.isinf(f):
        raise _Bail
    return f


def _checked(r: float | complex) -> float | complex:
    if isinstance(r, complex):
        if cmath.isinf(r) or cmath.isnan(r):
            raise _Bail
        return r.real if r.imag == 0 else r
    if math.isinf(r) or math.isnan(r):
        raise _Bail
    return r


def _pow(a: Num, b: Num) -> Num:
    if isinstance(b, Fraction) and b.denominator == 1 and isinstance(a, Fraction):
        e = b.numerator
        if a == 0 and e < 0:
            raise _Bail
        size = max(a.numerator.bit_length(), a.denominator.bit_length())
        if abs(e) > 100_000 or size * abs(e) > 200_000:  # never build huge integers
            raise _Bail
        return a**e
    if isinstance(a, Fraction) and isinstance(b, Fraction) and a > 0:
        root = _exact_root(a, b.denominator)  # an exact rational power such as 8^{1/3} or 4^{3/2}
        if root is not None and abs(b.numerator) <= 1000:
            return _pow(root, Fraction(b.numerator))
    fa, fb = _inexact(a), _inexact(b)
    try:
        if isinstance(fa, complex) or isinstance(fb, complex):
            if isinstance(fb, complex) or fa == 0:
                raise _Bail
            r = fa**fb
        else:
            r = math.pow(fa, fb)
    except (OverflowError, ValueError, ZeroDivisionError):
        raise _Bail from None
    return _checked(r)


def _int_root(n: int, k: int) -> int | None:
    if n < 0 or k <= 0 or n.bit_length() > 1000:
        return None
    r = round(n ** (1.0 / k))
    for c in (r - 1, r, r + 1):
        if c >= 0 and c**k == n:
            return c
    return None


def _exact_root(a: Fraction, k: int) -> Fraction | None:
    if k > 64 or a < 0:
        return None
    p, q = _int_root(a.numerator, k), _int_root(a.denominator, k)
    return Fraction(p, q) if p is not None and q is not None else None


def _root(a: Num, k: int) -> Num:
    if isinstance(a, complex):
        raise _Bail
    if isinstance(a, Fraction):
        if a < 0 and k % 2:
            return -_root(-a, k)
        exact = _exact_root(abs(a), k) if k == 2 or a >= 0 else None
        if exact is not None and a >= 0:
            return exact
    fa = _inexact(a)
    if fa < 0:  # type: ignore[operator]
        if k != 2:
            raise _Bail
        return complex(0.0, math.sqrt(-fa))  # sqrt(-3) = i sqrt(3), as sympy has it
    return fa ** (1.0 / k)


def _arith(op: str, a: Num, b: Num) -> Num:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if b == 0:
            raise _Bail
        return a / b
    fa, fb = _inexact(a), _inexact(b)
    if op == "+":
        return _checked(fa + fb)
    if op == "-":
        return _checked(fa - fb)
    if op == "*":
        return _checked(fa * fb)
    if fb == 0:
        raise _Bail
    return _checked(fa / fb)


def _real(x: Num) -> float:
    if isinstance(x, complex):
        raise _Bail
    return _inexact(x)


def _log(x: Num, base: Num | None = None) -> float:
    fx = _real(x)
    fb = math.e if base is None else _real(base)
    if fx <= 0 or fb <= 0 or fb == 1:
        raise _Bail
    return math.log(fx) / math.log(fb)


# the functions latex2sympy knows, by their LaTeX command; \log is base 10 there, \ln base e
_FUNCS: dict[str, Callable[[float], float]] = {
    "\\sin": math.sin, "\\cos": math.cos, "\\tan": math.tan,
    "\\cot": lambda x: 1 / math.tan(x), "\\sec": lambda x: 1 / math.cos(x), "\\csc": lambda x: 1 / math.sin(x),
    "\\arcsin": math.asin, "\\arccos": math.acos, "\\arctan": math.atan,
    "\\sinh": math.sinh, "\\cosh": math.cosh, "\\tanh": math.tanh,
    "\\exp": math.exp, "\\ln": lambda x: _log(x), "\\log": lambda x: _log(x, 10),
}
_CONSTS = {"\\pi", "\\infty"}
_ATOM_CMDS = {"\\frac", "\\sqrt", "\\binom"} | _CONSTS | set(_GREEK)


class _Eval:
    """Recursive-descent evaluation of a LaTeX arithmetic expression, read as latex2sympy does.

    expr   := ['+'|'-'] term (('+'|'-') term)*
    term   := factor ((op factor) | implicit-factor)*      op in * / \\cdot \\times \\div
    factor := ('+'|'-') factor | atom ['^' exponent] ['!']
    atom   := number | variable | e | i | \\pi | \\infty | (expr) | {expr}
            | \\frac{}{} | \\sqrt[n]{} | \\binom{}{} | func['^'n] (arg)  with func in _FUNCS
    An unbraced function argument runs over an implicit product of simple atoms, so
    ``\\sin 2x`` is sin(2x) and ``\\sin x \\cos x`` is sin(x) cos(x), as in latex2sympy.
    """

    def __init__(self, toks: list[tuple[str, str]], env: tuple[float, float, float] | None):
        self.t, self.i, self.env = toks, 0, env
        self.vars: set[str] = set()

    def peek(self, ahead: int = 0) -> tuple[str, str] | None:
        k = self.i + ahead
        return self.t[k] if k < len(self.t) else None

    def take(self, kind: str | None = None, val: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (kind and tok[0] != kind) or (val and tok[1] != val):
            raise _Bail
        self.i += 1
        return tok

    def run(self) -> Num:
        v = self.expr()
        if self.i != len(self.t):
            raise _Bail
        return v

    def expr(self) -> Num:
        tok = self.peek()
        sign = 1
        if tok in (("ch", "+"), ("ch", "-")):
            self.i += 1
            sign = -1 if tok[1] == "-" else 1
        v = self.term()
        if sign < 0:
            v = -v
        while (tok := self.peek()) in (("ch", "+"), ("ch", "-")):
            self.i += 1
            v = _arith(tok[1], v, self.term())
        return v

    def _starts_factor(self, tok: tuple[str, str] | None) -> bool:
        if tok is None:
            return False
        return tok[0] == "var" or tok in (("ch", "("), ("ch", "{")) or (
            tok[0] == "cmd" and (tok[1] in _ATOM_CMDS or tok[1] in _FUNCS))

    def term(self) -> Num:
        v = self.factor()
        divided = False
        while (tok := self.peek()) is not None:
            if tok in (("ch", "*"), ("cmd", "\\cdot"), ("cmd", "\\times")):
                self.i += 1
                v = _arith("*", v, self.factor())
            elif tok in (("ch", "/"), ("cmd", "\\div")):
                self.i += 1
                v = _arith("/", v, self.factor())
                divided = True
            elif self._starts_factor(tok):
                if divided:  # "1/2x": 1/(2x) or x/2? ambiguous, leave it to math-verify
                    raise _Bail
                v = _arith("*", v, self.factor(implicit=True))
            else:
                break
        return v

    def factor(self, implicit: bool = False) -> Num:
        tok = self.peek()
        if tok in (("ch", "+"), ("ch", "-")) and not implicit:
            self.i += 1
            v = self.factor()
            return -v if tok[1] == "-" else v
        v = self.atom()
        return self.postfix(v)

    def postfix(self, v: Num) -> Num:
        if self.peek() == ("ch", "^"):
            self.i += 1
            v = _pow(v, self.exponent())
        if self.peek() == ("ch", "!"):
            self.i += 1
            if not (isinstance(v, Fraction) and v.denominator == 1 and 0 <= v <= 1000):
                raise _Bail
            v = Fraction(math.factorial(int(v)))
        return v

    def exponent(self) -> Num:
        tok = self.take()
        if tok == ("ch", "{"):
            v = self.expr()
            self.take("ch", "}")
            return v
        if tok == ("ch", "-"):
            return -self.exponent()
        if tok[0] == "num":
            if len(tok[1]) != 1:  # "2^10" renders as 2^1 0: not what anyone meant
                raise _Bail
            return Fraction(tok[1])
        if tok[0] == "var":
            return self.variable(tok[1])
        if tok == ("cmd", "\\pi"):
            return math.pi
        raise _Bail

    def group(self) -> Num:
        self.take("ch", "{")
        v = self.expr()
        self.take("ch", "}")
        return v

    def variable(self, name: str) -> Num:
        if name == "i":  # the imaginary unit and Euler's number, as math-verify reads them
            return 1j
        if name == "e":
            return math.e
        if self.env is None:
            raise _Bail
        self.vars.add(name)
        return _var_value(name, self.env)

    def func(self, name: str) -> Num:
        power = None
        if self.peek() == ("ch", "^"):  # \sin^2 x = (\sin x)^2; \tan^{-1} is arctan: not here
            self.i += 1
            power = self.exponent()
            if not (isinstance(power, Fraction) and power.denominator == 1 and power > 0):
                raise _Bail
        base = None
        if name == "\\log" and self.peek() == ("ch", "_"):
            self.i += 1
            tok = self.peek()
            base = self.group() if tok == ("ch", "{") else Fraction(self.take("num")[1])
        if self.peek() in (("ch", "("), ("ch", "{")):
            close = ")" if self.take()[1] == "(" else "}"
            arg = self.expr()
            self.take("ch", close)
        else:  # an implicit product of simple atoms: \sin 2x, \cos \frac{\pi}{3}
            arg = self.simple()
            while (tok := self.peek()) is not None and (
                tok[0] in ("num", "var") or (tok[0] == "cmd" and tok[1] in _ATOM_CMDS)
            ):
                arg = _arith("*", arg, self.simple())
        try:
            v: Num = _log(arg, base) if base is not None else _FUNCS[name](_real(arg))
        except (ValueError, ZeroDivisionError, OverflowError):
            raise _Bail from None
        v = _checked(v)
        return _pow(v, power) if power is not None else v

    def simple(self) -> Num:
        tok = self.peek()
        if tok is None or tok[0] not in ("num", "var", "cmd") or (tok[0] == "cmd" and tok[1] not in _ATOM_CMDS):
            raise _Bail
        return self.postfix(self.atom())

    def atom(self) -> Num:
        kind, val = self.take()
        if kind == "num":
            if self.peek() is not None and self.peek()[0] == "num":
                raise _Bail
            return Fraction(val)
        if kind == "var":
            return self.variable(val)
        if kind == "ch" and val == "(":
            v = self.expr()
            self.take("ch", ")")
            return v
        if kind == "ch" and val == "{":
            v = self.expr()
            self.take("ch", "}")
            return v
        if kind != "cmd":
            raise _Bail
        if val in _FUNCS:
            return self.func(val)
        if val in _GREEK:
            return self.variable(val)
        if val == "\\pi":
            return math.pi
        if val == "\\infty":
            return math.inf
        if val == "\\frac":
            return _arith("/", self.group(), self.group())
        if val == "\\binom":
            n, k = self.group(), self.group()
            if not all(isinstance(x, Fraction) and x.denominator == 1 and 0 <= x <= 10_000 for x in (n, k)):
                raise _Bail
            return Fraction(math.comb(int(n), int(k)))
        if val == "\\sqrt":
            k = 2
            if self.peek() == ("ch", "["):
                self.i += 1
                idx = self.take("num")[1]
                self.take("ch", "]")
                if not idx.isdigit() or not 2 <= int(idx) <= 64:
                    raise _Bail
                k = int(idx)
            return _root(self.group(), k)
        raise _Bail


def _evaluate(s: str, env: tuple[float, float, float] | None) -> tuple[Num, set[str]]:
    ev = _Eval(_tokens(s), env)
    v = ev.run()
    return v, ev.vars


_EVAL_ERRORS = (_Bail, ZeroDivisionError, OverflowError, ValueError, RecursionError, TypeError)


@lru_cache(maxsize=1 << 16)
def _value(s: str) -> tuple[tuple[Num | None, ...], frozenset[str]] | None:
    """Value of an answer: ``((v,), {})`` for a constant; with variables, its values at each of
    ``_VAR_VALUES`` (None where undefined there, e.g. a negative square root) and the variables."""
    if len(s) > 300:
        return None
    used: set[str] = set()
    vals: list[Num | None] = []
    for env in _VAR_VALUES:
        try:
            v, used_here = _evaluate(s, env)
        except _EVAL_ERRORS:
            v, used_here = None, set()
        if env is _VAR_VALUES[0] and v is not None and not used_here:
            if isinstance(v, float) and math.isinf(v) and s.strip().lstrip("+-").strip() != "\\infty":
                return None
            return (v,), frozenset()
        used |= used_here
        vals.append(v)
    if sum(v is not None for v in vals) < 2 or not used:
        return None
    return tuple(vals), frozenset(used)


def _same_values(pvals, gvals, rounded: bool, sign: int = 1) -> bool | None:
    """Equal at every point where both are defined (at least two), constants broadcast."""
    n = max(len(pvals), len(gvals))
    pvals, gvals = pvals * (n // len(pvals)), gvals * (n // len(gvals))
    both = [(a, b) for a, b in zip(pvals, gvals) if a is not None and b is not None]
    if n > 1 and len(both) < 2:
        return None
    return all(_num_equal(a, sign * b, rounded) for a, b in both)


_DECIMAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")


def _num_equal(a: Num, b: Num, rounded: bool) -> bool:
    if isinstance(a, complex) or isinstance(b, complex):
        ca, cb = complex(_inexact(a)), complex(_inexact(b))
        return abs(ca - cb) <= 1e-9 * max(1.0, abs(ca), abs(cb))
    if rounded:  # math-verify: a bare decimal is compared rounded to 6 places
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return round(a, 6) == round(b, 6)
        fa, fb = _to_float(a), _to_float(b)
        return fa == fb if math.isinf(fa) or math.isinf(fb) else round(fa, 6) == round(fb, 6)
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    fa, fb = _to_float(a), _to_float(b)
    if math.isinf(fa) or math.isinf(fb):
        return fa == fb
    return math.isclose(fa, fb, rel_tol=1e-9, abs_tol=1e-12)


# --------------------------------------------------------------------------- fast comparison

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
        return _words(p, g)
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
        return _structured(cp, ppct, cg, gpct)
    except Exception:  # anything the fast path trips on is math-verify's to decide
        return None


# --------------------------------------------------------------------------- math-verify


def mv_safe(s: str) -> bool:
    """False for inputs that could make sympy build astronomically large numbers or recurse deeply."""
    if len(s) > MAX_LEN:
        return False
    depth = top = 0
    for c in s:
        if c in "{([":
            depth += 1
            top = max(top, depth)
        elif c in "})]":
            depth -= 1
    if top > 30:
        return False
    if re.search(r"\d{400,}", s):
        return False
    for m in re.finditer(r"\^", s):
        k = m.end()
        while k < len(s) and s[k] == " ":
            k += 1
        if k < len(s) and s[k] == "{":
            close = _match_brace(s, k)
            exp = s[k + 1 : close] if close is not None else s[k + 1 :]
        else:
            exp = s[k : k + 1]
        if "^" in exp or "!" in exp or "\\uparrow" in exp or re.search(r"\d{7,}", exp.replace(",", "")):
            return False
        if "**" in exp:
            return False
    if "!" in s and ("^" in s or re.search(r"\d{5,}\s*!", s)):
        return False
    if "**" in s and s.count("**") > 1:
        return False
    return True


def _quiet_math_verify() -> None:
    for name in ("math_verify", "math_verify.grader", "math_verify.parser", "math_verify.utils"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _dollars(s: str) -> str:
    s = s.replace("\\$", "").strip()  # a dollar sign is a unit here, not a math delimiter
    return s if "$" in s else f"${s}$"


@lru_cache(maxsize=1 << 15)
def _mv_parse(s: str):
    from math_verify import parse

    return parse(_dollars(s), parsing_timeout=MV_TIMEOUT)


# constructs math-verify's parser silently drops: 2^{\aleph_0+1} parses as 2, "a \dotsm b" as b,
# 10000_4 as 10000; an answer holding one is never judged by math-verify
_MV_DROPS = re.compile(r"\\(?:[lcv]?dots[bcmio]?|aleph|beth)(?![a-zA-Z])|\d\s*_\s*\{?\s*\d")


def _mv_whole(s: str, parsed: list) -> bool:
    """Did math-verify read all of ``s``? It falls back to a prefix ("14 - 12ab" -> "14 - 12")."""
    if _MV_DROPS.search(s):
        return False
    if len(parsed) < 2 or not isinstance(parsed[1], str):
        return True
    whole, got = (_squash(x.replace("$", "")) for x in (s, parsed[1]))
    return not (whole.startswith(got) and re.fullmatch(r"[A-Za-z]+", whole[len(got):]))


def _mv_admissible(s: str | None) -> bool:
    return isinstance(s, str) and mv_safe(s) and not _MV_DROPS.search(s)


def mv_equivalent(pred: str, gold: str) -> bool:
    """math-verify alone: ``verify(parse(gold), parse(pred))``. Main thread of a process only."""
    if not (_mv_admissible(pred) and _mv_admissible(gold)):
        return False
    _quiet_math_verify()
    from math_verify import verify

    try:
        g = _mv_parse(gold)
        p = _mv_parse(pred)
        if not g or not p or not (_mv_whole(gold, g) and _mv_whole(pred, p)):
            return False
        return bool(verify(g, p, timeout_seconds=MV_TIMEOUT))
    except (RecursionError, MemoryError):
        return False
    except Exception as e:  # math-verify catches its own errors; the threading one it re-raises
        if "thread" in str(e):
            raise
        return False


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


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


# --------------------------------------------------------------------------- batches


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


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
    ``stats`` (a dict) receives the counts per stage."""
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
    preds = [extract_answer(r) for r, _ in pairs]
    oks = judge_many([(p, g) for p, (_, g) in zip(preds, pairs)], workers, progress, stats=stats)
    return list(zip(preds, oks))


def _worker(conn) -> None:  # pragma: no cover - runs in a child process
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    _quiet_math_verify()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        for i, (p, g) in msg:
            try:
                ok = mv_equivalent(p, g)
            except BaseException:
                ok = False
            conn.send((i, ok))
        conn.send(None)  # chunk done


def _context():
    import multiprocessing as mp

    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods and sys.platform.startswith("linux") else "spawn")


def _pool(
    pairs: Sequence[tuple[str, str]],
    workers: int | None = None,
    progress: Progress | None = None,
    chunk: int = 16,
    hard_timeout: float = HARD_TIMEOUT,
    stats: dict | None = None,
) -> list[bool]:
    """math-verify over ``pairs`` in worker processes; in-process for a small batch on the main
    thread. A worker that finishes no pair for ``hard_timeout`` s is killed (its pair: False)."""
    n = len(pairs)
    workers = max(1, min(workers or default_workers(), n))
    if _main_thread() and (workers == 1 and n <= SMALL_BATCH * 4 or n < SMALL_BATCH):
        if stats is not None:
            stats["workers"] = 0  # in-process
        out = []
        for i, (p, g) in enumerate(pairs):
            out.append(mv_equivalent(p, g))
            if progress is not None:
                progress(i + 1, n)
        return out
    from multiprocessing.connection import wait

    if _context().get_start_method() == "fork" and _main_thread():
        _quiet_math_verify()
        _mv_parse("1")  # load math-verify and build its LaTeX parser once here: forked workers share it
    # group pairs by gold so each worker's parse cache hits; chunk for few messages
    chunk = max(1, min(chunk, n // (workers * 4)))  # small batches: keep every worker busy
    order = sorted(range(n), key=lambda i: (pairs[i][1], pairs[i][0]))
    todo = deque(order[i : i + chunk] for i in range(0, n, chunk))
    results: list[bool | None] = [None] * n
    ctx = _context()
    slots: list[dict] = []
    done = 0

    def spawn() -> dict:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "job": [], "busy": False, "last": time.monotonic()}

    def kill(slot: dict) -> None:
        slot["proc"].kill()
        slot["proc"].join(5)
        slot["conn"].close()

    try:
        slots = [spawn() for _ in range(workers)]
        while todo or any(s["busy"] for s in slots):
            for k, s in enumerate(slots):
                if not s["busy"] and todo:
                    if not s["proc"].is_alive():
                        kill(s)
                        s = slots[k] = spawn()
                    job = todo.popleft()
                    s["job"], s["busy"], s["last"] = list(job), True, time.monotonic()
                    s["conn"].send([(i, pairs[i]) for i in job])
            busy = [s for s in slots if s["busy"]]
            for conn in wait([s["conn"] for s in busy], timeout=1.0):
                s = next(x for x in busy if x["conn"] is conn)
                try:
                    while s["busy"] and conn.poll():
                        msg = conn.recv()
                        if msg is None:  # the chunk is done
                            s["busy"] = False
                            break
                        i, ok = msg
                        results[i] = ok
                        s["job"].remove(i)
                        s["last"] = time.monotonic()
                        done += 1
                        if progress is not None:
                            progress(done, n)
                except (EOFError, OSError):
                    s["last"] = -math.inf  # the worker died: handled below like a hang
            now = time.monotonic()
            for k, s in enumerate(slots):
                if s["busy"] and (now - s["last"] > hard_timeout or not s["proc"].is_alive()):
                    # it works through its chunk in order: the first unanswered pair is the culprit
                    if s["job"]:
                        culprit, rest = s["job"][0], s["job"][1:]
                        results[culprit] = False
                        if stats is not None:
                            stats["killed"] = stats.get("killed", 0) + 1
                        done += 1
                        if progress is not None:
                            progress(done, n)
                        if rest:
                            todo.appendleft(rest)
                    kill(s)
                    slots[k] = spawn()
    finally:
        for s in slots:
            try:
                s["conn"].send(None)
            except (OSError, ValueError):
                pass
        for s in slots:
            s["proc"].join(1)
            if s["proc"].is_alive():
                s["proc"].kill()
                s["proc"].join(1)
    return [bool(r) for r in results]
