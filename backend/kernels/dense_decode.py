"""fp16/bf16 GEMV for decode (1-8 tokens): y = x W^T (+ b) over the dense [out, in] weight, on tensor cores.

cuBLAS reaches 62-85% of copy bandwidth on the decode shapes at one token (H200, docs/benchmarks.md: 4096x4096
12.8 us); this kernel streams the weight like the W4A16 decode GEMV (w4a16_decode.py), without the dequantization:
a block owns 16 output rows, its KS warps split K into contiguous ranges of 32-k chunks, and a lane loads 16 bytes
of row g and 16 of row g + 8 per chunk with non-caching loads, a batch of U chunks in flight while the previous
one is multiplied. The 8 k of a lane feed two m16n8k16 k-tiles as they are: the reduction index is permuted the
same way in W (A) and x (B), so (lane t, k-tile j) takes k 8t + 4j + {0, 1} for the A/B registers of k 2t, 2t + 1
and 8t + 4j + {2, 3} for those of 2t + 8, 2t + 9. fp32 accumulation; warps meet in shared memory.
Reference: `reference` (F.linear in float32).
gemv_silu (GATED; the model's default, LMTRITON_FUSE_SILU=0 turns it off): over a fused [gate | up] weight a block runs
its 16 gate rows on half its warps and the matching up rows on the other half and stores silu(gate) * up, so the
MLP's silu_and_mul launch goes away at 1-8 tokens (tests passed on an H100; 0.9-1.4 us faster than the two kernels
at 4096x22016: docs/benchmarks.md, session 7).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import _cupy, activation
from .w4a16_runtime import DEVICE_HELPERS

MAX_TOKENS = 8   # one 8-token mma tile
# Dense linears and lm_head at 1-8 tokens take this kernel instead of cuBLAS (F.linear); LMTRITON_DENSE_GEMV=0: cuBLAS.
# H100, 2026-12-06 (docs/benchmarks.md, session 5): Llama-2-7B fp16 bs=1 170.9 -> 183.9 tok/s (75.3 -> 81.0% of the
# bandwidth limit), bs=64 unchanged; 4096x4096 15.5 -> 13.3 us, lm_head 4096x32000 98.5 -> 90.1 us.
ENABLED = bool(_cupy.env_int("LMTRITON_DENSE_GEMV", 1, minimum=0))

_SOURCE = DEVICE_HELPERS + r"""
// -D: IS_BF16, KS (warps per block splitting K), U (32-k chunks a load batch), GATED (a fused [gate | up] weight of
// 2I rows: block t runs gate rows 16t.. on its first KS/2 warps and up rows I + 16t.. on the others, and stores
// silu(gate) * up into y [M, I])
#ifndef GATED
#define GATED 0
#endif
#define KSPLIT (GATED ? (KS) / 2 : (KS))                   // warps splitting K over one block of 16 rows
template <int UB> struct Rows {   // UB chunks of rows g and g + 8, in registers
    uint4 a[UB], b[UB];
    __device__ __forceinline__ void load(const uint4* ra, const uint4* rb) {
#pragma unroll
        for (int u = 0; u < UB; ++u) { a[u] = ld_stream(ra + 4 * u); b[u] = ld_stream(rb + 4 * u); }
    }
    // acc[j] += k-tile j of each chunk times the activations at xp (this lane's token row, the first chunk)
    __device__ __forceinline__ void compute(const u16* xp, float (&acc)[2][4]) const {
        uint4 xv[UB];
#pragma unroll
        for (int u = 0; u < UB; ++u) xv[u] = ld_cached(xp + 32 * u);
#pragma unroll
        for (int u = 0; u < UB; ++u)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const u32 fa[4] = {word_of(a[u], 2 * j), word_of(b[u], 2 * j), word_of(a[u], 2 * j + 1),
                                   word_of(b[u], 2 * j + 1)};
                mma16816(acc[j], fa, word_of(xv[u], 2 * j), word_of(xv[u], 2 * j + 1));
            }
    }
};

