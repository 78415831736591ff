"""W4A16 GEMV for decode (a few tokens): tensor-core dot products over the runtime layout, split-K in a block.

A block owns NT n-tiles of 16 output channels and its KS warps split the k-chunks of 64 between them; each
warp keeps STAGES chunks of weights (16 bytes a lane each), activations and scales in flight through cp.async
into its own shared-memory ring, then dequantizes them in registers and feeds mma.sync with up to 8*MT tokens as
the B operand (a register-only version measured fewer bytes in flight: the compiler interleaves loads and math). The partial sums of the KS warps
meet in shared memory. Tokens beyond 8*MT run as further grid rows (grid.y), re-reading the weights.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from . import _cupy
from .w4a16_runtime import DEVICE_HELPERS, W4A16Runtime, allow_shared

_SOURCE = DEVICE_HELPERS + r"""
// -D: IS_BF16, GROUP_SIZE, MT (8-token tiles), NT (n-tiles per block), KS (warps per block), STAGES (chunks in
// flight per warp). Each lane copies, and later reads, only its own 16-byte pieces: no barrier inside the loop.
#define NG_CHUNK ((GROUP_SIZE) == 32 ? 2 : 1)   // groups met in one k-chunk of 64
#define W_U4 (NT * 32)                          // weights of one chunk: [NT][lane] uint4
#define X_U4 (MT * 64)                          // activations of one chunk: [8*MT rows][8] uint4
#define META_U32 (NT * NG_CHUNK * 32 * 2)       // [scale | zero word][NT][NG_CHUNK][lane] u32
#define STAGE_U4 (W_U4 + X_U4 + META_U32 / 4)

extern "C" __global__ void __launch_bounds__(KS * 32)
w4a16_gemv(const uint4* __restrict__ qw, const u32* __restrict__ scales, const u32* __restrict__ zero_words,
           const u16* __restrict__ x, const u16* __restrict__ bias, u16* __restrict__ y, int M, int N, int K) {
    extern __shared__ uint4 smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int nchunks = K >> 6, ngroups = K / GROUP_SIZE, ntiles = N >> 4;
    const int nt0 = blockIdx.x * NT;
    const int tok0 = blockIdx.y * (8 * MT);
    const int mrows = min(8 * MT, M - tok0);
    x += (size_t)tok0 * K;
    uint4* ring = smem + warp * STAGES * STAGE_U4;

    // chunk i of this warp is warp + i*KS; slot i % STAGES holds it
    auto issue = [&](int i) {
        const int c = warp + i * KS;
        const bool ok = c < nchunks;
        const int cc = ok ? c : 0;
        uint4* st = ring + (i % STAGES) * STAGE_U4;
        u32* meta = reinterpret_cast<u32*>(st + W_U4 + X_U4);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int nt = min(nt0 + j, ntiles - 1);   // a tail block recomputes the last tile, never stores it
            cp_async16_cg(st + j * 32 + lane, qw + ((size_t)nt * nchunks + cc) * 32 + lane, ok);
#pragma unroll
            for (int q = 0; q < NG_CHUNK; ++q) {
                const size_t off = ((size_t)nt * ngroups + (cc * 64 + q * 32) / GROUP_SIZE) * 8 + g;
                cp_async4(meta + (j * NG_CHUNK + q) * 32 + lane, scales + off, ok);
                cp_async4(meta + META_U32 / 2 + (j * NG_CHUNK + q) * 32 + lane, zero_words + (off >> 2), ok);
            }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const int row = 8 * m + g;
            if (row < mrows) {
                const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)row * K + cc * 64);
                cp_async16_ca(st + W_U4 + row * 8 + t, xp + t, ok);
                cp_async16_ca(st + W_U4 + row * 8 + 4 + t, xp + 4 + t, ok);
            }
        }
        cp_async_commit();
    };

    float acc[NT][MT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[j][m][0] = acc[j][m][1] = acc[j][m][2] = acc[j][m][3] = 0.f;

#pragma unroll
    for (int i = 0; i < STAGES; ++i) issue(i);
    for (int i = 0; warp + i * KS < nchunks; ++i) {
        cp_async_wait<STAGES - 1>();
        const uint4* st = ring + (i % STAGES) * STAGE_U4;
        const u32* meta = reinterpret_cast<const u32*>(st + W_U4 + X_U4);
        uint4 xv[MT][2];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const bool rok = 8 * m + g < mrows;
            xv[m][0] = rok ? st[W_U4 + (8 * m + g) * 8 + t] : make_uint4(0, 0, 0, 0);
            xv[m][1] = rok ? st[W_U4 + (8 * m + g) * 8 + 4 + t] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const uint4 w = st[j * 32 + lane];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int q = NG_CHUNK == 2 ? h : 0;
                const u32 zw = meta[META_U32 / 2 + (j * NG_CHUNK + q) * 32 + lane];
                const GroupParams p = group_params(meta[(j * NG_CHUNK + q) * 32 + lane], (zw >> (8 * (g & 3))) & 0xFFu);
#pragma unroll
                for (int jj = 0; jj < 2; ++jj) {
                    u32 a[4];
                    dequant_word(word_of(w, 2 * h + jj), p, a);
#pragma unroll
                    for (int m = 0; m < MT; ++m)
                        mma16816(acc[j][m], a, word_of(xv[m][h], 2 * jj), word_of(xv[m][h], 2 * jj + 1));
                }
            }
        }
        issue(i + STAGES);   // refills the slot just read: its values are in registers and consumed
    }
    cp_async_wait<0>();

    // acc[i][m][r]: channel 16*(nt0+i) + g + 8*(r/2), token 8*m + 2t + (r%2).
