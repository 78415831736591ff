"""W4A16 linear: int4 weights (AWQ, asymmetric, per-group scales and zeros), 16-bit activations.

Canonical checkpoint format (AutoAWQ "gemm", what `lmtriton lite auto_awq` writes and the loader reads):
  qweight int32 [in, out // 8]      8 output columns a word, nibble i holds column 8*j + AWQ_ORDER[i]
  qzeros  int32 [in // g, out // 8] same packing
  scales  fp16  [in // g, out]
  W[i, o] = (q[i, o] - z[i // g, o]) * s[i // g, o];  y = x @ W
"""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """q: int [rows, cols] values 0..15 -> int32 [rows, cols // 8] in AWQ order."""
    rows, cols = q.shape
    if cols % 8:
        raise ValueError(f"cannot pack {cols} columns: must be a multiple of 8")
    q = q.to(torch.int64).reshape(rows, cols // 8, 8)
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64, device=q.device)
    for i, col in enumerate(AWQ_ORDER):
        packed |= (q[:, :, col] & 0xF) << (4 * i)
    return packed.to(torch.int32) if packed.max() < 2**31 else (packed - (packed >= 2**31) * 2**32).to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols // 8] -> int32 [rows, cols] values 0..15."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*p.shape, 8, dtype=torch.int32, device=p.device)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = ((p >> (4 * i)) & 0xF).to(torch.int32)
    return out.reshape(p.shape[0], -1)


def dequantize_awq(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """-> W [in, out] in scales' dtype (float32 math)."""
    q = unpack_awq(qweight).float()
    z = unpack_awq(qzeros).float().repeat_interleave(group_size, 0)
    s = scales.float().repeat_interleave(group_size, 0)
    return ((q - z) * s).to(scales.dtype)


def w4a16_linear_ref(x: torch.Tensor, qweight, qzeros, scales, group_size: int, bias=None) -> torch.Tensor:
    """x: [T, in] -> [T, out]."""
    w = dequantize_awq(qweight, qzeros, scales, group_size).float()
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
