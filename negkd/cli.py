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
    """Run a step; a UserError becomes a one-line message and exit code 1 (NEGKD_DEBUG=1 shows the traceback)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from negkd.console import debug_enabled, fail
        from negkd.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if debug_enabled():
                raise
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted; rerun the same command to resume (training commands: add --resume)", code=130)

    return run


def _register() -> None:
    for name, module in COMMANDS:
        mod = importlib.import_module(f"negkd.steps.{module}")
        app.command(name, help=mod.command.__doc__)(_wrap(mod.command))


_register()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