#if KS > 1
    // the KS warps' partial sums meet in shared memory: [KS][value][lane], lane-contiguous (no bank conflicts)
    constexpr int V = NT * MT * 4;
    __syncthreads();                       // every warp is done with its ring: reuse it
    float (*red)[V][32] = reinterpret_cast<float (*)[V][32]>(smem);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int r = 0; r < 4; ++r) red[warp][(j * MT + m) * 4 + r][lane] = acc[j][m][r];
    __syncthreads();
    for (int v = threadIdx.x; v < V * 32; v += KS * 32) {
        const int l = v & 31, vi = v >> 5, r = vi & 3, m = (vi >> 2) % MT, i = (vi >> 2) / MT;
        const int n = 16 * (nt0 + i) + (l >> 2) + 8 * (r >> 1);
        const int tok = 8 * m + 2 * (l & 3) + (r & 1);
        if (n >= N || tok >= mrows) continue;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < KS; ++k) s += red[k][vi][l];
        if (bias) s += act_to_float(bias[n]);
        y[(size_t)(tok0 + tok) * N + n] = float_to_act(s);
    }
#else
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int n = 16 * (nt0 + i) + g + 8 * (r >> 1);
                const int tok = 8 * m + 2 * t + (r & 1);
                if (n >= N || tok >= mrows) continue;
                float s = acc[i][m][r];
                if (bias) s += act_to_float(bias[n]);
                y[(size_t)(tok0 + tok) * N + n] = float_to_act(s);
            }
#endif
}
"""


@dataclass(frozen=True)
class GemvConfig:
    mt: int = 1       # 8-token tiles per block row
    nt: int = 1       # n-tiles (16 channels) per block
    ks: int = 8       # warps per block, splitting K
    stages: int = 4   # k-chunks in flight per warp

    def options(self, dtype: torch.dtype, group_size: int):
        return (f"-DIS_BF16={int(dtype == torch.bfloat16)}", f"-DGROUP_SIZE={group_size}", f"-DMT={self.mt}",
                f"-DNT={self.nt}", f"-DKS={self.ks}", f"-DSTAGES={self.stages}")

    def shared_bytes(self, group_size: int) -> int:
        ng = 2 if group_size == 32 else 1
        stage = 16 * (self.nt * 32 + self.mt * 64 + self.nt * ng * 16)
        return max(self.ks * self.stages * stage, self.ks * self.nt * self.mt * 4 * 32 * 4)


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(M: int, N: int, K: int, device: int) -> GemvConfig:
    """Split K over enough warps to keep ~16 warps an SM busy, every block resident in one wave."""
    mt = min(4, -(-M // 8))
    ntiles, nchunks = N // 16, K // 64
    target = _sm_count(device) * 16
    ks = 1
    while ks < 8 and ntiles * ks * 2 <= target and ks * 2 * 2 <= nchunks:
        ks *= 2
    return GemvConfig(mt=mt, nt=1, ks=ks, stages=4 if mt <= 2 else 2)


def gemv(x: torch.Tensor, rt: W4A16Runtime, bias=None, config: GemvConfig = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16 contiguous, 16-byte aligned -> y: [M, N]."""
    M, K = x.shape
    N = rt.out_features
    cfg = config or default_config(M, N, K, x.device.index)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    kernel = _cupy.get_kernel(_SOURCE, "w4a16_gemv", cfg.options(x.dtype, rt.group_size))
    smem = cfg.shared_bytes(rt.group_size)
    allow_shared(kernel, smem)
    grid = (-(-(N // 16) // cfg.nt), -(-M // (8 * cfg.mt)))
    bias_arg = bias if bias is not None else np.uint64(0)
    _cupy.launch(kernel, grid, (cfg.ks * 32,),
                 (rt.qweight, rt.scales_for(x.dtype), rt.zeros, x, bias_arg, y,
                  np.int32(M), np.int32(N), np.int32(K)), shared_mem=smem)
    return y
