"""W4A16 linear kernels alone on the GPU, against copy bandwidth and cuBLAS.

  PYTHONPATH=. python3 scripts/bench_kernels.py --out $OUT/w4a16_kernels.json [--sweep 1,8] [--quick]

- copy bandwidth: torch copy_ of 2 GiB, bytes read + written.
- GEMV (decode, M tokens <= 8): time, GB/s and % of copy bandwidth for the Llama-7B linear shapes (K x N =
  4096x4096, 4096x11008, 11008x4096) at group 32/64/128; bytes = packed weights + scales + zeros (canonical
  sizes) + activations. fp16 dense torch.matmul (cuBLAS) on the same shapes gives the W4A16 speed-up.
- GEMM (prefill, M = 1..4096): the GEMV, the tensor-core GEMM and dequantize + cuBLAS, TFLOP/s; the fastest
  per M is the dispatch table of backend/kernels/w4a16.py.
Every timing replays a CUDA graph of calls that cycle through enough weight copies to overflow L2, so neither
launch overhead nor cache hits flatter the number; median of 5 timed replays.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from backend.kernels import _cupy, w4a16
from backend.kernels.w4a16_gemm import GemmConfig, dequant_matmul, gemm, splitk_config
from backend.kernels import dense_decode, w4a16_decode
from backend.kernels.w4a16_decode import DecodeConfig
from backend.kernels.w4a16_gemv import gemv
from scripts.bench_timing import graph_ms

log = logging.getLogger(__name__)
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]   # (in, out): qkv/o-like, gate/up, down
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
GEMM_VARIANTS = {"gemm_64x64": GemmConfig(bm=64, warps_m=2, ntw=1), "gemm_64x32": GemmConfig(bm=64, warps_m=4, ntw=1),
                 "gemm_32x32": GemmConfig(bm=32, warps_m=4, ntw=1), "gemm_64x128": GemmConfig(bm=64, warps_m=2, ntw=2),
                 "gemm_128x128": GemmConfig(bm=128, warps_m=2, ntw=2)}   # name: tokens x channels per block


def copy_bandwidth(gib: float = 2) -> float:
    """Bytes read + written per second by the faster of torch's copy_ and an elementwise kernel, timed eagerly
    (a copy_ captured in a graph becomes a memcpy node, measured slower)."""
    src = torch.randn(int(gib * 2**30) // 4, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for fn in (lambda: dst.copy_(src), lambda: torch.add(src, 0.0, out=dst)):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        best = min(best, statistics.median(times))
    return 2 * src.numel() * 4 / (best / 1e3)


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)


def awq_pool(K: int, N: int, group: int, dtype=torch.float16, int_zeros: bool = False):
    """Enough prepared copies of one random AWQ linear that a pass over them streams from HBM. RTN gives
    fractional zero points (the kernels' ZFRAC path); int_zeros rounds them (AutoAWQ checkpoints: integer path)."""
    nbytes = K * N // 2 + (K // group) * N * 3      # runtime bytes: codes, fp16 scales, 8-bit zeros
    linears = [w4a16.random_awq_linear(K, N, group, dtype=dtype, device="cuda", seed=i)
               for i in range(max(2, -(-3 * l2_bytes() // nbytes)))]
    for lin in linears:
        if int_zeros:
            lin.zeros = lin.zeros.round()
        w4a16.prepare(lin)
    return linears, nbytes


def dense_pool(K: int, N: int, dtype=torch.float16):
    n = max(2, -(-3 * l2_bytes() // (K * N * 2)))
    return [torch.randn(N, K, device="cuda", dtype=dtype) * 0.02 for _ in range(n)]


def over(pool, call):
    def fn():
        for item in pool:
            call(item)
    return fn


def sweep_configs():
    """Block configurations of the decode GEMV (w4a16_decode.DecodeConfig)."""
    return [DecodeConfig(nt=1, ks=ks, u=u, il=il) for ks in (4, 8, 16) for u in (1, 2, 4) for il in (False, True)]


def dense_sweep_configs():
    """Block configurations of the dense decode GEMV (dense_decode.DenseConfig)."""
    return [dense_decode.DenseConfig(ks=ks, u=u) for ks in (2, 4, 8, 16) for u in (1, 2, 4, 8) if ks * u < 128]


def copy_pool(nbytes: int):
    """Tensors whose copy moves `nbytes` (read + write), enough of them to overflow L2: the ceiling of a kernel
    that streams that many bytes, timed the same way as the kernels (launch ramp and tail included)."""
    n = max(2, -(-3 * l2_bytes() // nbytes))
    return [(torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda"),
             torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")) for _ in range(n)]


def profile_one(spec: str) -> None:
    """K,N,M[,nt,ks,u]: run the decode GEMV 20 times (for `ncu -k regex:w4a16_decode`)."""
    K, N, M, *rest = (int(v) for v in spec.split(","))
    lin = w4a16.random_awq_linear(K, N, 128, device="cuda")
    rt = w4a16.prepare(lin)
    cfg = DecodeConfig(*rest[:3]) if rest else None
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    for _ in range(20):
        w4a16_decode.gemv(x, rt, None, cfg)
    torch.cuda.synchronize()


def profile_gemm(spec: str) -> None:
    """K,N,M[,ntw,splitk]: run the split-K GEMM 20 times (for `ncu -k regex:w4a16_gemm`)."""
    K, N, M, *rest = (int(v) for v in spec.split(","))
    rt = w4a16.prepare(w4a16.random_awq_linear(K, N, 128, device="cuda"))
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = splitk_config(M, N, K, sm, *rest)
    log.info("profiling %s", cfg)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    for _ in range(20):
        gemm(x, rt, None, cfg)
    torch.cuda.synchronize()


def bench_gemv(bw, groups, tokens, sweep):
    rows, sweeps = [], []
    for K, N in SHAPES:
        dense = dense_pool(K, N)
        for group in groups:
            pool, nbytes = awq_pool(K, N, group)
            pool_int, _ = awq_pool(K, N, group, int_zeros=True)
            for M in tokens:
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                total = nbytes + M * K * 2
                ms = graph_ms(over(pool, lambda lin: w4a16_decode.gemv(x, lin.runtime)), len(pool))
                ms_int = graph_ms(over(pool_int, lambda lin: w4a16_decode.gemv(x, lin.runtime)), len(pool_int))
                ms_ring = graph_ms(over(pool, lambda lin: gemv(x, lin.runtime)), len(pool))
                ms_fp16 = graph_ms(over(dense, lambda w: F.linear(x, w)), len(dense))
                ms_dense = graph_ms(over(dense, lambda w: dense_decode.gemv(x, w)), len(dense))
                copies = copy_pool(total)
                ms_copy = graph_ms(over(copies, lambda ab: ab[1].copy_(ab[0])), len(copies))
                del copies
                cfg = w4a16_decode.default_config(N, K, group, 0)
                rows.append(dict(K=K, N=N, group=group, M=M, config=cfg.__dict__, us=ms * 1e3,
                                 int_zeros_us=ms_int * 1e3, int_zeros_frac_copy_bw=total / (ms_int / 1e3) / bw,
                                 GBps=total / ms / 1e6, frac_copy_bw=total / (ms / 1e3) / bw,
                                 ring_us=ms_ring * 1e3, ring_frac_copy_bw=total / (ms_ring / 1e3) / bw,
                                 same_bytes_copy_us=ms_copy * 1e3, frac_same_bytes_copy=ms_copy / ms,
                                 fp16_cublas_us=ms_fp16 * 1e3, speedup_vs_fp16=ms_fp16 / ms,
                                 fp16_cublas_frac_copy_bw=(K * N + M * K) * 2 / (ms_fp16 / 1e3) / bw,
                                 fp16_ours_us=ms_dense * 1e3,
                                 fp16_ours_frac_copy_bw=(K * N + M * K) * 2 / (ms_dense / 1e3) / bw))
                log.info("gemv %s", rows[-1])
                if sweep and M in sweep:
                    for cfg in sweep_configs():
                        ms_c = graph_ms(over(pool, lambda lin: w4a16_decode.gemv(x, lin.runtime, None, cfg)),
                                        len(pool))
                        regs = _cupy.get_kernel(w4a16_decode._SOURCE, w4a16_decode.KERNEL, cfg.options(
                            torch.float16, group) + (pool[0].runtime.zero_option,)).num_regs
                        sweeps.append(dict(K=K, N=N, M=M, group=group, config=cfg.__dict__, us=ms_c * 1e3,
                                           frac_copy_bw=total / (ms_c / 1e3) / bw, regs=regs))
                        log.info("sweep %s", sweeps[-1])
                    if group == groups[0]:
                        for dcfg in dense_sweep_configs():
                            ms_c = graph_ms(over(dense, lambda w: dense_decode.gemv(x, w, None, dcfg)), len(dense))
                            sweeps.append(dict(K=K, N=N, M=M, kernel="dense_decode", config=dcfg.__dict__,
                                               us=ms_c * 1e3, frac_copy_bw=(K * N + M * K) * 2 / (ms_c / 1e3) / bw))
                            log.info("sweep %s", sweeps[-1])
            del pool, pool_int
    return rows, sweeps


def bench_gemm(tokens, group=128):
    rows = []
    for K, N in SHAPES:
        pool, _ = awq_pool(K, N, group)
        dense = dense_pool(K, N)
        for M in tokens:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            flops = 2 * M * K * N
            paths = {name: (lambda lin, c=cfg: gemm(x, lin.runtime, None, c))
                     for name, cfg in GEMM_VARIANTS.items() if M >= 16}
            if M <= 128:   # split-K tensor-core GEMM for few tokens: n-tile width x number of K splits (0 = auto)
                sm = torch.cuda.get_device_properties(0).multi_processor_count
                for ntw in (1, 2):
                    for sk in (0, 2, 4, 8):
                        cfg = splitk_config(M, N, K, sm, ntw=ntw, splitk=sk)
                        paths[f"splitk_n{cfg.bn}_s{sk or 'auto'}"] = lambda lin, c=cfg: gemm(x, lin.runtime, None, c)
                for minb, stages in ((3, 3), (2, 4), (3, 4)):     # occupancy and pipeline depth, automatic split
                    cfg = splitk_config(M, N, K, sm, minb=minb, stages=stages)
                    name = f"splitk_n{cfg.bn}_sauto_b{minb}_st{stages}"
                    paths[name] = lambda lin, c=cfg: gemm(x, lin.runtime, None, c)
            paths["dequant_cublas"] = lambda lin: dequant_matmul(x, lin.runtime)
            if M <= 256:
                paths["gemv"] = lambda lin: gemv(x, lin.runtime)
            row = dict(K=K, N=N, M=M, group=group)
            for name, call in paths.items():
                ms = graph_ms(over(pool, call), len(pool))
                row[name + "_us"], row[name + "_tflops"] = ms * 1e3, flops / ms / 1e9
            ms = graph_ms(over(dense, lambda w: F.linear(x, w)), len(dense))
            row["fp16_cublas_us"], row["fp16_cublas_tflops"] = ms * 1e3, flops / ms / 1e9
            timed = [k for k in row if k.endswith("_us") and not k.startswith("fp16") and row[k] == row[k]]
            best = min(timed, key=row.get) if timed else "none__"
            row["fastest_w4a16"] = best[:-3]
            rows.append(row)
            log.info("gemm %s", row)
        del pool, dense
    return rows


def markdown(res) -> str:
    bw = res["copy_GBps"]
    out = [f"Machine: {res['device']}; copy bandwidth {bw:.0f} GB/s (bytes read + written, best of torch copy_ "
           f"and an elementwise kernel). {res['date']}.",
           f"Command: `{res['command']}`", "",
           "GEMV (fp16 activations): the decode kernel (w4a16_decode, what the dispatch runs at <= 8 tokens): time, "
           "achieved bandwidth, share of copy bandwidth; the ring GEMV (w4a16_gemv) and fp16 cuBLAS on the same shape.",
           "A copy that moves the same bytes, timed the same way, is the ceiling at this size (launch ramp, tail).",
           "", "| K x N | group | M | W4A16 us | GB/s | % copy BW | same-bytes copy us (W4A16 / it) | "
           "ring GEMV us (% BW) | fp16 cuBLAS us | speed-up |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["gemv"]:
        out.append(f"| {r['K']}x{r['N']} | {r['group']} | {r['M']} | {r['us']:.1f} | {r['GBps']:.0f} | "
                   f"{100 * r['frac_copy_bw']:.0f}% | {r['same_bytes_copy_us']:.1f} "
                   f"({100 * r['frac_same_bytes_copy']:.0f}%) | {r['ring_us']:.1f} ({100 * r['ring_frac_copy_bw']:.0f}%) | "
                   f"{r['fp16_cublas_us']:.1f} | {r['speedup_vs_fp16']:.2f}x |")
    if res.get("gemv_sweep"):
        out += ["", "Decode GEMV block configurations (fp16): the best of the sweep per shape, group and M.", "",
                "| K x N | group | M | best (nt, ks, u, il) | us | % copy BW | registers | default us "
                "| configs tried |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        default_us = {(r["K"], r["N"], r["group"], r["M"]): r["us"] for r in res["gemv"]}
        keys = sorted({(r["K"], r["N"], r.get("group", 128), r["M"]) for r in res["gemv_sweep"]})
        for K, N, G, M in keys:
            rs = [r for r in res["gemv_sweep"]
                  if (r["K"], r["N"], r.get("group", 128), r["M"]) == (K, N, G, M) and r["us"] == r["us"]]
            if rs:
                b = min(rs, key=lambda r: r["us"])
                c = b["config"]
                out.append(f"| {K}x{N} | {G} | {M} | ({c['nt']}, {c['ks']}, {c['u']}, {int(c.get('il', 0))}) | "
                           f"{b['us']:.1f} | {100 * b['frac_copy_bw']:.0f}% | {b.get('regs', '-')} | "
                           f"{default_us.get((K, N, G, M), float('nan')):.1f} | {len(rs)} |")
    out += ["", "GEMM paths (group 128, fp16), TFLOP/s; `w4a16_linear` dispatches to the fastest W4A16 path per M.",
            "GEMM columns name the block tile (tokens x channels).", "",
            "| K x N | M | GEMV | " + " | ".join(n.replace("gemm_", "GEMM ") for n in GEMM_VARIANTS)
            + " | dequant+cuBLAS | fp16 cuBLAS | fastest |", "|" + " --- |" * (len(GEMM_VARIANTS) + 6)]
    for r in res["gemm"]:
        cells = [f"{r[k + '_tflops']:.1f}" if k + "_tflops" in r else "-"
                 for k in ["gemv", *GEMM_VARIANTS, "dequant_cublas", "fp16_cublas"]]
        out.append(f"| {r['K']}x{r['N']} | {r['M']} | " + " | ".join(cells) + f" | {r['fastest_w4a16']} |")
    splitk = [r for r in res["gemm"] if any(k.startswith("splitk_") for k in r)]
    if splitk:
        out += ["", "Split-K tensor-core GEMM for few tokens (`splitk_n<channels per block>_s<K splits>`), TFLOP/s:",
                "",
                "| K x N | M | best split-K | TFLOP/s | ring GEMV | fp16 cuBLAS | all split-K variants |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in splitk:
            names = sorted(k[:-7] for k in r if k.startswith("splitk_") and k.endswith("_tflops"))
            best = max(names, key=lambda n: r[n + "_tflops"] if r[n + "_tflops"] == r[n + "_tflops"] else -1)
            out.append(f"| {r['K']}x{r['N']} | {r['M']} | {best} | {r[best + '_tflops']:.1f} | "
                       f"{r.get('gemv_tflops', float('nan')):.1f} | {r['fp16_cublas_tflops']:.1f} | "
                       + ", ".join(f"{n[7:]} {r[n + '_tflops']:.0f}" for n in names) + " |")
    return "\n".join(out) + "\n"


def launch_cost(n: int = 3000) -> dict:
    """Host microseconds per eager launch of a tiny kernel (RMSNorm of one 4096-wide token) through cupy's launcher
    (PDL off) and through cuLaunchKernelEx with the PDL attribute (ctypes), n launches each, after a warm-up."""
    from backend.kernels.rms_norm import rms_norm
    x = torch.randn(1, 4096, dtype=torch.float16, device="cuda")
    w = torch.ones(4096, dtype=torch.float16, device="cuda")
    res, mode = {}, _cupy.PDL_MODE
    try:
        for m in ("0", "1"):
            _cupy.PDL_MODE = m
            for _ in range(100):
                rms_norm(x, w, 1e-5)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                rms_norm(x, w, 1e-5)
            torch.cuda.synchronize()
            res[f"pdl{m}_us_per_launch"] = (time.perf_counter() - t0) / n * 1e6
    finally:
        _cupy.PDL_MODE = mode
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "workspace/bench"), "w4a16_kernels.json"))
    p.add_argument("--sweep", default="", help="token counts at which to time GEMV block configurations "
                   "(group 128), e.g. 1,8")
    p.add_argument("--quick", action="store_true", help="group 128 only, fewer token counts")
    p.add_argument("--gemv-only", action="store_true", help="skip the GEMM comparison")
    p.add_argument("--gemm-only", action="store_true", help="skip the GEMV table")
    p.add_argument("--gemm-tokens", default="", help="token counts of the GEMM comparison (default: 1..4096)")
    p.add_argument("--profile", default="", help="K,N,M[,nt,ks,u]: run the decode GEMV for ncu and exit")
    p.add_argument("--profile-gemm", default="", help="K,N,M[,ntw,splitk]: run the split-K GEMM for ncu and exit")
    p.add_argument("--launch-cost", action="store_true", help="host time of an eager launch, PDL off / on, and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device")
    if args.profile:
        profile_one(args.profile)
        return 0
    if args.profile_gemm:
        profile_gemm(args.profile_gemm)
        return 0
    if args.launch_cost:
        print(json.dumps(launch_cost()))
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_bandwidth()                                  # warm the clocks up first
    bw = copy_bandwidth()
    cli = " ".join(sys.argv[1:] if argv is None else argv)
    res = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               command="PYTHONPATH=. python3 scripts/bench_kernels.py " + cli, copy_GBps=bw / 1e9)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    groups = (128,) if args.quick else (32, 64, 128)
    sweep = [int(m) for m in args.sweep.split(",") if m]
    res["gemv"], res["gemv_sweep"] = ([], []) if args.gemm_only else bench_gemv(
        bw, groups, (1, 8) if args.quick else (1, 4, 8), sweep)
    save()
    gemm_tokens = [int(m) for m in args.gemm_tokens.split(",") if m] or ([16, 256, 4096] if args.quick else TOKENS)
    res["gemm"] = [] if args.gemv_only else bench_gemm(gemm_tokens)
    res["copy_GBps_end"] = copy_bandwidth() / 1e9
    save()
    md = markdown(res)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
