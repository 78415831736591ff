"""W4A16 runtime layout: the canonical AWQ tensors re-packed once at load time for the tensor-core kernels.

Both CUDA paths (GEMV for decode, GEMM for prefill) compute y^T = W^T x^T with mma.sync m16n8k16: the weights
are the A operand (16 output channels by 16 k), the tokens the B operand (16 k by 8 tokens). A k-chunk of 64 is
handed to the 32 lanes of a warp so that lane (g = lane // 4, t = lane % 4) owns, for each half h of the chunk,
the 8 contiguous inputs k = 64c + 32h + 8t + i (i = 0..7): its B fragments are one 16-byte load of x, and its
A fragments for the four k-tiles of the chunk are one 16-byte load of weights. The sum over k does not care
which mma column a k lands in, as long as weights and activations agree; that freedom buys the wide loads.

  qweight int32 [N/16, K/64, 32, 4]  word j of lane (g, t) = k-tile j = (h, jj) = (j // 2, j % 2); its nibbles:
      nibble 4*pl + 2*pp + rb = q[k = 64c + 32h + 8t + 4jj + 2pp + pl, n = 16*ntile + 8rb + g]
      so (w >> 4s) & 0x000F000F holds the f16x2 pair of mma register a_s (s = 0..3).
  scales  int32 [N/16, K/g, 8]       word g = (s[n=16nt+g], s[n=16nt+g+8]) as two fp16/bf16 (low half first)
  zeros   uint8 [N/16, K/g, 16]      u16 g = 16 z[16nt+g] | 16 z[16nt+g+8] << 8 (zero points on a 1/16 grid)

Zero points are fractional (fp16 in the canonical format, multiples of 1/16 in [0, 15]), so the kernels form
(q - z) exactly: fp16 nibbles masked in place at bits 4..7 read 1024 + 16q, and one fma with 1/16 and -(64 + z)
(exact: 64 + z has a 1/16 ulp) gives q - z; bf16 subtracts twice. A runtime whose zeros are all integers
(AutoAWQ checkpoints) sets `frac_zeros` False and the kernels compile the integer path (2 shifts a word fewer).

Groups of 32, 64 or 128 never split a half-chunk of 32, so one scale/zero pair covers a lane's 8 inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch

from . import _cupy

CHUNK_K = 64   # k per warp step: 4 mma k-tiles of 16
TILE_N = 16    # output channels per mma (the A operand's rows)


@dataclass
class W4A16Runtime:
    qweight: torch.Tensor            # int32 [N/16, K/64, 32, 4]
    zeros: torch.Tensor              # uint8 [N/16, K/g, 16]: 16 z as u16 pairs (row g, row g + 8)
    scales: Dict[torch.dtype, torch.Tensor] = field(default_factory=dict)   # dtype -> int32 [N/16, K/g, 8]
    in_features: int = 0
    out_features: int = 0
    group_size: int = 0
    frac_zeros: bool = False         # some zero point is not an integer: the kernels' fractional path

    @property
    def zero_option(self) -> str:
        return f"-DZFRAC={int(self.frac_zeros)}"

    def scales_for(self, dtype: torch.dtype) -> torch.Tensor:
        """Scale pairs in the activation dtype (the kernels multiply in it); converted once per dtype."""
        if dtype not in self.scales:
            src = next(iter(self.scales.values()))
            src_dtype = next(iter(self.scales))
            pairs = src.view(src_dtype).to(dtype)          # [N/16, K/g, 16]
            self.scales[dtype] = pairs.view(torch.int32)   # [N/16, K/g, 8]
        return self.scales[dtype]


def supports(in_features: int, out_features: int, group_size: int) -> str:
    """Empty string if the kernels take this shape, else the reason they don't."""
    if group_size not in (32, 64, 128):
        return f"group_size={group_size} (kernels take 32, 64 or 128)"
    if in_features % CHUNK_K or in_features % group_size:
        return f"in_features={in_features} (kernels need a multiple of {CHUNK_K} and of group_size)"
    if out_features % TILE_N:
        return f"out_features={out_features} (kernels need a multiple of {TILE_N})"
    return ""


