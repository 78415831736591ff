"""Rotary position embedding (HF "rotate half" convention) with optional logn query scaling.

inv_freq is [D/2] (static RoPE, incl. Llama-3 scaling folded in) or [T, D/2] (per-token, for dynamic NTK where
the base depends on each sequence's length). logn_max_pos > 0 scales q by log(pos+1)/log(logn_max_pos) for
positions past the training length (Qwen's use_logn_attn).
"""
from __future__ import annotations

import math

import torch


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


def rotary(q, k, positions, inv_freq, logn_max_pos=0):
    return rotary_ref(q, k, positions, inv_freq, logn_max_pos)
