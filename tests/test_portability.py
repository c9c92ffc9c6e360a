"""A run directory moves to another machine: the adapters record the base's absolute path, so the
next step takes --base-model (or the base was given as a relative path and resolves again)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from test_train_cli import COMMON, invoke, write_split


pytestmark = pytest.mark.usefixtures("one_thread")


def _first_machine(tiny_model, root, base_arg):
    shutil.copytree(tiny_model, root / "model")
    split = write_split(root / "split", n=16)
    r = invoke(CliRunner(), ["train-neg", str(split), "-o", str(root / "neg"), "--base-model", base_arg,
                             "--max-steps", "2", *COMMON])
    assert r.exit_code == 0, r.output
    return json.loads((root / "neg" / "adapter_config.json").read_text())


def test_moved_run_dir_trains_on_with_base_model_override(tiny_model, tmp_path, monkeypatch):
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    a.mkdir()
    acfg = _first_machine(tiny_model, a, str(a / "model"))
    assert acfg["base_model_name_or_path"] == str(a / "model")  # absolute, as given
    shutil.move(str(a), str(b))
    monkeypatch.chdir(tmp_path)
    nat = ["train-pos", str(b / "split"), "--neg", str(b / "neg"), "--max-steps", "1", "--gate-dim", "8", *COMMON]
    r = invoke(CliRunner(), [*nat, "-o", str(b / "nat-no-override")])
    assert r.exit_code == 1 and "no longer exists" in r.output and "--base-model" in r.output
    assert not (b / "nat-no-override" / "manifest.json").exists()
    r = invoke(CliRunner(), [*nat, "-o", str(b / "nat"), "--base-model", str(b / "model")])
    assert r.exit_code == 0, r.output
    meta = json.loads((b / "nat" / "negkd.json").read_text())
    assert meta["base_model_path"] == str(b / "model")  # the new run records where the base is now
    # an unrelated model under the same override is refused (config hash and name must match)
    other = tmp_path / "other"
    from negkd.tiny import build_tiny_model

    build_tiny_model(other, hidden=64, heads=2)
    r = invoke(CliRunner(), [*nat, "-o", str(b / "nat-other"), "--base-model", str(other)])
    assert r.exit_code == 1 and "differs from the base" in r.output


def test_relative_base_path_moves_with_the_run_dir(tiny_model, tmp_path, monkeypatch):
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    a.mkdir()
    monkeypatch.chdir(a)
    _first_machine(tiny_model, a, "model")
    shutil.move(str(a), str(b))
    monkeypatch.chdir(b)  # the next step runs from the moved root: "model" resolves again
    r = invoke(CliRunner(), ["train-pos", "split", "--neg", "neg", "-o", "nat", "--max-steps", "1",
                             "--gate-dim", "8", *COMMON])
    assert r.exit_code == 0, r.output
    assert json.loads((b / "nat" / "negkd.json").read_text())["base_model"] == "model"


def test_moved_nat_checkpoint_and_adapter_infer_with_base_model_override(tiny_model, tmp_path, monkeypatch):
    """infer --base-model: a moved NAT checkpoint (or adapter) loads on the base's new path; an
    unrelated model is refused before anything is written."""
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    a.mkdir()
    _first_machine(tiny_model, a, str(a / "model"))
    r = invoke(CliRunner(), ["train-pos", str(a / "split"), "--neg", str(a / "neg"), "-o", str(a / "nat"),
                             "--max-steps", "1", "--gate-dim", "8", *COMMON])
    assert r.exit_code == 0, r.output
    probs = a / "problems.jsonl"
    probs.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                             for i in range(2)))
    shutil.move(str(a), str(b))
    monkeypatch.chdir(tmp_path)
    gen = ["infer", str(b / "problems.jsonl"), "--greedy", "--max-new-tokens", "4", "--device", "cpu"]
    for student in ("nat", "neg"):
        r = invoke(CliRunner(), [*gen, "--model", str(b / student), "-o", str(b / f"pred-{student}"),
                                 "--base-model", str(b / "model")])
        assert r.exit_code == 0, r.output
        man = json.loads((b / f"pred-{student}" / "manifest.json").read_text())
        assert man["args"]["base"] == str(b / "model")
        assert len((b / f"pred-{student}" / "predictions.jsonl").read_text().splitlines()) == 2
    from negkd.tiny import build_tiny_model

    other = tmp_path / "other"
    build_tiny_model(other, hidden=64, heads=2)
    r = invoke(CliRunner(), [*gen, "--model", str(b / "nat"), "-o", str(b / "pred-other"), "--base-model", str(other)])
    assert r.exit_code == 1 and "a different model" in r.output and "drop --base-model" in r.output
    assert not (b / "pred-other").exists()
    r = invoke(CliRunner(), [*gen, "--model", str(b / "model"), "-o", str(b / "pred-base"), "--base-model", str(other)])
    assert r.exit_code == 2 and "with a base model" in r.output
