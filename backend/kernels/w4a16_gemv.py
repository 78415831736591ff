"""W4A16 GEMV for decode (a few tokens): tensor-core dot products over the runtime layout, split-K in a block.

A block owns NT n-tiles of 16 output channels and its KS warps split the k-chunks of 64 between them; each
warp streams chunks of weights (16 bytes a lane each), activations and scales through cp.async into its own
shared-memory ring, dequantizes them in registers and feeds mma.sync with up to 8*MT tokens as the B operand.
The partial sums of the KS warps meet in shared memory. Tokens beyond 8*MT run as further grid rows (grid.y),
re-reading the weights. On an H200 it reaches 30-41% of copy bandwidth at group 64/128 (docs/benchmarks.md):
ncu shows it issue-bound (64% issue-active, DRAM 32%), about 160 instructions a lane per 512-byte chunk.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import _cupy
from .w4a16_runtime import DEVICE_HELPERS, W4A16Runtime

_SOURCE = DEVICE_HELPERS + r"""
// -D: IS_BF16, GROUP_SIZE, MT (8-token tiles), NT (n-tiles per block), KS (warps per block), CONTIG, STAGES (chunks in
// in the ring of each warp, STAGES-1 in flight while one is computed), XROWS (token rows staged, <= 8*MT).
// Each lane copies, and later reads, only its own pieces of the ring: no barrier inside the loop.
#define NG_CHUNK ((GROUP_SIZE) == 32 ? 2 : 1)        // groups met in one k-chunk of 64
#define W_BYTES (NT * 512)                           // weights [NT][lane] uint4
#define X_BYTES (XROWS * 128)                        // activations [XROWS][8] uint4
#define S_BYTES (NT * NG_CHUNK * 128)                // scale pairs [NT][NG_CHUNK][lane] u32, then zero words
#define STAGE_BYTES (W_BYTES + X_BYTES + 2 * S_BYTES)

extern "C" __global__ void __launch_bounds__(KS * 32)
w4a16_gemv(const uint4* __restrict__ qw, const u32* __restrict__ scales, const u32* __restrict__ zero_words,
           const u16* __restrict__ x, const u16* __restrict__ bias, u16* __restrict__ y, int M, int N, int K) {
    PDL_BEGIN();
    extern __shared__ uint4 smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int nchunks = K >> 6, ngroups = K / GROUP_SIZE, ntiles = N >> 4;
    const int nt0 = blockIdx.x * NT;
    const int tok0 = blockIdx.y * (8 * MT);
    const int mrows = min(XROWS, M - tok0);
    x += (size_t)tok0 * K;
    const unsigned char* ring = reinterpret_cast<const unsigned char*>(smem) + warp * (STAGES * STAGE_BYTES);
    const u32 ring_s = smem_addr(ring);

    const uint4* wsrc[NT];
    const u32* ssrc[NT];
    const u32* zsrc[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int nt = min(nt0 + j, ntiles - 1);   // a tail block recomputes the last tile, never stores it
        wsrc[j] = qw + (size_t)nt * nchunks * 32 + lane;
        ssrc[j] = scales + (size_t)nt * ngroups * 8 + g;
        zsrc[j] = zero_words + (size_t)nt * ngroups * 4 + (g >> 1);
    }

    // CONTIG: this warp streams chunks [c0, c_end) in order; else chunks warp, warp + KS, ... (interleaved)
#if CONTIG
    const int per_warp = (nchunks + KS - 1) / KS;
    const int c0 = warp * per_warp, c_step = 1, c_end = min(c0 + per_warp, nchunks);
#else
    const int c0 = warp, c_step = KS, c_end = nchunks;
#endif

    auto issue = [&](int c, int slot) {
        const bool ok = c < c_end;
        const int cc = ok ? c : 0;
        const u32 st = ring_s + slot * STAGE_BYTES;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            cp_async16_cg(st + j * 512 + lane * 16, wsrc[j] + cc * 32, ok);
#pragma unroll
            for (int q = 0; q < NG_CHUNK; ++q) {
                const int grp = (cc * 64 + q * 32) / GROUP_SIZE;
                const u32 off = W_BYTES + X_BYTES + ((j * NG_CHUNK + q) * 32 + lane) * 4;
                cp_async4(st + off, ssrc[j] + grp * 8, ok);
                cp_async4(st + off + S_BYTES, zsrc[j] + grp * 4, ok);
            }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const int row = 8 * m + g;
            if (row < mrows) {
                const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)row * K + cc * 64);
                cp_async16_ca(st + W_BYTES + (row * 8 + t) * 16, xp + t, ok);
                cp_async16_ca(st + W_BYTES + (row * 8 + 4 + t) * 16, xp + 4 + t, ok);
            }
        }
        cp_async_commit();
    };

    // two accumulators per tile (one per k-tile parity): independent mma chains
    float acc[NT][MT][2][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int r = 0; r < 8; ++r) acc[j][m][r >> 2][r & 3] = 0.f;

    // chunk c of this warp lives in slot `slot`; chunk c + (STAGES-1)*KS refills the slot read one step earlier
