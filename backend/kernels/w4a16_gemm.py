"""W4A16 GEMM for prefill (many tokens): mma.sync m16n8k16 tiles with int4 weights dequantized in registers,
and the dequantize kernel behind the dequant + cuBLAS path for the largest token counts.

A block of 8 warps computes BN output channels x BM tokens; a 3-stage cp.async ring brings each k-chunk of 64
(weights already in fragment order, activations with a swizzle that keeps the 16-byte fragment reads free of
bank conflicts, scales and zeros) into shared memory. Each warp owns NTW n-tiles x MTW token tiles: a weight
word is dequantized once and multiplied into MTW mma's. Small tiles (NTW=1, 4 warps along tokens) give enough
blocks for a few hundred tokens; big ones amortize the dequantization at large M.
Split-K (`splitk_config`, the dispatch's path for 32-64 tokens): all 8 warps side by side along N so that each
weight is dequantized once for every token, and blockIdx.z takes a range of k-chunks so that the grid still fills
the SMs; the blocks add fp32 partial sums into a zeroed workspace with atomics and `w4a16_splitk_finish` adds the
bias and casts.
Not kept: the finish in the kernel by the last block of a tile to arrive (`_cupy.arrive_last`, as the split decode
attention does it), with atomics or with a workspace slice per split (deterministic): one block a tile finishing
64 x 128 outputs is latency-bound, 1-8 us slower a GEMM at 32-64 tokens than the finish launch spread over every SM
and 38 us at 16 splits (H100, 2026-12-06; docs/benchmarks.md session 8). Nor a persistent workspace that the finish
kernel zeroes again instead of the fill: it saves a launch only in eager mode, and end to end at bs=64 (CUDA graphs)
it measured 4% slower, 6,872 against 7,187 / 7,195 tok/s (session 9).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from . import _cupy
from .w4a16_runtime import DEVICE_HELPERS, W4A16Runtime

_GEMM = DEVICE_HELPERS + r"""
// -D: IS_BF16, GROUP_SIZE, ZFRAC, BM (tokens per block), WARPS_M (warps along tokens), NTW (n-tiles per warp), STAGES,
// SPLITK (blockIdx.z takes `per_split` k-chunks and adds its fp32 partial sums into `ws`), MINB (blocks per SM)
#define NG_CHUNK ((GROUP_SIZE) == 32 ? 2 : 1)
#define WARPS_N (8 / WARPS_M)
#define MTW (BM / 8 / WARPS_M)          // token tiles of 8 per warp
#define NTB (NTW * WARPS_N)             // n-tiles per block
#define W_U4 (NTB * 32)
#define X_U4 (BM * 8)
#define S_U32 (NTB * NG_CHUNK * 8)      // scale pairs [NTB][NG_CHUNK][g]
#define Z_U32 (NTB * NG_CHUNK * 4)      // zero u16 pairs [NTB][NG_CHUNK][g] as words
#define STAGE_U4 (W_U4 + X_U4 + (S_U32 + Z_U32 + 3) / 4)

