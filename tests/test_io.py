"""io.py: JSONL reading errors, input resolution, and the run directory contract."""

from __future__ import annotations

import gzip
import json

import pytest

from negkd.errors import UserError
from negkd.io import MANIFEST, RunDir, iter_jsonl, resolve_input, sha256_tree


def test_iter_jsonl_reads_plain_gzip_and_array(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert [(n, r["a"]) for n, r in iter_jsonl(p)] == [(1, 1), (3, 2)]
    g = tmp_path / "a.jsonl.gz"
    with gzip.open(g, "wt", encoding="utf-8") as fh:
        fh.write('{"a": 1}\n{"a": 2}\n')
    assert [r["a"] for _, r in iter_jsonl(g)] == [1, 2]
    j = tmp_path / "a.json"
    j.write_text(json.dumps([{"a": 1}, {"a": 2}]), encoding="utf-8")
    assert [r["a"] for _, r in iter_jsonl(j)] == [1, 2]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"\n  \n", "empty file"),
        (b'{"a": 1}\n{"a": \n', ":2: malformed JSON"),
        (b'{"a": 1}\n[1, 2]\n', ":2: expected a JSON object, got list"),
        (b'{"a": 1}\n{"a": "\xff\xfe"}\n', ":2: not valid UTF-8"),
    ],
)
def test_iter_jsonl_errors_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(UserError) as e:
        list(iter_jsonl(p))
    assert str(e.value).startswith(str(p))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_iter_jsonl_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))


def test_resolve_input_file_or_step_directory(tmp_path):
    (tmp_path / "pos.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="unfinished `negkd split`.*--allow-unfinished"):
        resolve_input(tmp_path, ["pos.jsonl"], produced_by="split")  # a directory must hold a finished run
    assert resolve_input(tmp_path, ["pos.jsonl"], allow_unfinished=True) == tmp_path / "pos.jsonl"
    (tmp_path / "manifest.json").write_text("{}\n")
    assert resolve_input(tmp_path, ["pos.jsonl"]) == tmp_path / "pos.jsonl"
    f = tmp_path / "x.jsonl"
    f.write_text("{}\n")
    assert resolve_input(f, ["pos.jsonl"]) == f
    with pytest.raises(UserError, match="holds none of neg.jsonl.*negkd split"):
        resolve_input(tmp_path, ["neg.jsonl"], produced_by="split")
    with pytest.raises(UserError, match="no such file or directory"):
        resolve_input(tmp_path / "missing", ["pos.jsonl"])


def _run(tmp_path, args, overwrite=False):
    inp = tmp_path / "in.jsonl"
    return RunDir(tmp_path / "out", "demo", args, inputs=[inp], overwrite=overwrite, quiet=True)


def test_rundir_writes_manifest_last_and_is_a_noop_on_rerun(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"x": 1}\n')
    run = _run(tmp_path, {"n": 1})
    assert not run.up_to_date()
    run.start()
    run.write_jsonl("out.jsonl", [{"a": 1}, {"a": 2}])
    assert not (tmp_path / "out" / "out.jsonl").exists()  # staged, not yet in place
    assert not (tmp_path / "out" / MANIFEST).exists()
    m = run.finish(extra_info=3)
    assert (tmp_path / "out" / "out.jsonl").read_text().count("\n") == 2
    assert m["outputs"]["out.jsonl"]["records"] == 2
    assert m["inputs"][0]["sha256"] == sha256_tree(tmp_path / "in.jsonl")
    assert m["extra_info"] == 3 and m["command"] == "demo" and m["negkd_version"]
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]
    # same inputs and args: up to date
    assert _run(tmp_path, {"n": 1}).up_to_date()
    # --overwrite: not up to date
    assert not _run(tmp_path, {"n": 1}, overwrite=True).up_to_date()
    # other args: refused with a message naming the fix
    with pytest.raises(UserError, match="arguments differ: n.*--overwrite"):
        _run(tmp_path, {"n": 2}).up_to_date()
    # changed input content: refused too
    (tmp_path / "in.jsonl").write_text('{"x": 2}\n')
    with pytest.raises(UserError, match="inputs changed"):
        _run(tmp_path, {"n": 1}).up_to_date()


def test_rundir_interrupted_run_leaves_no_partial_outputs(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"x": 1}\n')
    run = _run(tmp_path, {"n": 1}).start()

    def records():
        yield {"a": 1}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        run.write_jsonl("out.jsonl", records())
    run.cleanup()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    # a rerun is not mistaken for a finished one
    assert not _run(tmp_path, {"n": 1}).up_to_date()


def test_rundir_start_invalidates_old_manifest(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"x": 1}\n')
    run = _run(tmp_path, {"n": 1}).start()
    run.write_jsonl("out.jsonl", [{"a": 1}])
    run.finish()
    redo = _run(tmp_path, {"n": 1}, overwrite=True).start()
    assert not (tmp_path / "out" / MANIFEST).exists()  # outputs now in flux
    redo.write_jsonl("out.jsonl", [{"a": 9}])
    redo.finish()
    assert json.loads((tmp_path / "out" / "out.jsonl").read_text())["a"] == 9
