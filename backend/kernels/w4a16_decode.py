"""W4A16 GEMV for decode (1-8 tokens): weights streamed global -> registers, no shared-memory ring.

Same runtime layout and the same mma.sync m16n8k16 dot products as `w4a16_gemv` (docs in w4a16_runtime.py), with a
leaner data path and less arithmetic per weight, because at 1-8 tokens the kernel is bound by instruction issue
(ncu on the ring kernel: ~160 instructions a lane per 512-byte chunk, 28-41% of copy bandwidth on an H200):
- each lane loads its 16 bytes of a chunk with one non-caching vector load straight into registers, U chunks at
  a time, the next batch in flight while one is computed; activations come from L1 (every tile re-reads them);
- the mma multiplies (q - z), exact small integers in fp16/bf16, by x; the per-channel scale is applied to the
  fp32 partial sum once per group (4 FMAs a lane), not to every weight: 3 instructions a packed word fewer,
  and no fp16 rounding of the dequantized weight (the reference rounds it: differences are within that rounding).
A block owns NT n-tiles of 16 output channels; its KS warps split the k-chunks of 64 into contiguous ranges that
start on a group boundary (or, IL, take interleaved batches so that the block reads KS * U adjacent chunks a
step: faster for long K), and meet in shared memory at the end. With PDL (_cupy) the first batch of weights is
loaded before the kernel waits for the previous one.
The main loop has no bounds checks: a warp runs whole batches of U chunks (two in registers, ping-pong, so no
register copies), every load is a running pointer plus an immediate offset, and the rest of its range (whole groups)
follows one group at a time. Lanes past the last token read token 0's activations instead of zeros (their output
columns are never stored). Static SASS per chunk (ptxas 12.9, sm_90, g128 U=4): ~58 instructions, where the first
kernel of this file (bounds checks in the loop, register copies between batches) had ~96; that kernel was retired in
session 10 (its measured times against this one: the comment above KERNEL).
gemv_silu (GATED; the model's default, LMTRITON_FUSE_SILU=0 turns it off): for a fused [gate | up]
weight a block runs gate tile t on half its warps and up tile t + I/16 on the other half and stores silu(gate) * up,
so the MLP's silu_and_mul launch goes away at 1-8 tokens (tests passed on an H100; one kernel 0.7-0.8 us faster than
the two at 4096x22016, +0.4% end to end: docs/benchmarks.md, session 7).
A per-lane cp.async shared-memory ring (more bytes in flight, no registers held) measured no faster (H200,
2026-11-22: 11008x4096 12.1-25 us against 11.7), and neither did an L2 prefetch of the warp's next chunks before
the PDL wait (W4A16 + KV int8 bs=1 end to end with PDL: 450 tok/s without it, 413 with 16 chunks): not kept. Two
batches in registers before the wait instead of one measured no faster either (H100, session 10: bs=1 479.4 / 481.1
tok/s against 479.5 / 490.8, bs=8 -5 to -7%).
Nor did the RMSNorm in the prologue (every block normalizes the tokens into shared memory, block 0 stores the
residual; 64 launches a 7B step fewer): correct, but W4A16 + KV int8 bs=1 503.7 / 502.5 tok/s against 505.3 / 501.3
unfused, bs=2 -3%, bs=4 -21% (H100, session 10; commit 5b77d49 has it): the grid-wide wait for the hidden state
stays, and every block re-reads every token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _cupy
from .w4a16_runtime import DEVICE_HELPERS, W4A16Runtime

MAX_TOKENS = 8   # one 8-token mma tile
KERNEL = "w4a16_decode"
# The retired first decode kernel against this one, each at its default (H100, scripts/ab_kernels.py before the
# retirement, docs/benchmarks.md session 10), M=1 / M=8: 4096x4096 g128 5.51 -> 4.19 / 5.63 -> 4.64 us, g32 6.52 ->
# 4.96 / 6.95 -> 5.18; 11008x4096 g128 10.69 -> 9.14 / 13.00 -> 10.65, g32 14.45 -> 10.04 / 14.80 -> 11.57.

_SOURCE = DEVICE_HELPERS + r"""
// -D: IS_BF16, GROUP_SIZE, NT (n-tiles per block), KS (warps per block splitting K), U (chunks per load batch),
// L2PF (weight loads ask L2 for 256-byte fetches: ld_stream), IL (warps take interleaved batches, not contiguous
// ranges)
#define CPG ((GROUP_SIZE) > 64 ? (GROUP_SIZE) / 64 : 1)   // chunks of 64 k a group spans (batches: whole groups)
#define GROUPS_IN(UB) ((UB) * 64 / (GROUP_SIZE))          // groups in UB chunks (UB a multiple of CPG)
#define HALVES_PER_GROUP ((GROUP_SIZE) / 32)              // a lane's k-range of one chunk is two halves of 32
#define UB_MAIN (((U) + CPG - 1) / CPG * CPG)             // chunks a batch: U rounded up to whole groups
// GATED (NT 1): the weight is a fused [gate | up] projection of 2I rows; block t computes gate tile t
// with its first KS/2 warps and up tile t + I/16 with the others, and stores silu(gate) * up: y is [M, I]
#ifndef GATED
#define GATED 0
#endif
#define KSPLIT (GATED ? (KS) / 2 : (KS))                   // warps splitting K over one tile

