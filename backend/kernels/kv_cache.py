"""The paged KV cache: layout, allocation, and the write (+ online quantization) of new K/V.

Layout, per layer (one tensor for all layers, so a layer is a contiguous view):
  k, v       [num_blocks, num_kv_heads, block_size, D]      model dtype (kv_dtype "auto") or uint8 ("int8")
             [num_blocks, num_kv_heads, block_size, D // 2] uint8, two 4-bit codes a byte, low nibble first ("int4")
  k_qp, v_qp [num_blocks, num_kv_heads, block_size, 2]      float32 (scale, zero) per token per head (quantized only)
Quantization is asymmetric per token per head: code = round((x - min) / scale), scale = (max - min) / qmax,
x ~= code * scale + zero with zero = min.  A token's slot is block_id * block_size + offset; the GPU write
skips slots < 0 (the padded rows of a CUDA-graph batch).
Why [block, head, token, D]: decode attention reads one (block, kv head) as one contiguous run of
block_size * D elements, and the write of one token touches Hk runs of D elements (cheap).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import _cupy

QMAX = {"int8": 255, "int4": 15}
_KV_KIND = {"auto": 0, "int8": 1, "int4": 2}

_WRITE_SOURCE = _cupy.PRELUDE + r"""
// Block = 2 warps per (token, kv head): warp 0 writes K, warp 1 writes V. Lane l owns elements
// [l * E, l * E + E) with E = HEAD_DIM / 32, so an int4 pair (2i, 2i+1) never straddles lanes.
#define E (HEAD_DIM / 32)
extern "C" __global__ void write_kv(const u16* __restrict__ k, const u16* __restrict__ v, long long k_stride,
                                    long long v_stride, const int* __restrict__ slots, void* __restrict__ k_cache,
                                    void* __restrict__ v_cache, float* __restrict__ k_qp, float* __restrict__ v_qp,
                                    int num_kv_heads, int block_size) {
    PDL_BEGIN();
    const int t = blockIdx.x / num_kv_heads, h = blockIdx.x - t * num_kv_heads;
    const int slot = slots[t];
    if (slot < 0) return;
    const int lane = threadIdx.x & 31, which = threadIdx.x >> 5;
    const u16* src = (which ? v + t * v_stride : k + t * k_stride) + h * HEAD_DIM + lane * E;
    const long long row = ((long long)(slot / block_size) * num_kv_heads + h) * block_size + slot % block_size;
#if KV_KIND == 0
    u16* dst = reinterpret_cast<u16*>(which ? v_cache : k_cache) + row * HEAD_DIM + lane * E;
#pragma unroll
    for (int i = 0; i < E; ++i) dst[i] = src[i];
#else
    float x[E];
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = LOADF(src[i]);
#if KV_KIND == 1
    const float qmax = 255.f;
#else
    const float qmax = 15.f;
#endif
    float lo = x[0], hi = x[0];
#pragma unroll
    for (int i = 1; i < E; ++i) { lo = fminf(lo, x[i]); hi = fmaxf(hi, x[i]); }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    const float scale = fmaxf((hi - lo) * (1.f / qmax), 1e-8f);   // torch divides by a scalar this way
    unsigned c[E];
#pragma unroll
    for (int i = 0; i < E; ++i) c[i] = (unsigned)fminf(fmaxf(rintf((x[i] - lo) / scale), 0.f), qmax);
    u8* base = reinterpret_cast<u8*>(which ? v_cache : k_cache);
#if KV_KIND == 1
    u8* dst = base + row * HEAD_DIM + lane * E;
#pragma unroll
    for (int i = 0; i < E; ++i) dst[i] = (u8)c[i];
#else
    u8* dst = base + row * (HEAD_DIM / 2) + lane * (E / 2);
#pragma unroll
    for (int i = 0; i < E / 2; ++i) dst[i] = (u8)(c[2 * i] | (c[2 * i + 1] << 4));
#endif
    if (lane == 0) {
        float* qp = (which ? v_qp : k_qp) + row * 2;
        qp[0] = scale;
        qp[1] = lo;
    }
#endif
}
"""


@dataclass
class KVLayer:
    k: torch.Tensor
    v: torch.Tensor
    k_qp: Optional[torch.Tensor]
    v_qp: Optional[torch.Tensor]
    kv_dtype: str            # auto | int8 | int4

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 kv_dtype: str, dtype: torch.dtype, device):
        self.kv_dtype = kv_dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        d = head_dim // 2 if kv_dtype == "int4" else head_dim
        store = dtype if kv_dtype == "auto" else torch.uint8
        shape = (num_layers, num_blocks, num_kv_heads, block_size, d)
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        self.k_qp = self.v_qp = None
        if kv_dtype != "auto":
            qshape = (num_layers, num_blocks, num_kv_heads, block_size, 2)
            self.k_qp = torch.zeros(qshape, dtype=torch.float32, device=device)
            self.v_qp = torch.zeros(qshape, dtype=torch.float32, device=device)

    def layer(self, i: int) -> KVLayer:
        return KVLayer(self.k[i], self.v[i], None if self.k_qp is None else self.k_qp[i],
                       None if self.v_qp is None else self.v_qp[i], self.kv_dtype)

    @staticmethod
    def bytes_per_token(num_layers, num_kv_heads, head_dim, kv_dtype, dtype: torch.dtype) -> int:
        per_head = {"auto": head_dim * torch.tensor([], dtype=dtype).element_size(),
                    "int8": head_dim + 8, "int4": head_dim // 2 + 8}[kv_dtype]
        return 2 * num_layers * num_kv_heads * per_head


def quantize_ref(x: torch.Tensor, kv_dtype: str):
    """x: [..., D] -> (codes uint8 [..., D or D/2], qparams float32 [..., 2])."""
    qmax = QMAX[kv_dtype]
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    codes = torch.round((xf - lo) / scale).clamp_(0, qmax).to(torch.uint8)
    if kv_dtype == "int4":
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, torch.cat([scale, lo], -1)


def dequantize_ref(codes: torch.Tensor, qp: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """codes [..., D or D/2] uint8, qp [..., 2] -> float32 [..., D]."""
    if kv_dtype == "int4":
        codes = torch.stack([codes & 0xF, codes >> 4], -1).flatten(-2)
    return codes.float() * qp[..., :1] + qp[..., 1:]


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hk, D] new keys/values; slot_mapping: [T] int (slot = block * block_size + offset)."""
    bs = layer.block_size
    slots = slot_mapping.long()
    blk, off = slots // bs, slots % bs
    if layer.kv_dtype == "auto":
        layer.k[blk, :, off] = k.to(layer.k.dtype)
        layer.v[blk, :, off] = v.to(layer.v.dtype)
        return
    for x, cache, qp in ((k, layer.k, layer.k_qp), (v, layer.v, layer.v_qp)):
        codes, params = quantize_ref(x, layer.kv_dtype)
        cache[blk, :, off] = codes
        qp[blk, :, off] = params


