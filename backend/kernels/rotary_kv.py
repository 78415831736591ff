"""Rotary embedding fused with the KV-cache write (+ online quantization): one launch instead of two per layer.

Same contract as `rotary` followed by `write_kv` on the rotated keys: returns the rotated (and logn-scaled)
queries, writes rotated K and V into the paged cache. The rotated keys are never materialized: the attention
reads K from the cache. On the GPU the result is bit-identical to the two separate kernels: the rotation uses
the same float32 expressions, a rotated key is rounded to the model dtype before it is quantized (as the
unfused path stores it), and min/max reductions do not depend on their order.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _cupy
from .kv_cache import KVLayer, write_kv_ref
from .rotary import rotary_ref
from ..model.rotation import hadamard as hadamard_matrix, rotate

_KV_KIND = {"auto": 0, "int8": 1, "int4": 2}

_SOURCE = _cupy.PRELUDE + r"""
// Grid (T, ceil((Hq + 2 Hk) / WARPS)); block of WARPS warps, one warp per job: jobs [0, Hq) rotate a q head into
// q_out, [Hq, Hq + Hk) rotate a k head into the cache, [Hq + Hk, Hq + 2 Hk) copy a v head into the cache.
// Lane l owns the rotary pairs (j, j + D/2) for j = l + 32 m, m < P = D / 64: 2P elements a lane, so a warp
// reduction gives a head's min/max for quantization. int4 packs elements (2i, 2i+1): the neighbour lane's code.
// HADAMARD 1: q and k heads are multiplied by the orthonormal Sylvester-Hadamard matrix after RoPE (KV rotation,
// backend/model/rotation.py); 2: v heads too. x[i] holds element lane + 32 i, so the fast Walsh-Hadamard transform
// takes 5 butterfly stages over the lanes (shuffles) and log2(2P) over the registers.
#define P (HEAD_DIM / 64)
#define HALF (HEAD_DIM / 2)
#if KV_KIND == 1
#define QMAX 255.f
#else
#define QMAX 15.f
#endif
extern "C" __global__ void rotary_write_kv(const u16* __restrict__ q, const u16* __restrict__ k,
                                           const u16* __restrict__ v, long long q_stride, long long k_stride,
                                           long long v_stride, const int* __restrict__ positions,
                                           const float* __restrict__ inv_freq, int inv_stride,
                                           const int* __restrict__ slots, u16* __restrict__ q_out,
                                           void* __restrict__ k_cache, void* __restrict__ v_cache,
                                           float* __restrict__ k_qp, float* __restrict__ v_qp, int hq, int hk,
                                           int block_size, int logn_max_pos) {
    PDL_BEGIN();
    const int t = blockIdx.x, lane = threadIdx.x & 31;
    const int job = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (job >= hq + 2 * hk) return;
    const bool is_q = job < hq, is_v = job >= hq + hk;
    const int slot = slots[t];
    if (!is_q && slot < 0) return;                               // padded row of a CUDA-graph batch
    const int h = is_q ? job : (is_v ? job - hq - hk : job - hq);
    const u16* src = is_q ? q + t * q_stride + h * HEAD_DIM
                          : (is_v ? v + t * v_stride : k + t * k_stride) + h * HEAD_DIM;
    float x[2 * P];                                              // x[m] = element j_m, x[P + m] = j_m + HALF
#pragma unroll
    for (int m = 0; m < P; ++m) {
        x[m] = LOADF(src[lane + 32 * m]);
        x[P + m] = LOADF(src[lane + 32 * m + HALF]);
    }
    if (!is_v) {
        const float pos = (float)positions[t];
        float qscale = 1.f;
        if (is_q && logn_max_pos > 0 && pos + 1.f > (float)logn_max_pos)
            qscale = logf(pos + 1.f) / logf((float)logn_max_pos);
#pragma unroll
        for (int m = 0; m < P; ++m) {
            float s, c;
            sincosf(pos * inv_freq[(long long)t * inv_stride + lane + 32 * m], &s, &c);
            float o1 = x[m] * c - x[P + m] * s, o2 = x[P + m] * c + x[m] * s;
            if (is_q) { o1 *= qscale; o2 *= qscale; }
            // round to the model dtype, as the unfused path stores the rotated key before writing it
            x[m] = LOADF(STOREF(o1));
            x[P + m] = LOADF(STOREF(o2));
        }
    }
#if HADAMARD
    if (!is_v || HADAMARD == 2) {
#pragma unroll
        for (int b = 1; b < 32; b <<= 1) {
            const bool upper = lane & b;
#pragma unroll
            for (int i = 0; i < 2 * P; ++i) {
                const float other = __shfl_xor_sync(0xffffffffu, x[i], b);
                x[i] = upper ? other - x[i] : x[i] + other;
            }
        }
#pragma unroll
        for (int b = 1; b < 2 * P; b <<= 1)
#pragma unroll
            for (int i = 0; i < 2 * P; ++i)
                if (!(i & b)) {
                    const float lo = x[i], hi = x[i | b];
                    x[i] = lo + hi;
                    x[i | b] = lo - hi;
                }
        const float norm = rsqrtf((float)HEAD_DIM);
#pragma unroll
        for (int i = 0; i < 2 * P; ++i) x[i] = LOADF(STOREF(x[i] * norm));   // rounded as the matmul's output
    }
#endif
    if (is_q) {
        u16* dst = q_out + ((long long)t * hq + h) * HEAD_DIM;
#pragma unroll
        for (int m = 0; m < P; ++m) {
            dst[lane + 32 * m] = STOREF(x[m]);
            dst[lane + 32 * m + HALF] = STOREF(x[P + m]);
        }
        return;
    }
    const long long row = ((long long)(slot / block_size) * hk + h) * block_size + slot % block_size;
#if KV_KIND == 0
    u16* dst = reinterpret_cast<u16*>(is_v ? v_cache : k_cache) + row * HEAD_DIM;
#pragma unroll
    for (int m = 0; m < P; ++m) {
        dst[lane + 32 * m] = STOREF(x[m]);
        dst[lane + 32 * m + HALF] = STOREF(x[P + m]);
    }
#else
    float lo = x[0], hi = x[0];
#pragma unroll
    for (int i = 1; i < 2 * P; ++i) { lo = fminf(lo, x[i]); hi = fmaxf(hi, x[i]); }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    const float scale = fmaxf((hi - lo) * (1.f / QMAX), 1e-8f);   // the formulas of write_kv, exactly
    unsigned c[2 * P];
#pragma unroll
    for (int i = 0; i < 2 * P; ++i) c[i] = (unsigned)fminf(fmaxf(rintf((x[i] - lo) / scale), 0.f), QMAX);
    u8* base = reinterpret_cast<u8*>(is_v ? v_cache : k_cache);
#if KV_KIND == 1
    u8* dst = base + row * HEAD_DIM;
#pragma unroll
    for (int m = 0; m < P; ++m) {
        dst[lane + 32 * m] = (u8)c[m];
        dst[lane + 32 * m + HALF] = (u8)c[P + m];
    }
#else
    // element e = lane + 32 m (+ HALF) pairs with e ^ 1, held by lane ^ 1 at the same m: even lanes write the byte
    u8* dst = base + row * (HEAD_DIM / 2);
#pragma unroll
    for (int i = 0; i < 2 * P; ++i) {
        const unsigned other = __shfl_xor_sync(0xffffffffu, c[i], 1);
        const int e = lane + 32 * (i % P) + (i < P ? 0 : HALF);
        if ((lane & 1) == 0) dst[e / 2] = (u8)(c[i] | (other << 4));
    }
#endif
    if (lane == 0) {
        float* qp = (is_v ? v_qp : k_qp) + row * 2;
        qp[0] = scale;
        qp[1] = lo;
    }
#endif
}
"""

_WARPS = 4


def rotary_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        inv_freq: torch.Tensor, logn_max_pos: int, layer: KVLayer,
                        slot_mapping: torch.Tensor, hadamard: int = 0) -> torch.Tensor:
    """q [T, Hq, D], k, v [T, Hk, D] -> rotated q (new tensor); rotated k and v written to the cache.
    hadamard 1: q and k are then multiplied by the Sylvester-Hadamard matrix (KV rotation), 2: v as well."""
    q, k = rotary_ref(q, k, positions, inv_freq, logn_max_pos)
    if hadamard:
        h = hadamard_matrix(q.shape[2], device=q.device)
        q, k = rotate(q, h), rotate(k, h)
        v = rotate(v, h) if hadamard == 2 else v
    write_kv_ref(k, v, layer, slot_mapping)
    return q


def _rows_ok(x: torch.Tensor) -> bool:
    """[T, H, D] with contiguous heads inside each row (a view of the fused qkv output is fine)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def _kernel_ok(q, k, v, positions, inv_freq, layer: KVLayer, slot_mapping) -> bool:
    d = q.shape[2]
    return (_cupy.available(q) and _cupy.supports_dtype(q) and k.dtype == q.dtype and v.dtype == q.dtype
            and d in (64, 128) and all(_rows_ok(x) for x in (q, k, v)) and inv_freq.dtype == torch.float32
            and inv_freq.is_contiguous() and positions.dtype == torch.int32 and slot_mapping.dtype == torch.int32
            and positions.is_contiguous() and slot_mapping.is_contiguous()
            and (layer.kv_dtype != "auto" or layer.k.dtype == q.dtype))


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    inv_freq: torch.Tensor, logn_max_pos: int, layer: KVLayer,
                    slot_mapping: torch.Tensor, hadamard: int = 0) -> torch.Tensor:
    """The fused kernel (the reference where it does not apply); `hadamard` as in rotary_write_kv_ref."""
    if hadamard not in (0, 1, 2):
        raise ValueError(f"hadamard must be 0 (off), 1 (q, k) or 2 (q, k, v), got {hadamard}")
    if not _kernel_ok(q, k, v, positions, inv_freq, layer, slot_mapping):
        return rotary_write_kv_ref(q, k, v, positions, inv_freq, logn_max_pos, layer, slot_mapping, hadamard)
    t, hq, d = q.shape
    hk = k.shape[1]
    q_out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out
    opts = _cupy.dtype_options(q.dtype) + (f"-DHEAD_DIM={d}", f"-DKV_KIND={_KV_KIND[layer.kv_dtype]}",
                                           f"-DHADAMARD={hadamard}")
    kernel = _cupy.get_kernel(_SOURCE, "rotary_write_kv", opts)
    quant = layer.kv_dtype != "auto"
    inv_stride = d // 2 if inv_freq.dim() == 2 else 0
    _cupy.launch(kernel, (t, -(-(hq + 2 * hk) // _WARPS)), (32 * _WARPS,),
                 (_cupy.ptr(q), _cupy.ptr(k), _cupy.ptr(v), np.int64(q.stride(0)), np.int64(k.stride(0)),
                  np.int64(v.stride(0)), positions, inv_freq, np.int32(inv_stride), slot_mapping, q_out,
                  layer.k, layer.v, layer.k_qp if quant else _cupy.null_ptr(),
                  layer.v_qp if quant else _cupy.null_ptr(), np.int32(hq), np.int32(hk),
                  np.int32(layer.block_size), np.int32(logn_max_pos)))
    return q_out
