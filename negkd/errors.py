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


class UsageError(UserError):
    """A bad flag value (exit code 2, like Typer's own usage errors); the message starts with the flag."""


def describe(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code for an error a command can meet on bad input or a bad
    environment (I/O, corrupt files), or None for a bug (which keeps its traceback).

    This is the one place that turns such errors into messages: ``cli._wrap`` calls it."""
    import errno

    if isinstance(exc, UsageError):
        return str(exc), 2
    if isinstance(exc, UserError):
        return str(exc), 1
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "negkd"
        hints = {
            errno.ENOSPC: "no space left on device; free some space and rerun the same command "
                          "(training commands: add --resume)",
            errno.EDQUOT: "disk quota exceeded; free some space and rerun the same command",
            errno.EROFS: "read-only file system; choose a writable -o/--output",
            errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted",
            errno.ENOTDIR: "a path component is a file, not a directory",
            errno.EISDIR: "is a directory, expected a file",
            errno.EEXIST: "already exists",
        }
        what = hints.get(exc.errno, exc.strerror or str(exc))
        return f"{where}: {what}", 1
    if isinstance(exc, RecursionError):
        return "input nested too deeply to read (a JSON value nested thousands of levels?)", 1
    if isinstance(exc, UnicodeError):
        return f"text that is not valid Unicode ({exc}); check the input for lone surrogates or bad bytes", 1
    name = type(exc).__name__
    if name == "SafetensorError" or name == "HeaderTooLarge":  # safetensors raises these for corrupt files
        return f"corrupt or truncated .safetensors file ({exc}); re-create it with the step that wrote it", 1
    if name == "UnpicklingError":
        return f"refused to load a pickle that holds more than tensors ({str(exc).splitlines()[0]})", 1
    return None
