"""Static (offline-calibrated) KV quantization: per-layer, per-head scale and zero from `lmtriton lite kv_qparams`.

The cache layout is the online one (backend/kernels/kv_cache.py): codes plus (scale, zero) per token per head.
A static write stores the head's calibrated (scale, zero) in every token's slot instead of the token's own min/max,
so every reader (reference attention, GPU kernels) works unchanged. Values outside the calibrated range clamp.

File (JSON): {"format": FORMAT, "num_layers": L, "num_kv_heads": Hk, "k_min": [L][Hk], "k_max", "v_min", "v_max"}.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .kv_cache import QMAX, KVLayer

FORMAT = "lmtriton-kv-qparams-v1"


def load_kv_qparams(path, num_layers: int, num_kv_heads: int, kv_dtype: str, rank: int = 0,
                    tp: int = 1) -> torch.Tensor:
    """-> float32 [L, 2 (k, v), Hk, 2 (scale, zero)] for kv_dtype int8 | int4; errors name what does not fit.

    Under tensor parallelism num_kv_heads is the rank's share: the file holds all tp * num_kv_heads heads and rank
    r takes heads [r * Hk, (r + 1) * Hk), the heads its shard of the K / V projections computes (model/tp.py)."""
    if kv_dtype not in QMAX:
        raise ValueError(f"kv_qparams needs kv_cache_dtype int8 or int4, got {kv_dtype!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"kv_qparams file {p} does not exist (write it with `lmtriton lite kv_qparams`)")
    d = json.loads(p.read_text())
    if d.get("format") != FORMAT:
        raise ValueError(f"{p} is not a {FORMAT} file (format={d.get('format')!r})")
    total = num_kv_heads * tp
    if d.get("num_layers") != num_layers or d.get("num_kv_heads") != total:
        raise ValueError(f"{p} is for {d.get('num_layers')} layers x {d.get('num_kv_heads')} KV heads, the model has "
                         f"{num_layers} x {total}")
    out = torch.empty(num_layers, 2, total, 2)
    for j, name in enumerate(("k", "v")):
        lo = torch.tensor(d[f"{name}_min"], dtype=torch.float32)                  # [L, Hk]
        hi = torch.tensor(d[f"{name}_max"], dtype=torch.float32)
        if lo.shape != (num_layers, total) or hi.shape != lo.shape or bool((hi < lo).any()):
            raise ValueError(f"{p}: {name}_min / {name}_max must be [{num_layers}][{total}] with min <= max")
        out[:, j, :, 0] = ((hi - lo) / QMAX[kv_dtype]).clamp_min(1e-8)
        out[:, j, :, 1] = lo
    return out[:, :, rank * num_kv_heads:(rank + 1) * num_kv_heads].contiguous()


def quantize_static(x: torch.Tensor, params: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """x [T, Hk, D], params [Hk, 2] -> codes uint8 [T, Hk, D or D/2]."""
    scale, zero = params[:, 0, None], params[:, 1, None]                          # [Hk, 1]
    codes = torch.round((x.float() - zero) / scale).clamp_(0, QMAX[kv_dtype]).to(torch.uint8)
    if kv_dtype == "int4":
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes


def write_kv_static(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor,
                    params: torch.Tensor) -> None:
    """k, v [T, Hk, D]; params [2, Hk, 2] (this layer's rows of load_kv_qparams); slots < 0 are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = layer.block_size
    blk, off = slots // bs, slots % bs
    for x, cache, qp, p in ((k[keep], layer.k, layer.k_qp, params[0]), (v[keep], layer.v, layer.v_qp, params[1])):
        cache[blk, :, off] = quantize_static(x, p, layer.kv_dtype)
        qp[blk, :, off] = p.to(qp.dtype).expand(x.shape[0], -1, -1)                # [T, Hk, 2]
