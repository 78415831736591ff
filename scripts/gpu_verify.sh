#!/usr/bin/env bash
# The GPU checks of a session's end, in one device call (<= 9.5 min), most important first. Nothing is owed after
# session 10 (every change in the tree passed its GPU tests, docs/benchmarks.md sessions 9 and 10); what it runs:
# 1. decode attention alone (16 x 4k, every KV dtype, both kernels) with each way of combining the splits
#    (LMTRITON_SPLIT_REDUCE=kernel | block | auto, the default: block on small grids only), same machine;
# 2. the wgmma W4A16 GEMM prototype (scripts/proto_wgmma_gemm.py --time) against the split-K mma.sync GEMM;
# 3. the whole GPU suite, under scripts/capture_probe.py (names a call that invalidates a CUDA-graph capture).
# Then `bash scripts/bench_issue4.sh $OUT` in a second call for the issue-4 table.
#   bash scripts/gpu_verify.sh "$OUT"      ->  $OUT/verify/*.log, $OUT/summary.txt, $OUT/attention_*.json
set -u
out=${1:?usage: gpu_verify.sh OUT_DIR}
d=$out/verify
mkdir -p "$d"
export PYTHONPATH=. PYTHONUNBUFFERED=1
t0=$(date +%s)
step() {   # name, timeout seconds, pytest arguments...
    local name=$1 limit=$2; shift 2
    env ${ENV:-} timeout "$limit" python3 -m pytest -m gpu -q -rfE -p no:cacheprovider "$@" > "$d/$name.log" 2>&1
    echo "$name rc=$? ($(( $(date +%s) - t0 )) s): $(grep -E ' in [0-9.]+s' "$d/$name.log" | tail -1)" \
        | tee -a "$out/summary.txt"
    grep -A16 "CAPTURE INVALIDATED" "$d/$name.log" | head -40 | tee -a "$out/summary.txt"
}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/summary.txt"
for m in kernel block auto; do
    LMTRITON_SPLIT_REDUCE=$m timeout 90 python3 scripts/bench_attention.py --no-prefill --out "$out/attention_$m.json" \
        2>&1 | grep -E "^decode" | sed "s/^/$m /" | tee -a "$out/summary.txt"
done
timeout 200 python3 scripts/proto_wgmma_gemm.py --time > "$d/proto_wgmma.log" 2>&1
echo "proto_wgmma rc=$?" | tee -a "$out/summary.txt"
grep -E "^(FAIL|K=)" "$d/proto_wgmma.log" | head -20 | tee -a "$out/summary.txt"
left=$(( 560 - ($(date +%s) - t0) ))
[ "$left" -gt 60 ] && step all "$left" -p scripts.capture_probe --continue-on-collection-errors tests/
grep -hE "^(FAILED|ERROR)" "$d"/*.log | cut -c1-200 | sort | uniq | head -30 | tee -a "$out/summary.txt"
