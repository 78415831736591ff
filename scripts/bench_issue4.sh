#!/usr/bin/env bash
# The CUDA-engine headline figures (issue 4) in one device call (~6 min on an H200): decode attention alone (CUDA
# graph timing, every KV dtype, both kernels, 1/2/4 tiles in flight) and prefill attention; then the Llama-2-7B
# shape end to end with scripts/bench_decode.py: fp16 with HF transformers static cache + compile as the peer in the
# same process, W4A16 g128, W4A16 g128 + KV int8 (bs=1: prompt 128 / 256 new; bs=64: prompt 128 / 512 new, as the
# issue's batch-64 target says: 64 x 640 tokens of fp16 KV are 21.5 GB, hence 45% of the free memory, which an H100
# holds too; TTFT of a 2,048-token prompt; a profile of one eager step at batch 1 and 64, which scripts/roofline.py
# reads for the summary).
#   bash scripts/bench_issue4.sh "$OUT"      ->  $OUT/issue4.tgz, $OUT/summary.txt
set -u
out=${1:?usage: bench_issue4.sh OUT_DIR}
d=$out/issue4
mkdir -p "$d"
export PYTHONPATH=.
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$d/gpu.txt" 2>&1
timeout 150 python3 scripts/bench_attention.py --mma-tiles 1,2,4 --mma-tiles-kv auto,int8,int4 \
    --out "$d/attention.json" > "$d/attention.log" 2>&1
echo "attention rc=$? ($(( $(date +%s) - t0 )) s)" >> "$d/runs.txt"
bench() {   # name, flags...
    local name=$1; shift
    timeout 200 python3 scripts/bench_decode.py --model llama2-7b --cache-max-entry-count 0.45 --batch-new 512 \
        --profile --profile-batch 1 64 --out "$d/$name.json" \
        "$@" > "$d/$name.log" 2>&1
    echo "$name rc=$? ($(( $(date +%s) - t0 )) s)" >> "$d/runs.txt"
}
bench fp16 --hf static
bench awq --quant awq --hf none
bench awq_kvint8 --quant awq --kv int8 --hf none

python3 - "$d" > "$out/summary.txt" 2>&1 <<'PY'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
print((d / "gpu.txt").read_text().strip())
print((d / "runs.txt").read_text())
print("\n".join(l for l in (d / "attention.log").read_text().splitlines() if l.startswith(("decode", "prefill"))))
for name in ("fp16", "awq", "awq_kvint8"):
    f = d / f"{name}.json"
    if not f.exists():
        continue
    r = json.loads(f.read_text())
    a, b, t = r["bs1"], r["bs64"], r["ttft"]
    hf = r.get("hf_static", {})
    print(f"{name}: bs1 {a['tok_s']:.1f} tok/s ({100 * a['frac_of_limit']:.1f}% of limit), bs64 {b['tok_s']:.0f} "
          f"({100 * b['frac_of_limit']:.1f}%), TTFT {t['ttft_ms']:.1f} ms ({t['x_of_limit']:.2f}x limit), "
          f"pdl {r['pdl']}" + (f", HF static {hf['tok_s']:.1f} tok/s" if hf else ""))
PY
{   # where the step goes against the targets (scripts/roofline.py over the same runs' profiles)
    python3 -m scripts.roofline "$d/fp16.json" --batch 1 --target 0.8
    python3 -m scripts.roofline "$d/awq_kvint8.json" --batch 1 --target 0.7
    python3 -m scripts.roofline "$d/awq_kvint8.json" --batch 64 --target 0.6
} > "$d/roofline.txt" 2>&1
grep -v "^      " "$d/roofline.txt" >> "$out/summary.txt"
tar czf "$out/issue4.tgz" -C "$out" issue4 && rm -rf "$d"
cat "$out/summary.txt"