def repack(q: torch.Tensor, z: torch.Tensor, scales: torch.Tensor, group_size: int) -> W4A16Runtime:
    """q: int [K, N] values 0..15, z: [K/g, N] zero points (rounded to the 1/16 grid, 0..15), scales: [K/g, N]
    (fp16 or bf16) -> runtime layout."""
    K, N = q.shape
    reason = supports(K, N, group_size)
    if reason:
        raise ValueError(f"W4A16 kernels cannot take {reason}")
    ng = K // group_size
    # [N/16, rb, g, K/64, h, t, jj, pp, pl] -> [N/16, K/64, g, t, h, jj, pl, pp, rb]
    qt = q.t().to(torch.int64).reshape(N // 16, 2, 8, K // 64, 2, 4, 2, 2, 2)
    qt = qt.permute(0, 3, 2, 5, 4, 6, 8, 7, 1).reshape(N // 16, K // 64, 32, 4, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (qt << shifts).sum(-1)                                   # [N/16, K/64, 32, 4], < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    def by_row_pair(t: torch.Tensor) -> torch.Tensor:              # [K/g, N] -> [N/16, K/g, 8, 2]
        return t.t().reshape(N // 16, 2, 8, ng).permute(0, 3, 2, 1).contiguous()

    z16 = (z.float() * 16).round().clamp(0, 240).to(torch.int32)    # [K/g, N]
    zeros = by_row_pair(z16).to(torch.uint8).reshape(N // 16, ng, 16)  # little-endian u16 pairs (row g, row g+8)
    s = by_row_pair(scales).reshape(N // 16, ng, 16)
    return W4A16Runtime(qweight=words.contiguous(), zeros=zeros.contiguous(),
                        scales={scales.dtype: s.view(torch.int32).contiguous()},
                        in_features=K, out_features=N, group_size=group_size,
                        frac_zeros=bool((z16 % 16).any()))


def unrepack(rt: W4A16Runtime, dtype: torch.dtype = torch.float16):
    """Inverse of `repack` (tests): -> (q int32 [K, N], z float32 [K/g, N], scales [K/g, N] in dtype)."""
    K, N, ng = rt.in_features, rt.out_features, rt.in_features // rt.group_size
    w = rt.qweight.to(torch.int64) & 0xFFFFFFFF                      # [N/16, K/64, 32, 4]
    nib = (w.unsqueeze(-1) >> torch.arange(0, 32, 4, device=w.device)) & 0xF
    nib = nib.reshape(N // 16, K // 64, 8, 4, 2, 2, 2, 2, 2)         # [nt, c, g, t, h, jj, pl, pp, rb]
    q = nib.permute(0, 8, 2, 1, 4, 3, 5, 7, 6).reshape(N, K).t()
    zp = rt.zeros.reshape(N // 16, ng, 8, 2).float() / 16           # [N/16, K/g, g, row half]
    z = zp.permute(0, 3, 2, 1).reshape(N, ng).t()
    sp = rt.scales_for(dtype).view(dtype).reshape(N // 16, ng, 8, 2)
    s = sp.permute(0, 3, 2, 1).reshape(N, ng).t()
    return q.to(torch.int32).contiguous(), z.contiguous(), s.contiguous()


def random_runtime(in_features: int, out_features: int, group_size: int, scale: float, dtype: torch.dtype,
                   device, generator: torch.Generator) -> W4A16Runtime:
    """Random int4 weights made directly in the runtime layout (benchmarks of 70B shapes: no canonical copy, no
    repack): uniform nibbles, zero point 8, one scale for every group. Any int32 word is a valid set of nibbles."""
    reason = supports(in_features, out_features, group_size)
    if reason:
        raise ValueError(f"W4A16 kernels cannot take {reason}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"scales dtype={dtype}: the runtime layout holds fp16 or bf16 pairs")
    nt, ng = out_features // TILE_N, in_features // group_size
    words = torch.randint(-2**31, 2**31 - 1, (nt, in_features // CHUNK_K, 32, 4), generator=generator,
                          device=device, dtype=torch.int32)
    zeros = torch.full((nt, ng, 16), 16 * 8, dtype=torch.uint8, device=device)
    pairs = torch.full((nt, ng, 16), scale, dtype=dtype, device=device).view(torch.int32)     # [N/16, K/g, 8]
    return W4A16Runtime(qweight=words, zeros=zeros, scales={dtype: pairs}, in_features=in_features,
                        out_features=out_features, group_size=group_size)


# Device helpers shared by the GEMV, GEMM and dequantize kernels. Compiled with -DIS_BF16=0|1 and -DGROUP_SIZE=<group>.
DEVICE_HELPERS = _cupy.PDL_MACROS + r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
#if IS_BF16
#define MAGIC 0x43004300u   // bf16 128.0 in both halves: (0x4300 | q) is 128 + q exactly
#define MAGIC16 0x4300u
#else
#define MAGIC 0x64006400u   // fp16 1024.0 in both halves: (0x6400 | q) is 1024 + q exactly
#define MAGIC16 0x6400u
#endif

__device__ __forceinline__ u32 sub2(u32 a, u32 b) {  // exact here: small integers
    u32 d;
#if IS_BF16
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(b), "r"(0xBF80BF80u), "r"(a));
#else
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#endif
    return d;
}

__device__ __forceinline__ u32 mul2(u32 a, u32 b) {  // one rounding, as the reference's (q - z) * s
    u32 d;
#if IS_BF16
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
#else
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#endif
    return d;
}

__device__ __forceinline__ uint4 u4(u32 a, u32 b, u32 c, u32 d) {
    uint4 r; r.x = a; r.y = b; r.z = c; r.w = d; return r;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(d) : "r"(a), "r"(sel));
    return d;
}

// (a & MASK) | OR in one lop3 (0xEA = (A & B) | C): written as `(a & m) | o` in C it compiles to two LOP3s, each
// with one of the two immediates (SASS takes one a LOP3); the explicit lop3 has ptxas keep one constant in a
// register instead (H200 SASS of the decode GEMV: 8 -> 4 LOP3 a packed word; decode GEMV 4096x11008 11.98 ->
// 11.08 us, W4A16 + KV int8 bs=1 457.5 -> 491.5 tok/s in one call, docs/benchmarks.md).
template <u32 MASK, u32 OR> __device__ __forceinline__ u32 and_or(u32 a) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(MASK), "n"(OR));
    return d;
}

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
#if IS_BF16
    u32 d; asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
#else
    u32 d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
#endif
}

// Zero points: `zp` is the u16 pair (16 z of row g, 16 z of row g + 8), z on a 1/16 grid in [0, 15]. q - z is formed
// exactly and fed to the mma (decode) or multiplied by the scale (dequant_word). fp16 masks nibbles in place:
// at bits 4..7 a half reads 1024 + 16q, and fma(., 1/16, -(64 + z)) is q - z exactly (64 + z has a 1/16 ulp); at
// bits 0..3 it reads 1024 + q, and subtracting 1024 + z is exact for integer z only. So ZFRAC (some zero is
// fractional) shifts every nibble pair to bits 4..7 (3 shifts + 4 lop3 + 4 fma a word); integer zeros use bits
// 0..3 for rows g and 4..7 for rows g + 8 (1 shift + 4 lop3 + 4 half2 ops). bf16 (7 mantissa bits) shifts every
// pair down to bits 0..3 and, for fractional zeros, subtracts 128 and then z (8 significant bits: exact).
struct ZeroPair { u32 lo, hi; };      // the per-row constants of q_minus_z, in both halves

__device__ __forceinline__ u32 zero_neg64(u32 z16) { return (0xD400u | z16) * 0x10001u; }   // fp16 -(64 + z)
__device__ __forceinline__ u32 zero_magic(u32 z16) { return (MAGIC16 | (z16 >> 4)) * 0x10001u; }  // 1024 + z

__device__ __forceinline__ ZeroPair zero_pair(u32 zp) {
    const u32 zlo = zp & 0xFFu, zhi = (zp >> 8) & 0xFFu;
    ZeroPair z;
#if IS_BF16 && ZFRAC
    z.lo = (__float_as_uint((float)zlo * 0.0625f) >> 16) * 0x10001u;
    z.hi = (__float_as_uint((float)zhi * 0.0625f) >> 16) * 0x10001u;
#elif IS_BF16
    z.lo = zero_magic(zlo);
    z.hi = zero_magic(zhi);
#elif ZFRAC
    z.lo = zero_neg64(zlo);
    z.hi = zero_neg64(zhi);
#else
    z.lo = zero_magic(zlo);
    z.hi = zero_neg64(zhi);
#endif
    return z;
}

// One packed word -> (q - z) for the four A registers of one m16n8k16 k-tile (a0/a2 row g, a1/a3 row g+8), exact.
__device__ __forceinline__ void q_minus_z(u32 w, const ZeroPair& z, u32 a[4]) {
#if IS_BF16 && ZFRAC
    a[0] = sub2(sub2(and_or<0x000F000Fu, MAGIC>(w), MAGIC), z.lo);
    a[1] = sub2(sub2(and_or<0x000F000Fu, MAGIC>(w >> 4), MAGIC), z.hi);
    a[2] = sub2(sub2(and_or<0x000F000Fu, MAGIC>(w >> 8), MAGIC), z.lo);
    a[3] = sub2(sub2(and_or<0x000F000Fu, MAGIC>(w >> 12), MAGIC), z.hi);
#elif IS_BF16
    a[0] = sub2(and_or<0x000F000Fu, MAGIC>(w), z.lo);
    a[1] = sub2(and_or<0x000F000Fu, MAGIC>(w >> 4), z.hi);
    a[2] = sub2(and_or<0x000F000Fu, MAGIC>(w >> 8), z.lo);
    a[3] = sub2(and_or<0x000F000Fu, MAGIC>(w >> 12), z.hi);
#elif ZFRAC
    a[0] = fma2(and_or<0x00F000F0u, MAGIC>(w << 4), 0x2C002C00u, z.lo);   // 0x2C00 = 1/16
    a[1] = fma2(and_or<0x00F000F0u, MAGIC>(w), 0x2C002C00u, z.hi);
    a[2] = fma2(and_or<0x00F000F0u, MAGIC>(w >> 4), 0x2C002C00u, z.lo);
    a[3] = fma2(and_or<0x00F000F0u, MAGIC>(w >> 8), 0x2C002C00u, z.hi);
#else
    const u32 w8 = w >> 8;
    a[0] = sub2(and_or<0x000F000Fu, MAGIC>(w), z.lo);
    a[1] = fma2(and_or<0x00F000F0u, MAGIC>(w), 0x2C002C00u, z.hi);
    a[2] = sub2(and_or<0x000F000Fu, MAGIC>(w8), z.lo);
    a[3] = fma2(and_or<0x00F000F0u, MAGIC>(w8), 0x2C002C00u, z.hi);
#endif
}

// Scale and zero of rows g and g+8 for one group, as f16x2/bf16x2 pairs broadcast to both halves.
struct GroupParams { ZeroPair z; u32 slo, shi; };

__device__ __forceinline__ GroupParams group_params(u32 scale_pair, u32 zero_pair16) {
    GroupParams p;
    p.z = zero_pair(zero_pair16);
    p.slo = prmt(scale_pair, 0x1010u);
    p.shi = prmt(scale_pair, 0x3232u);
    return p;
}

// One packed word -> the four dequantized A registers, (q - z) * s rounded once (as the reference).
__device__ __forceinline__ void dequant_word(u32 w, const GroupParams& p, u32 a[4]) {
    q_minus_z(w, p.z, a);
    a[0] = mul2(a[0], p.slo);
    a[1] = mul2(a[1], p.shi);
    a[2] = mul2(a[2], p.slo);
    a[3] = mul2(a[3], p.shi);
}

__device__ __forceinline__ void mma16816(float c[4], const u32 a[4], u32 b0, u32 b1) {
#if IS_BF16
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#endif
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {   // read once: do not pollute L1
    uint4 r;
#if defined(L2PF) && L2PF   // and have L2 fetch the whole 256-byte sector group (fewer, longer DRAM bursts)
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
#else
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
#endif
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ uint4 ld_cached(const void* p) {    // activations: re-read by every tile, keep in L1
    uint4 r;
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ u32 word_of(const uint4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

__device__ __forceinline__ float act_to_float(u16 h) {
#if IS_BF16
    return __uint_as_float(((u32)h) << 16);
#else
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
#endif
}

__device__ __forceinline__ u16 float_to_act(float f) {
    u16 h;
#if IS_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

// The epilogue of a decode GEMV over a fused [gate | up] weight (w4a16_decode / dense_decode, GATED): a block's
// warps [0, KS_/2) hold the gate sums of its 16 rows, warps [KS_/2, KS_) the up sums of the same rows, in
// red[warp][r][lane] (the m16n8 C layout: row 16 * tile + lane / 4 + 8 * (r / 2), token 2 * (lane % 4) + r % 2).
// Stores silu(gate) * up of the tokens < M into y [M, I], rounded once.
template <int KS_> __device__ __forceinline__ void store_silu_mul(const float (&red)[KS_][4][32], int tile, int M,
                                                                  int I, const u16* __restrict__ bias,
                                                                  u16* __restrict__ y) {
    for (int v = threadIdx.x; v < 4 * 32; v += KS_ * 32) {
        const int l = v & 31, r = v >> 5;
        const int n = 16 * tile + (l >> 2) + 8 * (r >> 1);
        const int tok = 2 * (l & 3) + (r & 1);
        if (tok >= M) continue;
        float gate = 0.f, up = 0.f;
#pragma unroll
        for (int k = 0; k < KS_ / 2; ++k) gate += red[k][r][l];
#pragma unroll
        for (int k = KS_ / 2; k < KS_; ++k) up += red[k][r][l];
        if (bias) { gate += act_to_float(bias[n]); up += act_to_float(bias[I + n]); }
        y[(size_t)tok * I + n] = float_to_act(gate / (1.f + expf(-gate)) * up);
    }
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Asynchronous global -> shared copies to a shared-memory address (smem_addr); a false `pred` fills zeros and
// reads nothing. Weights stream through L2 only (.cg); activations and scales, reused, may stay in L1 (.ca).
__device__ __forceinline__ void cp_async16_cg(u32 dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(pred ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async16_ca(u32 dst, const void* src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(pred ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(dst), "l"(src), "r"(pred ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
"""
