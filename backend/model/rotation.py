"""Hadamard rotation of the head dimension for quantized KV (QuaRot-style), as torch ops in the model code.

With H the orthonormal, symmetric Sylvester-Hadamard matrix of size head_dim (H H^T = I):
  q' = q H, k' = k H after RoPE      -> q' . k' = q . k: the attention scores do not change;
  v' = v H before the cache write    -> attention output o' = o H, un-rotated by o = o' H^T before o_proj.
The cache stores k', v': each token's head vector is spread over all channels, so the few outlier channels of
the keys no longer take most of a per-token int4 range (measured in docs/quantization.md).

Dense weights fold the v rotation into the v rows of the fused qkv weight (W_v' = H W_v per head) and the
un-rotation into the o_proj columns (W_o' = W_o H per head): at run time only q and k are rotated, in one matmul.
W4A16 weights cannot absorb H without requantizing, so there v joins q and k in that matmul and o' is un-rotated
by a second one: at most 2 small matmuls per layer.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..config import KV_ROTATIONS

log = logging.getLogger(__name__)
# auto turns the rotation on for these online-quantized KV dtypes (int8 measured no better: docs/quantization.md)
AUTO_KV_DTYPES = ("int4",)


def hadamard(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix [n, n] (symmetric: H = H^T = H^-1); n must be a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"kv_rotation=hadamard needs head_dim a power of two, got head_dim {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(dtype=dtype, device=device)


def resolve_kv_rotation(mode: str, kv_dtype: str, head_dim: int, static_qparams: bool) -> bool:
    """-> whether the model rotates; errors name the combination that cannot work."""
    if mode not in KV_ROTATIONS:
        raise ValueError(f"kv_rotation must be one of {KV_ROTATIONS}, got {mode!r}")
    if mode == "off":
        return False
    if mode == "auto":
        on = kv_dtype in AUTO_KV_DTYPES and not static_qparams and head_dim & (head_dim - 1) == 0
        if kv_dtype in AUTO_KV_DTYPES and not on:
            log.info("kv_rotation auto: off (%s)", "static kv_qparams" if static_qparams
                     else f"head_dim {head_dim} is not a power of two")
        return on
    if static_qparams:
        raise ValueError("kv_rotation=hadamard cannot be combined with kv_qparams: the static parameters are "
                         "calibrated on unrotated K/V; use kv_rotation=off (or auto) with kv_qparams")
    hadamard(head_dim)                      # validates head_dim
    return True


def fold_v_rows(w: torch.Tensor, q_size: int, kv_size: int, head_dim: int, h: torch.Tensor) -> torch.Tensor:
    """Fused qkv weight [q+2kv, in] or bias [q+2kv] -> a new tensor whose v rows give v H per head."""
    out = w.clone()
    ct = torch.promote_types(w.dtype, torch.float32)                            # fp32 at least
    v = w[q_size + kv_size:].to(ct)
    shape = v.shape
    v = v.reshape(-1, head_dim, *shape[1:])                                     # [Hk, D, in] or [Hk, D]
    v = torch.einsum("ed,hd...->he...", h.t().to(ct), v)                       # (v H)_e = sum_d v_d H[d, e]
    out[q_size + kv_size:] = v.reshape(shape).to(w.dtype)
    return out


def fold_o_cols(w: torch.Tensor, head_dim: int, h: torch.Tensor) -> torch.Tensor:
    """o_proj weight [out, Hq*D] -> W_o' with W_o' o' = W_o o for o' = o H (per head: W_o[:, h] H)."""
    out_f, in_f = w.shape
    ct = torch.promote_types(w.dtype, torch.float32)
    wf = w.to(ct).reshape(out_f, in_f // head_dim, head_dim) @ h.to(ct)
    return wf.reshape(out_f, in_f).to(w.dtype)


def rotate(x: torch.Tensor, h: Optional[torch.Tensor]) -> torch.Tensor:
    """[T, heads, D] @ H in the activations' dtype."""
    return x if h is None else torch.matmul(x, h.to(x.dtype))
