"""The paged KV cache: layout, allocation, and the write (+ online quantization) of new K/V.

Layout, per layer (one tensor for all layers, so a layer is a contiguous view):
  k, v       [num_blocks, num_kv_heads, block_size, D]      model dtype (kv_dtype "auto") or uint8 ("int8")
             [num_blocks, num_kv_heads, block_size, D // 2] uint8, two 4-bit codes a byte, low nibble first ("int4")
  k_qp, v_qp [num_blocks, num_kv_heads, block_size, 2]      float32 (scale, zero) per token per head (quantized only)
Quantization is asymmetric per token per head: code = round((x - min) / scale), scale = (max - min) / qmax,
x ~= code * scale + zero with zero = min.  A token's slot is block_id * block_size + offset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

QMAX = {"int8": 255, "int4": 15}


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


def write_kv(k, v, layer, slot_mapping):
    write_kv_ref(k, v, layer, slot_mapping)
