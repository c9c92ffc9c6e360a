"""train-pos under real DDP (2 CPU processes over gloo) and a killed-then-resumed run.

Note: in accelerate 1.x ``accelerate launch --cpu --num_processes 2`` starts ONE process
(its simple launcher; multi-process CPU needs mpirun). ``ACCELERATE_USE_CPU=1 accelerate
launch --multi_gpu --num_processes 2`` starts two, and the Accelerator then reports
DistributedType.MULTI_CPU with a gloo process group — real DDP on CPU.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train_cli import COMMON, invoke, metrics, write_split


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "NEGKD_PLAIN_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def neg_and_split(tiny_model, tmp_path_factory):
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("ddp")
    split = write_split(root / "split", n=32)
    neg = root / "neg"
    r = invoke(CliRunner(), ["train-neg", str(split), "-o", str(neg), "--base-model", str(tiny_model),
                             "--max-steps", "3", *COMMON])
    assert r.exit_code == 0, r.output
    return root, split, neg


def test_train_pos_under_accelerate_launch_two_processes(neg_and_split):
    root, split, neg = neg_and_split
    out = root / "nat-ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "negkd", "train-pos", str(split), "-o", str(out), "--neg", str(neg), "--max-steps", "4",
           "--save-every", "2", "--gate-dim", "16", *COMMON[:-2]]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "x 2 processes" in p.stderr  # both ranks joined one process group
    man = json.loads((out / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["steps"] == 4
    cks = sorted(x.name for x in (out / "checkpoints").iterdir())
    assert cks == ["step-00000004"]  # one checkpoint, written once (older ones pruned, no temp dirs left)
    ck = out / "checkpoints" / cks[0]
    assert (ck / "rng_state_0.pt").exists() and (ck / "rng_state_1.pt").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # the main process alone logs
    assert not [x for x in out.iterdir() if ".tmp" in x.name]
    adapter = load_file(str(neg / "adapter_model.safetensors"))
    sd = load_file(str(out / "nat_model.safetensors"))
    from negkd.nat import canonical

    for key, t in adapter.items():
        which = "lora_A_neg" if ".lora_A." in key else "lora_B_neg"
        assert torch.equal(sd[f"{canonical(key.split('.lora_')[0])}.{which}.weight"], t), key
    assert any(float(v.abs().sum()) > 0 for k, v in sd.items() if "lora_gate_w2" in k)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_curve(neg_and_split, tiny_model):
    """SIGKILL a train-neg subprocess after its first checkpoint, --resume, compare to an uninterrupted run."""
    root, split, _ = neg_and_split
    base = [sys.executable, "-m", "negkd", "train-neg", str(split), "--base-model", str(tiny_model),
            "--max-steps", "200", "--save-every", "5", *COMMON]
    full = root / "full"
    assert subprocess.run([*base, "-o", str(full)], env=_env(), capture_output=True, timeout=240).returncode == 0
    cut = root / "cut"
    proc = subprocess.Popen([*base, "-o", str(cut)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (cut / "checkpoints" / "step-00000010").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "manifest.json").exists()
    r = subprocess.run([*base, "-o", str(cut), "--resume"], env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((cut / "manifest.json").read_text())
    assert man["steps"] == 200 and 10 <= man["resumed_from"] < 200
    a, b = metrics(full), metrics(cut)
    assert [x["step"] for x in b] == list(range(1, 201))
    torch.testing.assert_close([x["loss"] for x in b], [x["loss"] for x in a], rtol=1e-5, atol=1e-6)
