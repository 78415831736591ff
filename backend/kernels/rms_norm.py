"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from . import _cupy

_MAX_VEC = 4        # 16-byte vectors a thread keeps in registers: hidden <= 8 * 4 * 1024

_SOURCE = _cupy.PRELUDE + r"""
#define MAX_VEC 4
// One block per token. h = x (+ residual) in float; res_out = h rounded; out = h * rsqrt(mean(h^2) + eps) * w.
extern "C" __global__ void rms_norm(const u16* __restrict__ x, const u16* __restrict__ res,
                                    const u16* __restrict__ w, u16* __restrict__ out, u16* __restrict__ res_out,
                                    int hidden, float eps, int has_res) {
    PDL_BEGIN();
    __shared__ float partial[32];
    const long long base = (long long)blockIdx.x * hidden;
    const int nvec = hidden / 8;
    float h[MAX_VEC][8];
    uint4 wraw[MAX_VEC];          // the weight is loaded up front, so its latency hides behind the reduction
    float ss = 0.f;
#pragma unroll
    for (int v = 0; v < MAX_VEC; ++v) {
        int c = (threadIdx.x + v * blockDim.x) * 8;
        if (c < nvec * 8) {
            wraw[v] = *reinterpret_cast<const uint4*>(w + c);
            unpack8(*reinterpret_cast<const uint4*>(x + base + c), h[v]);
            if (has_res) {
                float r[8];
                unpack8(*reinterpret_cast<const uint4*>(res + base + c), r);
#pragma unroll
                for (int j = 0; j < 8; ++j) h[v][j] += r[j];
                *reinterpret_cast<uint4*>(res_out + base + c) = pack8(h[v]);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) ss += h[v][j] * h[v][j];
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    ss = lane < nwarps ? partial[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float scale = rsqrtf(ss / hidden + eps);
#pragma unroll
    for (int v = 0; v < MAX_VEC; ++v) {
        int c = (threadIdx.x + v * blockDim.x) * 8;
        if (c < nvec * 8) {
            float wf[8], o[8];
            unpack8(wraw[v], wf);
#pragma unroll
            for (int j = 0; j < 8; ++j) o[j] = h[v][j] * scale * wf[j];
            *reinterpret_cast<uint4*>(out + base + c) = pack8(o);
        }
    }
}
"""


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H]. Returns (norm(x + residual) * weight, x + residual); math in float32."""
    h = x.float() if residual is None else x.float() + residual.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype), h.to(x.dtype)


def _kernel_ok(x, weight, residual) -> bool:
    h = x.shape[-1]
    return (_cupy.available(x) and _cupy.supports_dtype(x) and weight.dtype == x.dtype and h % 8 == 0
            and h <= 8 * _MAX_VEC * 1024 and x.is_contiguous() and weight.is_contiguous()
            and (residual is None or (residual.is_contiguous() and residual.dtype == x.dtype)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    if not _kernel_ok(x, weight, residual):
        return rms_norm_ref(x, weight, eps, residual)
    hidden = x.shape[-1]
    tokens = x.numel() // hidden
    out = torch.empty_like(x)
    res_out = x if residual is None else torch.empty_like(x)
    if tokens:
        threads = min(1024, max(32, -(-(hidden // 8) // (_MAX_VEC * 32)) * 32))
        kernel = _cupy.get_kernel(_SOURCE, "rms_norm", _cupy.dtype_options(x.dtype))
        _cupy.launch(kernel, (tokens,), (threads,),
                     (x, x if residual is None else residual, weight, out, res_out, np.int32(hidden),
                      np.float32(eps), np.int32(residual is not None)))
    return out, res_out