extern "C" __global__ void __launch_bounds__(KS * 32)
dense_decode(const uint4* __restrict__ w, const u16* __restrict__ x, const u16* __restrict__ bias,
             u16* __restrict__ y, int M, int N, int K, int per_warp) {
    __shared__ float red[KS][4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int nchunks = K >> 5;                  // 32 k: 64 bytes of a row, 16 a lane
#if GATED
    static_assert(KS % 2 == 0, "GATED: half the warps on the gate rows, half on the up rows");
    const int kw = warp % KSPLIT, row0 = 16 * blockIdx.x + (warp >= KSPLIT ? N / 2 : 0);
#else
    const int kw = warp, row0 = 16 * blockIdx.x;
#endif
    const int c0 = kw * per_warp, nown = max(0, min(per_warp, nchunks - c0));
    const int nfull = nown / U, ntail = nown - nfull * U;
    const uint4* ra = w + ((size_t)(row0 + g) * K >> 3) + 4 * c0 + t;   // row g, this warp's first chunk
    const uint4* rb = ra + (size_t)K;                                               // row g + 8
    // B column g is token g; a lane past the last token reads token 0: its columns are never stored
    const u16* xp = x + (size_t)(g < M ? g : 0) * K + 32 * c0 + 8 * t;

    float acc[2][4];                             // two independent mma chains (k-tile parity)
#pragma unroll
    for (int r = 0; r < 8; ++r) acc[r >> 2][r & 3] = 0.f;
    Rows<U> p, q;                                // ping-pong: one batch in flight while the other is multiplied
    if (nfull > 0) { p.load(ra, rb); ra += 4 * U; rb += 4 * U; }   // static weights: before the previous kernel ends
    PDL_BEGIN();
    for (int left = nfull; left > 0;) {
        if (left > 1) { q.load(ra, rb); ra += 4 * U; rb += 4 * U; }
        p.compute(xp, acc);
        xp += 32 * U;
        if (--left == 0) break;
        if (left > 1) { p.load(ra, rb); ra += 4 * U; rb += 4 * U; }
        q.compute(xp, acc);
        xp += 32 * U;
        --left;
    }
    for (int c = 0; c < ntail; ++c) {
        Rows<1> r;
        r.load(ra, rb);
        ra += 4; rb += 4;
        r.compute(xp, acc);
        xp += 32;
    }

    // acc[.][r]: row 16 * tile + g + 8 * (r / 2), token 2t + (r % 2)
#pragma unroll
    for (int r = 0; r < 4; ++r) red[warp][r][lane] = acc[0][r] + acc[1][r];
    __syncthreads();
#if GATED
    store_silu_mul<KS>(red, blockIdx.x, M, N / 2, bias, y);
#else
#pragma unroll 1
    for (int v = threadIdx.x; v < 4 * 32; v += KS * 32) {
        const int l = v & 31, r = v >> 5;
        const int n = 16 * blockIdx.x + (l >> 2) + 8 * (r >> 1);
        const int tok = 2 * (l & 3) + (r & 1);
        if (tok >= M) continue;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < KS; ++k) s += red[k][r][l];
        if (bias) s += act_to_float(bias[n]);
        y[(size_t)tok * N + n] = float_to_act(s);
    }
#endif
}
"""


@dataclass(frozen=True)
class DenseConfig:
    ks: int = 8   # warps per block, splitting K into contiguous ranges of 32-k chunks
    u: int = 4    # chunks a load batch (u * 32 bytes in flight a lane, two batches in registers)

    def options(self, dtype: torch.dtype):
        return (f"-DIS_BF16={int(dtype == torch.bfloat16)}", f"-DKS={self.ks}", f"-DU={self.u}")

    def per_warp(self, K: int) -> int:
        return -(-(K // 32) // self.ks)


def default_config(N: int, K: int) -> DenseConfig:
    ks = 8
    while ks > 1 and K // 32 < 4 * ks:   # short K: fewer warps, each with a few chunks
        ks //= 2
    return DenseConfig(ks=ks)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` takes this call: 1-8 tokens, fp16/bf16 on a GPU with cupy, K % 32 == 0 and N % 16 == 0."""
    if not (ENABLED and x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= MAX_TOKENS and _cupy.available(x)):
        return False
    N, K = weight.shape
    return (x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype and x.shape[1] == K
            and x.is_contiguous() and x.data_ptr() % 16 == 0
            and K % 32 == 0 and N % 16 == 0 and weight.is_contiguous() and weight.data_ptr() % 16 == 0)


