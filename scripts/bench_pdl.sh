#!/usr/bin/env bash
# Programmatic dependent launch (issue 4) on the device, off vs on in one call: the PDL and W4A16 GPU tests, the host
# cost of an eager launch, the W4A16 decode GEMV table (graphs of back-to-back calls) and the decode attention
# benchmark with LMTRITON_PDL=0 / auto, then
# scripts/bench_decode.py (Llama-2-7B shape: W4A16 g128 + KV int8 and fp16; Llama-3-8B fp16) with LMTRITON_PDL=0 /
# auto (the default), interleaved.
#   bash scripts/bench_pdl.sh "$OUT"      ->  $OUT/pdl.tgz, $OUT/summary.txt
# Runs are skipped once BUDGET_S seconds have passed, so the call stays short.
set -u
out=${1:?usage: bench_pdl.sh OUT_DIR}
budget=${BUDGET_S:-480}
d=$out/pdl
mkdir -p "$d"
export PYTHONPATH=.
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$d/gpu.txt" 2>&1

timeout 150 python3 -m pytest -m gpu -q tests/test_pdl.py tests/test_kernel_w4a16.py > "$d/tests.txt" 2>&1
echo "pdl tests rc=$? ($(( $(date +%s) - t0 )) s)" >> "$d/tests.txt"

bench() {   # name, LMTRITON_PDL, extra flags...
    local name=$1 pdl=$2; shift 2
    if (( $(date +%s) - t0 > budget )); then echo "skipped $name (time)" >> "$d/runs.txt"; return; fi
    LMTRITON_PDL=$pdl timeout 110 python3 scripts/bench_decode.py --hf none --cache-max-entry-count 0.3 \
        --ttft-prompt 512 --out "$d/$name.json" "$@" > "$d/$name.log" 2>&1
    echo "$name rc=$? ($(( $(date +%s) - t0 )) s)" >> "$d/runs.txt"
}
timeout 60 python3 scripts/bench_kernels.py --launch-cost > "$d/launch_cost.json" 2> "$d/launch_cost.log"
for m in 0 auto; do
    LMTRITON_PDL=$m timeout 150 python3 scripts/bench_kernels.py --gemv-only --quick --out "$d/gemv_pdl_$m.json" \
        > "$d/gemv_pdl_$m.log" 2>&1
    echo "gemv pdl=$m rc=$? ($(( $(date +%s) - t0 )) s)" >> "$d/runs.txt"
done
for m in 0 auto; do
    LMTRITON_PDL=$m timeout 100 python3 scripts/bench_attention.py --quick --no-prefill --out "$d/attention_pdl_$m.json" \
        > "$d/attention_pdl_$m.log" 2>&1
    echo "attention pdl=$m rc=$? ($(( $(date +%s) - t0 )) s)" >> "$d/runs.txt"
done
for m in 0 auto; do
    bench awq_kvint8_pdl_$m $m --model llama2-7b --quant awq --kv int8
    bench fp16_pdl_$m $m --model llama2-7b
    bench l3_fp16_pdl_$m $m --model llama3-8b
done

python3 - "$d" > "$out/summary.txt" 2>&1 <<'PY'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
print((d / "gpu.txt").read_text().strip())
print("\n".join((d / "tests.txt").read_text().strip().splitlines()[-3:]))
print((d / "runs.txt").read_text())
print("launch cost:", (d / "launch_cost.json").read_text().strip())
for m in ("0", "auto"):
    g = json.loads((d / f"gemv_pdl_{m}.json").read_text())["gemv"]
    print(f"GEMV, LMTRITON_PDL={m}: " + "; ".join(f"{r['K']}x{r['N']} M={r['M']} {r['us']:.1f} us ({100 * r['frac_copy_bw']:.0f}%, copy {r['same_bytes_copy_us']:.1f})"
                                               for r in g if r["group"] == 128))
print(f"{'run':22} {'pdl':>3} {'bs1 tok/s':>9} {'% limit':>7} {'replay ms':>9} {'bs64 tok/s':>10} {'% limit':>7} "
      f"{'TTFT ms':>8}")
for m in ("0", "auto"):
    a = json.loads((d / f"attention_pdl_{m}.json").read_text())["decode"]
    print(f"attention, LMTRITON_PDL={m}: " + "; ".join(f"{r['impl']} {r['shape']} {r['kv']} {r['ms']:.3f} ms" for r in a))
for f in sorted(p for p in d.glob("*.json") if "bs1" in json.loads(p.read_text())):
    r = json.loads(f.read_text())
    a, b = r["bs1"], r["bs64"]
    print(f"{f.stem:22} {int(r['pdl']):3d} {a['tok_s']:9.1f} {100 * a['frac_of_limit']:7.1f} "
          f"{a.get('graph_replay_ms', 0):9.3f} {b['tok_s']:10.0f} {100 * b['frac_of_limit']:7.1f} "
          f"{r['ttft']['ttft_ms']:8.1f}")
PY
tar czf "$out/pdl.tgz" -C "$out" pdl && rm -rf "$d"
cat "$out/summary.txt"