def gather_kv_ref(layer: KVLayer, block_ids: torch.Tensor, length: int):
    """Dequantized K, V of one sequence: [Hk, length, D] float32 each."""
    out = []
    for cache, qp in ((layer.k, layer.k_qp), (layer.v, layer.v_qp)):
        x = cache[block_ids]                                  # [nblk, Hk, bs, D']
        x = x.float() if qp is None else dequantize_ref(x, qp[block_ids], layer.kv_dtype)
        out.append(x.permute(1, 0, 2, 3).reshape(x.shape[1], -1, x.shape[-1])[:, :length])
    return out


def _rows_ok(x: torch.Tensor) -> bool:
    """[T, Hk, D] with contiguous heads inside each row (a view of the fused qkv output is fine)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def write_kv(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """Same contract as write_kv_ref; on the GPU one kernel writes (and quantizes) K and V."""
    t, hk, d = k.shape
    if not (_cupy.available(k) and _cupy.supports_dtype(k) and v.dtype == k.dtype and d in (64, 128)
            and _rows_ok(k) and _rows_ok(v) and slot_mapping.dtype == torch.int32
            and (layer.kv_dtype != "auto" or layer.k.dtype == k.dtype)):
        write_kv_ref(k, v, layer, slot_mapping)
        return
    if t == 0:
        return
    opts = _cupy.dtype_options(k.dtype) + (f"-DHEAD_DIM={d}", f"-DKV_KIND={_KV_KIND[layer.kv_dtype]}")
    kernel = _cupy.get_kernel(_WRITE_SOURCE, "write_kv", opts)
    quant = layer.kv_dtype != "auto"
    _cupy.launch(kernel, (t * hk,), (64,),
                 (_cupy.ptr(k), _cupy.ptr(v), np.int64(k.stride(0)), np.int64(v.stride(0)), slot_mapping,
                  layer.k, layer.v, layer.k_qp if quant else _cupy.null_ptr(),
                  layer.v_qp if quant else _cupy.null_ptr(), np.int32(hk), np.int32(layer.block_size)))
