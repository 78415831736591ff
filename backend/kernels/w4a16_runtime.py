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
  zeros   uint8 [N/16, K/g, 8]       byte g = z[16nt+g] | z[16nt+g+8] << 4

Groups of 32, 64 or 128 never split a half-chunk of 32, so one scale/zero pair covers a lane's 8 inputs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

from . import _cupy

CHUNK_K = 64   # k per warp step: 4 mma k-tiles of 16
TILE_N = 16    # output channels per mma (the A operand's rows)


@dataclass
class W4A16Runtime:
    qweight: torch.Tensor            # int32 [N/16, K/64, 32, 4]
    zeros: torch.Tensor              # uint8 [N/16, K/g, 8]
    scales: Dict[torch.dtype, torch.Tensor] = field(default_factory=dict)   # dtype -> int32 [N/16, K/g, 8]
    in_features: int = 0
    out_features: int = 0
    group_size: int = 0

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
    """q: int [K, N] values 0..15, z: int [K/g, N], scales: [K/g, N] (fp16 or bf16) -> runtime layout."""
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

    zp = by_row_pair(z.to(torch.int32))
    zeros = (zp[..., 0] | (zp[..., 1] << 4)).to(torch.uint8)        # [N/16, K/g, 8]
    s = by_row_pair(scales).reshape(N // 16, ng, 16)
    return W4A16Runtime(qweight=words.contiguous(), zeros=zeros.contiguous(),
                        scales={scales.dtype: s.view(torch.int32).contiguous()},
                        in_features=K, out_features=N, group_size=group_size)


def unrepack(rt: W4A16Runtime, dtype: torch.dtype = torch.float16):
    """Inverse of `repack` (tests): -> (q int32 [K, N], z int32 [K/g, N], scales [K/g, N] in dtype)."""
    K, N, ng = rt.in_features, rt.out_features, rt.in_features // rt.group_size
    w = rt.qweight.to(torch.int64) & 0xFFFFFFFF                      # [N/16, K/64, 32, 4]
    nib = (w.unsqueeze(-1) >> torch.arange(0, 32, 4, device=w.device)) & 0xF
    nib = nib.reshape(N // 16, K // 64, 8, 4, 2, 2, 2, 2, 2)         # [nt, c, g, t, h, jj, pl, pp, rb]
    q = nib.permute(0, 8, 2, 1, 4, 3, 5, 7, 6).reshape(N, K).t()
    zb = rt.zeros.to(torch.int32)                                    # [N/16, K/g, 8]
    zp = torch.stack([zb & 0xF, zb >> 4], -1)                        # [N/16, K/g, 8, 2]
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
    zeros = torch.full((nt, ng, 8), 0x88, dtype=torch.uint8, device=device)
    pairs = torch.full((nt, ng, 16), scale, dtype=dtype, device=device).view(torch.int32)     # [N/16, K/g, 8]
    return W4A16Runtime(qweight=words, zeros=zeros, scales={dtype: pairs}, in_features=in_features,
                        out_features=out_features, group_size=group_size)


@functools.lru_cache(maxsize=None)
def kernel_with_shared(source: str, name: str, options: Tuple[str, ...], nbytes: int, device: int):
    """The compiled kernel, its dynamic shared-memory limit raised past the default 48 KB when it needs more."""
    kernel = _cupy.get_kernel(source, name, options, device)
    if nbytes > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = nbytes
    return kernel


# Device helpers shared by the GEMV, GEMM and dequantize kernels. Compiled with -DIS_BF16=0|1 and -DGROUP_SIZE=<group>.
DEVICE_HELPERS = r"""
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

// Scale and zero of rows g and g+8 for one group, as f16x2/bf16x2 pairs broadcast to both halves.
struct GroupParams { u32 zlo, zhi, slo, shi; };

__device__ __forceinline__ GroupParams group_params(u32 scale_pair, u32 zero_byte) {
    GroupParams p;
    p.zlo = (MAGIC16 | (zero_byte & 15u)) * 0x10001u;
    p.zhi = (MAGIC16 | (zero_byte >> 4)) * 0x10001u;
    p.slo = prmt(scale_pair, 0x1010u);
    p.shi = prmt(scale_pair, 0x3232u);
    return p;
}

// One packed word -> the four A registers of one m16n8k16 k-tile: a0/a2 row g, a1/a3 row g+8.
__device__ __forceinline__ void dequant_word(u32 w, const GroupParams& p, u32 a[4]) {
    a[0] = mul2(sub2((w & 0x000F000Fu) | MAGIC, p.zlo), p.slo);
    a[1] = mul2(sub2(((w >> 4) & 0x000F000Fu) | MAGIC, p.zhi), p.shi);
    a[2] = mul2(sub2(((w >> 8) & 0x000F000Fu) | MAGIC, p.zlo), p.slo);
    a[3] = mul2(sub2(((w >> 12) & 0x000F000Fu) | MAGIC, p.zhi), p.shi);
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
