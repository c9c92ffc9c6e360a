"""The one exception type a command raises for a failed run.

The CLI prints its message as a single line on stderr and exits 1; it never shows a
traceback unless NEGKD_DEBUG=1 is set. Messages name what was wrong and the fix.
"""


class UserError(Exception):
    """A failed run with a one-line reason (exit code 1)."""


def choice(allowed: tuple[str, ...]):
    """A Typer option callback: a value outside ``allowed`` is a usage error (exit code 2)."""

    def check(value: str) -> str:
        if value not in allowed:
            import typer

            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check
