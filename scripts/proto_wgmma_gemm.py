"""Prototype: a W4A16 GEMM for 1-64 tokens on Hopper's wgmma (sm_90a), to compare with the split-K mma.sync GEMM
(backend/kernels/w4a16_gemm.py) before anything of it goes into the backend.

Result (H100, 2026-12-06, docs/benchmarks.md session 9): correct everywhere (96 cases, rel err ~2e-4), but faster than
the split-K mma.sync GEMM only on the two widest 7B layers at 64 tokens (4096x12288: 43.2 against 47.2 us; 4096x22016:
61.3 against 70.2) and 1.2-5x slower elsewhere; the permutation of x (below) would eat most of that gain unless
folded into the RMSNorm that produces x. Not integrated.

Why: at batch 64 the split-K GEMM runs the 7B layers at ~166 TFLOP/s (docs/benchmarks.md, session 8); the issue's
batch-64 target needs several times that.
Design: y^T = W x^T with the weights as wgmma's register A operand and the tokens as its shared-memory B operand.
A warp of a warpgroup holds one n-tile of 16 output channels, so a warpgroup is wgmma's M = 64 channels; the
runtime layout already hands each lane the m16n8k16 A fragments of a k-chunk of 64 in one 16-byte load (one packed
word a k-tile, `dequant_word`), and wgmma's register A fragment of each warp's 16 rows has that layout. The tokens
(N = 64, rows past M zero-filled) come through a cp.async ring of 64 x 64 fp16 tiles in the 128-byte swizzled
K-major layout that the descriptor names. The runtime layout gives lane (g, t) the inputs 32h + 8t + 4jj + 0..3 of
k-tile (h, jj), not the mma's standard columns, so the activations are permuted the same way inside each chunk of
64 (`PERM`: mma column -> input) before the kernel; a real version would fold that into the producer of x.
Split-K over blockIdx.z as the mma.sync GEMM (fp32 atomics into a zeroed workspace, then its finish kernel).
v1 waits for each chunk's wgmma before dequantizing the next; OVERLAP (v2) dequantizes chunk c + 1 into a second
register set while chunk c's wgmma run (wait_group 1), with the tile ring refilled two chunks behind.

    PYTHONPATH=. python3 scripts/proto_wgmma_gemm.py [--time]   (on the device; compiles with NVRTC for sm_90a)
checks the kernel against the reference at groups 128 / 64 / 32, fp16 / bf16, 1 / 17 / 64 tokens, with and without
split-K; --time adds CUDA-graph timings against the split-K mma.sync GEMM on the 7B shapes at 32 and 64 tokens.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

import numpy as np
import torch

from backend.kernels import _cupy, w4a16, w4a16_gemm
from backend.kernels.w4a16_runtime import DEVICE_HELPERS
from scripts.sass_size import nvrtc_output


def _perm() -> list:
    """mma column p of a chunk of 64 (k-tile s = p // 16 = (h, jj)) -> the input it multiplies."""
    out = []
    for p in range(64):
        s, kk = divmod(p, 16)
        h, jj = divmod(s, 2)
        t, e = divmod(kk % 8, 2)
        out.append(32 * h + 8 * t + 4 * jj + (2 if kk >= 8 else 0) + e)
    return out


PERM = _perm()
assert sorted(PERM) == list(range(64))


def _wgmma_asm() -> str:
    d = ", ".join(f"%{i}" for i in range(32))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(32))
    return (
        '    asm volatile("{\\n.reg .pred p;\\nsetp.ne.b32 p, %37, 0;\\n"\n'
        '                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." AB_T "." AB_T " "\n'
        f'                 "{{{d}}}, {{%32, %33, %34, %35}}, %36, p, 1, 1, 0;\\n}}\\n"\n'
        f'                 : {outs}\n'
        '                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));\n')


