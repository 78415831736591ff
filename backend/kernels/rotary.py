"""Rotary position embedding (HF "rotate half" convention) with optional logn query scaling.

inv_freq is [D/2] (static RoPE, incl. Llama-3 scaling folded in) or [T, D/2] (per-token, for dynamic NTK where
the base depends on each sequence's length). logn_max_pos > 0 scales q by log(pos+1)/log(logn_max_pos) for
positions past the training length (Qwen's use_logn_attn).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _cupy

_SOURCE = _cupy.PRELUDE + r"""
// Grid (T, head groups of heads_per_block); block of D/2 threads: thread j computes sin/cos of frequency j once
// and rotates the pair (j, j + D/2) of each head in its group (q heads first, then k heads).
// q, k rows may be strided views of the fused qkv output (row strides q_stride, k_stride in elements).
extern "C" __global__ void rotary(const u16* __restrict__ q, const u16* __restrict__ k, long long q_stride,
                                  long long k_stride, const int* __restrict__ positions,
                                  const float* __restrict__ inv_freq, int inv_stride, u16* __restrict__ q_out,
                                  u16* __restrict__ k_out, int hq, int hk, int head_dim, int logn_max_pos,
                                  int heads_per_block) {
    PDL_BEGIN();
    const int t = blockIdx.x, half = head_dim / 2, j = threadIdx.x;
    if (j >= half) return;
    const float pos = (float)positions[t];
    float qscale = 1.f;
    if (logn_max_pos > 0 && pos + 1.f > (float)logn_max_pos) qscale = logf(pos + 1.f) / logf((float)logn_max_pos);
    float s, c;
    sincosf(pos * inv_freq[(long long)t * inv_stride + j], &s, &c);
    const int h_end = min((int)(blockIdx.y + 1) * heads_per_block, hq + hk);
    for (int head = blockIdx.y * heads_per_block; head < h_end; ++head) {
        const bool is_q = head < hq;
        const u16* src = is_q ? q + t * q_stride + head * head_dim : k + t * k_stride + (head - hq) * head_dim;
        u16* dst = is_q ? q_out + ((long long)t * hq + head) * head_dim
                        : k_out + ((long long)t * hk + head - hq) * head_dim;
        const float x1 = LOADF(src[j]), x2 = LOADF(src[j + half]);
        float o1 = x1 * c - x2 * s, o2 = x2 * c + x1 * s;
        if (is_q) { o1 *= qscale; o2 *= qscale; }
        dst[j] = STOREF(o1);
        dst[j + half] = STOREF(o2);
    }
}
"""


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               logn_max_pos: int = 0):
    """q: [T, Hq, D], k: [T, Hk, D], positions: [T] int -> (q, k) rotated (new tensors)."""
    pos = positions.to(torch.float32)
    freqs = pos[:, None] * (inv_freq if inv_freq.dim() == 2 else inv_freq[None, :])  # [T, D/2]
    cos = torch.cat([freqs.cos(), freqs.cos()], -1)[:, None, :]                         # [T, 1, D]
    sin = torch.cat([freqs.sin(), freqs.sin()], -1)[:, None, :]

    def rot(x):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return xf * cos + torch.cat([-x2, x1], -1) * sin

    qo, ko = rot(q), rot(k)
    if logn_max_pos > 0:
        n = pos + 1
        scale = torch.where(n > logn_max_pos, torch.log(n) / math.log(logn_max_pos), torch.ones_like(n))
        qo = qo * scale[:, None, None]
    return qo.to(q.dtype), ko.to(k.dtype)


def _rows_ok(x: torch.Tensor) -> bool:
    """[T, H, D] with contiguous heads inside each row (a view of the fused qkv output is fine)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           logn_max_pos: int = 0):
    if not (_cupy.available(q) and _cupy.supports_dtype(q) and k.dtype == q.dtype and _rows_ok(q)
            and _rows_ok(k) and inv_freq.dtype == torch.float32 and inv_freq.is_contiguous()
            and positions.dtype == torch.int32):
        return rotary_ref(q, k, positions, inv_freq, logn_max_pos)
    t, hq, d = q.shape
    hk = k.shape[1]
    q_out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(t, hk, d, dtype=k.dtype, device=k.device)
    if t:
        kernel = _cupy.get_kernel(_SOURCE, "rotary", _cupy.dtype_options(q.dtype))
        inv_stride = d // 2 if inv_freq.dim() == 2 else 0
        hpb = 8
        _cupy.launch(kernel, (t, -(-(hq + hk) // hpb)), (max(32, d // 2),),
                     (_cupy.ptr(q), _cupy.ptr(k), np.int64(q.stride(0)), np.int64(k.stride(0)), positions,
                      inv_freq, np.int32(inv_stride), q_out, k_out, np.int32(hq), np.int32(hk), np.int32(d),
                      np.int32(logn_max_pos), np.int32(hpb)))
    return q_out, k_out