def gemv_silu(x: torch.Tensor, weight: torch.Tensor, bias=None, config: DenseConfig = None) -> torch.Tensor:
    """silu(gate) * up of a fused [gate | up] weight [2I, K] in the GEMV's epilogue (one kernel instead of gemv +
    silu_and_mul): x [M, K] -> y [M, I]. Callers check `supports` and 2I % 32 == 0. config: ks even (ks/2 warps
    split K over the gate rows, ks/2 over the up rows); None: twice default_config's warps."""
    M, K = x.shape
    N = weight.shape[0]
    if not (1 <= M <= MAX_TOKENS and N % 32 == 0):
        raise ValueError(f"dense_decode.gemv_silu takes 1..{MAX_TOKENS} tokens and 2I rows with I a multiple of 16, "
                         f"got {M} tokens and {N} rows")
    base = default_config(N, K)
    cfg = config or DenseConfig(ks=2 * base.ks, u=base.u)
    if cfg.ks % 2:
        raise ValueError(f"dense_decode.gemv_silu needs an even ks, got {cfg}")
    return _launch(x, weight, bias, cfg, gated=True)


def linear_silu(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """silu(gate) * up of x times a fused [gate | up] weight: `gemv_silu` (one kernel) where activation.FUSE_SILU is
    on and `supports` says so, else `linear` then silu_and_mul."""
    if activation.FUSE_SILU and supports(x, weight) and weight.shape[0] % 32 == 0:
        return gemv_silu(x, weight, bias)
    return activation.silu_and_mul(linear(x, weight, bias))


def reference(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """The same math in float32 (the kernel accumulates in fp32, rounds once at the store)."""
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """y = x W^T (+ b): this kernel where `supports` says so (decode), else F.linear (cuBLAS, or the CPU)."""
    if supports(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias=None, config: DenseConfig = None) -> torch.Tensor:
    """x: [M, K] (M <= 8), weight: [N, K] of x's dtype -> y: [M, N]. Callers check `supports` first."""
    M, K = x.shape
    N = weight.shape[0]
    if not 1 <= M <= MAX_TOKENS:
        raise ValueError(f"dense_decode takes 1..{MAX_TOKENS} tokens, got {M}")
    return _launch(x, weight, bias, config or default_config(N, K))


def _launch(x: torch.Tensor, weight: torch.Tensor, bias, cfg: DenseConfig, gated: bool = False) -> torch.Tensor:
    """y = x W^T (+ b) (gated: silu(gate) * up, I = N / 2 outputs, a block per 16 of them, ks/2 warps each side)."""
    M, K = x.shape
    N = weight.shape[0]
    assert x.is_contiguous() and x.data_ptr() % 16 == 0 and K % 32 == 0 and N % 16 == 0
    y = torch.empty(M, N // 2 if gated else N, dtype=x.dtype, device=x.device)
    kernel = _cupy.get_kernel(_SOURCE, "dense_decode", cfg.options(x.dtype) + (("-DGATED=1",) if gated else ()),
                              x.device.index)
    bias_arg = bias.to(x.dtype).contiguous() if bias is not None else np.uint64(0)
    split = DenseConfig(ks=cfg.ks // 2, u=cfg.u) if gated else cfg      # the warps splitting K over 16 rows
    _cupy.launch(kernel, (N // 32 if gated else N // 16,), (cfg.ks * 32,),
                 (weight, x, bias_arg, y, np.int32(M), np.int32(N), np.int32(K), np.int32(split.per_warp(K))))
    return y
