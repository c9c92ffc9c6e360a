"""A small LaTeX evaluator read the way latex2sympy reads LaTeX: exact ``Fraction`` arithmetic,
floats or complex once a value is inexact, expressions in variables compared at fixed points."""

from __future__ import annotations

import cmath
import math
import re
import zlib
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache


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
            if tok == ("ch", "{"):
                base = self.group()
            else:
                digits = self.take("num")[1]
                if len(digits) > 1 and digits.isdigit():  # \log_23 is \log_2 3: a subscript is one token
                    base = Fraction(digits[0])
                    if self.peek() is not None and self.peek()[0] in ("num", "var", "cmd"):
                        raise _Bail
                    v = _checked(_log(Fraction(digits[1:]), base))
                    return _pow(v, power) if power is not None else v
                base = Fraction(digits)
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
