"""Reliability: half-done outputs are never consumed, no step destroys another's data, a resumed
run equals an uninterrupted one, non-finite settings and diverging runs never "finish"."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from infer_helpers import read_jsonl, write_problems  # noqa: E402
from test_train_cli import COMMON, write_split  # noqa: E402

from negkd.cli import app  # noqa: E402

SAMPLE = {"id": "p1", "question": "1 + 1?", "answer": "2", "k": 0, "rationale": "so \\boxed{2}"}


def _samples_dir(d: Path, n: int = 4, finished: bool = False, killed_by: str = "sample") -> Path:
    """A `negkd sample` directory as a kill leaves it (state file, samples so far, no manifest)."""
    d.mkdir(parents=True, exist_ok=True)
    rows = [{**SAMPLE, "id": f"p{i}", "k": k, "rationale": f"\\boxed{{{2 + k}}}"} for i in range(n) for k in range(2)]
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / ".sample-run.json").write_text('{"args": {}, "inputs": []}\n')
    (d / ".negkd-running.json").write_text(json.dumps({"command": killed_by}) + "\n")
    if finished:
        (d / ".sample-run.json").unlink()
        (d / ".negkd-running.json").unlink()
        (d / "manifest.json").write_text('{"command": "sample", "args": {}, "inputs": [], "outputs": {}}\n')
    return d


def _err(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.output, r.output
    return lines[0]


# ------------------------------------------------------------------ class 2: unfinished inputs


def test_split_refuses_a_killed_sample_directory(runner, tmp_path):
    d = _samples_dir(tmp_path / "samples")
    out = tmp_path / "split"
    r = runner.invoke(app, ["split", str(d), "-o", str(out)])
    assert r.exit_code == 1
    line = _err(r)
    assert "unfinished `negkd sample`" in line and "--allow-unfinished" in line and not out.exists()
    # the file itself, inside the unfinished run, is refused too
    r = runner.invoke(app, ["split", str(d / "samples.jsonl"), "-o", str(out)])
    assert r.exit_code == 1 and "unfinished" in r.output and not out.exists()
    # explicitly accepted: loudly
    r = runner.invoke(app, ["split", str(d), "-o", str(out), "--allow-unfinished"])
    assert r.exit_code == 0, r.output
    assert "UNFINISHED" in r.stderr


def test_eval_refuses_a_killed_infer_directory(runner, tmp_path):
    d = tmp_path / "infer"
    d.mkdir()
    rec = {"id": "a", "question": "q", "answer": "2", "candidates": [{"rationale": "\\boxed{2}", "pred": "2"}]}
    (d / "predictions.jsonl").write_text(json.dumps(rec) + "\n")
    (d / ".infer-state.json").write_text("{}\n")  # what a killed `negkd infer` leaves
    out = tmp_path / "eval"
    r = runner.invoke(app, ["eval", str(d), "-o", str(out)])
    assert r.exit_code == 1 and "unfinished `negkd infer`" in _err(r) and not out.exists()
    r = runner.invoke(app, ["eval", str(d), "-o", str(out), "--allow-unfinished"])
    assert r.exit_code == 0, r.output


def test_a_directory_input_needs_a_manifest(runner, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "samples.jsonl").write_text(json.dumps(SAMPLE) + "\n")  # no manifest, no state: not a finished step
    r = runner.invoke(app, ["split", str(d), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no manifest.json" in _err(r)


def test_training_refuses_an_unfinished_split_and_a_killed_train_dir_as_model(runner, tmp_path, tiny_model):
    split = write_split(tmp_path / "split", n=4)
    (split / "manifest.json").unlink()
    (split / ".negkd-running.json").write_text('{"command": "split"}\n')
    r = runner.invoke(app, ["train-neg", str(split), "-o", str(tmp_path / "o"), "--base-model", str(tiny_model)])
    assert r.exit_code == 1 and "unfinished `negkd split`" in _err(r)
    killed = tmp_path / "neg"
    (killed / "checkpoints" / "step-00000002").mkdir(parents=True)
    (killed / ".negkd-running.json").write_text('{"command": "train-neg", "command_line": "negkd train-neg X -o Y"}\n')
    probs = write_problems(tmp_path / "p.jsonl", 2)
    r = runner.invoke(app, ["infer", str(probs), "-o", str(tmp_path / "i"), "--model", str(killed)])
    line = _err(r)
    assert r.exit_code == 1 and "unfinished `negkd train-neg`" in line and "negkd train-neg X -o Y" in line


# ------------------------------------------------------------------ class 3: a step never destroys others' data


def test_split_over_its_sample_directory_is_refused_even_with_overwrite(runner, tmp_path):
    d = _samples_dir(tmp_path / "samples", finished=True)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for extra in ([], ["--overwrite"]):
        r = runner.invoke(app, ["split", str(d), "-o", str(d), *extra])
        assert r.exit_code == 1, r.output
        assert "input" in _err(r) or "negkd sample" in _err(r)
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_split_into_the_directory_of_its_own_input_is_refused(runner, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    rows = [{**SAMPLE, "k": k, "rationale": f"\\boxed{{{k}}}", "pred": str(k), "correct": k == 2} for k in range(4)]
    (d / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = (d / "pos.jsonl").read_bytes()
    r = runner.invoke(app, ["split", str(d / "pos.jsonl"), "-o", str(d), "--overwrite"])
    assert r.exit_code == 1 and "holds this run's input" in _err(r)
    assert (d / "pos.jsonl").read_bytes() == before and sorted(p.name for p in d.iterdir()) == ["pos.jsonl"]


@pytest.mark.parametrize("other", ["sample", "infer", "train-neg"])
def test_overwrite_redoes_the_same_command_only(runner, tmp_path, other):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps(SAMPLE) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"command": other, "args": {}, "inputs": [], "outputs": {}}))
    (out / "precious.bin").write_bytes(b"paid for")
    r = runner.invoke(app, ["split", str(samples), "-o", str(out), "--overwrite"])
    assert r.exit_code == 1 and f"`negkd {other}`" in _err(r)
    assert (out / "precious.bin").read_bytes() == b"paid for" and (out / "manifest.json").exists()
    # an unfinished run of another command (no manifest yet) is protected as well
    (out / "manifest.json").unlink()
    (out / ".negkd-running.json").write_text(json.dumps({"command": other}))
    r = runner.invoke(app, ["split", str(samples), "-o", str(out), "--overwrite"])
    assert r.exit_code == 1 and f"unfinished `negkd {other}`" in _err(r)


# ------------------------------------------------------------------ class 8: every output directory is locked


def test_a_second_command_writing_the_same_directory_is_refused(runner, tmp_path):
    import fcntl

    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps(SAMPLE) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # another process's split holds the directory
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        r = runner.invoke(app, ["split", str(samples), "-o", str(out)])
        assert r.exit_code == 1 and "another negkd command is writing" in _err(r)
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)
    r = runner.invoke(app, ["split", str(samples), "-o", str(out)])
    assert r.exit_code == 0, r.output  # the lock went with its holder
    r = runner.invoke(app, ["split", str(samples), "-o", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output  # and a finished command released its own


# ------------------------------------------------------------------ class 4: resumed infer == uninterrupted


def test_resumed_infer_writes_what_an_uninterrupted_run_writes(runner, tmp_path, tiny_model, monkeypatch):
    """A real tiny model, sampled: killed after 5 of 11 problems (mid-window), then resumed with the
    same --seed. Every record equals the uninterrupted run's."""
    from negkd.steps import infer

    probs = write_problems(tmp_path / "p.jsonl", 11)
    flags = ["--model", str(tiny_model), "--n", "2", "--batch-size", "2", "--max-new-tokens", "6", "--seed", "3",
             "--temperature", "1.0", "--device", "cpu"]
    r = runner.invoke(app, ["infer", str(probs), "-o", str(tmp_path / "a"), *flags])
    assert r.exit_code == 0, r.output
    want = {x["id"]: x["candidates"] for x in read_jsonl(tmp_path / "a" / "predictions.jsonl")}

    real = infer._HF.generate

    def killed(self, prompts, **kw):
        for k, item in enumerate(real(self, prompts, **kw)):
            if killed.left == 0:
                raise KeyboardInterrupt
            killed.left -= 1
            yield item

    killed.left = 5
    monkeypatch.setattr(infer._HF, "generate", killed)
    r = runner.invoke(app, ["infer", str(probs), "-o", str(tmp_path / "b"), *flags])
    assert r.exit_code == 130 and len(read_jsonl(tmp_path / "b" / "predictions.jsonl")) == 5
    monkeypatch.setattr(infer._HF, "generate", real)
    r = runner.invoke(app, ["infer", str(probs), "-o", str(tmp_path / "b"), *flags])
    assert r.exit_code == 0, r.output
    got = {x["id"]: x["candidates"] for x in read_jsonl(tmp_path / "b" / "predictions.jsonl")}
    assert sorted(got) == sorted(want)
    assert got == want
    assert len({c["rationale"] for cs in want.values() for c in cs}) > 3  # really sampled, not constant