SOURCE = DEVICE_HELPERS + r"""
// -D: IS_BF16, GROUP_SIZE, ZFRAC, WG (warpgroups a block, 64 channels each), STAGES (>= 3 with OVERLAP), SPLITK,
// OVERLAP (dequantize the next chunk while this one's wgmma run)
#if IS_BF16
#define AB_T "bf16"
#else
#define AB_T "f16"
#endif
#define NTHREADS (WG * 128)
#define NGC ((GROUP_SIZE) == 32 ? 2 : 1)                  // groups a chunk of 64 spans
#define TILE_BYTES 8192                                   // 64 tokens x 64 k, fp16/bf16, 128-byte rows

// K-major operand in the 128-byte swizzle: 8-row atoms of 1024 bytes (SBO), LBO unused; start address >> 4.
__device__ __forceinline__ unsigned long long sw128_desc(u32 addr) {
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32)
           | (1ull << 62);
}
__device__ __forceinline__ void wgmma_64x64x16(float (&d)[32], const u32 (&a)[4], unsigned long long desc) {
WGMMA_ASM}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait1() { asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
w4a16_wgmma(const uint4* __restrict__ qw, const u32* __restrict__ scales, const u16* __restrict__ zeros,
            const u16* __restrict__ xp, const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ ws,
            int M, int N, int K, int per_split) {
    PDL_BEGIN();
    extern __shared__ unsigned char smem_raw[];
    const u32 sbase = (smem_addr(smem_raw) + 1023u) & ~1023u;       // swizzle atoms sit on 1024-byte boundaries
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2, wq = warp & 3;
    const int g = lane >> 2, t = lane & 3;
    const int nchunks = K >> 6, ngroups = K / GROUP_SIZE, ntiles = N >> 4;
    const int nt = (blockIdx.x * WG + wg) * 4 + wq;                 // this warp's 16 channels: rows of wgmma's A
    const int ntc = min(nt, ntiles - 1);                             // past N: compute a copy, store nothing
    const int c_begin = blockIdx.z * per_split, c_end = min(c_begin + per_split, nchunks);
    const uint4* wsrc = qw + (size_t)ntc * nchunks * 32 + lane;
    const u32* ssrc = scales + (size_t)ntc * ngroups * 8 + g;
    const u16* zsrc = zeros + (size_t)ntc * ngroups * 8 + g;

    auto load_x = [&](int slot, int c) {      // chunk c of the permuted tokens -> swizzled tile `slot` (zeros past M)
        const bool ok = c < c_end;
        for (int v = tid; v < 512; v += NTHREADS) {
            const int r = v >> 3, u = v & 7;
            const bool p = ok && r < M;
            const u16* src = xp + (size_t)(p ? r : 0) * K + (size_t)(ok ? c : 0) * 64 + u * 8;
            cp_async16_ca(sbase + slot * TILE_BYTES + r * 128 + ((u ^ (r & 7)) << 4), src, p);
        }
    };
    auto params = [&](int c, GroupParams (&gp)[NGC]) {
#pragma unroll
        for (int q = 0; q < NGC; ++q) {
            const int grp = (c * 64 + q * 32) / GROUP_SIZE;
            gp[q] = group_params(ssrc[grp * 8], zsrc[grp * 8]);
        }
    };

    float d[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) d[i] = 0.f;
    auto dequant = [&](const uint4& w, const GroupParams (&gp)[NGC], u32 (&a)[4][4]) {
#pragma unroll
        for (int s = 0; s < 4; ++s) dequant_word(word_of(w, s), gp[NGC == 2 ? s >> 1 : 0], a[s]);
    };
    auto mma_chunk = [&](const u32 (&a)[4][4], int slot) {
        const u32 st = sbase + slot * TILE_BYTES;
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 4; ++s) wgmma_64x64x16(d, a[s], sw128_desc(st + 32 * s));
        wgmma_commit();
    };
#if !OVERLAP
    // v1: dequantize, wait for the tile, multiply, wait for the multiply; the next chunk's weights load meanwhile.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) { load_x(s, c_begin + s); cp_async_commit(); }
    uint4 w_cur = u4(0u, 0u, 0u, 0u);
    GroupParams gp_cur[NGC];
    if (c_begin < c_end) { w_cur = ld_stream(wsrc + (size_t)c_begin * 32); params(c_begin, gp_cur); }
    for (int c = c_begin; c < c_end; ++c) {
        const int i = c - c_begin;
        uint4 w_next = w_cur;                 // the next chunk's weights in flight during this one
        GroupParams gp_next[NGC];
        if (c + 1 < c_end) { w_next = ld_stream(wsrc + (size_t)(c + 1) * 32); params(c + 1, gp_next); }
        u32 a[4][4];
        dequant(w_cur, gp_cur, a);
        cp_async_wait<STAGES - 2>();
        fence_proxy_async();                  // this thread's cp.async writes, visible to the async proxy (wgmma)
        __syncthreads();                      // chunk c landed for all; every warpgroup waited for chunk c - 1
        load_x((i + STAGES - 1) % STAGES, c + STAGES - 1);
        cp_async_commit();
        mma_chunk(a, i % STAGES);
        wgmma_wait0();
        w_cur = w_next;
#pragma unroll
        for (int q = 0; q < NGC; ++q) gp_cur[q] = gp_next[q];
    }
#else
    // v2: chunk c's wgmma run while chunk c + 1 is dequantized into the other register set. wait_group 1 after
    // committing c means c - 1 is done: its registers are free, and after the next barrier its tile too, so the
    // refill goes to the slot of chunk c - 2 ... i.e. tiles are prefetched STAGES - 2 chunks ahead.
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) { load_x(s, c_begin + s); cp_async_commit(); }
    u32 a0[4][4], a1[4][4];
    uint4 w1 = u4(0u, 0u, 0u, 0u);            // weights of the chunk after the one being dequantized
    GroupParams gp1[NGC];
    if (c_begin < c_end) {
        GroupParams gp0[NGC];
        params(c_begin, gp0);
        dequant(ld_stream(wsrc + (size_t)c_begin * 32), gp0, a0);
        if (c_begin + 1 < c_end) { w1 = ld_stream(wsrc + (size_t)(c_begin + 1) * 32); params(c_begin + 1, gp1); }
    }
    auto step = [&](int c, const u32 (&a_cur)[4][4], u32 (&a_next)[4][4]) {
        const int i = c - c_begin;
        cp_async_wait<STAGES - 3>();
        fence_proxy_async();
        __syncthreads();                      // chunk c landed for all; every warpgroup's chunk c - 2 multiply is done
        load_x((i + STAGES - 2) % STAGES, c + STAGES - 2);
        cp_async_commit();
        mma_chunk(a_cur, i % STAGES);
        uint4 w2 = w1;
        GroupParams gp2[NGC];
        if (c + 2 < c_end) { w2 = ld_stream(wsrc + (size_t)(c + 2) * 32); params(c + 2, gp2); }
        wgmma_wait1();                        // chunk c - 1 done: a_next is free
        if (c + 1 < c_end) dequant(w1, gp1, a_next);
        w1 = w2;
#pragma unroll
        for (int q = 0; q < NGC; ++q) gp1[q] = gp2[q];
    };
    for (int c = c_begin; c < c_end; c += 2) {
        step(c, a0, a1);
        if (c + 1 < c_end) step(c + 1, a1, a0);
    }
    wgmma_wait0();
#endif
    cp_async_wait<0>();
    if (nt >= ntiles) return;
    // d[i]: channel 16 nt + g + 8 ((i >> 1) & 1), token 8 (i >> 2) + 2t + (i & 1)
#pragma unroll
    for (int i = 0; i < 32; ++i) {
        const int n = 16 * nt + g + 8 * ((i >> 1) & 1), tok = 8 * (i >> 2) + 2 * t + (i & 1);
        if (tok >= M) continue;
#if SPLITK
        atomicAdd(ws + (size_t)tok * N + n, d[i]);
#else
        y[(size_t)tok * N + n] = float_to_act(d[i] + (bias ? act_to_float(bias[n]) : 0.f));
#endif
    }
}
""".replace("WGMMA_ASM", _wgmma_asm())