__device__ __forceinline__ u32 ld_u32(const u32* p) {
    u32 r; asm("ld.global.nc.u32 %0, [%1];" : "=r"(r) : "l"(p)); return r;
}
__device__ __forceinline__ u32 ld_u16(const u16* p) {
    unsigned short r; asm("ld.global.nc.u16 %0, [%1];" : "=h"(r) : "l"(p)); return r;
}
__device__ __forceinline__ float lo_to_float(u32 pair) { return act_to_float((u16)(pair & 0xFFFFu)); }
__device__ __forceinline__ float hi_to_float(u32 pair) { return act_to_float((u16)(pair >> 16)); }

// The block's warps meet in shared memory: sum their accumulators, add the bias, store y of the block's tiles.
// acc[j][r]: channel 16*(nt0+j) + g + 8*(r/2), token 2t + (r%2)
__device__ __forceinline__ void store_warp_sums(const float (&acc)[NT][4], int warp, int lane, int nt0, int ntiles,
                                                int M, int N, const u16* __restrict__ bias, u16* __restrict__ y) {
    __shared__ float red[KS][NT * 4][32];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) red[warp][j * 4 + r][lane] = acc[j][r];
    __syncthreads();
    for (int v = threadIdx.x; v < NT * 4 * 32; v += KS * 32) {
        const int l = v & 31, vi = v >> 5, j = vi >> 2, r = vi & 3;
        const int tile = nt0 + j;
        const int n = 16 * tile + (l >> 2) + 8 * (r >> 1);
        const int tok = 2 * (l & 3) + (r & 1);
        if (tile >= ntiles || tok >= M) continue;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < KS; ++k) s += red[k][vi][l];
        if (bias) s += act_to_float(bias[n]);
        y[(size_t)tok * N + n] = float_to_act(s);
    }
}

#if GATED
// The gate warps' and the up warps' sums of the block's 16 rows meet in shared memory: y = silu(gate) * up, rounded
// once (the unfused path rounds gate and up to the activation type first).
__device__ __forceinline__ void store_gated(const float (&acc)[NT][4], int warp, int lane, int tile, int M, int I,
                                            const u16* __restrict__ bias, u16* __restrict__ y) {
    __shared__ float red[KS][4][32];
#pragma unroll
    for (int r = 0; r < 4; ++r) red[warp][r][lane] = acc[0][r];
    __syncthreads();
    store_silu_mul<KS>(red, tile, M, I, bias, y);
}
#endif

// Where a lane reads its weights, zero points and scales of each n-tile; advanced a batch at a time, so every load
// of a batch is the pointer plus an immediate offset.
struct Src {
    const uint4* w[NT];
    const u16* z[NT];
    const u32* s[NT];
    __device__ __forceinline__ void advance(int chunks) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            w[j] += (size_t)chunks * 32;
            z[j] += chunks * 64 / GROUP_SIZE * 8;
            s[j] += chunks * 64 / GROUP_SIZE * 8;
        }
    }
};

