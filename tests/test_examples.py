"""examples/math/Makefile is only run on GPUs: check here that every negkd command it would run
parses (no unknown flag, no bad value), for both starting points."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _commands(*make_args: str) -> list[list[str]]:
    out = subprocess.run(["make", "-s", "-n", "-C", str(REPO / "examples/math"), *make_args],
                         capture_output=True, text=True, check=True).stdout
    out = out.replace("\\\n", " ")
    cmds = []
    for line in out.splitlines():
        for part in line.split("||")[0].split(";"):
            argv = shlex.split(part.strip().replace("for e in math gsm8k svamp asdiv multiarith do", ""))
            if "negkd" in argv:
                argv = argv[argv.index("negkd") + 1:]
                cmds.append([a.replace("$e", "math") for a in argv])
    return cmds


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("make_args", [(), ("FROM_TDG=1",), ("INFER_BACKEND=openai",)])
def test_math_recipe_commands_parse(make_args):
    import typer

    from negkd.cli import app

    group = typer.main.get_command(app)
    cmds = _commands(*make_args)
    names = {c[0] for c in cmds}
    assert {"split", "train-neg", "train-pos", "calibrate", "train-ranker", "infer", "eval"} <= names
    assert ("sample" in names) == (not make_args or make_args[0] != "FROM_TDG=1")
    for argv in cmds:
        cmd = group.commands[argv[0]]
        ctx = cmd.make_context(argv[0], argv[1:])  # raises click.UsageError on a bad flag
        assert ctx.params