@functools.lru_cache(maxsize=None)
def _kernel(options: tuple, device: int):
    """NVRTC -> cubin for sm_90a (cupy's own compile names sm_90, which has no wgmma), loaded with cupy."""
    import cupy
    cubin = nvrtc_output(SOURCE, options, arch="sm_90a", cubin=True)
    fd, path = tempfile.mkstemp(suffix=".cubin")
    with os.fdopen(fd, "wb") as f:
        f.write(cubin)
    with cupy.cuda.Device(device):
        return cupy.RawModule(path=path).get_function("w4a16_wgmma")


@functools.lru_cache(maxsize=None)
def _perm_index(device: torch.device) -> torch.Tensor:
    return torch.tensor(PERM, device=device)     # made once, outside graph capture (the --time loop captures permute)


def permute(x: torch.Tensor) -> torch.Tensor:
    """Tokens [M, K] -> the runtime layout's input order inside each chunk of 64."""
    M, K = x.shape
    return x.view(M, K // 64, 64)[:, :, _perm_index(x.device)].reshape(M, K).contiguous()


def gemm(x: torch.Tensor, rt, bias=None, splitk: int = 1, wg: int = 2, stages: int = 4, overlap: bool = False,
         xp=None) -> torch.Tensor:
    M, K = x.shape
    N = rt.out_features
    assert 1 <= M <= 64 and K % 64 == 0 and N % 16 == 0
    xp = permute(x) if xp is None else xp
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    opts = (f"-DIS_BF16={int(x.dtype == torch.bfloat16)}", f"-DGROUP_SIZE={rt.group_size}", rt.zero_option,
            f"-DWG={wg}", f"-DSTAGES={stages}", f"-DSPLITK={int(splitk > 1)}", f"-DOVERLAP={int(overlap)}")
    kernel = _kernel(opts, x.device.index)
    nchunks = K // 64
    per_split = -(-nchunks // splitk)
    grid = (-(-(N // 16) // (4 * wg)), 1, -(-nchunks // per_split))
    ws = torch.zeros(M, N, dtype=torch.float32, device=x.device) if splitk > 1 else None
    smem = stages * 8192 + 1024
    if smem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = smem
    bias_arg = bias if bias is not None else np.uint64(0)
    _cupy.launch(kernel, grid, (128 * wg,), (rt.qweight, rt.scales_for(x.dtype), rt.zeros, xp, bias_arg, y,
                                             ws if ws is not None else np.uint64(0), np.int32(M), np.int32(N),
                                             np.int32(K), np.int32(per_split)), shared_mem=smem)
    if ws is not None:
        finish = _cupy.get_kernel(w4a16_gemm._FINISH, "w4a16_splitk_finish",
                                  (f"-DIS_BF16={int(x.dtype == torch.bfloat16)}",), x.device.index)
        _cupy.launch(finish, (-(-(M * N) // 256),), (256,), (ws, bias_arg, y, np.int32(M), np.int32(N)))
    return y


def check() -> int:
    failures = 0
    for K, N, group in ((1280, 1728, 128), (1216, 1728, 64), (1216, 1728, 32), (4096, 4096, 128)):
        lin = w4a16.random_awq_linear(K, N, group, device="cuda", bias=True, seed=K + N + group)
        rt = w4a16.prepare(lin)
        for dtype in (torch.float16, torch.bfloat16):
            for M in (1, 17, 64):
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                ref = w4a16.w4a16_linear_ref(x.float(), lin.qweight, lin.zeros, lin.scales, group, lin.bias.float())
                for splitk, wg, overlap in ((1, 2, False), (3, 2, False), (1, 2, True), (3, 1, True)):
                    got = gemm(x, rt, lin.bias.to(dtype), splitk=splitk, wg=wg, overlap=overlap).float()
                    rel = float((got - ref).norm() / ref.norm())
                    ok = rel < (2e-3 if dtype == torch.float16 else 1.5e-2)
                    failures += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} K={K} N={N} g={group} {str(dtype)[6:]} M={M} splitk={splitk} "
                          f"wg={wg} overlap={int(overlap)} rel err {rel:.2e}", flush=True)
    return failures


def time_against_mma_sync() -> None:
    from scripts.bench_kernels import awq_pool, over
    from scripts.bench_timing import graph_ms
    sm = _cupy.sm_count(0)
    for K, N in ((4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096)):
        pool, _ = awq_pool(K, N, 128, int_zeros=True)
        for M in (32, 64):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            xp = permute(x)
            cfg = w4a16_gemm.splitk_config(M, N, K, sm)
            row = {"mma.sync split-K": graph_ms(over(pool, lambda lin: w4a16_gemm.gemm(x, lin.runtime, None, cfg)),
                                                len(pool)) * 1e3}
            for wg in (1, 2):
                tiles = -(-(N // 16) // (4 * wg))
                for splitk in sorted({1, max(1, round(sm / tiles)), max(1, round(2 * sm / tiles))}):
                    for overlap in (False, True):
                        row[f"wgmma wg{wg} split {splitk}{' overlap' if overlap else ''}"] = graph_ms(
                            over(pool, lambda lin: gemm(x, lin.runtime, None, splitk=splitk, wg=wg, overlap=overlap,
                                                        xp=xp)), len(pool)) * 1e3
            row["permute x"] = graph_ms(lambda: permute(x), 1) * 1e3
            print(f"K={K} N={N} M={M}: " + ", ".join(f"{k} {v:.1f} us" for k, v in row.items()), flush=True)
        del pool


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", action="store_true", help="also time it against the split-K mma.sync GEMM")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("needs a Hopper GPU (sm_90: wgmma)", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name(), flush=True)
    failures = check()
    if args.time and not failures:
        time_against_mma_sync()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