// UB chunks of weights with their zero points and scales, in registers.
template <int UB> struct Batch {
    uint4 w[UB][NT];
    u32 z[NT][GROUPS_IN(UB)], s[NT][GROUPS_IN(UB)];

    __device__ __forceinline__ void load(const Src& src) {
#pragma unroll
        for (int u = 0; u < UB; ++u)
#pragma unroll
            for (int j = 0; j < NT; ++j) w[u][j] = ld_stream(src.w[j] + u * 32);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int gi = 0; gi < GROUPS_IN(UB); ++gi) {
                z[j][gi] = ld_u16(src.z[j] + gi * 8);
                s[j][gi] = ld_u32(src.s[j] + gi * 8);
            }
    }

    // acc += this batch's dot products with the activations at xp (this lane's row, the batch's first chunk)
    __device__ __forceinline__ void compute(const u16* xp, float (&acc)[NT][4]) const {
        uint4 xv[UB][2];
#pragma unroll
        for (int u = 0; u < UB; ++u) {
            xv[u][0] = ld_cached(xp + u * 64);
            xv[u][1] = ld_cached(xp + u * 64 + 32);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            float part[2][4];                                 // two independent mma chains (k-tile parity)
            ZeroPair zp = zero_pair(0);
            u32 spair = 0;
#pragma unroll
            for (int hc = 0; hc < 2 * UB; ++hc) {            // half-chunks of 32 k
                const int u = hc >> 1, h = hc & 1;
                if (hc % HALVES_PER_GROUP == 0) {            // a group starts
                    zp = zero_pair(z[j][hc / HALVES_PER_GROUP]);
                    spair = s[j][hc / HALVES_PER_GROUP];
#pragma unroll
                    for (int r = 0; r < 8; ++r) part[r >> 2][r & 3] = 0.f;
                }
#pragma unroll
                for (int jj = 0; jj < 2; ++jj) {
                    u32 a[4];
                    q_minus_z(word_of(w[u][j], 2 * h + jj), zp, a);
                    mma16816(part[jj], a, word_of(xv[u][h], 2 * jj), word_of(xv[u][h], 2 * jj + 1));
                }
                if ((hc + 1) % HALVES_PER_GROUP == 0) {      // the group ends: scale the fp32 partial sums
                    const float slo = lo_to_float(spair), shi = hi_to_float(spair);
                    acc[j][0] += slo * (part[0][0] + part[1][0]);
                    acc[j][1] += slo * (part[0][1] + part[1][1]);
                    acc[j][2] += shi * (part[0][2] + part[1][2]);
                    acc[j][3] += shi * (part[0][3] + part[1][3]);
                }
            }
        }
    }
};

extern "C" __global__ void __launch_bounds__(KS * 32)
w4a16_decode(const uint4* __restrict__ qw, const u32* __restrict__ scales, const u16* __restrict__ zeros,
             const u16* __restrict__ x, const u16* __restrict__ bias, u16* __restrict__ y,
             int M, int N, int K, int per_warp) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int nchunks = K >> 6, ngroups = K / GROUP_SIZE, ntiles = N >> 4;
    const int nt0 = blockIdx.x * NT;
#if GATED
    static_assert(NT == 1 && KS % 2 == 0, "GATED: one tile of gate and one of up, half the warps each");
    const int kw = warp % KSPLIT;                   // the warp's place among those splitting K over its tile
#else
    const int kw = warp;
#endif
    // The warp's chunks: `nfull` batches of U (a step of `bstep` chunks apart) from c0, then `ntail` chunks (whole
    // groups) from ct, one group at a time. No bounds checks inside a batch.
#if IL   // interleaved: batch i of warp w starts at chunk (w + i * KS) * U: the block reads KS * U adjacent chunks
    const int nbatches = nchunks / UB_MAIN, bstep = KSPLIT * UB_MAIN;
    const int c0 = kw * UB_MAIN, nfull = nbatches > kw ? (nbatches - kw + KSPLIT - 1) / KSPLIT : 0;
    const int ct = nbatches * UB_MAIN, ntail = kw == nbatches % KSPLIT ? nchunks - ct : 0;
#else    // contiguous: warp w owns chunks [w * per_warp, (w + 1) * per_warp) (per_warp: whole groups)
    const int bstep = UB_MAIN;
    const int c0 = kw * per_warp, nown = max(0, min(per_warp, nchunks - c0));
    const int nfull = nown / UB_MAIN, ct = c0 + nfull * UB_MAIN, ntail = nown - nfull * UB_MAIN;
