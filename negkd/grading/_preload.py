"""Imported once by the grading workers' forkserver before it forks any of them: math-verify,
sympy and the LaTeX parser are loaded there and shared by every worker (copy-on-write)."""

from negkd.grading.mathverify import _mv_parse, _quiet_math_verify

_quiet_math_verify()
_mv_parse("1")
