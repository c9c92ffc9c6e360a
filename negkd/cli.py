"""negkd's command line: the table of contents.

Each command lives in ``negkd/steps/<name>.py`` as a plain function ``command`` whose typed
signature and docstring are its flags and help. Step modules import only light modules at
top level; torch/transformers/peft are imported inside the command, so ``negkd --help`` and
``negkd <cmd> --help`` stay fast.
"""

from __future__ import annotations

import functools
import importlib
from typing import Annotated, Optional

import typer

from negkd import __version__

# (command name, module under negkd.steps), in pipeline order.
COMMANDS = [
    ("tiny-model", "tiny_model"),
    ("sample", "sample"),
    ("split", "split"),
    ("train-neg", "train_neg"),
    ("train-pos", "train_pos"),
    ("calibrate", "calibrate"),
    ("train-ranker", "train_ranker"),
    ("infer", "infer"),
    ("eval", "evaluate"),
    ("compare", "compare"),
    ("export", "export"),
]

app = typer.Typer(
    name="negkd",
    help=(
        "Distill chain-of-thought from a teacher LLM into a small student using the teacher's "
        "correct AND incorrect rationales.\n\n"
        "Pipeline: sample -> split -> train-neg -> train-pos (NAT) -> calibrate (NCE) -> "
        "train-ranker + infer (SC/ASC) -> eval / compare; export writes TRL datasets and merged models. Each step reads files or the previous step's "
        "output directory and writes an output directory with manifest.json written last."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"negkd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """negkd: NAT / NCE / ASC distillation with negative data."""


def _wrap(fn):
    """Run a step; a failed run becomes a one-line message and exit code 1 (2 for a bad flag value).

    ``negkd.errors.describe`` is the one place that maps errors (UserError, I/O errors such as a
    full disk or a read-only file system, corrupt safetensors, refused pickles) to messages;
    anything else is a bug and keeps its traceback. NEGKD_DEBUG=1 shows the traceback always.
    Every float flag must be finite (NaN/inf are usage errors, exit 2). Output-directory locks
    taken by the step are released when it returns.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from negkd.console import debug_enabled, fail
        from negkd.errors import describe

        try:
            _check_finite(kwargs)
            _check_output(kwargs)
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            fail("interrupted; rerun the same command to resume (training commands: add --resume)", code=130)
        except Exception as e:
            told = describe(e)
            if told is None or debug_enabled():
                raise
            fail(told[0], code=told[1])
        finally:
            from negkd.io import release_locks

            release_locks()

    return run


def _check_output(kwargs: dict) -> None:
    """-o naming an existing file: refused before any input is read or model loaded."""
    from pathlib import Path

    from negkd.errors import UserError

    out = kwargs.get("output")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"-o {out}: exists and is not a directory; choose another -o/--output")


def _check_finite(kwargs: dict) -> None:
    """NaN or infinity is never a meaningful value of a negkd flag: refuse it before any work."""
    import math

    from negkd.errors import UsageError

    for name, v in kwargs.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be a finite number")


def _register() -> None:
    for name, module in COMMANDS:
        mod = importlib.import_module(f"negkd.steps.{module}")
        app.command(name, help=mod.command.__doc__)(_wrap(mod.command))


_register()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