#endif
    // B column g is token g; a lane past the last token reads token 0: its columns are never stored
    const u16* xrow = x + (size_t)(g < M ? g : 0) * K + 8 * t;

    Src src;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#if GATED
        const int nt = nt0 + (warp >= KSPLIT ? ntiles / 2 : 0);   // gate tile t, or up tile t + I/16
#else
        const int nt = min(nt0 + j, ntiles - 1);   // a tail block recomputes the last tile, never stores it
#endif
        src.w[j] = qw + (size_t)nt * nchunks * 32 + lane;
        src.s[j] = scales + (size_t)nt * ngroups * 8 + g;
        src.z[j] = zeros + (size_t)nt * ngroups * 8 + g;
    }
    Src tail = src;
    src.advance(c0);
    tail.advance(ct);

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[j][r] = 0.f;

    // two batches in registers, ping-pong: the next one's loads are in flight while one is computed
    Batch<UB_MAIN> a, b;
    if (nfull > 0) { a.load(src); src.advance(bstep); }   // static data: in flight before the previous kernel ends
    PDL_BEGIN();
    const u16* xp = xrow + (size_t)c0 * 64;
    for (int left = nfull; left > 0;) {
        if (left > 1) { b.load(src); src.advance(bstep); }
        a.compute(xp, acc);
        xp += bstep * 64;
        if (--left == 0) break;
        if (left > 1) { a.load(src); src.advance(bstep); }
        b.compute(xp, acc);
        xp += bstep * 64;
        --left;
    }
    xp = xrow + (size_t)ct * 64;
    for (int c = 0; c < ntail; c += CPG) {
        Batch<CPG> r;
        r.load(tail);
        tail.advance(CPG);
        r.compute(xp, acc);
        xp += CPG * 64;
    }

#if GATED
    store_gated(acc, warp, lane, nt0, M, N / 2, bias, y);
#else
    store_warp_sums(acc, warp, lane, nt0, ntiles, M, N, bias, y);
