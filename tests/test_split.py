"""``negkd split`` through the CLI: outputs, stats, no-op rerun, --overwrite, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from negkd.cli import app

# (id, subject, level, gold, rationales)
PROBLEMS = [
    ("p1", "algebra", 1, "\\frac{1}{2}", ["so $\\boxed{0.5}$", "thus \\boxed{\\dfrac12}", "get \\boxed{2}"]),
    ("p2", "algebra", 2, "10", ["The answer is 10.", "\\boxed{10\\text{ cm}}", "I give up."]),
    ("p3", "geometry", 3, "(1,2)", ["\\boxed{(2,1)}", "\\boxed{[1,2]}", "\\boxed{(1, 2)}"]),
]


def write_samples(path: Path, problems=PROBLEMS) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for pid, subject, level, gold, rats in problems:
            for k, r in enumerate(rats):
                fh.write(json.dumps({"id": pid, "question": f"Question {pid}?", "answer": gold, "subject": subject,
                                     "level": level, "k": k, "rationale": r}) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split(runner, *args):
    return runner.invoke(app, ["split", *map(str, args)])


def test_split_writes_graded_positives_and_negatives(runner, tmp_path):
    out = tmp_path / "split"
    r = split(runner, write_samples(tmp_path / "samples.jsonl"), "-o", out)
    assert r.exit_code == 0, r.output
    pos, neg = read_jsonl(out / "pos.jsonl"), read_jsonl(out / "neg.jsonl")
    assert sorted((x["id"], x["k"]) for x in pos) == [("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1), ("p3", 2)]
    assert sorted((x["id"], x["k"]) for x in neg) == [("p1", 2), ("p2", 2), ("p3", 0), ("p3", 1)]
    assert all(x["correct"] for x in pos) and not any(x["correct"] for x in neg)
    byk = {(x["id"], x["k"]): x for x in pos + neg}
    assert byk[("p1", 0)]["pred"] == "0.5" and byk[("p2", 0)]["pred"] == "10" and byk[("p2", 2)]["pred"] is None
    assert byk[("p1", 0)]["question"] == "Question p1?" and byk[("p1", 0)]["subject"] == "algebra"

    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"] == {"rationales": 9, "positive": 5, "negative": 4, "unparseable": 1, "empty": 0,
                              "share_positive": round(5 / 9, 4), "problems": 3,
                              "problems_no_positive": 0, "problems_all_positive": 0}
    assert stats["by_subject"]["geometry"]["positive"] == 1
    assert stats["by_level"]["2"]["unparseable"] == 1
    assert stats["grading"]["pairs"] == 9
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "split" and manifest["outputs"]["pos.jsonl"]["records"] == 5
    assert "geometry" in r.output and "total" in r.output  # the table


def test_directory_input_rerun_is_a_no_op_and_overwrite_redoes(runner, tmp_path):
    sample_dir = tmp_path / "sample"
    sample_dir.mkdir()
    write_samples(sample_dir / "samples.jsonl")
    (sample_dir / "manifest.json").write_text('{"command": "sample"}\n')  # a finished `negkd sample`
    out = tmp_path / "split"
    assert split(runner, sample_dir, "-o", out).exit_code == 0
    before = (out / "manifest.json").read_text()
    r = split(runner, sample_dir, "-o", out)
    assert r.exit_code == 0 and "up to date" in r.output
    assert (out / "manifest.json").read_text() == before
    r = split(runner, sample_dir, "-o", out, "--overwrite")
    assert r.exit_code == 0 and "up to date" not in r.output
    assert json.loads((out / "manifest.json").read_text())["started_at"] >= json.loads(before)["started_at"]
    # other settings against a finished run: refuse without --overwrite
    r = split(runner, sample_dir, "-o", out, "--drop-unparseable")
    assert r.exit_code == 1 and "--overwrite" in r.output


def test_drop_unparseable_and_tdg_input(runner, tmp_path):
    tdg = tmp_path / "teacher.jsonl.gz"
    with gzip.open(tdg, "wt", encoding="utf-8") as fh:
        for i, (gold, rats) in enumerate([("\\boxed{4}", ["Solution:\nSo \\boxed{4}.", "Solution:\n5"]),
                                          ("so $\\boxed{}$ primes", ["\\boxed{0}"])]):
            fh.write(json.dumps({"question": f"Problem:\nQ{i}", "answer": gold, "generated_answer": rats,
                                 "level": "Level 3", "type": "Algebra", "tdg_source": f"f.jsonl:{i}"}) + "\n")
    out = tmp_path / "split"
    r = split(runner, tdg, "-o", out, "--drop-unparseable")
    assert r.exit_code == 0, r.output
    pos, neg = read_jsonl(out / "pos.jsonl"), read_jsonl(out / "neg.jsonl")
    assert [(x["id"], x["k"], x["pred"]) for x in pos] == [("f.jsonl:0", 0, "4")]
    assert [(x["id"], x["k"], x["pred"]) for x in neg] == [("f.jsonl:1", 0, "0")]  # an empty gold matches nothing
    assert pos[0]["rationale"] == "So \\boxed{4}." and pos[0]["question"] == "Q0" and pos[0]["level"] == 3
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"]["rationales"] == 3 and stats["total"]["unparseable"] == 1


def test_infer_predictions_directory_splits_per_candidate(runner, tmp_path):
    pred_dir = tmp_path / "infer"
    pred_dir.mkdir()
    rec = {"id": "a", "question": "q", "answer": "2", "votes": {"sc": "2"},
           "candidates": [{"rationale": "so \\boxed{2}", "pred": "2"}, {"rationale": "\\boxed{3}", "pred": "3"}]}
    (pred_dir / "predictions.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
    (pred_dir / "manifest.json").write_text('{"command": "infer"}\n')  # a finished `negkd infer`
    out = tmp_path / "split"
    r = split(runner, pred_dir, "-o", out)
    assert r.exit_code == 0, r.output
    assert [(x["k"], x["pred"]) for x in read_jsonl(out / "pos.jsonl")] == [(0, "2")]
    assert [(x["k"], x["pred"]) for x in read_jsonl(out / "neg.jsonl")] == [(1, "3")]


def _bad(tmp_path: Path, name: str, content: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


def good_line(**kw) -> bytes:
    rec = {"id": "a", "question": "Q?", "answer": "1", "k": 0, "rationale": "\\boxed{1}", **kw}
    rec = {k: v for k, v in rec.items() if v is not None}
    return (json.dumps(rec) + "\n").encode()


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", b"\n\n", "empty file"),
        ("malformed.jsonl", good_line() + b'{"id": "b", "question": \n', "malformed.jsonl:2: malformed JSON"),
        ("dup.jsonl", good_line() + good_line(), "dup.jsonl:2: duplicate (id, k)"),
        ("noq.jsonl", good_line(question=None), "noq.jsonl:1: missing field 'question'"),
        ("noa.jsonl", good_line(answer=None), "noa.jsonl:1: missing field 'answer'"),
        ("nok.jsonl", good_line(k=None), "nok.jsonl:1: a sample needs 'k'"),
        ("latin1.jsonl", good_line() + good_line(k=1).replace(b"Q?", b"Q\xe9?"), "latin1.jsonl:2: not valid UTF-8"),
    ],
)
def test_bad_input_fails_with_one_line_and_no_output(runner, tmp_path, name, content, message):
    out = tmp_path / "split"
    r = split(runner, _bad(tmp_path, name, content), "-o", out)
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not out.exists() or not any(out.iterdir())


def test_missing_input_and_bad_format(runner, tmp_path):
    r = split(runner, tmp_path / "nope.jsonl", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "no such file" in r.output
    r = split(runner, tmp_path, "-o", tmp_path / "out")  # a directory without samples.jsonl
    assert r.exit_code == 1 and "negkd sample" in r.output
    r = split(runner, write_samples(tmp_path / "s.jsonl"), "-o", tmp_path / "out", "--format", "csv")
    assert r.exit_code == 2 and "--format" in r.output  # a usage error
    assert not (tmp_path / "out").exists()


def test_help_lists_the_options(runner):
    r = runner.invoke(app, ["split", "--help"])
    assert r.exit_code == 0
    for opt in ("--output", "--workers", "--drop-unparseable", "--format", "--overwrite"):
        assert opt in r.output


def test_a_split_that_dies_while_writing_leaves_nothing_half_written(runner, tmp_path, monkeypatch):
    """A failure after pos.jsonl was staged (here: stats.json cannot be written) must leave no
    pos.jsonl/neg.jsonl, no manifest and no temp file; a rerun then finishes normally."""
    import os

    from negkd import io

    samples = write_samples(tmp_path / "samples.jsonl")
    out = tmp_path / "split"
    real = io.RunDir.write_json

    def disk_full(self, name, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.RunDir, "write_json", disk_full)
    r = split(runner, samples, "-o", out)
    assert r.exit_code == 1 and "no space left on device" in r.output and "Traceback" not in r.output
    assert sorted(os.listdir(out)) == []
    monkeypatch.setattr(io.RunDir, "write_json", real)
    # a SIGKILLed run leaves its temp files behind (no cleanup runs): the next run removes them
    (out / ".pos.jsonl.tmp-999999999").write_text("torn")
    r = split(runner, samples, "-o", out)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["manifest.json", "neg.jsonl", "pos.jsonl", "stats.json"]
    assert len(read_jsonl(out / "pos.jsonl")) + len(read_jsonl(out / "neg.jsonl")) == 9
