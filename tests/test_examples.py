"""examples/math/Makefile is only run on GPUs: check here that every negkd command it would run
parses (no unknown flag, no bad value), for both starting points."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


MATH_DATA = ["eval/math_train.jsonl", "eval/math_test.jsonl", "eval/gsm8k_test.jsonl", "eval/svamp.json",
             "eval/asdiv_test_2215.jsonl", "eval/multiarith_pal.jsonl", "tdg/gpt35_math_train_8.jsonl.gz"]


def _commands(*make_args: str) -> list[list[str]]:
    """The negkd commands `make -n` would run, against stand-in data files (a clone without
    ../shared must dry-run too: make only checks that the prerequisites exist)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for name in MATH_DATA:
            (Path(d) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(d) / name).touch()
        out = subprocess.run(["make", "-s", "-n", "-C", str(REPO / "examples/math"), f"DATA={d}", *make_args],
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


def _opt(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("backend", ["hf", "openai", "vllm"])
def test_math_recipe_infer_backends(backend):
    """Each student's infer runs ask the server for that student (its own --served-model, as in the
    documented `vllm serve --lora-modules` line), and the NAT student (a NAT checkpoint, which
    only the hf backend runs) always gets --backend hf."""
    infers = [c for c in _commands(f"INFER_BACKEND={backend}") if c[0] == "infer"]
    served: dict[str, set[str]] = {}
    students = set()
    for argv in infers:
        student = Path(_opt(argv, "--model")).name
        students.add(student)
        if student == "nat":
            assert _opt(argv, "--backend") == "hf", argv
            assert "--served-model" not in argv and "--base-url" not in argv, argv
            continue
        assert _opt(argv, "--backend") == backend, argv
        if backend == "openai":
            assert _opt(argv, "--base-url"), argv
            served.setdefault(_opt(argv, "--served-model"), set()).add(student)
        else:
            assert "--served-model" not in argv, argv
    assert {"nat", "nce", "cotkd", "mix"} <= students
    if backend == "openai":
        # one served name per LoRA student, and no name shared by two students
        assert all(len(s) == 1 for s in served.values()), served
        assert {next(iter(s)) for s in served.values()} == students - {"nat"}
        # the documented vllm serve line serves every one of those names
        lines = (REPO / "examples/math/Makefile").read_text().splitlines()
        i = next(i for i, line in enumerate(lines) if line.startswith("#") and "vllm serve" in line and "--enable-lora" in line)
        serve = lines[i]
        while serve.endswith("\\"):
            i += 1
            serve = serve[:-1] + " " + lines[i].lstrip("# ")
        for name in served:
            assert f" {name}=work/{name}" in serve, (name, serve)
