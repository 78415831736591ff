"""Session-5 kernels against what they replace, one process, CUDA-graph timing (scripts/bench_timing.graph_ms):
- W4A16 decode GEMV at its default block configuration, and its whole sweep at one token (sorted; the best alone
  is one noisy sample);
- dense decode GEMV (dense_decode.py) vs cuBLAS (F.linear), and its whole sweep;
- tensor-core decode attention, 16 x 4k: exact vs RAW int8/int4 codes (old, new, old again);
- gate_up + SiLU·mul at 1 and 8 tokens: the decode GEMV then silu_and_mul vs gemv_silu (LMTRITON_FUSE_SILU), and a
  sweep of the fused kernel's configurations;
- split-K W4A16 GEMM at 32-64 tokens, at the automatic split count and at half and twice of it.
Every time also as a fraction of the copy bandwidth measured in the same run.
    PYTHONPATH=. python3 scripts/ab_kernels.py OUT.json [w4a16|dense|attention|fused_silu|splitk ...]  (default: all)
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from backend.kernels import _cupy, dense_decode, paged_attention as pa, w4a16_decode, w4a16_gemm
from backend.kernels.w4a16_decode import DecodeConfig
from scripts import bench_attention
from scripts.bench_kernels import awq_pool, copy_bandwidth, dense_pool, dense_sweep_configs, over
from scripts.bench_timing import graph_ms

# the three shapes, then Llama-2-7B's fused qkv and gate_up
W4A16_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288), (4096, 22016)]
DENSE_SHAPES = [(4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (4096, 32000)]   # last: lm_head


def frac(r: dict, nbytes: int, bw: float) -> dict:
    for k in [k for k in r if k.endswith("_us")]:
        r[k[:-3] + "_frac"] = round(nbytes / (r[k] / 1e6) / bw, 3)
    return r


def w4a16_rows(bw: float) -> list:
    sweep = [DecodeConfig(nt=1, ks=ks, u=u, il=il) for ks in (4, 8, 16) for u in (2, 4, 8) for il in (0, 1)]
    rows = []
    for K, N in W4A16_SHAPES:
        for group in (128, 64, 32) if (K, N) in ((4096, 4096), (11008, 4096)) else (128,):
            pool, nbytes = awq_pool(K, N, group, int_zeros=True)
            for M in (1, 8):
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                cfg = w4a16_decode.default_config(N, K, group, 0)

                def us(c):
                    return graph_ms(over(pool, lambda lin: w4a16_decode.gemv(x, lin.runtime, None, c)), len(pool)) * 1e3
                r = dict(K=K, N=N, g=group, M=M, cfg=str(cfg), gemv_us=us(cfg))
                if M == 1:    # at groups 64 / 32 too
                    r["sweep"] = sorted((round(us(c), 3), str(c)) for c in sweep)    # all of it: the best is noisy
                    r["best_us"], r["best_cfg"] = r["sweep"][0]
                rows.append(frac(r, nbytes + M * K * 2, bw))
                print(json.dumps(rows[-1]), flush=True)
            del pool
    return rows


def dense_rows(bw: float) -> list:
    rows = []
    for K, N in DENSE_SHAPES:
        pool = dense_pool(K, N)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)

        def us(fn):
            return graph_ms(over(pool, fn), len(pool)) * 1e3
        r = dict(K=K, N=N, M=1, cublas_us=us(lambda w: F.linear(x, w)), ours_us=us(lambda w: dense_decode.gemv(x, w)))
        r["sweep"] = sorted((round(us(lambda w: dense_decode.gemv(x, w, None, c)), 3), str(c))
                            for c in dense_sweep_configs())
        r["best_us"], r["best_cfg"] = r["sweep"][0]
        rows.append(frac(r, (K * N + K) * 2, bw))
        print("dense", json.dumps(rows[-1]), flush=True)
        del pool
    return rows


def silu_rows(bw: float) -> list:
    """The gate_up projection of Llama-2-7B then SiLU·mul, W4A16 and fp16: two kernels (the decode GEMV +
    silu_and_mul) vs gemv_silu."""
    from backend.kernels.activation import silu_and_mul
    rows = []
    K, N = 4096, 22016
    pool, nbytes = awq_pool(K, N, 128, int_zeros=True)
    sweep = [DecodeConfig(nt=1, ks=ks, u=u, il=il) for ks in (8, 16) for u in (2, 4) for il in (0, 1)]
    for M in (1, 8):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)

        def us(fn):
            return graph_ms(over(pool, fn), len(pool)) * 1e3
        r = dict(K=K, N=N, g=128, M=M, two_kernels_us=us(lambda lin: silu_and_mul(w4a16_decode.gemv(x, lin.runtime))),
                 gemv_only_us=us(lambda lin: w4a16_decode.gemv(x, lin.runtime)),
                 fused_us=us(lambda lin: w4a16_decode.gemv_silu(x, lin.runtime)),
                 fused_cfg=str(w4a16_decode.gated_config(N, K, 128, 0)))
        if M == 1:
            r["sweep"] = sorted((round(us(lambda lin: w4a16_decode.gemv_silu(x, lin.runtime, None, c)), 3), str(c))
                                for c in sweep)
        rows.append(frac(r, nbytes + M * K * 2, bw))
        print("silu", json.dumps(rows[-1]), flush=True)
    del pool
    dense = dense_pool(K, N)
    for M in (1, 8):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)

        def us(fn):
            return graph_ms(over(dense, fn), len(dense)) * 1e3
        r = dict(K=K, N=N, dtype="fp16", M=M, two_kernels_us=us(lambda w: silu_and_mul(dense_decode.gemv(x, w))),
                 gemv_only_us=us(lambda w: dense_decode.gemv(x, w)),
                 fused_us=us(lambda w: dense_decode.gemv_silu(x, w)))
        if M == 1:
            r["sweep"] = sorted((round(us(lambda w: dense_decode.gemv_silu(x, w, None, c)), 3), str(c))
                                for c in (dense_decode.DenseConfig(ks=ks, u=u) for ks in (8, 16) for u in (2, 4)))
        rows.append(frac(r, (K * N + M * K) * 2, bw))
        print("silu", json.dumps(rows[-1]), flush=True)
    del dense
    return rows


def attention_rows(bw: float) -> list:
    rows = []
    for shape in ((32, 8, 128), (32, 32, 128)):
        for kv in ("auto", "int8", "int4"):
            r = {"shape": shape, "kv": kv}
            for name, raw in (("old", "none"), ("new", "all"), ("old2", "none")):
                pa.MMA_RAW = raw
                r[name] = bench_attention.bench_decode(shape, kv, bw, impl="mma")["ms"] * 1e3
            if kv == "auto":
                r["cuda"] = bench_attention.bench_decode(shape, kv, bw, impl="cuda")["ms"] * 1e3
            rows.append(r)
            print("attention", json.dumps(r), flush=True)
    return rows


def splitk_rows(bw: float) -> list:
    rows = []
    sm = _cupy.sm_count(0)
    for K, N in W4A16_SHAPES:
        pool, nbytes = awq_pool(K, N, 128, int_zeros=True)
        for M in (32, 64):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            auto = w4a16_gemm.splitk_config(M, N, K, sm).splitk
            r = dict(K=K, N=N, M=M, splitk=auto)
            for split in sorted({max(2, auto // 2), auto, 2 * auto}):
                cfg = w4a16_gemm.splitk_config(M, N, K, sm, splitk=split)
                r[f"s{split}_us"] = graph_ms(over(pool, lambda lin: w4a16_gemm.gemm(x, lin.runtime, None, cfg)),
                                             len(pool)) * 1e3
            rows.append(frac(r, nbytes + M * K * 2, bw))
            print("splitk", json.dumps(rows[-1]), flush=True)
        del pool
    return rows


PARTS = dict(w4a16=w4a16_rows, dense=dense_rows, attention=attention_rows, fused_silu=silu_rows, splitk=splitk_rows)


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args or any(a not in PARTS for a in args[1:]):
        print(f"usage: ab_kernels.py OUT.json [PART ...], PART one of {', '.join(PARTS)} (default: all, in that order)",
              file=sys.stderr)
        return 2
    out, parts = args[0], args[1:] or list(PARTS)
    bw = copy_bandwidth()
    res = dict(device=torch.cuda.get_device_name(), copy_bw_GBps=bw / 1e9)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    for part in parts:
        res[part] = PARTS[part](bw)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
