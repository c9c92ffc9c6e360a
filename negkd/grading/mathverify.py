"""math-verify as the second stage: input guards, parse / verify with timeouts (main thread only).

math-verify (and sympy) are imported on first use, never at import of this module."""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from negkd.grading.extract import _match_brace
from negkd.grading.normalise import _squash

MV_TIMEOUT = 3  # seconds for each math-verify parse / verify call (signal.alarm: integer seconds)
MAX_LEN = 1000  # longer answers are not sent to math-verify (they are not final answers)


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
