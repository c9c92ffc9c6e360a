"""Security: no code runs from a checkpoint, no remote code by default, the API key never reaches disk."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402
from test_train_cli import COMMON, write_split  # noqa: E402

from negkd.cli import COMMANDS, app  # noqa: E402

PKG = Path(__file__).resolve().parents[1] / "negkd"


class Planted:
    """A pickle that, when unpickled, creates ``marker``: stands in for any code a checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    import torch

    torch.save({"state": Planted(marker)}, path)


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """A finished train-neg run (its last checkpoint kept), built once."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("sec")
    split = write_split(root / "split", n=16)
    out = root / "neg"
    r = CliRunner().invoke(app, ["train-neg", str(split), "-o", str(out), "--base-model", str(tiny_model),
                                 "--max-steps", "2", "--save-every", "1", *COMMON])
    assert r.exit_code == 0, r.output
    return split, out, tiny_model


def _resume(runner, split, out, model):
    """Extend the finished run by one step: this loads every file of its checkpoint."""
    return runner.invoke(app, ["train-neg", str(split), "-o", str(out), "--base-model", str(model),
                               "--max-steps", "3", "--save-every", "1", "--resume", *COMMON])


def _one_line_error(r, code: int = 1) -> str:
    """The run's last stderr line is its one-line error (progress logs may come before it)."""
    assert r.exit_code == code, r.output
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.output
    assert "Traceback" not in r.output
    return errors[0]


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state_0.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_without_running(runner, finished, tmp_path, name):
    split, src, model = finished
    out = tmp_path / "neg"
    shutil.copytree(src, out)
    ck = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert (ck / name).exists()
    marker = tmp_path / "PWNED"
    _plant(ck / name, marker)
    manifest = (out / "manifest.json").read_text()
    line = _one_line_error(_resume(runner, split, out, model))
    assert name in line and "refused" in line and ".open" in line  # names what it would have built
    assert not marker.exists(), "unpickling ran code planted in the checkpoint"
    # the refused extension left the finished run exactly as it was
    assert (out / "manifest.json").read_text() == manifest


def test_a_clean_checkpoint_still_resumes(runner, finished, tmp_path):
    split, src, model = finished
    out = tmp_path / "neg"
    shutil.copytree(src, out)
    r = _resume(runner, split, out, model)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["resumed_from"] == 2


@pytest.mark.parametrize("name, damage", [("trainable.safetensors", "truncate"), ("trainable.safetensors", "garbage"),
                                          ("trainer_state.json", "truncate"), ("trainer_state.json", "garbage"),
                                          ("scheduler.pt", "truncate")])
def test_a_damaged_checkpoint_file_is_one_line(runner, finished, tmp_path, name, damage):
    split, src, model = finished
    out = tmp_path / "neg"
    shutil.copytree(src, out)
    f = sorted((out / "checkpoints").glob("step-*"))[-1] / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    manifest = (out / "manifest.json").read_text()
    line = _one_line_error(_resume(runner, split, out, model))
    assert name in line
    assert (out / "manifest.json").read_text() == manifest


def test_no_unsafe_load_anywhere_in_the_package():
    """Every torch.load is weights_only=True; nothing unpickles; remote code is opt-in only."""
    hits = []
    for f in sorted(PKG.rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                hits.append(f"{f.name}: {m.group(0)}")
        for pat in (r"\bpickle\.loads?\(", r"weights_only\s*=\s*False", r"trust_remote_code\s*=\s*True",
                    r"\bmarshal\.loads?\(", r"(?<![\w.])eval\(", r"(?<![\w.])exec\("):
            hits += [f"{f.name}: {m.group(0)}" for m in re.finditer(pat, text)]
    assert hits == []


def test_trust_remote_code_is_off_by_default_in_every_command():
    import typer.main

    click_app = typer.main.get_command(app)
    seen = 0
    for name, _ in COMMANDS:
        cmd = click_app.commands[name]
        for p in cmd.params:
            if p.name == "trust_remote_code":
                seen += 1
                assert p.default is False, name
    assert seen >= 5  # every command that loads a model has the flag


def test_api_key_never_on_disk_even_when_the_server_echoes_it(runner, tmp_path):
    key = "sk-live-0123456789abcdefSECRET"

    def echo(req, i):  # a hostile or buggy server that echoes the request headers back
        return f"headers: {req.headers.get('authorization')} so \\boxed{{{i}}}"

    probs = tmp_path / "p.jsonl"
    probs.write_text("".join(json.dumps({"id": f"p{i}", "question": f"{i}+{i}?", "answer": str(2 * i)}) + "\n"
                             for i in range(3)))
    out = tmp_path / "run"
    with FakeOpenAI(echo, api_key=key) as srv:
        r = runner.invoke(app, ["sample", str(probs), "-o", str(out), "--base-url", srv.url, "--model", "teacher",
                                "--n", "2", "--timeout", "2"], env={"OPENAI_API_KEY": key})
        assert any(key in (q.headers.get("authorization") or "") for q in srv.requests)  # it was sent
    assert r.exit_code == 0, r.output
    assert key not in r.output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "samples.jsonl" for p in files)
    for p in files:
        assert key not in p.read_text(encoding="utf-8", errors="replace"), p
    assert "***" in (out / "samples.jsonl").read_text()  # the echo is there, masked
