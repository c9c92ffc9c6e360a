"""train-neg, train-pos (NAT) and calibrate under `accelerate launch` with an FSDP2 config, 2 CPU
processes: the saved adapters equal a single-process run's, and a resumed FSDP run continues exactly.

accelerate enables FSDP only on accelerators (on CPU an FSDP config silently becomes DDP), so the
launches go through tests/fsdp_cpu_shim.py, which switches accelerate's state to FSDP after it set
up the gloo group; torch's fully_shard then shards every parameter as on GPUs.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_cli import invoke, write_split

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "examples" / "fsdp.yaml"
RUN = ["--max-steps", "3", "--batch-size", "8", "--lr", "1e-2", "--log-every", "1", "--warmup", "0",
       "--lora-dropout", "0", "--schedule", "constant"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp(args, cwd):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "NEGKD_PLAIN_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
           "--main_process_port", str(_port()), str(HERE / "fsdp_cpu_shim.py"), *args, "--grad-accum", "1"]
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "x 2 processes, FSDP)" in p.stderr
    return p


def single(args):
    from typer.testing import CliRunner

    r = invoke(CliRunner(), [*args, "--device", "cpu"])
    assert r.exit_code == 0, r.output


def assert_same(a: Path, b: Path, name: str):
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert sorted(x) == sorted(y)
    assert max(v.abs().max().item() for v in y.values()) > 0
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def root(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    write_split(d / "split", n=32)
    return d


@pytest.fixture(scope="module")
def neg1(root, tiny_model):
    single(["train-neg", str(root / "split"), "-o", str(root / "neg-1"), "--base-model", str(tiny_model), *RUN,
            "--grad-accum", "2"])
    return root / "neg-1"


def test_fsdp_runs_equal_a_single_process_run(root, tiny_model, neg1):
    """2 FSDP processes x batch 8 = one process x batch 8 x 2 accumulation: the same rows per step."""
    split, base = str(root / "split"), ["--base-model", str(tiny_model)]
    fsdp(["train-neg", split, "-o", str(root / "neg-f"), *base, *RUN, "--save-every", "2"], root)
    assert_same(root / "neg-f", root / "neg-1", "adapter_model.safetensors")
    assert_same(root / "neg-f" / "checkpoints" / "step-00000003", root / "neg-1" / "checkpoints" / "step-00000003",
                "trainable.safetensors")

    nat = ["train-pos", split, "--neg", str(root / "neg-1"), "--gate-dim", "16", *RUN]
    single([*nat, "-o", str(root / "nat-1"), "--grad-accum", "2"])
    fsdp([*nat, "-o", str(root / "nat-f")], root)
    assert_same(root / "nat-f", root / "nat-1", "nat_model.safetensors")  # frozen neg branch included

    nce = ["calibrate", split, "--nat", str(root / "nat-1"), *RUN]
    single([*nce, "-o", str(root / "nce-1"), "--grad-accum", "2"])
    fsdp([*nce, "-o", str(root / "nce-f")], root)
    assert_same(root / "nce-f", root / "nce-1", "adapter_model.safetensors")
    assert len((root / "nce-f" / "calibration.jsonl").read_text().splitlines()) == 32
    # 3 steps x 16 rows over 32 examples: step 3 is epoch 2, where every process knows every beta
    passes = json.loads((root / "nce-f" / "manifest.json").read_text())["neg_passes"]
    assert passes == {"run": 2, "beta_reused": 1}


def test_fsdp_resume_and_token_budget(root, tiny_model):
    split, base = str(root / "split"), ["--base-model", str(tiny_model)]
    # a budget that cuts each process's 8 rows per step into passes of 2 (every pass a collective)
    budget = ["--max-batch-tokens", "90"]
    single(["train-neg", split, "-o", str(root / "b-1"), *base, *RUN, "--grad-accum", "2"])
    out = root / "b-f"
    short = [a if a != "3" else "2" for a in RUN]  # --max-steps 2, then --resume to 3
    fsdp(["train-neg", split, "-o", str(out), *base, *short, *budget, "--save-every", "1"], root)
    p = fsdp(["train-neg", split, "-o", str(out), *base, *RUN, *budget, "--save-every", "1", "--resume"], root)
    assert "resuming from" in p.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["steps"] == 3 and man["resumed_from"] == 2 and man["world_size"] == 2
    assert_same(out, root / "b-1", "adapter_model.safetensors")


def test_fsdp_bf16_base_with_float32_adapters(root, neg1):
    """Mixed dtypes in one FSDP unit (bf16 frozen base, float32 LoRA/NAT tensors) shard and save."""
    split, out = str(root / "split"), root / "nat-bf16"
    fsdp(["train-pos", split, "-o", str(out), "--neg", str(neg1), "--gate-dim", "16", *RUN,
          "--dtype", "bfloat16"], root)
    w = load_file(str(out / "nat_model.safetensors"))
    assert w and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in w.values())