extern "C" __global__ void __launch_bounds__(256, MINB)
w4a16_gemm(const uint4* __restrict__ qw, const u32* __restrict__ scales, const u32* __restrict__ zero_words,
           const u16* __restrict__ x, const u16* __restrict__ bias, u16* __restrict__ y, int M, int N, int K,
           float* __restrict__ ws, int per_split) {
    PDL_BEGIN();
    extern __shared__ uint4 smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wn = warp % WARPS_N, wm = warp / WARPS_N;
    const int nchunks = K >> 6, ngroups = K / GROUP_SIZE, ntiles = N >> 4;
    const int ntb0 = blockIdx.x * NTB, m0 = blockIdx.y * BM;
    const int c_begin = blockIdx.z * per_split, c_end = min(c_begin + per_split, nchunks);

    // Each thread's copies of a stage, resolved once: sources at chunk 0 (a chunk adds a fixed stride) and
    // shared-memory destinations; the loop then only adds offsets.
#define W_IT ((W_U4 + 255) / 256)
#define X_IT ((X_U4 + 255) / 256)
#define M_IT ((S_U32 + Z_U32 + 255) / 256)
    const uint4* wsrc[W_IT];
    bool wok[W_IT];
#pragma unroll
    for (int i = 0; i < W_IT; ++i) {
        const int v = tid + 256 * i, nt = ntb0 + v / 32;
        wsrc[i] = qw + (size_t)min(nt, ntiles - 1) * nchunks * 32 + (v & 31);
        wok[i] = v < W_U4 && nt < ntiles;
    }
    const u16* xsrc[X_IT];
    u32 xdst[X_IT];
    bool xok[X_IT];
#pragma unroll
    for (int i = 0; i < X_IT; ++i) {
        const int v = tid + 256 * i, row = v >> 3, u = v & 7;
        xok[i] = v < X_U4 && m0 + row < M;
        xsrc[i] = x + (size_t)(xok[i] ? m0 + row : 0) * K + u * 8;
        xdst[i] = (W_U4 + row * 8 + (u ^ ((row & 1) << 2))) * 16;
    }
    const u32* msrc[M_IT];
    int mstep[M_IT], mhalf[M_IT];
    bool mok[M_IT];
#pragma unroll
    for (int i = 0; i < M_IT; ++i) {
        const int v = tid + 256 * i;
        const bool is_s = v < S_U32;
        const int e = is_s ? v : v - S_U32;
        const int per = is_s ? 8 : 4;
        const int jb = e / (NG_CHUNK * per), k = e % per;
        const size_t nt = min(ntb0 + jb, ntiles - 1);
        mhalf[i] = (e / per) % NG_CHUNK;
        mstep[i] = per;
        msrc[i] = is_s ? scales + nt * ngroups * 8 + k : zero_words + nt * ngroups * 4 + k;
        mok[i] = v < S_U32 + Z_U32;
    }

    auto load_stage = [&](int slot, int c) {
        const bool ok = c < c_end;
        const int cc = ok ? c : 0;
        const u32 st = smem_addr(smem + slot * STAGE_U4);
#pragma unroll
        for (int i = 0; i < W_IT; ++i)
            if (tid + 256 * i < W_U4) cp_async16_cg(st + (tid + 256 * i) * 16, wsrc[i] + cc * 32, ok && wok[i]);
#pragma unroll
        for (int i = 0; i < X_IT; ++i)
            if (tid + 256 * i < X_U4) cp_async16_ca(st + xdst[i], xsrc[i] + cc * 64, ok && xok[i]);
#pragma unroll
        for (int i = 0; i < M_IT; ++i)
            if (mok[i]) {
                const int grp = (cc * 64 + mhalf[i] * 32) / GROUP_SIZE;
                cp_async4(st + (W_U4 + X_U4) * 16 + (tid + 256 * i) * 4, msrc[i] + grp * mstep[i], ok);
            }
    };

    float acc[NTW][MTW][4];
#pragma unroll
    for (int j = 0; j < NTW; ++j)
#pragma unroll
        for (int m = 0; m < MTW; ++m) acc[j][m][0] = acc[j][m][1] = acc[j][m][2] = acc[j][m][3] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) { load_stage(s, c_begin + s); cp_async_commit(); }
    for (int c = c_begin; c < c_end; ++c) {
        const int i = c - c_begin;
        cp_async_wait<STAGES - 2>();
        __syncthreads();                        // chunk c landed; every warp is done with chunk c-1's slot
        load_stage((i + STAGES - 1) % STAGES, c + STAGES - 1);
        cp_async_commit();

        const uint4* st = smem + (i % STAGES) * STAGE_U4;
        const u32* meta = reinterpret_cast<const u32*>(st + W_U4 + X_U4);
        uint4 w[NTW];
#pragma unroll
        for (int j = 0; j < NTW; ++j) w[j] = st[(wn * NTW + j) * 32 + lane];
        GroupParams gp[NTW][NG_CHUNK];                 // once a chunk, not once a half-chunk
#pragma unroll
        for (int j = 0; j < NTW; ++j)
#pragma unroll
            for (int q = 0; q < NG_CHUNK; ++q) {
                const int jb = wn * NTW + j;
                const u32 zw = meta[S_U32 + (jb * NG_CHUNK + q) * 4 + (g >> 1)];
                gp[j][q] = group_params(meta[(jb * NG_CHUNK + q) * 8 + g], zw >> (16 * (g & 1)));
            }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            uint4 b[MTW];
#pragma unroll
            for (int m = 0; m < MTW; ++m) {
                const int row = (wm * MTW + m) * 8 + g;
                b[m] = st[W_U4 + row * 8 + ((4 * h + t) ^ ((row & 1) << 2))];
            }
            const int q = NG_CHUNK == 2 ? h : 0;
#pragma unroll
            for (int j = 0; j < NTW; ++j) {
                const GroupParams& p = gp[j][q];
#pragma unroll
                for (int jj = 0; jj < 2; ++jj) {
                    u32 a[4];
                    dequant_word(word_of(w[j], 2 * h + jj), p, a);
#pragma unroll
                    for (int m = 0; m < MTW; ++m)
                        mma16816(acc[j][m], a, word_of(b[m], 2 * jj), word_of(b[m], 2 * jj + 1));
                }
            }
        }
    }
    cp_async_wait<0>();

    // acc[j][m][r]: channel 16*(ntb0 + wn*NTW + j) + g + 8*(r/2), token m0 + 8*(wm*MTW + m) + 2t + (r%2)