def test_per_prompt_seeds_follow_the_problem_not_the_resume_point(runner, tmp_path, tiny_model, monkeypatch):
    """Backends with per-prompt seeds (vLLM, OpenAI) get seed + position in the full selection."""
    from negkd.generation import Generation

    seen: dict[str, int] = {}

    class Seeded:
        name, tokenizer, window = "openai", None, 1 << 30

        def __init__(self, stop_after=None):
            self.stop_after = stop_after

        def generate(self, prompts, *, n, seed, **kw):
            for i, p in enumerate(prompts):
                if self.stop_after is not None and len(seen) >= self.stop_after:
                    raise KeyboardInterrupt
                seen[p] = seed + i
                yield i, [Generation(text="\\boxed{1}", n_tokens=1, finished=True)] * n

    probs = write_problems(tmp_path / "p.jsonl", 6)
    monkeypatch.setattr("negkd.steps.infer._make_backend", lambda *a, **k: Seeded(stop_after=2))
    out = tmp_path / "o"
    assert runner.invoke(app, ["infer", str(probs), "-o", str(out), "--model", str(tiny_model), "--n", "1",
                               "--seed", "100"]).exit_code == 130
    monkeypatch.setattr("negkd.steps.infer._make_backend", lambda *a, **k: Seeded())
    r = runner.invoke(app, ["infer", str(probs), "-o", str(out), "--model", str(tiny_model), "--n", "1",
                            "--seed", "100"])
    assert r.exit_code == 0, r.output
    order = [p for p in seen]
    assert [seen[p] for p in order] == list(range(100, 106))


