"""Final-answer extraction: the last ``\\boxed{}`` of a rationale (a run of boxes is one list),
else a trailing "The answer is X" / "Final Answer: X", else a GSM8K ``#### X`` line."""

from __future__ import annotations

import re

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
