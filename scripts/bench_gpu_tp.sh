#!/usr/bin/env bash
# Tensor parallelism on 2 GPUs (issue 8) in one device call (kind nvidia-h200-x2, ~6 min, 9 at most); results in
# $OUT/tp_gpu.tgz, rewritten after each step (scripts/tp_gpu_report.py turns them into docs/benchmarks.md rows):
#   1. tests: tp=2 greedy tokens == tp=1, random Llama-3-8B shape (32 layers), NCCL + CUDA graphs; runtime-layout W4A16
#   2. decode tok/s tp=1 vs tp=2, bs 1 and 64, Llama-2-70B shape W4A16 (random int4 made per rank in the kernels'
#      layout), and the all-reduce time of one decode step
#   3. tritonserver serving, tp=2 over both GPUs, the same 70B-shape W4A16 model (weights made at load) and the
#      Llama-2-7B shape fp16 (random, from disk): lmtriton bench serving at concurrency 1 and 16, beside the
#      in-process engine on the same prompts
# Every step runs under `timeout` (its whole process group is killed), so a hang costs that step only.
# Here, first (read-only, shared with scripts/bench_gpu.sh): .carry/ (../shared/device/make-carry.sh .venv),
#   workspace/bench_tok/ (tokenizer files), workspace/gpu_py/ (cp312 wheels: grpcio, protobuf, python-rapidjson,
#   pyzmq, msgpack + the tritonclient package directory).
# Device call: kind nvidia-h200-x2, carry [".carry", "workspace/bench_tok", "workspace/gpu_py"],
#   command `bash scripts/bench_gpu_tp.sh`
# CPU rehearsal of the same steps (tiny shapes, gloo, the CPU tritonserver):
#   SMOKE=1 PY=.venv/bin/python OUT=/tmp/tp_smoke bash scripts/bench_gpu_tp.sh
set -u
OUT=${OUT:-out/bench_gpu_tp}
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
DEADLINE=${DEADLINE:-530}     # seconds for all steps (the call must stay under 9 min; the device kills it at 10)
R=${R:-/tmp/tp_gpu_results}   # only the archive goes under $OUT (at most 8 files come back)
rm -rf "$R"
mkdir -p "$R" "$OUT"
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # never NVLink multicast
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
T0=$SECONDS

step() {   # step NAME SECONDS CMD...: log to $R/NAME.log; TERM to the step's process group at SECONDS (cut to what
           # is left of DEADLINE), KILL 15 s later; the archive is rewritten after every step
  local name=$1 secs=$2 t0=$SECONDS
  shift 2
  local left=$((DEADLINE - (SECONDS - T0) - 20))
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$secs" -lt 30 ]; then
    echo "== $name skipped: $left s left" | tee -a "$R/steps.txt"
    return
  fi
  timeout -k 15 "$secs" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s of $secs (total $((SECONDS - T0))s)" | tee -a "$R/steps.txt"
  grep -v "it/s\]\|tok/s\]\|req/s\]" "$R/$name.log" | tail -n 6
  leftovers "$name"
  pack
}

pack() { tar -C "$R" -czf "$OUT/tp_gpu.tgz.part" . && mv "$OUT/tp_gpu.tgz.part" "$OUT/tp_gpu.tgz"; }

leftovers() {   # a GPU process still alive after a step is one of its tp workers: say so, and end it
  command -v nvidia-smi > /dev/null || return 0
  local pids
  pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
  [ -z "$pids" ] && return 0
  echo "leftover GPU processes after $1: $pids" | tee -a "$R/steps.txt"
  kill -9 $pids 2>/dev/null
  sleep 3
}

if [ "$SMOKE" = 1 ]; then
  SHAPE=tiny; AWQ=tiny-awq; DT=float32; BENCH_ARGS="--cpu --batches 1,4 --new 4"; SERVE_ARGS="--smoke"
  SERVE_AWQ_ARGS="--smoke"
  TESTS=(-m "not slow and not gpu" -k "tp2 or runtime")
