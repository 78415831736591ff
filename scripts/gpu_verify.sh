#!/usr/bin/env bash
# The GPU checks owed by the latest session, in one device call (<= 9.5 min), most important first. Session 8:
# 1. the split reductions in the kernel (LMTRITON_SPLIT_REDUCE=block: split-K W4A16 GEMM, split decode attention)
#    and the new defaults (lean decode GEMV at every group, ks 4 for grids just over one wave: cfg14), under
#    scripts/capture_probe.py (names the call that invalidates a CUDA-graph capture, if one does);
# 2. the engine suites with those defaults (CUDA graphs, PDL, KV rotation, the fused SiLU now on by default);
# 3. end-to-end A/B of the split reduction (scripts/ab_e2e.sh), if time is left.
#   bash scripts/gpu_verify.sh "$OUT"      ->  $OUT/verify/*.log, $OUT/summary.txt, $OUT/ab_e2e/
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
step kernels 200 -p scripts.capture_probe tests/test_kernel_w4a16.py tests/test_attention_mma.py \
    -k "splitk or split_reduce or paths_match or graph or cfg14 or gemv_silu or mma_decode or static_bound"
step engine 200 -p scripts.capture_probe tests/test_gpu_engine.py tests/test_fused_silu.py tests/test_pdl.py \
    tests/test_gpu_kv_rotation.py tests/test_kernels.py
left=$(( 560 - ($(date +%s) - t0) ))
[ "$left" -gt 150 ] && timeout "$left" bash scripts/ab_e2e.sh "$out" "kernel:LMTRITON_SPLIT_REDUCE=kernel" "block:"
grep -hE "^(FAILED|ERROR)" "$d"/*.log | cut -c1-200 | sort | uniq | head -30 | tee -a "$out/summary.txt"
