#!/usr/bin/env bash
# Decode fast paths (issue 4) on the device, old vs new in one call: the gpu tests of the switches, then
# scripts/bench_decode.py bs=1 and bs=64 with the switches off and on (Llama-2-7B shape fp16, and AWQ + int8 KV).
#   bash scripts/bench_decode_fast_paths.sh "$OUT"      ->  $OUT/decode_fast_paths.tgz, $OUT/summary.txt
# Optional runs (each switch alone) are skipped once BUDGET_S seconds have passed, so the call stays short.
set -u
out=${1:?usage: bench_decode_fast_paths.sh OUT_DIR}
budget=${BUDGET_S:-250}
d=$out/decode_fast_paths
mkdir -p "$d"
export PYTHONPATH=.
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv > "$d/gpu.txt" 2>&1

timeout 120 python3 -m pytest -m gpu -q tests/test_kernels.py tests/test_gpu_engine.py \
    -k "rotary_write_kv or fast_paths or in_graph or graphs_on_equals_off" > "$d/tests.txt" 2>&1
echo "gpu tests rc=$? ($(( $(date +%s) - t0 )) s)" >> "$d/tests.txt"

bench() {   # name, extra flags...
    local name=$1; shift
    timeout 100 python3 scripts/bench_decode.py --model llama2-7b --hf none --cache-max-entry-count 0.3 \
        --out "$d/$name.json" "$@" > "$d/$name.log" 2>&1
    echo "$name rc=$? ($(( $(date +%s) - t0 )) s)" >> "$d/runs.txt"
}
timeout 60 python3 scripts/bench_host_step.py --out "$d/host_step.json" > "$d/host_step.log" 2>&1
ON="--decode-step-in-graph --fuse-rope-kv"          # the defaults since the first run of this script
OFF="--no-decode-step-in-graph --no-fuse-rope-kv"
bench fp16_off $OFF
bench fp16_on $ON
bench awq_kvint8_off --quant awq --kv int8 $OFF
bench awq_kvint8_on --quant awq --kv int8 $ON
for opt in "fp16_graph_only --decode-step-in-graph --no-fuse-rope-kv" "fp16_fuse_only --fuse-rope-kv --no-decode-step-in-graph"; do
    if (( $(date +%s) - t0 < budget )); then bench $opt; else echo "skipped $opt (time)" >> "$d/runs.txt"; fi
done

python3 - "$d" > "$out/summary.txt" 2>&1 <<'EOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
print((d / "tests.txt").read_text().strip().splitlines()[-2:])
print((d / "runs.txt").read_text())
print(f"{'run':18} {'bs1 tok/s':>9} {'step ms':>8} {'replay ms':>9} {'host ms':>8} {'bs64 tok/s':>10} {'step ms':>8} "
      f"{'replay ms':>9}")
for f in sorted(p for p in d.glob("*.json") if p.stem != "host_step"):
    r = json.loads(f.read_text())
    a, b = r["bs1"], r["bs64"]
    print(f"{f.stem:18} {a['tok_s']:9.1f} {a['step_ms']:8.3f} {a.get('graph_replay_ms', 0):9.3f} "
          f"{a['step_ms'] - a.get('graph_replay_ms', 0):8.3f} {b['tok_s']:10.0f} {b['step_ms']:8.3f} "
          f"{b.get('graph_replay_ms', 0):9.3f}")
h = d / "host_step.json"
if h.exists():
    for r in json.loads(h.read_text()):
        print(f"host, no model, bs={r['batch']}: engine step {r['engine_step_us']:.0f} us, prepare() "
              f"{r['prepare_us']:.0f} us, load_decode {r['load_decode_us']:.0f} us")
print("replay ms with --decode-step-in-graph includes lm_head + argmax (outside the graph without it)")
EOF
tar czf "$out/decode_fast_paths.tgz" -C "$out" decode_fast_paths && rm -rf "$d"
cat "$out/summary.txt"
