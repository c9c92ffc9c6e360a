"""Every JSONL record type negkd reads or writes, and the readers for foreign formats.

Contracts (JSON Lines, UTF-8, ``.jsonl`` or ``.jsonl.gz``, one object per line):

- *problem*: ``id`` (str, unique in its file), ``question``, ``answer`` (gold final answer);
  optional ``solution``, ``subject``, ``level``; unknown keys are carried through untouched.
- *sample*: a problem + ``k`` (int; ``(id, k)`` unique) + ``rationale`` + optional ``meta``.
- *graded sample*: a sample + ``pred`` (extracted answer or null) + ``correct`` (bool).
- *prediction*: a problem + ``candidates`` = list of ``{rationale, pred, score?}`` (the first
  is the greedy / first sample) + optional ``votes`` (answer chosen by each voting rule).

Foreign formats, auto-detected from the first record's fields (``--format`` forces one):
MATH, MATH-500, GSM8K, the paper's released teacher data (TDG), SVAMP, ASDiv, MultiArith,
GSM-Hard. Each is mapped onto the problem contract; the original fields are kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from negkd.errors import UserError
from negkd.io import iter_jsonl

FORMATS = ("auto", "negkd", "math", "math500", "gsm8k", "tdg", "svamp", "asdiv", "multiarith", "gsmhard",
           "predictions")


def _num(v: Any, where: str = "", field: str = "answer") -> str:
    """A gold answer as text: a string, or a number without a spurious '.0'; any other JSON type is
    an error (never rewritten into Python's repr)."""
    from negkd.validate import scalar_text

    return scalar_text(v, field, where).strip()


def _id(v: Any, where: str) -> str:
    from negkd.validate import scalar_text

    return scalar_text(v, "id", where)


def _text(rec: dict, key: str, where: str) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise UserError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    return v


def _level(v: Any) -> Any:
    if isinstance(v, str):
        m = re.fullmatch(r"\s*Level\s+(\d+)\s*", v)
        if m:
            return int(m.group(1))
    return v


def detect_format(rec: dict) -> str:
    keys = set(rec)
    if "generated_answer" in keys:
        return "tdg"
    if {"Body", "Question", "Answer"} <= keys:
        return "svamp"
    if {"body", "question", "answer"} <= keys:
        return "asdiv"
    if {"input", "code", "target"} <= keys:
        return "gsmhard"
    if {"input", "target"} <= keys:
        return "multiarith"
    if "problem" in keys and "answer" in keys:
        return "math500"
    if "problem" in keys and "solution" in keys:
        return "math"
    if "question" in keys and "answer" in keys and "id" not in keys and "####" in str(rec["answer"]):
        return "gsm8k"
    return "negkd"


def _gold_from_solution(solution: str) -> str | None:
    from negkd.grading import last_boxed

    return last_boxed(solution)


def _require(rec: dict, keys: tuple[str, ...], where: str, fmt: str) -> None:
    missing = [k for k in keys if k not in rec or rec[k] is None]
    if missing:
        raise UserError(f"{where}: missing field {', '.join(repr(k) for k in missing)} "
                        f"(read as {fmt} format; pass --format to choose another)")


def _problem(rec: dict, fmt: str, where: str, lineno: int, stem: str) -> dict:
    """Map one record of format ``fmt`` onto the problem contract (original keys kept)."""
    out = dict(rec)
    if fmt == "negkd":
        _require(rec, ("id", "question", "answer"), where, fmt)
        out["id"] = _id(rec["id"], where)
        out["answer"] = _num(rec["answer"], where)
    elif fmt == "math":
        _require(rec, ("problem", "solution"), where, fmt)
        gold = _gold_from_solution(_text(rec, "solution", where))
        if gold is None:
            raise UserError(f"{where}: no \\boxed{{}} answer in 'solution'")
        out = {"id": _id(rec.get("unique_id", f"{stem}:{lineno}"), where), "question": rec["problem"],
               "answer": gold, "solution": rec["solution"], **_rest(rec, ("problem",))}
        if "type" in rec:
            out.setdefault("subject", rec["type"])
    elif fmt == "math500":
        _require(rec, ("problem", "answer"), where, fmt)
        out = {"id": _id(rec.get("unique_id", f"{stem}:{lineno}"), where), "question": rec["problem"],
               "answer": _num(rec["answer"], where), **_rest(rec, ("problem", "answer"))}
    elif fmt == "gsm8k":
        _require(rec, ("question", "answer"), where, fmt)
        sol = _text(rec, "answer", where)
        if "####" not in sol:
            raise UserError(f"{where}: GSM8K 'answer' has no '#### N' final line")
        body, gold = sol.rsplit("####", 1)
        out = {"id": _id(rec.get("id", f"{stem}:{lineno}"), where), "question": rec["question"],
               "answer": gold.strip().replace(",", ""), "solution": sol, **_rest(rec, ("question", "answer"))}
    elif fmt == "tdg":
        _require(rec, ("question", "answer", "generated_answer"), where, fmt)
        q = re.sub(r"^\s*Problem:\s*\n", "", _text(rec, "question", where), count=1)
        gold = _gold_from_solution(_text(rec, "answer", where))
        if gold is None:
            raise UserError(f"{where}: no \\boxed{{}} answer in the gold solution 'answer'")
        out = {"id": _id(rec.get("tdg_source", rec.get("id", f"{stem}:{lineno}")), where), "question": q,
               "answer": gold, "solution": rec["answer"],
               **_rest(rec, ("question", "answer", "generated_answer"))}
        if "type" in rec:
            out.setdefault("subject", rec["type"])
    elif fmt == "svamp":
        _require(rec, ("Body", "Question", "Answer"), where, fmt)
        out = {"id": _id(rec.get("ID", f"{stem}:{lineno}"), where),
               "question": f"{_text(rec, 'Body', where).strip()} {_text(rec, 'Question', where).strip()}",
               "answer": _num(rec["Answer"], where, "Answer"), **_rest(rec, ())}
    elif fmt == "asdiv":
        _require(rec, ("body", "question", "answer"), where, fmt)
        ans = _num(rec["answer"], where)
        m = re.fullmatch(r"(.*?)\s*\(([^()]*)\)", ans)
        gold, unit = (m.group(1), m.group(2)) if m else (ans, None)
        out = {"id": _id(rec.get("idx", f"{stem}:{lineno}"), where),
               "question": f"{_text(rec, 'body', where).strip()} {_text(rec, 'question', where).strip()}",
               "answer": gold.strip(), **_rest(rec, ("question", "answer"))}
        if unit:
            out["unit"] = unit
    elif fmt in ("multiarith", "gsmhard"):
        _require(rec, ("input", "target"), where, fmt)
        out = {"id": _id(rec.get("id", f"{stem}:{lineno}"), where), "question": rec["input"],
               "answer": _num(rec["target"], where, "target"), **_rest(rec, ("input", "target", "code"))}
    else:  # pragma: no cover - guarded by FORMATS
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if "level" in out:
        out["level"] = _level(out["level"])
    if not isinstance(out.get("question"), str) or not out["question"].strip():
        raise UserError(f"{where}: 'question' must be a non-empty string")
    # MATH's own data has two solutions ending in an empty \boxed{} (train: "how many primes
    # between n!+1 and n!+n"); keep them: an empty gold answer matches nothing.
    if not isinstance(out.get("answer"), str) or not (out["answer"].strip() or fmt in ("math", "tdg")):
        raise UserError(f"{where}: 'answer' must be a non-empty string (the gold final answer)")
    return out


def _rest(rec: dict, drop: tuple[str, ...]) -> dict:
    return {k: v for k, v in rec.items() if k not in drop}


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def iter_problems(path: Path, fmt: str = "auto") -> Iterator[tuple[str, dict]]:
    """Yield ``(where, problem)`` with ``where = "file:line"``; ids checked unique."""
    fmt = _check_format(fmt)
    path = Path(path)
    stem = path.name.split(".")[0]
    seen: dict[str, str] = {}
    chosen = None if fmt == "auto" else fmt
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if chosen is None:
            chosen = detect_format(rec)
        prob = _problem(rec, chosen, where, lineno, stem)
        if prob["id"] in seen:
            raise UserError(f"{where}: duplicate id {prob['id']!r} (first at {seen[prob['id']]}); ids must be unique")
        seen[prob["id"]] = where
        yield where, prob


def read_problems(path: Path, fmt: str = "auto") -> list[dict]:
    return [p for _, p in iter_problems(path, fmt)]


def iter_samples(path: Path, fmt: str = "auto") -> Iterator[tuple[str, dict]]:
    """Yield ``(where, sample)``. A TDG file expands to one sample per generated rationale, and a
    predictions file (``negkd infer`` output) to one sample per candidate. ``(id, k)`` is checked
    unique across the file whatever its format (concatenated shards must not double a sample)."""
    fmt = _check_format(fmt)
    path = Path(path)
    stem = path.name.split(".")[0]
    seen: dict[tuple[str, int], str] = {}
    chosen = None if fmt == "auto" else fmt
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if chosen is None:
            chosen = "tdg" if "generated_answer" in rec else "predictions" if "candidates" in rec else "negkd"
        for sample in _record_samples(rec, chosen, where, lineno, stem):
            key = (sample["id"], sample["k"])
            if key in seen:
                raise UserError(f"{where}: duplicate (id, k) = {key!r} (first at {seen[key]})")
            seen[key] = where
            yield where, sample


def _record_samples(rec: dict, fmt: str, where: str, lineno: int, stem: str) -> Iterator[dict]:
    """The samples one input line holds: a candidate each (predictions), a generated rationale each
    (TDG), or the line itself (sample contract)."""
    if fmt == "predictions":  # `negkd infer` output: one sample per candidate (the ranker recipe)
        prob = _problem(rec, "negkd", where, lineno, stem)
        cands = rec.get("candidates")
        if not isinstance(cands, list):
            raise UserError(f"{where}: 'candidates' must be a list of {{rationale, pred}}")
        base = problem_fields(prob)
        for k, c in enumerate(cands):
            if not isinstance(c, dict) or not isinstance(c.get("rationale"), str):
                raise UserError(f"{where}: candidates[{k}] needs a 'rationale' string")
            yield {**base, "k": k, "rationale": c["rationale"]}
        return
    if fmt == "tdg":
        prob = _problem(rec, "tdg", where, lineno, stem)
        gens = rec["generated_answer"]
        if not isinstance(gens, list):
            raise UserError(f"{where}: 'generated_answer' must be a list of rationales")
        for k, r in enumerate(gens):
            if not isinstance(r, str):
                raise UserError(f"{where}: generated_answer[{k}] is not a string")
            r = re.sub(r"^\s*Solution:\s*\n", "", r, count=1)
            yield {**prob, "k": k, "rationale": r}
        return
    sample = _problem(rec, fmt, where, lineno, stem)
    if "k" not in rec or "rationale" not in rec:
        raise UserError(f"{where}: a sample needs 'k' (int) and 'rationale' (str) besides id/question/answer")
    if not isinstance(rec["k"], int) or isinstance(rec["k"], bool):
        raise UserError(f"{where}: 'k' must be an integer, got {rec['k']!r}")
    if not isinstance(rec["rationale"], str):
        raise UserError(f"{where}: 'rationale' must be a string")
    yield sample


def read_samples(path: Path, fmt: str = "auto") -> list[dict]:
    return [s for _, s in iter_samples(path, fmt)]


def read_graded(path: Path) -> list[dict]:
    """Graded samples (the output of ``negkd split``)."""
    out = []
    for where, s in iter_samples(path, "negkd"):
        if not isinstance(s.get("correct"), bool):
            raise UserError(f"{where}: a graded sample needs 'correct' (true/false); grade it with `negkd split`")
        out.append(s)
    return out


def read_predictions(path: Path) -> list[dict]:
    out = []
    for where, p in iter_problems(path, "negkd"):
        cands = p.get("candidates")
        if not isinstance(cands, list) or not cands:
            raise UserError(f"{where}: a prediction needs 'candidates', a non-empty list of {{rationale, pred}}")
        for i, c in enumerate(cands):
            if not isinstance(c, dict) or "pred" not in c:
                raise UserError(f"{where}: candidates[{i}] must be an object with 'pred' (and 'rationale')")
        out.append(p)
    return out


def problem_fields(rec: dict) -> dict:
    """The problem part of a sample/prediction record (drops per-sample fields)."""
    drop = {"k", "rationale", "meta", "pred", "correct", "candidates", "votes", "decoding"}
    return {k: v for k, v in rec.items() if k not in drop}


Reader = Callable[[Path], list]
