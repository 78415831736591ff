#!/usr/bin/env bash
# The GPU benchmark set of docs/benchmarks.md in one device call (10-minute limit), results under $OUT.
# Here, first:  ../shared/device/make-carry.sh .venv   (tritonserver for the GPU image, -> .carry/)
#               workspace/bench_tok/  the demo tokenizer files (tokenizer.json, tokenizer_config.json, config.json)
#               workspace/gpu_py/     cp312 wheels of grpcio, protobuf, python-rapidjson, pyzmq, msgpack (the image
#                                     has none of them) + a copy of the tritonclient package directory
# Device call:  carry [".carry", "workspace/bench_tok", "workspace/gpu_py"], command `bash scripts/bench_gpu.sh`
set -u
OUT=${OUT:-out/bench_gpu}
SHAPE=${SHAPE:-llama2-7b}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=.
export TOKENIZERS_PARALLELISM=false
B="$PY -m tools.cli bench"

step() {   # step NAME SECONDS CMD...: log to $OUT/NAME.log, print the exit code, time and last lines
  local name=$1 secs=$2 t0=$SECONDS
  shift 2
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0))s"
  grep -v "it/s\]\|tok/s\]\|req/s\]" "$OUT/$name.log" | tail -n 4
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# in the background while the in-process runs use the GPU: tritonserver unpacked, the served 7B workspace on CPU
( bash .carry/setup.sh > "$OUT/setup.log" 2>&1
  $PY -m pip install -q --no-index --no-deps --target /tmp/gsite workspace/gpu_py/*.whl >> "$OUT/setup.log" 2>&1
  cp -r workspace/gpu_py/tritonclient /tmp/gsite/ ) &
SETUP=$!
( CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4 timeout 300 $PY -m scripts.bench_random_workspace --shape "$SHAPE" \
    --tokenizer workspace/bench_tok --workspace /tmp/ws_fp16 --param session_len=2048 > "$OUT/workspace.log" 2>&1 ) &
WS=$!

step gen_fp16 130 $B generation --model "$SHAPE" --dtype float16 --batch-sizes 1,16,64 \
  --lengths 1:128,128:256,2048:128 --cache-max-entry-count 0.5 --out-dir "$OUT"
step gen_awq_kv8 70 $B generation --model "$SHAPE" --dtype float16 --quant awq --kv int8 --batch-sizes 1,16,64 \
  --lengths 1:128,128:256,2048:128 --no-hf --out-dir "$OUT"
step tp_fp16 150 $B throughput --model "$SHAPE" --dtype float16 --num-prompts 160 --concurrency 16,64 \
  --max-output-len 512 --hf-num-prompts 8 --hf-batch 8 --cache-max-entry-count 0.5 --out-dir "$OUT"
step tp_awq_kv8 60 $B throughput --model "$SHAPE" --dtype float16 --quant awq --kv int8 --num-prompts 160 \
  --concurrency 16,64 --max-output-len 512 --no-hf --out-dir "$OUT"

wait $SETUP $WS
tail -n 2 "$OUT/workspace.log"
source .carry/setup.sh > /dev/null
PYTHONPATH=/tmp/gsite:. step serving 180 $B serving --workspace /tmp/ws_fp16 --num-prompts 96 \
  --concurrency 16,64 --max-output-len 512 --out-dir "$OUT" --server-log "$OUT/server.log" --tag "${SHAPE}_fp16"
# the device returns a handful of files: pack everything into one
tar -C "$OUT" -czf /tmp/bench_gpu.tgz . && rm -rf "${OUT:?}"/* && mv /tmp/bench_gpu.tgz "$OUT/"
