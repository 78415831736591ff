#!/usr/bin/env bash
# End-to-end A/B of environment switches (the kernels read them at import) on the Llama-2-7B shape with
# scripts/bench_decode.py: batch 1 (128 prompt / 256 new) and batch 64 (128 / 512), each variant twice, interleaved.
#   bash scripts/ab_e2e.sh OUT "kernel:LMTRITON_SPLIT_REDUCE=kernel" "block:"    ->  $OUT/ab_e2e/*.json, summary.txt
#   Q="--quant awq" ROUNDS=1 bash scripts/ab_e2e.sh ...   (Q: the weights / KV flags, unset: W4A16 g128 + KV int8,
#                                                          empty: fp16; ROUNDS: 2; ARGS: bench_decode's other flags)
set -u
out=${1:?usage: ab_e2e.sh OUT_DIR NAME:ENV... }
shift
d=$out/ab_e2e
mkdir -p "$d"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$d/summary.txt"
for i in $(seq "${ROUNDS:-2}"); do
    for v in "$@"; do
        name=${v%%:*}
        sw=${v#*:}
        env $sw timeout 120 python3 scripts/bench_decode.py --model llama2-7b \
            ${ARGS---cache-max-entry-count 0.45 --batch-new 512} ${Q---quant awq --kv int8} --hf none \
            --out "$d/${name}_$i.json" 2>&1 | grep -E "^bs=" | sed "s/^/$name $i /" | tee -a "$d/summary.txt"
    done
done
