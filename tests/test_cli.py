"""The CLI as an interface: help text, version, exit codes, and import cost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from negkd import __version__
from negkd.cli import COMMANDS, app

PIPELINE = ["sample", "split", "train-neg", "train-pos", "calibrate", "train-ranker", "infer", "eval", "compare",
            "export"]


def test_help_lists_every_pipeline_command(runner):
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for name in PIPELINE + ["tiny-model"]:
        assert name in r.output


def test_version(runner):
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"negkd {__version__}"


@pytest.mark.parametrize("name", [c for c, _ in COMMANDS])
def test_every_command_has_help_with_documented_flags(runner, name):
    r = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output
    assert "not implemented" not in r.output.lower(), f"{name} is still a placeholder"


def test_unknown_command_and_bad_option_are_usage_errors(runner):
    assert runner.invoke(app, ["frobnicate"]).exit_code == 2
    assert runner.invoke(app, ["split", "--no-such-flag"]).exit_code == 2


@pytest.mark.parametrize("argv", [["--help"], ["split", "--help"], ["eval", "--help"], ["compare", "--help"],
                                  ["export", "--help"]])
def test_help_does_not_import_heavy_modules(argv):
    code = (
        "import sys\n"
        "from negkd.cli import app\n"
        "try:\n"
        f"    app({argv!r}, prog_name='negkd')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', 'openai', 'math_verify', 'sympy', 'numpy', 'datasets', 'trl') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY=\n" in out.stdout or out.stdout.rstrip().endswith("HEAVY="), out.stdout[-500:] + out.stderr[-2000:]
