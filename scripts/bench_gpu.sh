#!/usr/bin/env bash
# GPU serving benchmark in one device call (<= 9 min): the Llama-2-7B shape with random weights served by the real
# tritonserver on the GPU, `lmtriton bench serving` (gRPC streaming, with the in-process engine on the same prompts
# in the same run) for fp16 and for W4A16 + KV int8, and Triton's perf_analyzer (--streaming, concurrency sweep)
# against the fp16 server. Results: $OUT/bench_gpu.tgz (everything) and $OUT/summary.md (the tables).
#
# Here, first:  ../shared/device/make-carry.sh .venv   (-> .carry/: tritonserver for the GPU image)
#               bash scripts/gpu_carry.sh               (-> workspace/gpu_py/, workspace/gpu_perf/)
#               bash scripts/gpu_carry.sh --size        (what travels: must stay under 64 MiB)
# Device call:  kind nvidia-h200, carry [".carry", "workspace/gpu_py", "workspace/gpu_perf"],
#               command `bash scripts/bench_gpu.sh`
# Afterwards:   python -m scripts.bench_gpu_docs <files_at>/bench_gpu.tgz   (docs/benchmarks/: JSON, PNG, tables)
# The weights are generated on the GPU machine into /dev/shm (RAM) and never travel.
# Modes: SMOKE=1 runs the same path with a tiny model and a few short requests (a CPU check; also CARRY=0);
#        CARRY=0 uses the installed project venv (its tritonserver, tritonclient) instead of .carry + gpu_py:
#        `make bench-gpu` on a GPU box of your own.   CPU check here:  SMOKE=1 bash scripts/bench_gpu.sh
set -u
OUT=${OUT:-out/bench_gpu}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  SHAPE=tiny; DTYPE=float32; CONC=1,2; PERF_CONC=1; N=4; MAX_IN=24; MAX_OUT=4; PER_C=0; PERF_REQ=2; STAB=1000
  BUDGET=${BUDGET:-900}; CARRY=${CARRY:-0}
  WS_PARAMS="--param session_len=512 --param cpu_kv_blocks=64 --param cache_block_seq_len=16"
fi
CARRY=${CARRY:-1}
[ "$CARRY" = 1 ] || PY=${PY:-.venv/bin/python}
PY=${PY:-python3}
SHAPE=${SHAPE:-llama2-7b}
DTYPE=${DTYPE:-float16}
CONC=${CONC:-1,16,64}                  # bench serving levels
PER_C=${PER_C:-4}                      # level C runs max(16, 4*C) prompts (c=1: 16, c=16: 64, c=64: 256)
N=${N:-256}
MAX_IN=${MAX_IN:-1024}
MAX_OUT=${MAX_OUT:-256}
PERF_CONC=${PERF_CONC:-1,4,16,64}
PERF_REQ=${PERF_REQ:-6}                # perf_analyzer: requests per measurement window (at least C), 3 windows
STAB=${STAB:-100}                      # perf_analyzer -s; mixed ShareGPT-like lengths vary a lot between windows
BUDGET=${BUDGET:-530}                  # seconds for the whole script; every step gets at most what is left
WS_PARAMS=${WS_PARAMS:---param session_len=2048}
R=/tmp/bench_gpu_results
rm -rf "$R" && mkdir -p "$R" "$OUT"
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1   # + /tmp/gsite once installed
B="$PY -m tools.cli bench"

step() {   # step NAME SECONDS CMD...: own process group, log in $R/NAME.log; prints rc, time, last lines
  local name=$1 secs=$2 t0=$SECONDS left=$((BUDGET - SECONDS)) pid rc
  shift 2
  if [ "$left" -lt 30 ]; then echo "== $name skipped: ${left}s of the budget left"; return 1; fi
  [ "$secs" -gt "$left" ] && secs=$left
  setsid timeout -k 15 "$secs" "$@" > "$R/$name.log" 2>&1 &
  pid=$!
  wait "$pid"; rc=$?
  kill -KILL -- "-$pid" 2>/dev/null   # whatever of that step is still alive (tritonserver after a timeout)
  echo "== $name rc=$rc $((SECONDS - t0))s (limit ${secs}s, at ${SECONDS}s)"
  tr '\r' '\n' < "$R/$name.log" | grep -v '%|' | tail -n 5
  return "$rc"
}