def test_a_bad_template_is_refused_before_the_model_loads_and_leaves_no_state(runner, tmp_path, tiny_model,
                                                                                monkeypatch):
    probs = write_problems(tmp_path / "p.jsonl", 2)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the template was checked")

    monkeypatch.setattr("negkd.steps.infer._make_backend", no_load)
    out = tmp_path / "o"
    r = runner.invoke(app, ["infer", str(probs), "-o", str(out), "--model", str(tiny_model),
                            "--template", "Q: {question} {nope}"])
    assert r.exit_code == 1 and "{nope}" in _err(r) and not out.exists()


# ------------------------------------------------------------------ class 5: non-finite settings and divergence


@pytest.mark.parametrize("flag", [["--lr", "inf"], ["--lr", "nan"], ["--warmup", "inf"]])
def test_non_finite_training_flags_are_usage_errors(runner, tmp_path, tiny_model, flag):
    split = write_split(tmp_path / "split", n=4)
    out = tmp_path / "o"
    r = runner.invoke(app, ["train-neg", str(split), "-o", str(out), "--base-model", str(tiny_model), *flag])
    assert r.exit_code == 2 and flag[0] in _err(r) and not out.exists()


def test_a_diverging_run_stops_with_a_clear_error_and_no_manifest(runner, tmp_path, tiny_model):
    split = write_split(tmp_path / "split", n=8)
    out = tmp_path / "o"
    common = [x for x in COMMON if x not in ("1e-2",)]
    common[common.index("--lr") + 1:common.index("--lr") + 1] = ["1e30"]  # finite, absurd: the loss blows up
    r = runner.invoke(app, ["train-neg", str(split), "-o", str(out), "--base-model", str(tiny_model),
                            "--max-steps", "6", "--max-grad-norm", "0", *common])
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]  # after the progress log
    assert "Traceback" not in r.output and line.startswith("error:")
    assert "diverged" in line and "--lr" in line
    assert not (out / "manifest.json").exists() and not (out / "adapter_model.safetensors").exists()
    for f in out.rglob("*.json*"):  # whatever was written is strict JSON (no bare NaN/Infinity)
        for chunk in (f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]):
            json.loads(chunk, parse_constant=lambda c: pytest.fail(f"{f}: non-standard JSON constant {c}"))


def test_strict_json_writers_refuse_nan():
    from negkd.io import dump_json, dumps

    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            dumps({"x": bad})
        with pytest.raises(ValueError):
            dump_json({"x": bad})


def test_disk_full_while_checkpointing_leaves_no_temp_checkpoint(runner, tmp_path, tiny_model, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(a[1]) if len(a) > 1 else None)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    split = write_split(tmp_path / "split", n=4)
    out = tmp_path / "o"
    r = runner.invoke(app, ["train-neg", str(split), "-o", str(out), "--base-model", str(tiny_model),
                            "--max-steps", "1", *COMMON])
    assert r.exit_code == 1 and "no space left on device" in r.stderr and "Traceback" not in r.output, r.output
    assert not (out / "manifest.json").exists()
    ck = out / "checkpoints"
    assert not any(ck.glob(".step-*.tmp")), "a torn checkpoint was left"
    assert not any(ck.glob("step-*"))
