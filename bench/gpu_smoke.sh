#!/usr/bin/env bash
# GPU smoke test of the training core: train-neg and train-pos (NAT) for a few steps in bf16 on
# CUDA, then both again with --load-in-4bit (QLoRA), on a small locally built LLaMA. Prints
# tokens/s, peak GPU memory and the final loss of each run; then the whole-model rows of
# bench/train.py at a 1B shape (hidden 2048, bf16): CoT-KD (LoRA SFT) vs NAT (train-pos) vs NCE
# (calibrate) step time and peak GPU memory, each in its own process. Exits 0 with a message
# where there is no CUDA GPU.
#
#   bash bench/gpu_smoke.sh            # uses .venv/bin/python if present, else python3
#   PYTHON=python STEPS=20 bash bench/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
STEPS=${STEPS:-10}
WM_LAYERS=${WM_LAYERS:-4}   # whole-model rows: decoder layers at hidden 2048

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_smoke: no CUDA GPU visible to $PY; skipping (nothing to test here)"
    exit 0
fi
"$PY" -c 'import torch; print("gpu_smoke:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

D=$(mktemp -d -t negkd-gpu-smoke-XXXX)
trap 'rm -rf "$D"' EXIT
export HF_HUB_OFFLINE=1 NEGKD_PLAIN_PROGRESS=1

"$PY" -m negkd tiny-model -o "$D/base" --hidden 512 --layers 4 --heads 8 --vocab-size 512
"$PY" - "$D/split" <<'PYEOF'
import json, random, sys
from pathlib import Path
d = Path(sys.argv[1]); d.mkdir(parents=True)
rng = random.Random(0)
pos, neg = [], []
for i in range(256):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    base = {"id": f"q{i}", "question": f"What is {a} + {b}?", "answer": str(a + b)}
    steps = " ".join(f"Step {j}: {a} + {j} = {a + j}." for j in range(rng.randint(1, 40)))
    pos.append({**base, "k": 0, "rationale": f"{steps} So {a} + {b} = {a + b}. The answer is $\\boxed{{{a + b}}}$.",
                "pred": str(a + b), "correct": True})
    neg.append({**base, "k": 1, "rationale": f"{steps} So {a} + {b} = {a + b + 1}. The answer is $\\boxed{{{a + b + 1}}}$.",
                "pred": str(a + b + 1), "correct": False})
for name, rows in (("pos.jsonl", pos), ("neg.jsonl", neg)):
    (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
PYEOF

COMMON=(--max-steps "$STEPS" --batch-size 16 --grad-accum 1 --log-every 5 --device cuda --dtype bfloat16 --overwrite)
run() { echo "+ negkd $*"; "$PY" -m negkd "$@" "${COMMON[@]}"; }
run train-neg "$D/split" -o "$D/neg" --base-model "$D/base"
run train-pos "$D/split" -o "$D/nat" --neg "$D/neg"
run train-neg "$D/split" -o "$D/neg4" --base-model "$D/base" --load-in-4bit
run train-pos "$D/split" -o "$D/nat4" --neg "$D/neg4" --load-in-4bit

"$PY" - "$D" <<'PYEOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
print(f"{'run':28} {'steps':>5} {'tokens/s':>10} {'peak GPU GiB':>12} {'padding':>8} {'final loss':>10}")
for name, label in (("neg", "train-neg bf16"), ("nat", "train-pos NAT bf16"),
                    ("neg4", "train-neg 4-bit (QLoRA)"), ("nat4", "train-pos NAT 4-bit")):
    m = json.loads((d / name / "manifest.json").read_text())
    last = [json.loads(x) for x in (d / name / "metrics.jsonl").read_text().splitlines()][-1]
    print(f"{label:28} {m['steps']:>5} {m.get('tokens_per_s', 0):>10,.0f} {m.get('peak_gpu_memory_gb') or 0:>12.3f} "
          f"{100 * m.get('padding_share', 0):>7.1f}% {last['loss']:>10.4f}")
PYEOF
# --max-batch-tokens on CUDA: the same run under a 2,048-token budget per pass (peak GPU memory side by side)
run train-neg "$D/split" -o "$D/neg-budget" --base-model "$D/base" --max-batch-tokens 2048
"$PY" - "$D" <<'PYEOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
a, b = (json.loads((d / n / "manifest.json").read_text()) for n in ("neg", "neg-budget"))
print(f"--max-batch-tokens 2048: peak GPU {b['peak_gpu_memory_gb']:.3f} vs {a['peak_gpu_memory_gb']:.3f} GiB "
      f"({b['peak_gpu_memory_gb'] / a['peak_gpu_memory_gb']:.2f}x), tokens/s {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")
PYEOF

# FSDP2 (examples/fsdp.yaml) on 2 GPUs: train-neg, train-pos (NAT), calibrate; adapters vs 1 process x 2 accumulation
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$NGPU" -ge 2 ]; then
    F=(--max-steps 4 --batch-size 8 --lr 1e-3 --warmup 0 --lora-dropout 0 --schedule constant --dtype float32 --overwrite)
    fsdp() { echo "+ accelerate launch (FSDP2, 2 GPUs) negkd $*"; "$PY" -m accelerate.commands.launch --config_file examples/fsdp.yaml \
             --num_processes 2 -m negkd "$@" "${F[@]}" --grad-accum 1; }
    one() { echo "+ negkd $* (1 GPU)"; "$PY" -m negkd "$@" "${F[@]}" --grad-accum 2 --device cuda; }
    one train-neg "$D/split" -o "$D/f-neg1" --base-model "$D/base"
    fsdp train-neg "$D/split" -o "$D/f-neg2" --base-model "$D/base"
    one train-pos "$D/split" -o "$D/f-nat1" --neg "$D/f-neg1"
    fsdp train-pos "$D/split" -o "$D/f-nat2" --neg "$D/f-neg1"
    one calibrate "$D/split" -o "$D/f-nce1" --nat "$D/f-nat1"
    fsdp calibrate "$D/split" -o "$D/f-nce2" --nat "$D/f-nat1"
    "$PY" - "$D" <<'PYEOF'
import sys
from pathlib import Path
from safetensors.torch import load_file
d = Path(sys.argv[1])
for one, two, f in (("f-neg1", "f-neg2", "adapter_model.safetensors"), ("f-nat1", "f-nat2", "nat_model.safetensors"),
                    ("f-nce1", "f-nce2", "adapter_model.safetensors")):
    a, b = load_file(str(d / one / f)), load_file(str(d / two / f))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    scale = max(a[k].float().abs().max().item() for k in a)
    print(f"FSDP vs 1 process, {two}: max |diff| {diff:.2e} (largest |w| {scale:.3f})")
    assert sorted(a) == sorted(b) and diff <= 1e-3 * max(scale, 1e-3), "FSDP adapter differs from the single-process one"
PYEOF
else
    echo "gpu_smoke: FSDP check needs 2 GPUs ($NGPU visible); skipped"
fi

echo "+ bench/train.py --whole-model (1B shape, bf16, CUDA)"
"$PY" bench/train.py --whole-model --device cuda --dtype bfloat16 --wm-layers "$WM_LAYERS" --wm-vocab 32000 \
    --wm-batch 4 --wm-seq 1024 --wm-steps 5
echo "gpu_smoke: ok"