gpu_idle() {   # the next server must find the GPU free: wait for our engine processes to leave, else end them
  command -v nvidia-smi > /dev/null || return 0
  local i pids
  for i in $(seq 30); do
    pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | tr -d ' ')
    [ -z "$pids" ] && return 0
    sleep 1
  done
  echo "GPU still held by $pids after 30 s: ending them"
  for p in $pids; do kill -KILL "$p" 2>/dev/null; done
  sleep 2
}

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# CPU-side set-up in the background while the GPU writes the random weights
( set -e
  if [ "$CARRY" = 1 ]; then
    bash .carry/setup.sh
    # wheels are zip files: unpack them (no pip needed); the stub, the engine and the client all import from here
    $PY -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/gsite') for w in glob.glob('workspace/gpu_py/*.whl')]"
    cp -r workspace/gpu_py/tritonclient /tmp/gsite/
    ls /tmp/gsite
  fi
  mkdir -p /tmp/perf/lib
  xz -dc workspace/gpu_perf/perf_analyzer.xz > /tmp/perf/perf_analyzer && chmod +x /tmp/perf/perf_analyzer
  tar -C /tmp/perf/lib -xJf workspace/gpu_perf/libs.tar.xz
  if LD_LIBRARY_PATH=/tmp/perf/lib ldd /tmp/perf/perf_analyzer | grep -q "libssl.*not found\|libcrypto.*not found"; then
    echo "no OpenSSL 3 here: using the carried one"; tar -C /tmp/perf/lib -xJf workspace/gpu_perf/ssl.tar.xz
  fi
  LD_LIBRARY_PATH=/tmp/perf/lib ldd /tmp/perf/perf_analyzer | grep -i "not found" \
    || echo "perf_analyzer: all libraries found"
) > "$R/setup.log" 2>&1 &
SETUP=$!
mkdir -p /tmp/bench_tok_x && tar -C /tmp/bench_tok_x -xJf workspace/gpu_perf/bench_tok.tar.xz
TOK=/tmp/bench_tok_x/bench_tok
WS_ROOT=/tmp
[ "$SMOKE" != 1 ] && [ -d /dev/shm ] && [ "$(df -k --output=avail /dev/shm | tail -1)" -gt 25000000 ] \
  && WS_ROOT=/dev/shm
WS16=$WS_ROOT/${SHAPE}_fp16 WSQ=$WS_ROOT/${SHAPE}_awq_kvint8   # directory names = model labels
rm -rf "$WS16" "$WSQ"
# shellcheck disable=SC2086
step ws_fp16 150 $PY -m scripts.bench_random_workspace --shape "$SHAPE" --dtype "$DTYPE" --tokenizer "$TOK" \
  --workspace "$WS16" $WS_PARAMS
# shellcheck disable=SC2086
step ws_awq_kv8 90 $PY -m scripts.bench_random_workspace --shape "$SHAPE" --dtype "$DTYPE" --quant awq --kv int8 \
  --tokenizer "$TOK" --workspace "$WSQ" $WS_PARAMS
du -sh "$WS16" "$WSQ" 2>/dev/null
wait "$SETUP"; echo "== setup rc=$? (at ${SECONDS}s)"; tail -n 3 "$R/setup.log"
if [ "$CARRY" = 1 ]; then
  source .carry/setup.sh > /dev/null; export PYTHONPATH=/tmp/gsite:$PWD
  # the stub does not see PYTHONPATH (it found `backend` only through its working directory): put pyzmq and
  # msgpack into the stub's own site-packages and the image's (the engine process runs in the image's python)
  for py in "$STUB_BIN/python3" "$ENGINE_PYTHON"; do
    "$py" -c "import glob, site, zipfile; [zipfile.ZipFile(w).extractall(site.getsitepackages()[0])
for w in glob.glob('workspace/gpu_py/pyzmq-*.whl') + glob.glob('workspace/gpu_py/msgpack-*.whl')]"
  done
  # the frontend runs in the stub's interpreter: it must import zmq, msgpack and tokenizers with numpy < 2
  env -u PYTHONPATH "$STUB_BIN/python3" -c "import sys, numpy, zmq, msgpack, tokenizers; print('stub python', sys.version.split()[0], \
    'numpy', numpy.__version__, 'zmq', zmq.__version__)" || { echo "stub env broken: sys.path below";
    "$STUB_BIN/python3" -c "import sys; print(sys.path)"; }
fi
export PERF_ANALYZER=/tmp/perf/perf_analyzer
WORKLOAD="--num-prompts $N --max-input-len $MAX_IN --max-output-len $MAX_OUT"

# shellcheck disable=SC2086
step serving_fp16 200 $B serving --workspace "$WS16" $WORKLOAD --concurrency "$CONC" \
  --prompts-per-concurrency "$PER_C" --timeout 120 --out-dir "$R" --server-log "$R/server_fp16.log" --tag "${SHAPE}_fp16"
gpu_idle
step perf_fp16 150 env LD_LIBRARY_PATH="/tmp/perf/lib:${LD_LIBRARY_PATH:-}" $PY -m scripts.perf_analyzer_run \
  --workspace "$WS16" --concurrency "$PERF_CONC" --num-prompts 64 --max-input-len "$MAX_IN" \
  --max-output-len "$MAX_OUT" --requests "$PERF_REQ" --stability "$STAB" --timeout 100 --out-dir "$R/perf"
gpu_idle
# shellcheck disable=SC2086
step serving_awq_kv8 180 $B serving --workspace "$WSQ" $WORKLOAD --concurrency "$CONC" \
  --prompts-per-concurrency "$PER_C" --timeout 120 --out-dir "$R" --server-log "$R/server_awq_kv8.log" \
  --tag "${SHAPE}_awq_kvint8"
gpu_idle

# the device returns at most 8 files: the tables in one, everything in a tarball
cat "$R"/serving_*.md "$R"/perf/perf.md > "$OUT/summary.md" 2>/dev/null
cat "$OUT/summary.md"
rm -f "$R/perf/input_data.json"   # rebuilt from the seeded workload; large
tar -C "$R" -czf "$OUT/bench_gpu.tgz" .
rm -rf "$WS16" "$WSQ"
ls -la "$OUT"; echo "done at ${SECONDS}s"
