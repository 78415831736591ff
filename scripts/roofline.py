"""A profiled decode step against its floors: what a target fraction of the bandwidth limit leaves for the linears.

  python -m scripts.roofline docs/benchmarks/session4_h200/profile_w4a16_kvint8_pdl0.json --batch 64 --target 0.6

Reads a `scripts/bench_decode.py --profile-only` JSON (no GPU needed): GPU time per kernel of one eager decode step
of the layers (lm_head not included) at `batch` sequences of `context` tokens (the profile's prompt + 1), with the
device's copy bandwidth and fp16 matmul rate measured in the same call. For that step it prints
- the memory floor: the layers' weights + the KV read / copy bandwidth (the issue's "limit", without lm_head);
- the compute floor of the linear layers: 2 x their parameters x batch at the measured matmul rate;
- the measured kernel time, split into linear layers / attention / the rest (each kernel's class is listed);
- for the target fraction of the memory limit: the step it allows, the time left for the linear layers when
  attention and the rest stay as measured, and when attention streams its KV at copy bandwidth, each as the
  TFLOP/s the linear layers would then have to reach.
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Dict, List, Tuple

from backend.model.config import ModelConfig

LINEAR = re.compile(r"w4a16|dense_decode|gemv|gemm|nvjet|cublas|splitK|cutlass|vectorized_elementwise")
ATTENTION = re.compile(r"paged|reduce_splits|attention|flash")
# vectorized_elementwise: in a W4A16 step, torch's zero fill of the split-K GEMM's workspace (4 a layer)


def shape_of(model: str) -> ModelConfig:
    from scripts.bench_common import SHAPES
    base = model[:-len("-awq")] if model.endswith("-awq") else model
    if base not in SHAPES:
        raise SystemExit(f"unknown model shape {model!r}: one of {', '.join(SHAPES)}")
    return SHAPES[base]


def layer_linear_params(cfg: ModelConfig) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    return cfg.num_layers * (qkv + cfg.num_heads * d * h + 3 * h * cfg.intermediate_size)


def classify(profile: List[dict]) -> Tuple[Dict[str, float], List[Tuple[str, str, float, int]]]:
    totals = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    rows = []
    for k in profile:
        if k["ms"] <= 0:
            continue                        # host-side entries (launch calls) carry no GPU time
        cls = "linear" if LINEAR.search(k["kernel"]) else "attention" if ATTENTION.search(k["kernel"]) else "other"
        totals[cls] += k["ms"]
        rows.append((cls, k["kernel"], k["ms"], k["count"]))
    return totals, rows


def analyse(res: dict, batch: int, context: int, target: float) -> dict:
    cfg = shape_of(res["engine"]["model"])
    key = f"profile_bs{batch}"
    if key not in res:
        raise SystemExit(f"no {key} in this JSON (has: {', '.join(k for k in res if k.startswith('profile_bs'))})")
    bw, tflops = res["copy_bw_GBps"] * 1e9, res["matmul_tflops"] * 1e12
    lm_head = 2 * cfg.vocab_size * cfg.hidden_size + 2 * cfg.hidden_size     # fp16 lm_head + final norm
    weights = res["weight_bytes_per_step"] - lm_head
    kv = res["kv_bytes_per_token"] * batch * context
    flops = 2 * layer_linear_params(cfg) * batch
    totals, rows = classify(res[key])
    memory_ms = 1e3 * (weights + kv) / bw
    step_ms = memory_ms / target
    other = totals["other"]
    left_measured = step_ms - totals["attention"] - other
    left_attn_at_bw = step_ms - 1e3 * kv / bw - other

    def rate(ms):
        return flops / (ms / 1e3) / 1e12 if ms > 0 else float("inf")

    def stream(ms):                         # the layers' weights / ms, as a fraction of copy bandwidth
        return weights / (ms / 1e3) / bw if ms > 0 else float("inf")

    return {
        "device": res["device"], "date": res["date"], "model": res["engine"]["model"],
        "kv": res["engine"]["kv_cache_dtype"], "batch": batch, "context": context, "target": target,
        # profiles before bench_decode profiled with PDL off were taken with the run's PDL setting
        "profiled_with_pdl": bool(res.get("profile_pdl", res.get("pdl", False))),
        "copy_bw_GBps": bw / 1e9, "matmul_tflops": tflops / 1e12,
        "weights_GB": weights / 1e9, "kv_GB": kv / 1e9, "linear_tflop": flops / 1e12,
        "memory_floor_ms": memory_ms, "linear_compute_floor_ms": 1e3 * flops / tflops,
        "measured_ms": sum(totals.values()), "linear_ms": totals["linear"], "attention_ms": totals["attention"],
        "other_ms": other, "linear_tflops_measured": rate(totals["linear"]),
        "linear_frac_copy_bw_measured": stream(totals["linear"]),
        "attention_GBps": kv / (totals["attention"] / 1e3) / 1e9 if totals["attention"] else None,
        "target_step_ms": step_ms,
        "linear_budget_ms": left_measured, "linear_tflops_needed": rate(left_measured),
        "linear_frac_copy_bw_needed": stream(left_measured),
        "linear_budget_attn_at_bw_ms": left_attn_at_bw, "linear_tflops_needed_attn_at_bw": rate(left_attn_at_bw),
        "linear_frac_copy_bw_needed_attn_at_bw": stream(left_attn_at_bw),
        "launches": {c: sum(n for cc, _, _, n in rows if cc == c) for c in totals},
        "kernels": [{"class": c, "kernel": k, "ms": ms, "count": n} for c, k, ms, n in rows],
    }


def report(a: dict) -> str:
    def need(ms, tf, frac):
        if ms <= 0:
            return f"{ms:.3f} ms: nothing left"
        return f"{ms:.3f} ms = {tf:.0f} TFLOP/s, weights at {100 * frac:.0f}% of copy bandwidth"
    lines = [
        f"{a['model']} (KV {a['kv']}), batch {a['batch']} x context {a['context']}, {a['device']} ({a['date']}): "
        f"copy {a['copy_bw_GBps']:.0f} GB/s, fp16 matmul {a['matmul_tflops']:.0f} TFLOP/s",
        f"  reads: layer weights {a['weights_GB']:.2f} GB + KV {a['kv_GB']:.2f} GB -> memory floor "
        f"{a['memory_floor_ms']:.3f} ms; linear layers {a['linear_tflop']:.3f} TFLOP -> compute floor "
        f"{a['linear_compute_floor_ms']:.3f} ms at the matmul rate",
        f"  measured (one eager step, kernels): {a['measured_ms']:.3f} ms = linear {a['linear_ms']:.3f} "
        f"({a['linear_tflops_measured']:.0f} TFLOP/s, weights at {100 * a['linear_frac_copy_bw_measured']:.0f}% of "
        f"copy bandwidth) + attention {a['attention_ms']:.3f}"
        + (f" ({a['attention_GBps']:.0f} GB/s of KV)" if a["attention_GBps"] else "")
        + f" + other {a['other_ms']:.3f}",
        f"  launches: " + ", ".join(f"{c} {n} ({1e3 * a[c + '_ms'] / n:.1f} us each)" for c, n in a["launches"].items()
                                   if n),
        f"  {100 * a['target']:.0f}% of the limit = a step of {a['target_step_ms']:.3f} ms; the linear layers get",
        f"    with attention and the rest as measured: "
        + need(a["linear_budget_ms"], a["linear_tflops_needed"], a["linear_frac_copy_bw_needed"]),
        f"    with attention at copy bandwidth:        "
        + need(a["linear_budget_attn_at_bw_ms"], a["linear_tflops_needed_attn_at_bw"],
               a["linear_frac_copy_bw_needed_attn_at_bw"]),
    ]
    if a["profiled_with_pdl"]:
        lines.append("  (profiled with PDL on: a kernel queued behind a long one starts early and counts its wait, so the "
                     "short kernels after a GEMV look longer: attention and other are upper bounds here)")
    lines += [f"      {k['class']:9s} {k['ms']:8.3f} ms {k['count']:5d} x  {k['kernel'][:80]}" for k in a["kernels"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile_json", nargs="+", help="bench_decode.py --profile(-only) outputs")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=129, help="tokens a sequence holds in the profiled step "
                    "(bench_decode.py's --prompt + 1; default 129)")
    ap.add_argument("--target", type=float, default=0.6, help="fraction of the memory limit (default 0.6)")
    ap.add_argument("--json", help="write the analyses here")
    args = ap.parse_args(argv)
    if not 0 < args.target <= 1:
        ap.error(f"--target is a fraction of the limit in (0, 1], got {args.target}")
    if args.context < 1 or min(args.batch) < 1:
        ap.error("--context and --batch must be >= 1")
    out = []
    for path in args.profile_json:
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f"cannot read {path}: {e}")
        for b in args.batch:
            if f"profile_bs{b}" in res:
                out.append(analyse(res, b, args.context, args.target))
                print(report(out[-1]))
    if not out:
        ap.error(f"no profile at batch {', '.join(map(str, args.batch))} in {', '.join(args.profile_json)} "
                 "(bench_decode.py --profile --profile-batch N writes them)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
