"""Table-driven hostile input: the same malformed files fed to every command that reads records, the
same damaged directories to every command that loads a model. Each must end with one line on
stderr, exit 1 (2 for a bad flag value), no traceback, and nothing written."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_cli import write_split  # noqa: E402

from negkd.cli import app  # noqa: E402

PROBLEM = {"id": "p1", "question": "What is 1 + 1?", "answer": "2"}
SAMPLE = {**PROBLEM, "k": 0, "rationale": "1 + 1 = 2. \\boxed{2}"}
GRADED = {**SAMPLE, "pred": "2", "correct": True}
PRED = {**PROBLEM, "candidates": [{"rationale": "\\boxed{2}", "pred": "2"}], "votes": {"sc": "2"}}


def _line(rec: dict) -> bytes:
    return (json.dumps(rec) + "\n").encode()


def _deep(n: int = 200_000) -> bytes:
    return b'{"id": "p1", "question": ' + b"[" * n + b"]" * n + b', "answer": "2"}\n'


# (name, base record -> bytes to write, the file suffix); every entry is malformed for every command
BAD_RECORDS = {
    "empty": (lambda r: b"", ".jsonl"),
    "blank-lines": (lambda r: b"\n \n", ".jsonl"),
    "malformed-json": (lambda r: _line(r) + b'{"id": "p2", "question": \n', ".jsonl"),
    "not-an-object": (lambda r: b"[1, 2]\n", ".jsonl"),
    "bad-utf8": (lambda r: b'{"id": "p1", "question": "\xff\xfe", "answer": "2"}\n', ".jsonl"),
    "truncated-gzip": (lambda r: gzip.compress(_line(r) * 50)[:40], ".jsonl.gz"),
    "corrupt-gzip-body": (lambda r: (lambda z: z[:12] + bytes(b ^ 0x5A for b in z[12:-8]) + z[-8:])(
        gzip.compress(_line(r) * 50)), ".jsonl.gz"),
    "nested-200k": (lambda r: _deep(), ".jsonl"),
    "lone-surrogate": (lambda r: _line(r).replace(b'"What is', b'"\\ud800 What is'), ".jsonl"),
    "answer-object": (lambda r: _line({**r, "answer": {"v": 3}}), ".jsonl"),
    "answer-list": (lambda r: _line({**r, "answer": [1, 2]}), ".jsonl"),
    "answer-bool": (lambda r: _line({**r, "answer": True}), ".jsonl"),
    "answer-null": (lambda r: _line({**r, "answer": None}), ".jsonl"),
    "id-list": (lambda r: _line({**r, "id": ["p1"]}), ".jsonl"),
    "question-number": (lambda r: _line({**r, "question": 7}), ".jsonl"),
    "missing-question": (lambda r: _line({k: v for k, v in r.items() if k != "question"}), ".jsonl"),
    "duplicate-id": (lambda r: _line(r) + _line(r), ".jsonl"),
}

# command -> (the record it reads, argv builder given the input file, the output dir and the tiny model)
READERS = {
    "sample": (PROBLEM, lambda f, o, m: ["sample", f, "-o", o, "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]),
    "split": (SAMPLE, lambda f, o, m: ["split", f, "-o", o]),
    "train-neg": (GRADED, lambda f, o, m: ["train-neg", f, "-o", o, "--base-model", m, "--device", "cpu"]),
    "train-pos": (GRADED, lambda f, o, m: ["train-pos", f, "-o", o, "--no-neg", "--base-model", m, "--device", "cpu"]),
    "train-ranker": (GRADED, lambda f, o, m: ["train-ranker", f, "-o", o, "--base-model", m, "--device", "cpu"]),
    "infer": (PROBLEM, lambda f, o, m: ["infer", f, "-o", o, "--model", m, "--device", "cpu"]),
    "eval": (PRED, lambda f, o, m: ["eval", f, "-o", o]),
}


def one_line_failure(r, out: Path, code: int = 1) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert not out.exists(), "a refused run wrote its output directory"
    return lines[0]


@pytest.mark.parametrize("bad", sorted(BAD_RECORDS))
@pytest.mark.parametrize("cmd", sorted(READERS))
def test_malformed_records_are_one_line_errors(runner, tmp_path, tiny_model, cmd, bad):
    rec, argv = READERS[cmd]
    make, suffix = BAD_RECORDS[bad]
    f = tmp_path / f"input{suffix}"
    f.write_bytes(make(rec))
    out = tmp_path / "out"
    r = runner.invoke(app, [str(x) for x in argv(f, out, tiny_model)], env={"OPENAI_API_KEY": "sk-x"})
    line = one_line_failure(r, out)
    if bad not in ("empty", "blank-lines", "truncated-gzip", "corrupt-gzip-body"):
        assert "input.jsonl:" in line, line  # names file:line
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name]  # nothing else written


def test_numbers_for_answer_and_id_are_their_json_text(tmp_path):
    from negkd.schemas import read_problems

    f = tmp_path / "p.jsonl"
    f.write_text('{"id": 7, "question": "q", "answer": 3}\n{"id": "x", "question": "q", "answer": 2.5}\n'
                 '{"id": 8.0, "question": "q", "answer": 4.0}\n')
    assert [(p["id"], p["answer"]) for p in read_problems(f)] == [("7", "3"), ("x", "2.5"), ("8", "4")]


@pytest.mark.parametrize("value, kind", [({"v": 3}, "an object"), ([1, 2], "a list"), (True, "a boolean")])
def test_wrong_answer_types_are_not_rewritten(tmp_path, value, kind):
    from negkd.errors import UserError
    from negkd.schemas import read_problems

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": "a", "question": "q", "answer": "1"}) + "\n"
                 + json.dumps({"id": "b", "question": "q", "answer": value}) + "\n")
    with pytest.raises(UserError, match=rf"p.jsonl:2: 'answer' must be a string or a number, got {kind}"):
        read_problems(f)


# ------------------------------------------------------------------ damaged model directories


def _damaged(kind: str, tiny_model: Path, root: Path) -> Path:
    d = root / f"model-{kind}"
    if kind == "missing":
        return d
    if kind == "a-file":
        d.write_text("not a directory")
        return d
    if kind == "empty":
        d.mkdir()
        return d
    if kind == "unfinished-training":  # a killed train-* step: checkpoints, no manifest, no weights
        (d / "checkpoints" / "step-00000001").mkdir(parents=True)
        return d
    shutil.copytree(tiny_model, d)
    w = d / "model.safetensors"
    data = w.read_bytes()
    if kind == "truncated-weights":
        w.write_bytes(data[: len(data) // 3])
    elif kind == "garbage-weights":
        w.write_bytes(b"\xff" * 8 + data[8:64])
    elif kind == "corrupt-config":
        (d / "config.json").write_text('{"model_type": "llama", ')
    elif kind == "config-not-object":
        (d / "config.json").write_text("[]")
    return d


BAD_DIRS = ["missing", "a-file", "empty", "unfinished-training", "truncated-weights", "garbage-weights",
            "corrupt-config", "config-not-object"]

# command -> argv builder given (the damaged directory, a valid split dir, a valid problems file, the output)
LOADERS = {
    "train-neg --base-model": lambda d, s, p, o: ["train-neg", s, "-o", o, "--base-model", d],
    "train-pos --base-model": lambda d, s, p, o: ["train-pos", s, "-o", o, "--no-neg", "--base-model", d],
    "train-pos --neg": lambda d, s, p, o: ["train-pos", s, "-o", o, "--neg", d],
    "calibrate --nat": lambda d, s, p, o: ["calibrate", s, "-o", o, "--nat", d],
    "train-ranker --base-model": lambda d, s, p, o: ["train-ranker", s, "-o", o, "--base-model", d],
    "infer --model": lambda d, s, p, o: ["infer", p, "-o", o, "--model", d],
    "infer --ranker": lambda d, s, p, o: ["infer", p, "-o", o, "--model", s.parent / "tiny", "--ranker", d],
    "sample --backend hf --model": lambda d, s, p, o: ["sample", p, "-o", o, "--backend", "hf", "--model", d],
}


@pytest.mark.parametrize("kind", BAD_DIRS)
@pytest.mark.parametrize("cmd", sorted(LOADERS))
def test_damaged_model_directories_are_one_line_errors(runner, tmp_path, tiny_model, cmd, kind):
    split = write_split(tmp_path / "split", n=4)
    shutil.copytree(tiny_model, tmp_path / "tiny")
    probs = tmp_path / "p.jsonl"
    probs.write_text(json.dumps(PROBLEM) + "\n")
    d = _damaged(kind, tiny_model, tmp_path)
    out = tmp_path / "out"
    argv = [str(x) for x in LOADERS[cmd](d, split, probs, out)] + ["--device", "cpu"]
    r = runner.invoke(app, argv)
    one_line_failure(r, out)


# ------------------------------------------------------------------ output paths and the file system


@pytest.mark.parametrize("cmd", sorted(READERS))
def test_output_naming_an_existing_file_is_refused_before_any_work(runner, tmp_path, tiny_model, cmd):
    rec, argv = READERS[cmd]
    f = tmp_path / "in.jsonl"
    f.write_bytes(_line(rec))
    if rec is GRADED:  # training needs both kinds of rows to get as far as its output directory
        f = write_split(tmp_path / "split", n=4)
    out = tmp_path / "taken"
    out.write_text("precious")
    r = runner.invoke(app, [str(x) for x in argv(f, out, tiny_model)], env={"OPENAI_API_KEY": "sk-x"})
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "not a directory" in lines[0], r.output
    assert out.read_text() == "precious"


def test_tiny_model_output_naming_a_file(runner, tmp_path):
    out = tmp_path / "taken"
    out.write_text("precious")
    r = runner.invoke(app, ["tiny-model", "-o", str(out)])
    assert r.exit_code == 1 and "not a directory" in r.output and "Traceback" not in r.output, r.output
    assert out.read_text() == "precious"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_output_directory_is_one_line(runner, tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_bytes(_line(SAMPLE))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = runner.invoke(app, ["split", str(samples), "-o", str(ro / "out")])
    finally:
        ro.chmod(0o755)
    assert r.exit_code == 1 and "permission denied" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("errno_, words", [(28, "no space left on device"), (30, "read-only file system"),
                                           (13, "permission denied")])
def test_io_errors_while_writing_are_one_line_and_leave_nothing(runner, tmp_path, monkeypatch, errno_, words):
    """A full disk / read-only fs / denied write in the middle of writing outputs (simulated at the
    staging write, where a real one strikes) -> one line, exit 1, no partial output."""
    from negkd import io

    samples = tmp_path / "s.jsonl"
    samples.write_bytes(_line(SAMPLE) + _line({**SAMPLE, "k": 1, "rationale": "\\boxed{3}"}))

    def fail(path, records):
        raise OSError(errno_, os.strerror(errno_), str(path))

    monkeypatch.setattr(io, "write_jsonl", fail)
    out = tmp_path / "out"
    r = runner.invoke(app, ["split", str(samples), "-o", str(out)])
    assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    assert len([x for x in r.output.splitlines() if x.startswith("error:")]) == 1
    assert not (out / "manifest.json").exists() and list(out.iterdir()) == []


def test_a_pipe_as_input_is_refused_clearly(runner, tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    r = runner.invoke(app, ["split", str(fifo), "-o", str(out)])
    line = one_line_failure(r, out)
    assert "not a regular file" in line


# ------------------------------------------------------------------ flag values: usage errors (exit 2) everywhere

BAD_FLAGS = {
    "sample": (PROBLEM, lambda f, o, m: ["sample", f, "-o", o, "--base-url", "http://127.0.0.1:9/v1", "--model", "m"],
               [["--temperature", "nan"], ["--top-p", "inf"], ["--timeout", "-inf"], ["--n", "0"]]),
    "train-neg": (GRADED, lambda f, o, m: ["train-neg", f, "-o", o, "--base-model", m],
                  [["--lr", "inf"], ["--lr", "nan"], ["--epochs", "inf"], ["--warmup", "nan"], ["--batch-size", "0"],
                   ["--lora-dropout", "1.5"], ["--device", "tpu"], ["--dtype", "float8"], ["--max-grad-norm", "inf"]]),
    "train-pos": (GRADED, lambda f, o, m: ["train-pos", f, "-o", o, "--no-neg", "--base-model", m],
                  [["--lr", "-inf"], ["--gate-beta", "nan"], ["--weight-decay", "inf"]]),
    "train-ranker": (GRADED, lambda f, o, m: ["train-ranker", f, "-o", o, "--base-model", m],
                     [["--loss-power", "inf"], ["--val-fraction", "nan"], ["--lr", "inf"]]),
    "infer": (PROBLEM, lambda f, o, m: ["infer", f, "-o", o, "--model", m],
              [["--temperature", "nan"], ["--temperature", "inf"], ["--top-p", "nan"], ["--timeout", "inf"],
               ["--n", "0"], ["--dtype", "float8"], ["--device", "tpu"]]),
}


@pytest.mark.parametrize("cmd", sorted(BAD_FLAGS))
def test_bad_flag_values_are_usage_errors_everywhere(runner, tmp_path, tiny_model, cmd):
    rec, argv, cases = BAD_FLAGS[cmd]
    f = tmp_path / "in.jsonl"
    f.write_bytes(_line(rec))
    if rec is GRADED:  # valid data, so only the flag is wrong
        f = write_split(tmp_path / "split", n=4)
    out = tmp_path / "out"
    for extra in cases:
        r = runner.invoke(app, [str(x) for x in argv(f, out, tiny_model)] + extra, env={"OPENAI_API_KEY": "sk-x"})
        assert r.exit_code == 2, (extra, r.output)
        assert "Traceback" not in r.output and extra[0] in r.output, (extra, r.output)
        assert not out.exists(), extra