#pragma unroll
    for (int s = 0; s + 1 < STAGES; ++s) issue(c0 + s * c_step, s);
    int slot = 0;
    for (int c = c0; c < c_end; c += c_step) {
        cp_async_wait<STAGES - 2>();
        issue(c + (STAGES - 1) * c_step, slot == 0 ? STAGES - 1 : slot - 1);
        const unsigned char* st = ring + slot * STAGE_BYTES;
        const uint4* sw = reinterpret_cast<const uint4*>(st);
        const uint4* sx = reinterpret_cast<const uint4*>(st + W_BYTES);
        const u32* ss = reinterpret_cast<const u32*>(st + W_BYTES + X_BYTES);
        uint4 xv[MT][2];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const int row = 8 * m + g;
            xv[m][0] = row < mrows ? sx[row * 8 + t] : u4(0, 0, 0, 0);
            xv[m][1] = row < mrows ? sx[row * 8 + 4 + t] : u4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const uint4 w = sw[j * 32 + lane];
            GroupParams p[NG_CHUNK];
#pragma unroll
            for (int q = 0; q < NG_CHUNK; ++q) {
                const int e = (j * NG_CHUNK + q) * 32 + lane;
                p[q] = group_params(ss[e], ss[S_BYTES / 4 + e] >> (16 * (g & 1)));
            }
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int jj = 0; jj < 2; ++jj) {
                    u32 a[4];
                    dequant_word(word_of(w, 2 * h + jj), p[NG_CHUNK == 2 ? h : 0], a);
#pragma unroll
                    for (int m = 0; m < MT; ++m)
                        mma16816(acc[j][m][jj], a, word_of(xv[m][h], 2 * jj), word_of(xv[m][h], 2 * jj + 1));
                }
        }
        slot = slot + 1 == STAGES ? 0 : slot + 1;
    }
    cp_async_wait<0>();
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[j][m][0][r] += acc[j][m][1][r];

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
            for (int r = 0; r < 4; ++r) red[warp][(j * MT + m) * 4 + r][lane] = acc[j][m][0][r];
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
                float s = acc[i][m][0][r];
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
    stages: int = 2   # ring slots per warp: stages - 1 chunks in flight while one is computed
    contig: bool = False   # each warp streams a contiguous range of k-chunks (else interleaved with the others)

    def xrows(self, M: int) -> int:
        """Token rows a block stages: all 8*mt when the tokens take several block rows, else M rounded up to 2^k."""
        return 8 * self.mt if M >= 8 * self.mt else min(8 * self.mt, 1 << (M - 1).bit_length())

    def options(self, dtype: torch.dtype, group_size: int, M: int):
        return (f"-DIS_BF16={int(dtype == torch.bfloat16)}", f"-DGROUP_SIZE={group_size}", f"-DMT={self.mt}",
                f"-DNT={self.nt}", f"-DKS={self.ks}", f"-DSTAGES={self.stages}", f"-DXROWS={self.xrows(M)}",
                f"-DCONTIG={int(self.contig)}")

    def shared_bytes(self, group_size: int, M: int) -> int:
        ng = 2 if group_size == 32 else 1
        stage = self.nt * 512 + self.xrows(M) * 128 + 2 * self.nt * ng * 128
        return max(self.ks * self.stages * stage, self.ks * self.nt * self.mt * 4 * 32 * 4)


@functools.lru_cache(maxsize=None)
def device_limits(device: int):
    props = torch.cuda.get_device_properties(device)
    return _cupy.sm_count(device), getattr(props, "shared_memory_per_block_optin", 227 * 1024)


def default_config(M: int, N: int, K: int, group_size: int, device: int) -> GemvConfig:
    """The best of the block-configuration sweep of scripts/bench_kernels.py on an H200 (docs/benchmarks.md):
    2 n-tiles a block where n-tiles alone fill the SMs, a 2-slot ring, and the most warps splitting K (up to 16)
    that still keep the whole grid resident in one wave (about 32 warps an SM fit the registers at mt=1)."""
    sm_count, smem_limit = device_limits(device)
    mt = min(4, -(-M // 8))
    ntiles, nchunks = N // 16, K // 64
    nt = 2 if ntiles >= sm_count else 1
    blocks = -(-ntiles // nt)
    warps_per_sm = 32 // mt
    ks = 16
    while ks > 1 and (ks > min(warps_per_sm, max(1, nchunks // 2)) or blocks > sm_count * (warps_per_sm // ks)):
        ks //= 2
    cfg = GemvConfig(mt=mt, nt=nt, ks=ks, stages=2)
    while cfg.ks > 1 and cfg.shared_bytes(group_size, M) > smem_limit:
        cfg = replace(cfg, ks=cfg.ks // 2)
    return cfg


def gemv(x: torch.Tensor, rt: W4A16Runtime, bias=None, config: GemvConfig = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16 contiguous, 16-byte aligned -> y: [M, N]."""
    M, K = x.shape
    N = rt.out_features
    cfg = config or default_config(M, N, K, rt.group_size, x.device.index)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    smem = cfg.shared_bytes(rt.group_size, M)
    if smem > device_limits(x.device.index)[1]:
        raise ValueError(f"GemvConfig {cfg} needs {smem} bytes of shared memory, more than the device's "
                         f"{device_limits(x.device.index)[1]}")
    options = cfg.options(x.dtype, rt.group_size, M) + (rt.zero_option,)
    kernel = _cupy.kernel_with_shared(_SOURCE, "w4a16_gemv", options, smem, x.device.index)
    grid = (-(-(N // 16) // cfg.nt), -(-M // (8 * cfg.mt)))
    bias_arg = bias if bias is not None else np.uint64(0)
    _cupy.launch(kernel, grid, (cfg.ks * 32,),
                 (rt.qweight, rt.scales_for(x.dtype), rt.zeros, x, bias_arg, y,
                  np.int32(M), np.int32(N), np.int32(K)), shared_mem=smem)
    return y
