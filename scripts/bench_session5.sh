#!/usr/bin/env bash
# The session-5 kernels (lean W4A16 decode GEMV, dense decode GEMV, RAW-code attention) against what they replace,
# in one device call (~6 min): scripts/ab_kernels.py, then the Llama-2-7B shape end to end with each switch off, at
# its default, and with LMTRITON_FUSE_SILU=1, twice, interleaved (scripts/bench_decode.py; the switches are
# read at import).
#   bash scripts/bench_session5.sh "$OUT"      ->  $OUT/session5/*.json, $OUT/session5/summary.txt
#   MODES="default fuse_silu" bash scripts/bench_session5.sh "$OUT"    (a subset of the e2e modes)
set -u
out=${1:?usage: bench_session5.sh OUT_DIR}
d=$out/session5
mkdir -p "$d"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$d/summary.txt"
timeout 300 python3 scripts/ab_kernels.py "$d/ab_kernels.json" > "$d/ab_kernels.log" 2>&1
off="LMTRITON_DENSE_GEMV=0 LMTRITON_W4A16_DECODE_LEAN=0 LMTRITON_ATTN_RAW_CODES=none"
for i in 1 2; do
    for q in "" "--quant awq --kv int8"; do
        for mode in ${MODES:-off default fuse_silu}; do
            name=e2e_${mode}${q:+_awq_kvint8}_$i
            case $mode in off) sw=$off ;; fuse_silu) sw=LMTRITON_FUSE_SILU=1 ;; *) sw= ;; esac
            env $sw timeout 100 python3 scripts/bench_decode.py --model llama2-7b \
                --cache-max-entry-count 0.3 $q --hf none --new 128 --batch 64 --ttft-prompt 128 --out "$d/$name.json" \
                2>&1 | grep -E "^bs=" | sed "s/^/$name /" | tee -a "$d/summary.txt"
        done
    done
done
