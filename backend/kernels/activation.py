"""SiLU(gate) * up over the fused gate_up projection output."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import _cupy

# silu(gate) * up in the epilogue of the decode GEMV over the fused [gate | up] weight, at 1-8 tokens, W4A16
# and fp16/bf16 alike: one launch fewer a layer (LMTRITON_FUSE_SILU=1|0). One kernel is 0.7-1.4 us faster than
# the GEMV + silu_and_mul at the 7B shape, +0.4% end to end (docs/benchmarks.md session 7); the engine's GPU suite
# passed with it on (session 8).
FUSE_SILU = _cupy.env_choice("LMTRITON_FUSE_SILU", "1", ("0", "1")) == "1"

_SOURCE = _cupy.PRELUDE + r"""
// x: [T, 2I] = [gate | up], out: [T, I]; one thread per 8 outputs (16-byte loads and stores).
extern "C" __global__ void silu_and_mul(const u16* __restrict__ x, u16* __restrict__ out, int inter, long long n8) {
    PDL_BEGIN();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    long long per_row = inter / 8;
    long long t = i / per_row, c = (i - t * per_row) * 8;
    const u16* row = x + t * 2 * inter;
    float g[8], u[8], o[8];
    unpack8(*reinterpret_cast<const uint4*>(row + c), g);
    unpack8(*reinterpret_cast<const uint4*>(row + inter + c), u);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = g[j] / (1.f + expf(-g[j])) * u[j];
    *reinterpret_cast<uint4*>(out + t * inter + c) = pack8(o);
}
"""


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] = [gate | up] -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    if not (_cupy.available(x) and _cupy.supports_dtype(x) and inter % 8 == 0 and x.is_contiguous()):
        return silu_and_mul_ref(x)
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    n8 = out.numel() // 8
    if n8:
        kernel = _cupy.get_kernel(_SOURCE, "silu_and_mul", _cupy.dtype_options(x.dtype))
        _cupy.launch(kernel, (-(-n8 // 256),), (256,), (x, out, np.int32(inter), np.int64(n8)))
    return out
