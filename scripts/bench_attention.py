"""Attention kernels alone on the GPU: paged decode (fp16/int8/int4 KV) against copy bandwidth, and prefill over
the paged cache (gather + SDPA) against SDPA on contiguous K/V (what a fused flash kernel could at best reach).

  PYTHONPATH=. python3 scripts/bench_attention.py --out $OUT/attention.json
Decode: batch 16 x 4096 context, block 64, the Llama-2-7B (32:32) and Llama-3-8B (32:8) attention shapes, each with
the CUDA-core kernel ("cuda") and the tensor-core kernel ("mma") in the same run.
Bytes counted: K and V of every context token (codes + per-token scale/zero for int8/int4), read once.
Time: a CUDA graph of 8 calls over 4 layers' caches (L2 holds none of it), per call (`ms`); `eager_call_ms` is the
older measure, one eager call between two CUDA events, which also counts the host's launch latency.
"""
from __future__ import annotations

import argparse
import json
import logging
import math

import torch
import torch.nn.functional as F

from backend.kernels import paged_attention as pa
from backend.kernels.kv_cache import KVCache
from scripts.bench_timing import graph_ms

log = logging.getLogger(__name__)


def time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median over `iters` single runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(gib: int = 4) -> float:
    """Bytes read + written per second by a device-to-device clone of `gib` GiB."""
    x = torch.randint(-2**31, 2**31 - 1, ((gib << 30) // 4,), dtype=torch.int32, device="cuda")
    ms = time_ms(lambda: x.clone(), iters=10)
    del x
    return 2 * (gib << 30) / (ms / 1e3)


def _decode_setup(kv_dtype, hq, hk, d, batch, ctx, bs, layers):
    cache = KVCache(layers, batch * ctx // bs, bs, hk, d, kv_dtype, torch.float16, "cuda")
    for t in (cache.k, cache.v):
        t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device="cuda") if kv_dtype != "auto"
                else torch.randn(t.shape, dtype=torch.float16, device="cuda"))
    if kv_dtype != "auto":
        cache.k_qp.uniform_(0.01, 0.02)
        cache.v_qp.uniform_(0.01, 0.02)
    tables = torch.randperm(batch * ctx // bs, device="cuda").to(torch.int32).view(batch, ctx // bs)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, dtype=torch.float16, device="cuda")
    per_head = {"auto": 2 * d, "int8": d + 8, "int4": d // 2 + 8}[kv_dtype]
    return cache, tables, lens, q, 2 * batch * ctx * hk * per_head


def bench_decode(shape, kv_dtype, bw, batch=16, ctx=4096, bs=64, partition=0, impl="cuda", bound=0):
    """bound: the static context bound passed to the kernel (a CUDA graph's session_len; 0 = ctx)."""
    hq, hk, d = shape
    layers = 4                                   # rotate layers so that L2 never holds the cache
    cache, tables, lens, q, nbytes = _decode_setup(kv_dtype, hq, hk, d, batch, ctx, bs, layers)
    state = {"i": 0}

    def step():
        layer = cache.layer(state["i"] % layers)
        state["i"] += 1
        pa.paged_decode(q, layer, tables, lens, bound or ctx, 1 / math.sqrt(d), partition, impl=impl)
    eager_ms = time_ms(step, iters=40)        # one eager call between two events: includes host launch latency
    ms = graph_ms(lambda: [step() for _ in range(2 * layers)], 2 * layers)   # the kernels alone
    del cache
    fixed = partition > 0
    nsplit, min_part = pa.split_plan(batch, hq, hk, bound or ctx, 0, partition, impl, kv_dtype)
    partition = pa.split_len(ctx, nsplit, min_part)
    log.info("  %s %s:%sx%s kv=%s B=%d ctx=%d P=%d%s: %.3f ms (one eager call: %.3f ms)", impl, hq, hk, d, kv_dtype,
             batch, ctx, partition, f" tiles={pa.MMA_TILES}" if impl == "mma" and pa.MMA_TILES else "", ms, eager_ms)
    return {"impl": impl, "shape": f"{hq}:{hk}x{d}", "kv": kv_dtype, "batch": batch, "ctx": ctx, "bound": bound or ctx,
            "block": bs,
            "partition": partition, "splits": nsplit, "split_ctas_per_sm": pa.SPLIT_CTAS_PER_SM,
            "fixed_partition": fixed, "ms": ms, "eager_call_ms": eager_ms, "bytes": nbytes,
            "frac_of_copy_bw": nbytes / (ms / 1e3) / bw}


def bench_prefill(hq=32, hk=8, d=128, q_len=2048, prefix=0, bs=64):
    ctx = prefix + q_len
    cache = KVCache(1, ctx // bs + 1, bs, hk, d, "auto", torch.float16, "cuda")
    cache.k.normal_()
    cache.v.normal_()
    blocks = torch.randperm(ctx // bs + 1, device="cuda")[:-(-ctx // bs)]
    layer = cache.layer(0)
    q = torch.randn(q_len, hq, d, dtype=torch.float16, device="cuda")
    k, v = pa.gather_kv(layer, blocks, ctx, torch.float16)
    k, v = k.repeat_interleave(hq // hk, 0).contiguous(), v.repeat_interleave(hq // hk, 0).contiguous()
    qb = q.transpose(0, 1)[None].contiguous()

    def contiguous():
        if prefix == 0:
            return F.scaled_dot_product_attention(qb, k[None], v[None], is_causal=True)
        return F.scaled_dot_product_attention(qb, k[None], v[None], attn_mask=mask)
    mask = (torch.arange(ctx, device="cuda")[None, :] <= torch.arange(prefix, ctx, device="cuda")[:, None])
    gathered = time_ms(lambda: pa.prefill_attention(q, layer, blocks, ctx, 1 / math.sqrt(d)))
    ideal = time_ms(contiguous)
    flops = 4 * q_len * ctx * hq * d / (2 if prefix == 0 else 1)
    return {"q_len": q_len, "prefix": prefix, "gather_sdpa_ms": gathered, "sdpa_contiguous_ms": ideal,
            "gather_sdpa_tflops": flops / gathered / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="only the headline decode cases")
    ap.add_argument("--impl", default="cuda,mma", help="decode kernels to time, comma-separated: cuda, mma")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill cases")
    ap.add_argument("--mma-tiles", default="", help="also time the mma kernel's int8/int4 cases with these tiles "
                    "in flight per warp (comma-separated, e.g. 1,2,4; default: the kernel's choice only)")
    ap.add_argument("--mma-tiles-kv", default="int8,int4", help="KV dtypes the --mma-tiles runs cover (auto,int8,int4)")
    ap.add_argument("--mma-minb", default="", help="also time the mma kernel (16 x 4k, every KV dtype) compiled for "
                    "these CTAs an SM (__launch_bounds__ minimum blocks, comma-separated)")
    ap.add_argument("--split-ctas", default="", help="also time the default-partition cases with these split caps "
                    "(SPLIT_CTAS_PER_SM, comma-separated; 0 = no cap)")
    ap.add_argument("--profile", default="", help="HQ,HK,D,KV[,IMPL]: run that decode case (batch 16 x 4096) 5 times "
                    "for ncu (e.g. `ncu -k regex:paged_decode`) and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.profile:
        hq, hk, d, kv, *impl = args.profile.split(",")
        cache, tables, lens, q, _ = _decode_setup(kv, int(hq), int(hk), int(d), 16, 4096, 64, 1)
        for _ in range(5):
            pa.paged_decode(q, cache.layer(0), tables, lens, 4096, 1 / math.sqrt(int(d)), impl=(impl or ["mma"])[0])
        torch.cuda.synchronize()
        return 0
    bw = copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "copy_bw_GBps": bw / 1e9, "decode": [], "prefill": []}
    impls = args.impl.split(",")
    for impl in impls:
        for shape in ((32, 32, 128), (32, 8, 128)):
            for kv in ("auto", "int8", "int4"):
                res["decode"].append(bench_decode(shape, kv, bw, impl=impl))
    if not args.quick:
        for impl in impls:
            for part in (128, 256, 1024):   # fixed partitions against the default
                res["decode"].append(bench_decode((32, 8, 128), "auto", bw, partition=part, impl=impl))
            for kv in ("auto", "int8"):
                res["decode"].append(bench_decode((32, 8, 128), kv, bw, batch=1, ctx=4096, impl=impl))
            res["decode"].append(bench_decode((32, 8, 128), "auto", bw, batch=64, ctx=1024, impl=impl))
            res["decode"].append(bench_decode((15, 5, 64), "auto", bw, impl=impl))    # SmolLM2-360M-like, G=3
    for tiles in [int(t) for t in args.mma_tiles.split(",") if t]:
        pa.MMA_TILES = tiles
        for shape in ((32, 32, 128), (32, 8, 128)):
            for kv in args.mma_tiles_kv.split(","):
                res["decode"].append(dict(bench_decode(shape, kv, bw, impl="mma"), tiles=tiles))
        pa.MMA_TILES = 0
    for minb in [int(t) for t in args.mma_minb.split(",") if t]:
        pa.MMA_MINB = minb
        for shape in ((32, 32, 128), (32, 8, 128)):
            for kv in ("auto", "int8", "int4"):
                res["decode"].append(dict(bench_decode(shape, kv, bw, impl="mma"), minb=minb))
        pa.MMA_MINB = 0
    for cap in [int(t) for t in args.split_ctas.split(",") if t]:
        keep, pa.SPLIT_CTAS_PER_SM = pa.SPLIT_CTAS_PER_SM, cap
        for impl in impls:
            for shape, kv, batch, ctx in (((32, 32, 128), "auto", 16, 4096), ((32, 8, 128), "auto", 16, 4096),
                                          ((32, 8, 128), "int8", 16, 4096), ((32, 32, 128), "auto", 1, 4096),
                                          ((32, 8, 128), "auto", 1, 4096), ((32, 8, 128), "auto", 1, 300),
                                          ((32, 32, 128), "auto", 1, 300), ((32, 8, 128), "auto", 64, 1024)):
                res["decode"].append(dict(bench_decode(shape, kv, bw, batch=batch, ctx=ctx, impl=impl,
                                                       bound=8192 if batch == 1 else 0), cap=cap))
        pa.SPLIT_CTAS_PER_SM = keep
    if not args.quick and not args.no_prefill:
        res["prefill"].append(bench_prefill(q_len=2048, prefix=0))
        res["prefill"].append(bench_prefill(q_len=512, prefix=1536))
    log.info("copy bandwidth %.0f GB/s on %s", bw / 1e9, res["device"])
    key = lambda r: (r["shape"], r["kv"], r["batch"], r["ctx"], r["partition"] if r["fixed_partition"] else 0,
                     r.get("cap", -1), r.get("minb", 0), r.get("tiles", 0))
    tiles = lambda r: ((f" tiles={r['tiles']}" if "tiles" in r else "")
                       + (f" cap={r['cap']} splits={r['splits']} bound={r['bound']}" if "cap" in r else "")
                       + (f" minb={r['minb']}" if "minb" in r else ""))
    fp16_ms = {(r["impl"],) + key(r)[:1] + key(r)[2:]: r["ms"] for r in res["decode"] if r["kv"] == "auto"}
    cuda_ms = {key(r)[:-1]: r["ms"] for r in res["decode"] if r["impl"] == "cuda"}
    best_fp16 = {}                        # the faster kernel's fp16-KV time (what LMTRITON_DECODE_ATTN=auto picks)
    for r in res["decode"]:
        if r["kv"] == "auto" and "tiles" not in r:
            k = key(r)[:1] + key(r)[2:-1]
            best_fp16[k] = min(best_fp16.get(k, float("inf")), r["ms"])
    for r in res["decode"]:
        base = fp16_ms.get((r["impl"],) + key(r)[:1] + key(r)[2:])
        old = cuda_ms.get(key(r)[:-1])
        best = best_fp16.get(key(r)[:1] + key(r)[2:-1])
        r["vs_fp16_kv"] = r["ms"] / base if base else None
        r["vs_best_fp16_kv"] = r["ms"] / best if best else None
        r["vs_cuda"] = r["ms"] / old if old else None
        log.info("decode %-4s %-9s kv=%-4s B=%-3d ctx=%-5d P=%-4d %8.3f ms  %5.1f%% of copy bw  %.2fx fp16 KV"
                 "  %.2fx best fp16 KV  %.2fx cuda  (eager call %.3f ms)%s", r["impl"], r["shape"], r["kv"],
                 r["batch"], r["ctx"], r["partition"], r["ms"], 100 * r["frac_of_copy_bw"], r["vs_fp16_kv"] or 0,
                 r["vs_best_fp16_kv"] or 0, r["vs_cuda"] or 0, r["eager_call_ms"], tiles(r))
    for r in res["prefill"]:
        log.info("prefill q=%d prefix=%d: gather+SDPA %.3f ms, SDPA contiguous %.3f ms", r["q_len"], r["prefix"],
                 r["gather_sdpa_ms"], r["sdpa_contiguous_ms"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
