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
echo "+ bench/train.py --whole-model (1B shape, bf16, CUDA)"
"$PY" bench/train.py --whole-model --device cuda --dtype bfloat16 --wm-layers "$WM_LAYERS" --wm-vocab 32000 \
    --wm-batch 4 --wm-seq 1024 --wm-steps 5
echo "gpu_smoke: ok"
