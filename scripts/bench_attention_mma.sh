#!/usr/bin/env bash
# Tensor-core paged decode attention (issue 4) on the device, old vs new in one call: the gpu tests of the mma
# kernel, the CPU emulation of its fragment math, then scripts/bench_attention.py with both kernels (and the
# int8/int4 cases with 1/2/4 tiles in flight per warp).
#   bash scripts/bench_attention_mma.sh "$OUT"     (at most ~4 min: tests 130 s, bench 100 s)
#   ->  $OUT/attention_mma/{gpu.txt,tests.txt,emulate.txt,bench.log,attention.json}
set -u
out=${1:?usage: bench_attention_mma.sh OUT_DIR}
d=$out/attention_mma
mkdir -p "$d"
export PYTHONPATH=.
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$d/gpu.txt" 2>&1
python3 scripts/emulate_attention_mma.py > "$d/emulate.txt" 2>&1
echo "emulate rc=$?" >> "$d/emulate.txt"
timeout 130 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_attention_mma.py \
    tests/test_kernels.py -k "mma or paged_decode" > "$d/tests.txt" 2>&1
echo "gpu tests rc=$? ($(( $(date +%s) - t0 )) s)" >> "$d/tests.txt"
timeout 100 python3 scripts/bench_attention.py --no-prefill --mma-tiles 1,2,4 --out "$d/attention.json" \
    > "$d/bench.log" 2>&1
echo "bench rc=$? ($(( $(date +%s) - t0 )) s)" >> "$d/bench.log"
tail -3 "$d/tests.txt"
grep "^decode\|rc=" "$d/bench.log"