#endif
}
"""


@dataclass(frozen=True)
class DecodeConfig:
    nt: int = 1   # n-tiles (16 channels) per block
    ks: int = 8   # warps per block, splitting K into contiguous whole-group ranges
    u: int = 4    # chunks of 64 k loaded per batch (u * 16 bytes in flight a lane per n-tile)
    l2pf: bool = False   # weight loads with the .L2::256B prefetch hint
    il: bool = False     # warps take interleaved batches of u chunks instead of contiguous ranges

    def options(self, dtype: torch.dtype, group_size: int):
        return (f"-DIS_BF16={int(dtype == torch.bfloat16)}", f"-DGROUP_SIZE={group_size}", f"-DNT={self.nt}",
                f"-DKS={self.ks}", f"-DU={self.u}", f"-DL2PF={int(self.l2pf)}", f"-DIL={int(self.il)}")

    def per_warp(self, K: int, group_size: int) -> int:
        """Chunks of 64 per warp, rounded up to whole groups (a warp's range never splits a group)."""
        cpg = max(1, group_size // 64)
        nchunks = K // 64
        return -(-(-(-nchunks // self.ks)) // cpg) * cpg


def default_config(N: int, K: int, group_size: int, device: int) -> DecodeConfig:
    """One n-tile a block, 8 warps splitting K in interleaved batches of 4 chunks (the block reads 32 adjacent
    chunks a step); 2 chunks a batch when the grid is more than one wave of 32 warps an SM (registers). The sweeps'
    best on the H100 at M=1 (scripts/ab_kernels.py, session 7): at group 64 twice the warps with half the chunks each
    (4096x4096 4.95 -> 4.52 us, 11008x4096 11.3 -> 10.3); at group 128 a grid of 8-warp blocks just over one wave
    (up to 1.5) takes 4 warps a block instead (the qkv / up shapes, N x K = 11008 x 4096: 11.0 -> 10.1 us,
    12288 x 4096: 11.4 -> 10.7)."""
    sm = _cupy.sm_count(device)
    ntiles, nchunks = N // 16, K // 64
    ks = 8
    while ks > 1 and nchunks < 2 * ks:
        ks //= 2
    u = 2 if ntiles * ks > 32 * sm else 4
    if group_size == 64 and u == 4 and nchunks >= 4 * ks and ntiles * 2 * ks <= 32 * sm:
        ks, u = 2 * ks, 2
    elif group_size == 128 and ks == 8 and 32 * sm < ntiles * ks <= 48 * sm:
        ks = 4
    return DecodeConfig(nt=1, ks=ks, u=u, il=True)


def supports_tokens(M: int) -> bool:
    return 1 <= M <= MAX_TOKENS


def gated_config(N: int, K: int, group_size: int, device: int) -> DecodeConfig:
    """gemv_silu's default: default_config for the [gate | up] weight, with twice the warps a
    block (a block computes one tile of gate and one of up, so the warps splitting K over a tile stay as many); where
    that would pass 16 warps (group 64), as many warps with twice the chunks a batch."""
    cfg = default_config(N, K, group_size, device)
    ks, u = (2 * cfg.ks, cfg.u) if cfg.ks <= 8 else (cfg.ks, 2 * cfg.u)
    return DecodeConfig(nt=1, ks=ks, u=u, l2pf=cfg.l2pf, il=cfg.il)


def gated_supported(rt: W4A16Runtime, M: int) -> bool:
    """gemv_silu can take this [gate | up] weight: 1-8 tokens, I = out_features / 2 a whole number of 16-row tiles."""
    return supports_tokens(M) and rt.out_features % 32 == 0


def gemv_silu(x: torch.Tensor, rt: W4A16Runtime, bias=None, config: DecodeConfig = None) -> torch.Tensor:
    """silu(gate) * up of a fused [gate | up] projection in the GEMV's epilogue (one kernel instead of the
    GEMV + silu_and_mul): x [M, K] as gemv's, rt's out_features 2I -> y [M, I]. config: nt 1, ks even (ks/2
    warps split K over each of the block's two tiles); None = gated_config."""
    M, K = x.shape
    if not gated_supported(rt, M):
        raise ValueError(f"gemv_silu takes 1..{MAX_TOKENS} tokens and 2I output rows with I a multiple of 16, got "
                         f"{M} tokens and {rt.out_features} rows")
    cfg = config or gated_config(rt.out_features, K, rt.group_size, x.device.index)
    if not (cfg.nt == 1 and cfg.ks % 2 == 0):
        raise ValueError(f"gemv_silu needs nt=1 and an even ks, got {cfg}")
    return _launch(x, rt, bias, cfg, gated=True)


def gemv(x: torch.Tensor, rt: W4A16Runtime, bias=None, config: DecodeConfig = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16 contiguous, 16-byte aligned rows, M <= 8 -> y: [M, N]."""
    M, K = x.shape
    if not supports_tokens(M):
        raise ValueError(f"w4a16_decode takes 1..{MAX_TOKENS} tokens, got {M}")
    return _launch(x, rt, bias, config or default_config(rt.out_features, K, rt.group_size, x.device.index))


def _launch(x: torch.Tensor, rt: W4A16Runtime, bias, cfg: DecodeConfig, gated: bool = False) -> torch.Tensor:
    """y = the GEMV of x (gated: silu(gate) * up, I = N / 2 outputs, a block per 16 of them, ks/2 warps a tile)."""
    M, K = x.shape
    assert x.is_contiguous() and x.data_ptr() % 16 == 0 and K == rt.in_features
    N = rt.out_features
    y = torch.empty(M, N // 2 if gated else N, dtype=x.dtype, device=x.device)
    kernel = _cupy.get_kernel(_SOURCE, KERNEL, cfg.options(x.dtype, rt.group_size) + (rt.zero_option,) + (
        ("-DGATED=1",) if gated else ()), x.device.index)
    grid = (N // 32,) if gated else (-(-(N // 16) // cfg.nt),)
    split = DecodeConfig(nt=1, ks=cfg.ks // 2, u=cfg.u) if gated else cfg    # the warps splitting K over a tile
    _cupy.launch(kernel, grid, (cfg.ks * 32,),
                 (rt.qweight, rt.scales_for(x.dtype), rt.zeros, x, bias if bias is not None else np.uint64(0), y,
                  np.int32(M), np.int32(N), np.int32(K), np.int32(split.per_warp(K, rt.group_size))))
    return y