else
  SHAPE=llama2-7b; AWQ=llama2-70b; DT=float16; BENCH_ARGS="--batches 1,64 --new 64"
  SERVE_ARGS="--num-prompts 16 --concurrency 1,16 --max-output-len 96"
  SERVE_AWQ_ARGS="--num-prompts 16 --concurrency 1,16 --max-output-len 64"
  TESTS=(-m gpu -o faulthandler_timeout=150)
  export TP_TEST_LAYERS=32      # the whole Llama-3-8B shape (the test's default is 8 layers)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/gpus.txt"
  nvidia-smi topo -m >> "$R/gpus.txt" 2>&1
  # in the background while steps 1-2 use the GPUs: tritonserver unpacked, the 7B workspace written on CPU
  ( timeout 200 bash .carry/setup.sh > "$R/setup.log" 2>&1
    $PY -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/gsite') for w in glob.glob('workspace/gpu_py/*.whl')]" \
      >> "$R/setup.log" 2>&1
    cp -r workspace/gpu_py/tritonclient /tmp/gsite/ ) &
  SETUP=$!
fi
# the served workspaces: the 70B-shape W4A16 one holds no weights (each rank makes its shard on its GPU at load:
# backend/model/random_model.py), the 7B fp16 one is written to disk on CPU while steps 1-2 run
( CUDA_VISIBLE_DEVICES= timeout 120 $PY -m scripts.bench_random_workspace --shape "$AWQ" --quant awq \
    --random-at-load --tokenizer workspace/bench_tok --workspace /tmp/ws_tp2_awq --dtype $DT --param tp=2 \
    --param session_len=2048 > "$R/workspace_awq.log" 2>&1
  CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4 timeout 300 $PY -m scripts.bench_random_workspace --shape "$SHAPE" \
    --tokenizer workspace/bench_tok --workspace /tmp/ws_tp2 --dtype $DT --param tp=2 --param session_len=2048 \
    > "$R/workspace.log" 2>&1 ) &
WS=$!

# 1. correctness (the GPU test compares tp=2 with tp=1 and prints the first divergence or the max logit difference)
step tests 200 $PY -m pytest -q -s -p no:cacheprovider tests/test_tp.py tests/test_w4a16_runtime_only.py "${TESTS[@]}"
# 2. 70B-shape W4A16 decode, tp=1 then tp=2, and the all-reduce time per step
step bench_70b 200 $PY scripts/bench_tp.py --models "" --awq-shape "$AWQ" $BENCH_ARGS --out "$R/tp_${AWQ}-awq.json"
# 3. serving through tritonserver, tp=2 over both GPUs: the 70B-shape W4A16 model, then the 7B fp16 one
if [ "$SMOKE" != 1 ]; then
  wait $SETUP
  source .carry/setup.sh > /dev/null
  export PYTHONPATH=/tmp/gsite:$PWD
  # the stub does not see PYTHONPATH: pyzmq and msgpack into the stub's and the image's site-packages (as bench_gpu.sh)
  for py in "$STUB_BIN/python3" "$ENGINE_PYTHON"; do
    "$py" -c "import glob, site, zipfile; [zipfile.ZipFile(w).extractall(site.getsitepackages()[0])
for w in glob.glob('workspace/gpu_py/pyzmq-*.whl') + glob.glob('workspace/gpu_py/msgpack-*.whl')]"
  done
fi
for _ in $(seq 60); do [ -f /tmp/ws_tp2_awq/model_repository/llm/config.pbtxt ] && break; sleep 1; done
step serving_awq 180 $PY -m tools.cli bench serving --workspace /tmp/ws_tp2_awq $SERVE_AWQ_ARGS --out-dir "$R" \
  --server-log "$R/server_awq.log" --tag "${AWQ}-awq_tp2"
wait $WS
tail -n 2 "$R/workspace_awq.log" "$R/workspace.log"
step serving 180 $PY -m tools.cli bench serving --workspace /tmp/ws_tp2 $SERVE_ARGS --out-dir "$R" \
  --server-log "$R/server.log" --tag "${SHAPE}_${DT}_tp2"
echo "total $((SECONDS - T0))s" >> "$R/steps.txt"
pack
