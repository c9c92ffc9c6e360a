"""Hendrycks-style string normalisation of answers (the first step of the fast path)."""

from __future__ import annotations

import re
from functools import lru_cache

from negkd.grading.extract import _match_brace

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
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = re.sub(r"^\s*\\approx\s*", "", s)  # "\\approx 8.24 mph" is read as 8.24 by math-verify too
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
