#!/usr/bin/env bash
# The session-5 kernels (dense decode GEMV, RAW-code attention; the W4A16 decode GEMV they once compared against its
# predecessor, retired in session 10) against what they replace,
# in one device call (~6 min): scripts/ab_kernels.py, then the Llama-2-7B shape end to end (fp16, then W4A16 + KV
# int8; prompt 128 / 128 new, batch 1 and 64) with those switches off, at their defaults, and with the fused
# SiLU·mul off (LMTRITON_FUSE_SILU=0), twice, interleaved (scripts/ab_e2e.sh).
#   bash scripts/bench_session5.sh "$OUT"      ->  $OUT/session5/ab_kernels.*, $OUT/session5/{fp16,awq_kvint8}/ab_e2e/
#   MODES="default unfused" bash scripts/bench_session5.sh "$OUT"    (a subset of the e2e modes)
set -u
out=${1:?usage: bench_session5.sh OUT_DIR}
d=$out/session5
mkdir -p "$d"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$d/summary.txt"
timeout 300 python3 scripts/ab_kernels.py "$d/ab_kernels.json" > "$d/ab_kernels.log" 2>&1
variants=()
for mode in ${MODES:-off default unfused}; do
    case $mode in
        off) variants+=("off:LMTRITON_DENSE_GEMV=0 LMTRITON_ATTN_RAW_CODES=none") ;;   # the first W4A16 GEMV: retired
        unfused) variants+=("unfused:LMTRITON_FUSE_SILU=0") ;;
        *) variants+=("$mode:") ;;
    esac
done
export ARGS="--cache-max-entry-count 0.3 --new 128 --batch 64 --ttft-prompt 128"
Q="" bash scripts/ab_e2e.sh "$d/fp16" "${variants[@]}"
Q="--quant awq --kv int8" bash scripts/ab_e2e.sh "$d/awq_kvint8" "${variants[@]}"