#pragma unroll
    for (int j = 0; j < NTW; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int n = 16 * (ntb0 + wn * NTW + j) + g + 8 * (r >> 1);
            if (n >= N) continue;
#if SPLITK
#pragma unroll
            for (int m = 0; m < MTW; ++m) {
                const int tok = m0 + 8 * (wm * MTW + m) + 2 * t + (r & 1);
                if (tok < M) atomicAdd(ws + (size_t)tok * N + n, acc[j][m][r]);
            }
#else
            const float b = bias ? act_to_float(bias[n]) : 0.f;
#pragma unroll
            for (int m = 0; m < MTW; ++m) {
                const int tok = m0 + 8 * (wm * MTW + m) + 2 * t + (r & 1);
                if (tok < M) y[(size_t)tok * N + n] = float_to_act(acc[j][m][r] + b);
            }
#endif
        }
    }
}
"""

_FINISH = DEVICE_HELPERS + r"""
// Split-K epilogue: y = ws (+ bias), in the activation dtype. One thread per output. -D: IS_BF16
extern "C" __global__ void w4a16_splitk_finish(const float* __restrict__ ws, const u16* __restrict__ bias,
                                               u16* __restrict__ y, int M, int N) {
    PDL_BEGIN();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)M * N) return;
    y[i] = float_to_act(ws[i] + (bias ? act_to_float(bias[i % N]) : 0.f));
}
"""

_DEQUANT = DEVICE_HELPERS + r"""
// One thread per (n-tile, k-chunk, lane): 32 weights -> four 16-byte rows of W^T [N, K]. -D: IS_BF16, GROUP_SIZE
extern "C" __global__ void w4a16_dequant(const uint4* __restrict__ qw, const u32* __restrict__ scales,
                                         const u16* __restrict__ zeros, u16* __restrict__ wt, int N, int K) {
    PDL_BEGIN();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int nchunks = K >> 6, ngroups = K / GROUP_SIZE;
    if (i >= (long long)(N >> 4) * nchunks * 32) return;
    const int lane = i & 31, g = lane >> 2, t = lane & 3;
    const int c = (int)((i >> 5) % nchunks), nt = (int)((i >> 5) / nchunks);
    const uint4 w = qw[i];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const size_t off = ((size_t)nt * ngroups + (c * 64 + h * 32) / GROUP_SIZE) * 8 + g;
        const GroupParams p = group_params(scales[off], zeros[off]);
        u32 lo[4], hi[4];
        dequant_word(word_of(w, 2 * h), p, lo);
        dequant_word(word_of(w, 2 * h + 1), p, hi);
        const size_t k = (size_t)c * 64 + h * 32 + t * 8;
        *reinterpret_cast<uint4*>(wt + (size_t)(16 * nt + g) * K + k) = u4(lo[0], lo[2], hi[0], hi[2]);
        *reinterpret_cast<uint4*>(wt + (size_t)(16 * nt + g + 8) * K + k) = u4(lo[1], lo[3], hi[1], hi[3]);
    }
}
"""


@dataclass(frozen=True)
class GemmConfig:
    bm: int = 128      # tokens per block
    warps_m: int = 2   # warps along tokens (of 8)
    ntw: int = 2       # n-tiles (16 channels) per warp; the block has ntw * (8 // warps_m) of them
    stages: int = 3
    splitk: int = 1    # blocks along K, their fp32 partial sums added in a workspace (few tokens: fills the SMs)
    minb: int = 1      # blocks per SM the compiler budgets registers for

    @property
    def bn(self) -> int:
        return 16 * self.ntw * (8 // self.warps_m)

    def options(self, dtype: torch.dtype, group_size: int):
        if self.bm % (8 * self.warps_m) or self.warps_m not in (1, 2, 4, 8):
            raise ValueError(f"GemmConfig: bm={self.bm} must be a multiple of 8 * warps_m={self.warps_m}")
        return (f"-DIS_BF16={int(dtype == torch.bfloat16)}", f"-DGROUP_SIZE={group_size}", f"-DBM={self.bm}",
                f"-DWARPS_M={self.warps_m}", f"-DNTW={self.ntw}", f"-DSTAGES={self.stages}",
                f"-DSPLITK={int(self.splitk > 1)}", f"-DMINB={self.minb}")

    def shared_bytes(self, group_size: int) -> int:
        ng = 2 if group_size == 32 else 1
        ntb = self.bn // 16
        meta_u4 = -(-(ntb * ng * 12) // 4)
        return self.stages * 16 * (ntb * 32 + self.bm * 8 + meta_u4)


def default_config(M: int) -> GemmConfig:
    return GemmConfig(bm=64, warps_m=4, ntw=1) if M <= 256 else GemmConfig(bm=128, warps_m=2, ntw=2)


def splitk_config(M: int, N: int, K: int, sm_count: int, ntw: int = 1, splitk: int = 0, minb: int = 2,
                  stages: int = 3) -> GemmConfig:
    """Few tokens (<= 64): all 8 warps side by side along N (each dequantizes its weights once and multiplies
    them into every token tile), the k-chunks split over enough blocks to give each SM about two; `splitk` = 0
    picks that count."""
    bm = min(64, max(16, 1 << (M - 1).bit_length()))
    cfg = GemmConfig(bm=bm, warps_m=1, ntw=ntw, stages=stages, minb=minb)
    if not splitk:
        tiles = -(-N // cfg.bn) * -(-M // bm)
        splitk = max(1, min(K // 64 // 4, round(2 * sm_count / tiles)))
    return replace(cfg, splitk=splitk)


def gemm(x: torch.Tensor, rt: W4A16Runtime, bias=None, config: GemmConfig = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16 contiguous -> y: [M, N] through the tensor-core W4A16 kernel."""
    M, K = x.shape
    N = rt.out_features
    cfg = config or default_config(M)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    smem = cfg.shared_bytes(rt.group_size)
    kernel = _cupy.kernel_with_shared(_GEMM, "w4a16_gemm", cfg.options(x.dtype, rt.group_size) + (rt.zero_option,),
                                      smem, x.device.index)
    nchunks = K // 64
    per_split = -(-nchunks // max(1, cfg.splitk))
    grid = (-(-N // cfg.bn), -(-M // cfg.bm), -(-nchunks // per_split))
    bias_arg = bias if bias is not None else np.uint64(0)
    ws = torch.zeros(M, N, dtype=torch.float32, device=x.device) if cfg.splitk > 1 else None
    _cupy.launch(kernel, grid, (256,), (rt.qweight, rt.scales_for(x.dtype), rt.zeros, x, bias_arg, y,
                                        np.int32(M), np.int32(N), np.int32(K),
                                        ws if ws is not None else np.uint64(0), np.int32(per_split)),
                 shared_mem=smem)
    if ws is not None:
        finish = _cupy.get_kernel(_FINISH, "w4a16_splitk_finish", (f"-DIS_BF16={int(x.dtype == torch.bfloat16)}",),
                                  x.device.index)
        _cupy.launch(finish, (-(-(M * N) // 256),), (256,), (ws, bias_arg, y, np.int32(M), np.int32(N)))
    return y


def dequantize(rt: W4A16Runtime, dtype: torch.dtype) -> torch.Tensor:
    """-> W^T [N, K] in dtype, the weight layout of F.linear (rounding as the reference's dequantize_awq)."""
    N, K = rt.out_features, rt.in_features
    wt = torch.empty(N, K, dtype=dtype, device=rt.qweight.device)
    kernel = _cupy.get_kernel(_DEQUANT, "w4a16_dequant",
                              (f"-DIS_BF16={int(dtype == torch.bfloat16)}", f"-DGROUP_SIZE={rt.group_size}",
                               rt.zero_option))
    n = (N // 16) * (K // 64) * 32
    _cupy.launch(kernel, (-(-n // 256),), (256,), (rt.qweight, rt.scales_for(dtype), rt.zeros, wt,
                                                   np.int32(N), np.int32(K)))
    return wt


def dequant_matmul(x: torch.Tensor, rt: W4A16Runtime, bias=None) -> torch.Tensor:
    """The large-M path: dequantize once per call, then cuBLAS."""
    return torch.nn.functional.linear(x, dequantize(rt, x.dtype), bias)
